//! The change scenario the fidelity tests share: a lower tree, then every kind of change a
//! container makes, done through the merged overlay mount so overlay itself writes the upperdir.

use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, CWD};
use std::ffi::OsStr;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub(crate) fn p(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

pub(crate) fn write(root: &Path, rel: &[u8], data: &[u8]) {
    std::fs::write(p(root, rel), data).unwrap();
}

pub(crate) fn mkdir(root: &Path, rel: &[u8]) {
    std::fs::create_dir_all(p(root, rel)).unwrap();
}

pub(crate) fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let t = Timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

pub(crate) fn setx(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()).unwrap();
}

pub(crate) fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub(crate) fn mknod(path: &Path, ft: FileType, major: u32, minor: u32) {
    rustix::fs::mknodat(
        CWD,
        path,
        ft,
        Mode::from_raw_mode(0o640),
        rustix::fs::makedev(major, minor),
    )
    .unwrap();
}

/// 3 MiB of non-trivial bytes (several content chunks).
fn blob() -> Vec<u8> {
    (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// The parent's tree.
pub(crate) fn make_lower(l: &Path) {
    for f in [
        &b"mod.txt"[..],
        b"del.txt",
        b"ren_src",
        b"chmod.txt",
        b"chown.txt",
        b"noop.txt",
        b"hl_lower.txt",
    ] {
        write(l, f, b"lower content\n");
    }
    write(l, b"xattr.txt", b"x");
    write(l, b"setuid.bin", b"#!/bin/true\n");
    write(l, b"cap.bin", b"cap");
    write(l, b"sneaky.bin", &blob());
    mkdir(l, b"deldir/b");
    write(l, b"deldir/a", b"a");
    write(l, b"deldir/b/c", b"c");
    mkdir(l, b"repdir/oldsub");
    write(l, b"repdir/old1", b"1");
    write(l, b"repdir/oldsub/x", b"x");
    mkdir(l, b"dir_to_file/sub");
    write(l, b"dir_to_file/sub/f", b"f");
    write(l, b"file_to_dir", b"f");
    std::os::unix::fs::symlink("mod.txt", p(l, b"sym_old")).unwrap();
    mkdir(l, b"keepdir");
    write(l, b"keepdir/untouched", b"u");
    mkdir(l, b"samedir");
    write(l, b"samedir/inplace", b"before");
    set_mtime(&p(l, b"sneaky.bin"), 1_600_000_000, 123_456_789);
}

/// Long, non-UTF-8 and odd names, and a nested path longer than 100 bytes.
pub(crate) fn odd_names(m: &Path) {
    let long_dir: Vec<u8> = [b"d".repeat(60), b"e".repeat(60)].join(&b'/');
    mkdir(m, &long_dir);
    let mut long_file = long_dir.clone();
    long_file.push(b'/');
    long_file.extend(b"f".repeat(200));
    write(m, &long_file, b"long");
    write(m, b"caf\xe9", b"latin1 name");
    write(m, b"new\nline", b"newline");
    write(m, b"with space", b"space");
    let mut target = b"/nowhere/\xff\xfe/".to_vec();
    target.extend(b"t".repeat(300));
    std::os::unix::fs::symlink(OsStr::from_bytes(&target), p(m, b"longlink")).unwrap();
}

/// Every kind of change, made through `m` (the merged mount). `sparse` is the size of a sparse
/// file with one byte of data in its middle.
pub(crate) fn change(m: &Path, sparse: u64) {
    write(m, b"new.txt", b"new\n");
    setx(&p(m, b"new.txt"), "user.test", b"hello");
    write(m, b"mod.txt", b"modified content, longer\n");
    std::fs::remove_file(p(m, b"del.txt")).unwrap();
    std::fs::remove_dir_all(p(m, b"deldir")).unwrap();
    std::fs::remove_dir_all(p(m, b"repdir")).unwrap();
    mkdir(m, b"repdir");
    write(m, b"repdir/fresh", b"fresh");
    std::fs::rename(p(m, b"ren_src"), p(m, b"ren_dst")).unwrap();
    std::os::unix::fs::symlink("new.txt", p(m, b"newlink")).unwrap();
    std::fs::remove_file(p(m, b"sym_old")).unwrap();
    std::os::unix::fs::symlink("chmod.txt", p(m, b"sym_old")).unwrap();
    hardlinks(m);
    owners_and_modes(m);
    setx(&p(m, b"xattr.txt"), "user.bin", &[0, 1, 2, 255, b'\n']);
    // vfs_cap_data v2 with CAP_NET_BIND_SERVICE permitted + effective.
    let cap = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    setx(&p(m, b"cap.bin"), "security.capability", &cap);
    mknod(&p(m, b"fifo"), FileType::Fifo, 0, 0);
    mknod(&p(m, b"chardev"), FileType::CharacterDevice, 1, 3);
    mknod(&p(m, b"blockdev"), FileType::BlockDevice, 7, 200);
    odd_names(m);
    let mut f = std::fs::File::create(p(m, b"sparse.img")).unwrap();
    f.set_len(sparse).unwrap();
    f.seek(SeekFrom::Start(sparse / 2)).unwrap();
    f.write_all(b"x").unwrap();
    drop(f);
    // Rewritten in place: the directory's mtime does not change.
    std::fs::OpenOptions::new()
        .write(true)
        .open(p(m, b"samedir/inplace"))
        .unwrap()
        .write_all(b"AFTER!")
        .unwrap();
    sneaky_edit(m);
    std::fs::remove_dir_all(p(m, b"dir_to_file")).unwrap();
    write(m, b"dir_to_file", b"now a file");
    std::fs::remove_file(p(m, b"file_to_dir")).unwrap();
    mkdir(m, b"file_to_dir");
    write(m, b"file_to_dir/child", b"c");
    write(m, b"old.txt", b"from before 1970");
    set_mtime(&p(m, b"old.txt"), -1000, 5);
    std::os::unix::net::UnixListener::bind(p(m, b"sock")).unwrap();
}

fn hardlinks(m: &Path) {
    write(m, b"hl_a", b"linked");
    std::fs::hard_link(p(m, b"hl_a"), p(m, b"hl_b")).unwrap();
    std::fs::hard_link(p(m, b"hl_lower.txt"), p(m, b"hl_lower2")).unwrap();
}

fn owners_and_modes(m: &Path) {
    chmod(&p(m, b"chmod.txt"), 0o600);
    std::os::unix::fs::chown(p(m, b"chown.txt"), Some(1234), Some(5678)).unwrap();
    write(m, b"bigid.txt", b"big ids");
    std::os::unix::fs::chown(p(m, b"bigid.txt"), Some(3_000_000), Some(3_000_001)).unwrap();
    chmod(&p(m, b"setuid.bin"), 0o4755);
    mkdir(m, b"sgid_dir");
    chmod(&p(m, b"sgid_dir"), 0o2775);
    mkdir(m, b"sticky_dir");
    chmod(&p(m, b"sticky_dir"), 0o1777);
    // Same owner as before: overlay copies the file up, but nothing changed.
    std::os::unix::fs::chown(p(m, b"noop.txt"), Some(0), Some(0)).unwrap();
}

/// One byte changed in place, size kept, mtime put back: only a content compare can tell.
fn sneaky_edit(m: &Path) {
    let path = p(m, b"sneaky.bin");
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(2 << 20)).unwrap();
    f.write_all(b"!").unwrap();
    drop(f);
    set_mtime(&path, 1_600_000_000, 123_456_789);
}
