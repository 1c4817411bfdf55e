//! A small layer applier with containerd's semantics, for tests: `.wh.<name>` removes `<name>`,
//! `.wh..wh..opq` empties its directory (it follows the directory entry, before any child), an
//! entry replaces whatever non-directory (or, for a non-directory entry, directory) is at its
//! path, hardlink entries re-apply their metadata to the shared inode, directory metadata is
//! applied last. Parsing is `rawtar`'s. File content is written sparse.

use super::rawtar::{self, Entry};
use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, CWD};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

struct Attrs {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Attrs {
    fn of(e: &Entry) -> Attrs {
        Attrs {
            mode: e.mode,
            uid: e.uid as u32,
            gid: e.gid as u32,
            mtime: e.mtime,
            xattrs: e.xattrs.clone(),
        }
    }
}

/// Applies the layer in `tar` onto `root`.
pub(crate) fn apply(tar: impl Read, root: &Path) {
    let mut dirs: Vec<(PathBuf, Attrs)> = Vec::new();
    rawtar::for_each(tar, |e, content| {
        let rel = e.path.strip_suffix(b"/").unwrap_or(&e.path);
        let path = root.join(OsStr::from_bytes(rel));
        let base = path.file_name().unwrap().as_bytes().to_vec();
        if base == b".wh..wh..opq" {
            for child in std::fs::read_dir(path.parent().unwrap()).unwrap() {
                remove_all(&child.unwrap().path());
            }
            return;
        }
        if let Some(name) = base.strip_prefix(b".wh.") {
            remove_all(&path.parent().unwrap().join(OsStr::from_bytes(name)));
            return;
        }
        if let Ok(md) = std::fs::symlink_metadata(&path) {
            if !(md.is_dir() && e.kind == b'5') {
                remove_all(&path);
            }
        }
        if e.kind == b'5' {
            if !path.exists() {
                std::fs::create_dir(&path).unwrap();
            }
            dirs.push((path, Attrs::of(e)));
            return;
        }
        create(e, content, &path, root);
        set_attrs(&path, &Attrs::of(e));
    });
    for (path, attrs) in dirs.iter().rev() {
        set_attrs(path, attrs);
    }
}

fn create(e: &Entry, content: &mut dyn Read, path: &Path, root: &Path) {
    let dev = rustix::fs::makedev(e.dev.0, e.dev.1);
    let perm = Mode::from_raw_mode(e.mode & 0o777);
    match e.kind {
        b'0' => write_sparse(content, path),
        b'2' => std::os::unix::fs::symlink(OsStr::from_bytes(&e.link), path).unwrap(),
        b'1' => std::fs::hard_link(root.join(OsStr::from_bytes(&e.link)), path).unwrap(),
        b'3' => rustix::fs::mknodat(CWD, path, FileType::CharacterDevice, perm, dev).unwrap(),
        b'4' => rustix::fs::mknodat(CWD, path, FileType::BlockDevice, perm, dev).unwrap(),
        b'6' => rustix::fs::mknodat(CWD, path, FileType::Fifo, perm, 0).unwrap(),
        other => panic!(
            "unexpected entry type {:?} at {}",
            other as char,
            path.display()
        ),
    }
}

fn write_sparse(entry: &mut dyn Read, path: &Path) {
    let mut f = File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let zero = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = read_full(entry, &mut buf);
        if n == 0 {
            break;
        }
        if buf[..n] == zero[..n] {
            f.seek(SeekFrom::Current(n as i64)).unwrap();
        } else {
            f.write_all(&buf[..n]).unwrap();
        }
        len += n as u64;
    }
    f.set_len(len).unwrap();
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Owner, then mode (chown clears setuid), xattrs, and mtime last; never through a symlink.
fn set_attrs(path: &Path, a: &Attrs) {
    std::os::unix::fs::lchown(path, Some(a.uid), Some(a.gid)).unwrap();
    let is_link = std::fs::symlink_metadata(path)
        .unwrap()
        .file_type()
        .is_symlink();
    if !is_link {
        rustix::fs::chmod(path, Mode::from_raw_mode(a.mode)).unwrap();
    }
    for (name, value) in &a.xattrs {
        rustix::fs::lsetxattr(
            path,
            OsStr::from_bytes(name),
            value,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
    let t = Timespec {
        tv_sec: a.mtime,
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: t,
        last_modification: t,
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

fn remove_all(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(path).unwrap(),
        Ok(_) => std::fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}
