//! One filesystem object as the diff sees it: its stat, the xattrs that go into the layer,
//! overlay's private markers, and (for symlinks) the target. Reading a node opens directories
//! and regular files (so content and xattrs come from the very inode that was lstat'ed) and
//! never opens anything else: opening a device or a fifo can have side effects.

use super::fsx::{self, hook, St, XattrAt};
use super::{display, DiffError};
use rustix::fs::FileType;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Overlay's private xattrs: `trusted.overlay.*`, or `user.overlay.*` on a `userxattr` mount
/// (and only there: on any other mount the sandbox can set `user.overlay.*` itself, so they are
/// its data, never markers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Marks {
    /// `opaque=y` (not `x`, which only says the directory holds xattr whiteouts).
    pub opaque: bool,
    /// `overlay.whiteout` on a zero-size regular file (the newer "xwhiteout" form).
    pub whiteout: bool,
    pub redirect: bool,
    pub metacopy: bool,
}

/// xattr (name, value) pairs, sorted by name.
pub(crate) type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// What is kept of the xattrs a file has and what is read as overlay's own markers.
#[derive(Debug, Clone)]
pub(crate) struct XattrPolicy {
    /// Overlay's private prefix on this mount: `trusted.overlay.`, or `user.overlay.` with
    /// `userxattr`. Names under it are markers, never data.
    private: &'static [u8],
    /// Names kept: exact, or a prefix when the pattern ends in `*`.
    keep: Vec<Vec<u8>>,
}

/// Kept by default, as Docker and containerd keep `security.capability`; `user.*` is the
/// sandbox's own data. Node-local labels (`security.selinux`, `ima`, `evm`, `SMACK64*`) are
/// dropped unless asked for: restored elsewhere they can deny access or fail appraisal.
const DEFAULT_KEEP: [&str; 2] = ["security.capability", "user.*"];

/// The most xattr bytes (names + values) one file may bring: Go's tar reader (containerd,
/// Docker, umoci) rejects a PAX header over 1 MiB, and this also bounds what one file costs in
/// memory.
pub(crate) const MAX_XATTR_BYTES: usize = 1 << 20;

impl XattrPolicy {
    /// `userxattr`: the mount's option of that name. `extra`: patterns kept on top of the
    /// defaults (`security.selinux`, `security.*`).
    pub fn new(userxattr: bool, extra: &[String]) -> XattrPolicy {
        let keep = DEFAULT_KEEP
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
            .map(|p| p.as_bytes().to_vec())
            .collect();
        XattrPolicy {
            private: private_prefix(userxattr),
            keep,
        }
    }

    /// Reads markers only (lower layers, which are only looked up).
    pub fn markers(&self) -> XattrPolicy {
        XattrPolicy {
            private: self.private,
            keep: Vec::new(),
        }
    }

    pub fn private(&self) -> &'static [u8] {
        self.private
    }

    fn keeps(&self, name: &[u8]) -> bool {
        self.keep.iter().any(|p| match p.strip_suffix(b"*") {
            Some(prefix) => name.starts_with(prefix),
            None => name == &p[..],
        })
    }
}

pub(crate) fn private_prefix(userxattr: bool) -> &'static [u8] {
    if userxattr {
        b"user.overlay."
    } else {
        b"trusted.overlay."
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub st: St,
    /// xattrs that go into the layer (see [`XattrPolicy`]), sorted.
    pub xattrs: Xattrs,
    pub marks: Marks,
    /// Symlink target, byte for byte (empty for other types).
    pub target: Vec<u8>,
}

impl Meta {
    pub fn is_dir(&self) -> bool {
        self.st.ftype == FileType::Directory
    }

    pub fn is_reg(&self) -> bool {
        self.st.ftype == FileType::RegularFile
    }

    /// An overlay whiteout: char device 0:0, or a zero-size file marked `overlay.whiteout`.
    pub fn is_whiteout(&self) -> bool {
        is_whiteout_stat(&self.st) || (self.is_reg() && self.st.size == 0 && self.marks.whiteout)
    }

