//! Directory-fd filesystem helpers for a hostile tree: every lookup is one name relative to an
//! open directory, never a path string re-resolved from the root, and nothing follows a
//! symlink. A container may rewrite its tree while we read it (or before we paused it); the
//! worst it can achieve is an error, never a read outside the tree.

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The subset of `struct stat` the diff looks at, in portable types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct St {
    pub ftype: FileType,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    pub rdev: u64,
    /// Bytes allocated on disk (`st_blocks` × 512): far below `size` for a sparse file.
    pub allocated: u64,
}

impl St {
    // Field types differ between architectures, hence the casts.
    #[allow(clippy::unnecessary_cast)]
    fn from(s: &rfs::Stat) -> St {
        St {
            ftype: FileType::from_raw_mode(s.st_mode),
            mode: s.st_mode & 0o7777,
            uid: s.st_uid,
            gid: s.st_gid,
            size: u64::try_from(s.st_size).unwrap_or(0),
            mtime: (s.st_mtime as i64, s.st_mtime_nsec as u32),
            ctime: (s.st_ctime as i64, s.st_ctime_nsec as u32),
            dev: s.st_dev,
            ino: s.st_ino,
            nlink: s.st_nlink as u64,
            rdev: s.st_rdev,
            allocated: u64::try_from(s.st_blocks).unwrap_or(0).saturating_mul(512),
        }
    }

    /// Same inode and same type: what an open fd must match its lstat to be trusted.
    pub fn same_object(&self, other: &St) -> bool {
        self.dev == other.dev && self.ino == other.ino && self.ftype == other.ftype
    }
}

fn name_arg(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}

