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

/// Overlay's private xattrs (`trusted.overlay.*`, or `user.overlay.*` on userxattr mounts).
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

#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub st: St,
    /// xattrs that go into the layer (`user.*` without `user.overlay.*`, `security.*`), sorted.
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
        let (a, b) = (&self.st, &o.st);
        a.ftype == b.ftype
            && a.mode == b.mode
            && a.uid == b.uid
            && a.gid == b.gid
            && a.mtime == b.mtime
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
    let meta = finish_meta(st, at, dir, name, rel)?;
    Ok(Some(Node { meta, handle }))
}

/// Metadata of `name` in `dir` without opening it (for lower layers, which we only compare).
pub(crate) fn read_meta_at(
    dir: BorrowedFd,
    name: &[u8],
    st: St,
    rel: &[u8],
) -> Result<Meta, DiffError> {
    finish_meta(st, XattrAt::Name(dir, name), dir, name, rel)
}

/// Metadata of an open directory.
pub(crate) fn read_meta_fd(fd: BorrowedFd, st: St, rel: &[u8]) -> Result<Meta, DiffError> {
    let (xattrs, marks) = read_xattrs(XattrAt::Fd(fd), rel)?;
    Ok(Meta {
        st,
        xattrs,
        marks,
        target: Vec::new(),
    })
}

/// Whether `name` (already lstat'ed as `st`) is an overlay whiteout, reading xattrs only for
/// the zero-size regular files that could be xattr whiteouts.
pub(crate) fn is_whiteout_at(
    dir: BorrowedFd,
    name: &[u8],
    st: &St,
    rel: &[u8],
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
        .any(|n| n == b"trusted.overlay.whiteout" || n == b"user.overlay.whiteout"))
}

fn finish_meta(
    st: St,
    at: XattrAt,
    dir: BorrowedFd,
    name: &[u8],
    rel: &[u8],
) -> Result<Meta, DiffError> {
    let target = if st.ftype == FileType::Symlink {
        fsx::read_link_at(dir, name).map_err(DiffError::io("readlink", rel))?
    } else {
        Vec::new()
    };
    let (xattrs, marks) = if st.ftype == FileType::Socket {
        Default::default()
    } else {
        read_xattrs(at, rel)?
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

/// Splits an object's xattrs into what the layer keeps and overlay's markers.
fn read_xattrs(at: XattrAt, rel: &[u8]) -> Result<(Xattrs, Marks), DiffError> {
    let mut keep = Vec::new();
    let mut marks = Marks::default();
    for name in fsx::xattr_names(at).map_err(DiffError::io("listxattr", rel))? {
        let private = name
            .strip_prefix(b"trusted.overlay.")
            .or_else(|| name.strip_prefix(b"user.overlay."));
        if let Some(key) = private {
            match key {
                b"opaque" => marks.opaque = get(at, &name, rel)?.is_some_and(|v| v == b"y"),
                b"whiteout" => marks.whiteout = true,
                b"redirect" => marks.redirect = true,
                b"metacopy" => marks.metacopy = true,
                _ => {}
            }
        } else if name.starts_with(b"user.") || name.starts_with(b"security.") {
            if let Some(v) = get(at, &name, rel)? {
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