    /// Equal as far as the layer (and the unpacked tree) can tell, content aside: type, mode,
    /// owner, size, mtime to the nanosecond, xattrs, link target, device numbers.
    pub fn same_attrs(&self, o: &Meta) -> bool {
        self.st.mtime == o.st.mtime && self.same_attrs_but_mtime(o)
    }

    /// `same_attrs` without the mtime: for directories of a snapshotter that copies trees, where
    /// a directory's mtime tells when it was copied, not that the sandbox changed it.
    pub fn same_attrs_but_mtime(&self, o: &Meta) -> bool {
        let (a, b) = (&self.st, &o.st);
        a.ftype == b.ftype
            && a.mode == b.mode
            && a.uid == b.uid
            && a.gid == b.gid
            && (self.is_dir() || a.size == b.size)
            && a.rdev == b.rdev
            && self.xattrs == o.xattrs
            && self.target == o.target
    }
}

/// The cheap half of the whiteout test (no xattr needed).
pub(crate) fn is_whiteout_stat(st: &St) -> bool {
    st.ftype == FileType::CharacterDevice && st.rdev == 0
}

/// An open handle on the node, when its type is one we read through.
pub(crate) enum Handle {
    None,
    File(File),
    Dir(OwnedFd),
}

pub(crate) struct Node {
    pub meta: Meta,
    pub handle: Handle,
}

/// Reads `name` in `dir` (whose relative path is `rel`, for messages). None when it vanished
/// since the directory was listed. A directory or file that turns out to be something else
/// once opened (a symlink swapped in) is `FileChanged`.
pub(crate) fn read_node(
    dir: BorrowedFd,
    name: &[u8],
    rel: &[u8],
    policy: &XattrPolicy,
) -> Result<Option<Node>, DiffError> {
    let Some(st) = fsx::lstat_opt(dir, name).map_err(DiffError::io("lstat", rel))? else {
        return Ok(None);
    };
    hook::fire(hook::Stage::AfterStat, name);
    let opened = match st.ftype {
        FileType::Directory => fsx::open_dir_at(dir, name).map(Handle::Dir),
        FileType::RegularFile => fsx::open_file_at(dir, name).map(Handle::File),
        _ => Ok(Handle::None),
    };
    let handle = match opened {
        Ok(h) => h,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ELOOP | libc::ENOTDIR | libc::ENXIO)
            ) =>
        {
            return Err(changed(
                rel,
                &st,
                &format!("not a {:?} any more ({e})", st.ftype),
            ));
        }
        Err(e) => return Err(DiffError::io("open", rel)(e)),
    };
    let (st, at) = match &handle {
        Handle::File(f) => (checked_fstat(f.as_fd(), &st, rel)?, XattrAt::Fd(f.as_fd())),
        Handle::Dir(d) => (checked_fstat(d.as_fd(), &st, rel)?, XattrAt::Fd(d.as_fd())),
        Handle::None => (st, XattrAt::Name(dir, name)),
    };
    let meta = finish_meta(st, at, dir, name, rel, policy)?;
    Ok(Some(Node { meta, handle }))
}

/// Metadata of `name` in `dir` without opening it (for lower layers, which we only compare).
pub(crate) fn read_meta_at(
    dir: BorrowedFd,
    name: &[u8],
    st: St,
    rel: &[u8],
    policy: &XattrPolicy,
) -> Result<Meta, DiffError> {
    finish_meta(st, XattrAt::Name(dir, name), dir, name, rel, policy)
}

/// Metadata of an open directory.
pub(crate) fn read_meta_fd(
    fd: BorrowedFd,
    st: St,
    rel: &[u8],
    policy: &XattrPolicy,
) -> Result<Meta, DiffError> {
    let (xattrs, marks) = read_xattrs(XattrAt::Fd(fd), rel, policy)?;
    Ok(Meta {
        st,
        xattrs,
        marks,
        target: Vec::new(),
    })
}

