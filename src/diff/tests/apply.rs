//! A small layer applier with containerd's semantics, for tests: `.wh.<name>` removes `<name>`,
//! `.wh..wh..opq` empties its directory (it follows the directory entry, before any child), an
//! entry replaces whatever non-directory (or, for a non-directory entry, directory) is at its
//! path, hardlink entries re-apply their metadata to the shared inode, directory metadata is
//! applied last. Parsing is the `tar` crate's (it honours PAX `path`, `linkpath` and `size`);
//! PAX `uid`, `gid`, `mtime` and `SCHILY.xattr.*` are read here. File content is written sparse.

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

/// Applies the layer in `tar` onto `root`.
pub(crate) fn apply(tar: impl Read, root: &Path) {
    let mut archive = tar::Archive::new(tar);
    let mut dirs: Vec<(PathBuf, Attrs)> = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let raw = entry.path_bytes().into_owned();
        let rel = raw.strip_suffix(b"/").unwrap_or(&raw).to_vec();
        let path = root.join(OsStr::from_bytes(&rel));
        let base = path.file_name().unwrap().as_bytes().to_vec();
        let attrs = attrs(&mut entry);
        if base == b".wh..wh..opq" {
            for child in std::fs::read_dir(path.parent().unwrap()).unwrap() {
                remove_all(&child.unwrap().path());
            }
            continue;
        }
        if let Some(name) = base.strip_prefix(b".wh.") {
            remove_all(&path.parent().unwrap().join(OsStr::from_bytes(name)));
            continue;
        }
        let kind = entry.header().entry_type();
        if let Ok(md) = std::fs::symlink_metadata(&path) {
            if !(md.is_dir() && kind.is_dir()) {
                remove_all(&path);
            }
        }
        if kind.is_dir() {
            if !path.exists() {
                std::fs::create_dir(&path).unwrap();
            }
            dirs.push((path, attrs));
            continue;
        }
        create(&mut entry, &path, root, attrs.mode);
        set_attrs(&path, &attrs);
    }
    for (path, attrs) in dirs.iter().rev() {
        set_attrs(path, attrs);
    }
}

fn create(entry: &mut tar::Entry<impl Read>, path: &Path, root: &Path, mode: u32) {
    let h = entry.header();
    let dev = || {
        rustix::fs::makedev(
            h.device_major().unwrap().unwrap(),
            h.device_minor().unwrap().unwrap(),
        )
    };
    let perm = Mode::from_raw_mode(mode & 0o777);
    match h.entry_type() {
        tar::EntryType::Regular => write_sparse(entry, path),
        tar::EntryType::Symlink => {
            let target = entry.link_name_bytes().unwrap().into_owned();
            std::os::unix::fs::symlink(OsStr::from_bytes(&target), path).unwrap();
        }
        tar::EntryType::Link => {
            let target = entry.link_name_bytes().unwrap().into_owned();
            std::fs::hard_link(root.join(OsStr::from_bytes(&target)), path).unwrap();
        }
        tar::EntryType::Char => {
            rustix::fs::mknodat(CWD, path, FileType::CharacterDevice, perm, dev()).unwrap()
        }
        tar::EntryType::Block => {
            rustix::fs::mknodat(CWD, path, FileType::BlockDevice, perm, dev()).unwrap()
        }
        tar::EntryType::Fifo => rustix::fs::mknodat(CWD, path, FileType::Fifo, perm, 0).unwrap(),
        other => panic!("unexpected entry type {other:?} at {}", path.display()),
    }
}

fn write_sparse(entry: &mut impl Read, path: &Path) {
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

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Header values, overridden by PAX records where present.
fn attrs(entry: &mut tar::Entry<impl Read>) -> Attrs {
    let h = entry.header();
    let mut a = Attrs {
        mode: h.mode().unwrap(),
        uid: h.uid().unwrap() as u32,
        gid: h.gid().unwrap() as u32,
        mtime: h.mtime().unwrap() as i64,
        xattrs: Vec::new(),
    };
    if let Some(pax) = entry.pax_extensions().unwrap() {
        for ext in pax {
            let ext = ext.unwrap();
            let num = || {
                std::str::from_utf8(ext.value_bytes())
                    .unwrap()
                    .parse::<i64>()
                    .unwrap()
            };
            match ext.key_bytes() {
                b"uid" => a.uid = num() as u32,
                b"gid" => a.gid = num() as u32,
                b"mtime" => a.mtime = num(),
                k if k.starts_with(b"SCHILY.xattr.") => a.xattrs.push((
                    k[b"SCHILY.xattr.".len()..].to_vec(),
                    ext.value_bytes().to_vec(),
                )),
                _ => {}
            }
        }
    }
    a
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
