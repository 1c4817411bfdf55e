//! A tree's observable state, for "the unpacked image equals the container's rootfs" checks:
//! per path its type, mode, owner, mtime (seconds: what a layer carries), size, content digest,
//! symlink target, device numbers, kept xattrs and hardlink group. Sockets are left out (a layer
//! cannot carry them).

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    pub content: Option<Vec<u8>>,
    pub target: Vec<u8>,
    pub rdev: u64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The smallest path sharing this inode, when nlink > 1.
    pub link_group: Option<Vec<u8>>,
}

pub(crate) type Tree = BTreeMap<Vec<u8>, Node>;

/// Everything below `root` (root itself excluded).
pub(crate) fn snapshot(root: &Path) -> Tree {
    let mut tree = Tree::new();
    let mut inodes: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    walk(root, b"", &mut tree, &mut inodes);
    for paths in inodes.values().filter(|p| p.len() > 1) {
        let first = paths.iter().min().unwrap().clone();
        for p in paths {
            tree.get_mut(p).unwrap().link_group = Some(first.clone());
        }
    }
    tree
}

fn walk(dir: &Path, rel: &[u8], tree: &mut Tree, inodes: &mut HashMap<(u64, u64), Vec<Vec<u8>>>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let path = e.path();
        let mut r = rel.to_vec();
        if !r.is_empty() {
            r.push(b'/');
        }
        r.extend_from_slice(e.file_name().as_bytes());
        let md = std::fs::symlink_metadata(&path).unwrap();
        let ft = md.file_type();
        if ft.is_socket() {
            continue;
        }
        let kind = kind_of(&ft);
        if !ft.is_dir() && md.nlink() > 1 {
            inodes
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(r.clone());
        }
        let node = Node {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            size: if ft.is_file() { md.size() } else { 0 },
            content: ft.is_file().then(|| content_digest(&path, md.size())),
            target: if ft.is_symlink() {
                std::fs::read_link(&path)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            } else {
                vec![]
            },
            rdev: if ft.is_char_device() || ft.is_block_device() {
                md.rdev()
            } else {
                0
            },
            xattrs: kept_xattrs(&path),
            link_group: None,
        };
        tree.insert(r.clone(), node);
        if ft.is_dir() {
            walk(&path, &r, tree, inodes);
        }
    }
}

fn kind_of(ft: &std::fs::FileType) -> char {
    match () {
        _ if ft.is_dir() => 'd',
        _ if ft.is_symlink() => 'l',
        _ if ft.is_file() => 'f',
        _ if ft.is_char_device() => 'c',
        _ if ft.is_block_device() => 'b',
        _ => 'p',
    }
}

/// A digest of the non-zero 4 KiB blocks and their offsets, reading only the data extents: two
/// files of equal size get the same digest exactly when their bytes are equal, and a 1 GiB
/// sparse file costs what its data costs.
pub(crate) fn content_digest(path: &Path, size: u64) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let zero = [0u8; 4096];
    while pos < size {
        let fd = std::os::fd::AsFd::as_fd(&f);
        let data = match rustix::fs::seek(fd, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => panic!("SEEK_DATA {}: {e}", path.display()),
        };
        let hole = rustix::fs::seek(fd, rustix::fs::SeekFrom::Hole(data)).unwrap();
        f.seek(SeekFrom::Start(data)).unwrap();
        let mut off = data;
        while off < hole {
            let want = buf.len().min((hole - off) as usize);
            f.read_exact(&mut buf[..want]).unwrap();
            for (i, block) in buf[..want].chunks(4096).enumerate() {
                if block != &zero[..block.len()] {
                    h.update((off + (i * 4096) as u64).to_le_bytes());
                    h.update(block);
                }
            }
            off += want as u64;
        }
        pos = hole;
    }
    h.finalize().to_vec()
}

/// `user.*` and `security.capability`: what a layer keeps by default. (A merged overlay view
/// hides overlay's own markers; a sandbox's `user.overlay.*` on a mount without `userxattr` is
/// its data, shown and kept.)
pub(crate) fn kept_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(path, &mut buf[..]).unwrap();
    let names: Vec<Vec<u8>> = buf[..n]
        .split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    for name in names {
        let keep = name.starts_with(b"user.") || name == b"security.capability";
        if keep {
            let mut v = vec![0u8; 65536];
            let n = rustix::fs::lgetxattr(path, std::ffi::OsStr::from_bytes(&name), &mut v[..])
                .unwrap();
            v.truncate(n);
            out.insert(name, v);
        }
    }
    out
}

/// Panics with a readable list of every difference.
pub(crate) fn assert_same(expected: &Tree, actual: &Tree, what: &str) {
    let mut diffs = Vec::new();
    for (p, e) in expected {
        match actual.get(p) {
            None => diffs.push(format!("missing {:?}: {e:?}", String::from_utf8_lossy(p))),
            Some(a) if a != e => diffs.push(format!(
                "differs {:?}:\n   want {e:?}\n   got  {a:?}",
                String::from_utf8_lossy(p)
            )),
            _ => {}
        }
    }
    for (p, a) in actual {
        if !expected.contains_key(p) {
            diffs.push(format!("extra {:?}: {a:?}", String::from_utf8_lossy(p)));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