/// Whether `name` (already lstat'ed as `st`) is an overlay whiteout, reading xattrs only for
/// the zero-size regular files that could be xattr whiteouts (`private` is the mount's prefix).
pub(crate) fn is_whiteout_at(
    dir: BorrowedFd,
    name: &[u8],
    st: &St,
    rel: &[u8],
    private: &[u8],
) -> Result<bool, DiffError> {
    if is_whiteout_stat(st) {
        return Ok(true);
    }
    if st.ftype != FileType::RegularFile || st.size != 0 {
        return Ok(false);
    }
    let names =
        fsx::xattr_names(XattrAt::Name(dir, name)).map_err(DiffError::io("listxattr", rel))?;
    Ok(names
        .iter()
        .any(|n| n.strip_prefix(private) == Some(&b"whiteout"[..])))
}

fn finish_meta(
    st: St,
    at: XattrAt,
    dir: BorrowedFd,
    name: &[u8],
    rel: &[u8],
    policy: &XattrPolicy,
) -> Result<Meta, DiffError> {
    let target = if st.ftype == FileType::Symlink {
        fsx::read_link_at(dir, name).map_err(DiffError::io("readlink", rel))?
    } else {
        Vec::new()
    };
    let (xattrs, marks) = if st.ftype == FileType::Socket {
        Default::default()
    } else {
        read_xattrs(at, rel, policy)?
    };
    Ok(Meta {
        st,
        xattrs,
        marks,
        target,
    })
}

/// The fstat of an opened object, which must be the inode lstat saw.
fn checked_fstat(fd: BorrowedFd, expected: &St, rel: &[u8]) -> Result<St, DiffError> {
    let st = fsx::fstat(fd).map_err(DiffError::io("fstat", rel))?;
    if !st.same_object(expected) {
        return Err(changed(
            rel,
            expected,
            &format!("inode {} ({:?})", st.ino, st.ftype),
        ));
    }
    Ok(st)
}

fn changed(rel: &[u8], expected: &St, found: &str) -> DiffError {
    DiffError::FileChanged {
        path: display(rel),
        expected: format!("inode {} ({:?})", expected.ino, expected.ftype),
        found: found.to_string(),
    }
}

/// Splits an object's xattrs into what the layer keeps and overlay's markers. Values are read
/// only for kept names, and no more than [`MAX_XATTR_BYTES`] of them.
fn read_xattrs(
    at: XattrAt,
    rel: &[u8],
    policy: &XattrPolicy,
) -> Result<(Xattrs, Marks), DiffError> {
    let mut keep = Vec::new();
    let mut marks = Marks::default();
    let mut bytes = 0usize;
    for name in fsx::xattr_names(at).map_err(DiffError::io("listxattr", rel))? {
        if let Some(key) = name.strip_prefix(policy.private) {
            match key {
                b"opaque" => marks.opaque = get(at, &name, rel)?.is_some_and(|v| v == b"y"),
                b"whiteout" => marks.whiteout = true,
                b"redirect" => marks.redirect = true,
                b"metacopy" => marks.metacopy = true,
                _ => {}
            }
        } else if policy.keeps(&name) {
            if let Some(v) = get(at, &name, rel)? {
                bytes += name.len() + v.len();
                if bytes > MAX_XATTR_BYTES {
                    return Err(DiffError::HeaderTooLarge {
                        path: display(rel),
                        what: "extended attributes",
                        bytes: bytes as u64,
                        limit: MAX_XATTR_BYTES as u64,
                    });
                }
                keep.push((name, v));
            }
        }
    }
    keep.sort();
    Ok((keep, marks))
}

fn get(at: XattrAt, name: &[u8], rel: &[u8]) -> Result<Option<Vec<u8>>, DiffError> {
    fsx::xattr_get(at, name).map_err(DiffError::io("getxattr", rel))
}