/// Opens a root given by the caller (a host path, so following its symlinks is fine).
pub(crate) fn open_root(path: &Path) -> io::Result<OwnedFd> {
    Ok(rfs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// lstat that maps "not there" (ENOENT, or ENOTDIR for a vanished parent) to None.
pub(crate) fn lstat_opt(dir: BorrowedFd, name: &[u8]) -> io::Result<Option<St>> {
    match rfs::statat(dir, name_arg(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(s) => Ok(Some(St::from(&s))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn fstat(fd: BorrowedFd) -> io::Result<St> {
    Ok(St::from(&rfs::fstat(fd)?))
}

/// Opens a subdirectory; a symlink (or anything swapped in for the directory) fails.
pub(crate) fn open_dir_at(dir: BorrowedFd, name: &[u8]) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rfs::openat(dir, name_arg(name), flags, Mode::empty())?)
}

/// Opens a regular file for reading without following a symlink and without ever opening
/// anything else: the name is first opened with `O_PATH` (which opens nothing: a fifo does not
/// block, a device driver is not called), its type checked with fstat, and only a regular file
/// is reopened for reading through `/proc/self/fd`, which reaches that very inode whatever the
/// name points to by then. Anything else is `ENXIO` ("not a regular file any more").
pub(crate) fn open_file_at(dir: BorrowedFd, name: &[u8]) -> io::Result<File> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let path = rfs::openat(dir, name_arg(name), flags, Mode::empty())?;
    if fstat(path.as_fd())?.ftype != FileType::RegularFile {
        return Err(io::Error::from_raw_os_error(libc::ENXIO));
    }
    let proc = format!("/proc/self/fd/{}", path.as_raw_fd());
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    // Not NotFound: a missing /proc must fail the read, not pass for a file that vanished.
    let file = rfs::open(proc.as_str(), flags, Mode::empty())
        .map_err(|e| io::Error::other(format!("reopening through {proc}: {e}")))?;
    Ok(File::from(file))
}

/// The names in a directory, without `.` and `..`, sorted by bytes.
pub(crate) fn list_names(dir: BorrowedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for entry in rfs::Dir::read_from(dir)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// A symlink's target, byte for byte.
pub(crate) fn read_link_at(dir: BorrowedFd, name: &[u8]) -> io::Result<Vec<u8>> {
    Ok(rfs::readlinkat(dir, name_arg(name), Vec::new())?.into_bytes())
}

/// Where xattrs are read from: an open fd (regular files, directories), or a name in a
/// directory for objects we must not open (symlinks, devices, fifos), reached through
/// `/proc/self/fd/<dirfd>/<name>` with the `l*` calls so the name itself is never followed.
#[derive(Clone, Copy)]
pub(crate) enum XattrAt<'a> {
    Fd(BorrowedFd<'a>),
    Name(BorrowedFd<'a>, &'a [u8]),
}

fn proc_path(dir: BorrowedFd, name: &[u8]) -> Vec<u8> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    p
}

/// All xattr names of an object.
pub(crate) fn xattr_names(at: XattrAt) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 1024];
    loop {
        let r = match at {
            XattrAt::Fd(fd) => rfs::flistxattr(fd, &mut buf[..]),
            XattrAt::Name(dir, name) => {
                rfs::llistxattr(name_arg(&proc_path(dir, name)), &mut buf[..])
            }
        };
        match r {
            Ok(n) => {
                return Ok(buf[..n]
                    .split(|&c| c == 0)
                    .filter(|s| !s.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect())
            }
            Err(rustix::io::Errno::RANGE) => buf.resize(buf.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// One xattr value, or None when it vanished or is unreadable as absent.
pub(crate) fn xattr_get(at: XattrAt, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 256];
    loop {
        let r = match at {
            XattrAt::Fd(fd) => rfs::fgetxattr(fd, name_arg(name), &mut buf[..]),
            XattrAt::Name(dir, n) => {
                rfs::lgetxattr(name_arg(&proc_path(dir, n)), name_arg(name), &mut buf[..])
            }
        };
        match r {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(rustix::io::Errno::RANGE) => {
                buf.resize(buf.len().max(64 * 1024).saturating_mul(4), 0)
            }
            Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads `len` bytes of two files and says whether they are equal; a short read is "different".
pub(crate) fn same_content(
    a: &mut File,
    b: &mut File,
    len: u64,
    buf: &mut Vec<u8>,
) -> io::Result<bool> {
    use std::io::Read;
    let half = 1 << 20;
    buf.resize(2 * half, 0);
    let (ba, bb) = buf.split_at_mut(half);
    let mut left = len;
    while left > 0 {
        let want = half.min(usize::try_from(left).unwrap_or(usize::MAX));
        let (x, y) = (&mut ba[..want], &mut bb[..want]);
        if a.read_exact(x).and_then(|_| b.read_exact(y)).is_err() || x != y {
            return Ok(false);
        }
        left -= want as u64;
    }
    Ok(true)
}

/// Deterministic fault injection for tests: a thread-local callback fired at named points.
#[cfg(test)]
pub(crate) mod hook {
    use std::cell::RefCell;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Stage {
        /// After an entry was lstat'ed, before it is opened.
        AfterStat,
        /// After a regular file was opened and fstat'ed, before its content is read.
        BeforeRead,
        /// Before two files' bytes are compared (a no-op copy-up check, or the walk).
        Compare,
    }

    type Hook = Box<dyn FnMut(Stage, &[u8])>;
    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    #[cfg_attr(not(feature = "lab"), allow(dead_code))] // set by the overlay tests only
    pub(crate) fn set(f: Option<Hook>) {
        HOOK.with(|h| *h.borrow_mut() = f);
    }

    pub(crate) fn fire(stage: Stage, name: &[u8]) {
        HOOK.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f(stage, name)
            }
        });
    }
}

#[cfg(not(test))]
pub(crate) mod hook {
    #[derive(Clone, Copy)]
    pub(crate) enum Stage {
        AfterStat,
        BeforeRead,
        /// Before two files' bytes are compared (a no-op copy-up check, or the walk).
        Compare,
    }
    #[inline(always)]
    pub(crate) fn fire(_: Stage, _: &[u8]) {}
}
