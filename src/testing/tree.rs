//! The tree oracle of both test suites (the unit tests' `crate::testing::tree`; the integration
//! tests include this file as their `tree` module): two directory trees, walked without following
//! symlinks, compared attribute by attribute, one readable line per difference, so a failing test
//! prints exactly what a layer or an image got wrong.
//!
//! Compared for every path below the root (the root's own attributes belong to the mount point):
//! type, permission bits with setuid/setgid/sticky, owner, size and content of regular files,
//! symlink targets, device numbers, and — unless a test opts out in [`CompareOpts`] — mtimes
//! (whole seconds: what a layer carries), extended attributes (never `trusted.*`: overlayfs' own),
//! which paths share an inode, and sockets.
//!
//! A tree can be snapshotted ([`snapshot`]) and compared later ([`differences`]), after the
//! directory changed or went away.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// What to leave out of a comparison. [`Default`] compares everything.
#[derive(Clone, Debug)]
pub struct CompareOpts {
    /// Paths (as seen from the tree's root, e.g. "/proc") skipped with everything below them.
    pub ignore: Vec<String>,
    /// Compare mtimes (whole seconds).
    pub mtime: bool,
    /// Compare extended attributes (`trusted.*` never are).
    pub xattrs: bool,
    /// Compare which paths share an inode.
    pub hardlinks: bool,
    /// Compare sockets; when false they are left out of both trees.
    pub sockets: bool,
}

impl Default for CompareOpts {
    fn default() -> CompareOpts {
        CompareOpts {
            ignore: Vec::new(),
            mtime: true,
            xattrs: true,
            hardlinks: true,
            sockets: true,
        }
    }
}

impl CompareOpts {
    /// A container's rootfs against an image: without what no image holds (the kernel's filesystems
    /// and runc's bind mounts), and without mtimes, xattrs and hardlinks, which callers that check
    /// them turn back on.
    pub fn container_rootfs() -> CompareOpts {
        CompareOpts {
            ignore: [
                "/proc",
                "/sys",
                "/dev",
                "/etc/hosts",
                "/etc/resolv.conf",
                "/etc/hostname",
                "/run",
            ]
            .map(String::from)
            .to_vec(),
            mtime: false,
            xattrs: false,
            hardlinks: false,
            ..CompareOpts::default()
        }
    }

    /// A merged overlay tree against its layer unpacked: everything but sockets, which a layer
    /// cannot carry.
    pub fn layer() -> CompareOpts {
        CompareOpts {
            sockets: false,
            ..CompareOpts::default()
        }
    }

    pub fn ignoring(mut self, path: &str) -> CompareOpts {
        self.ignore.push(path.to_string());
        self
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::CharDev => "char device",
            Kind::BlockDev => "block device",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        })
    }
}

/// One path's observable state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits with setuid/setgid/sticky (mode & 0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files only (0 otherwise).
    pub size: u64,
    pub mtime: i64,
    /// (major, minor) of a device; (0, 0) otherwise.
    pub rdev: (u32, u32),
    /// Regular files: [`content_digest`].
    pub content: Option<Vec<u8>>,
    pub target: Option<Vec<u8>>,
    /// All but `trusted.*` (empty when the options do not compare xattrs).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The other paths sharing this inode, sorted (directories: none).
    pub links: Vec<Vec<u8>>,
}

/// Every path below a root ("etc/passwd", no leading slash) and its state.
pub type Tree = BTreeMap<Vec<u8>, Entry>;

/// Everything below `root` (root itself excluded), less what `opts` leaves out.
pub fn snapshot(root: &Path, opts: &CompareOpts) -> Tree {
    let mut tree = Tree::new();
    let mut inodes: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    walk(root, b"", opts, &mut tree, &mut inodes);
    for paths in inodes.values().filter(|p| p.len() > 1) {
        for p in paths {
            let mut others: Vec<Vec<u8>> = paths.iter().filter(|o| *o != p).cloned().collect();
            others.sort();
            tree.get_mut(p).unwrap().links = others;
        }
    }
    tree
}

type Inodes = HashMap<(u64, u64), Vec<Vec<u8>>>;

fn walk(dir: &Path, rel: &[u8], opts: &CompareOpts, tree: &mut Tree, inodes: &mut Inodes) {
    let rd =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading dir {}: {e}", dir.display()));
    for e in rd {
        let e = e.unwrap_or_else(|e| panic!("reading dir {}: {e}", dir.display()));
        let path = e.path();
        let mut r = rel.to_vec();
        if !r.is_empty() {
            r.push(b'/');
        }
        r.extend_from_slice(e.file_name().as_bytes());
        if ignored(&r, opts) {
            continue;
        }
        let md = std::fs::symlink_metadata(&path)
            .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
        let kind = kind_of(&md.file_type());
        if kind == Kind::Socket && !opts.sockets {
            continue;
        }
        if kind != Kind::Dir && md.nlink() > 1 {
            inodes
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(r.clone());
        }
        tree.insert(r.clone(), entry(&path, &md, kind, opts));
        if kind == Kind::Dir {
            walk(&path, &r, opts, tree, inodes);
        }
    }
}

fn entry(path: &Path, md: &std::fs::Metadata, kind: Kind, opts: &CompareOpts) -> Entry {
    let device = matches!(kind, Kind::CharDev | Kind::BlockDev);
    let rdev = md.rdev();
    Entry {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: if kind == Kind::File { md.size() } else { 0 },
        mtime: md.mtime(),
        rdev: if device {
            (libc::major(rdev), libc::minor(rdev))
        } else {
            (0, 0)
        },
        content: (kind == Kind::File).then(|| content_digest(path, md.size())),
        target: (kind == Kind::Symlink).then(|| {
            let t = std::fs::read_link(path)
                .unwrap_or_else(|e| panic!("readlink {}: {e}", path.display()));
            t.as_os_str().as_bytes().to_vec()
        }),
        xattrs: if opts.xattrs {
            raw_xattrs(path)
        } else {
            BTreeMap::new()
        },
        links: Vec::new(),
    }
}

fn kind_of(ft: &std::fs::FileType) -> Kind {
    match () {
        _ if ft.is_symlink() => Kind::Symlink,
        _ if ft.is_dir() => Kind::Dir,
        _ if ft.is_file() => Kind::File,
        _ if ft.is_char_device() => Kind::CharDev,
        _ if ft.is_block_device() => Kind::BlockDev,
        _ if ft.is_fifo() => Kind::Fifo,
        _ => Kind::Socket,
    }
}

/// "/d/sub" skips "d/sub" and "d/sub/x", not "d/subway".
fn ignored(rel: &[u8], opts: &CompareOpts) -> bool {
    opts.ignore.iter().any(|ig| {
        let ig = ig.trim_start_matches('/').as_bytes();
        rel == ig || (rel.starts_with(ig) && rel.get(ig.len()) == Some(&b'/'))
    })
}

/// One line per difference between `a` and `b`, sorted by path; empty when the trees match.
pub fn compare_trees(a: &Path, b: &Path, opts: &CompareOpts) -> Vec<String> {
    differences(&snapshot(a, opts), &snapshot(b, opts), opts)
}

/// One line per difference between two snapshots, sorted by path ("/d/file: mode 0644 vs 0600").
pub fn differences(a: &Tree, b: &Tree, opts: &CompareOpts) -> Vec<String> {
    let mut diffs = Vec::new();
    let paths: BTreeSet<&Vec<u8>> = a.keys().chain(b.keys()).collect();
    for p in paths {
        let shown = show_path(p);
        match (a.get(p), b.get(p)) {
            (Some(ea), None) => diffs.push(format!("{shown}: only in a ({})", ea.kind)),
            (None, Some(eb)) => diffs.push(format!("{shown}: only in b ({})", eb.kind)),
            (Some(ea), Some(eb)) => compare_entry(&shown, ea, eb, opts, &mut diffs),
            (None, None) => unreachable!(),
        }
    }
    diffs
}

fn compare_entry(p: &str, a: &Entry, b: &Entry, opts: &CompareOpts, diffs: &mut Vec<String>) {
    if a.kind != b.kind {
        diffs.push(format!("{p}: type {} vs {}", a.kind, b.kind));
        return;
    }
    let mut differ = |what: &str, va: String, vb: String| {
        if va != vb {
            diffs.push(format!("{p}: {what} {va} vs {vb}"));
        }
    };
    differ("mode", format!("{:04o}", a.mode), format!("{:04o}", b.mode));
    differ("uid", a.uid.to_string(), b.uid.to_string());
    differ("gid", a.gid.to_string(), b.gid.to_string());
    if a.size != b.size {
        differ("size", a.size.to_string(), b.size.to_string());
    } else if a.content != b.content {
        differ(
            "content differs: data digest",
            short(&a.content),
            short(&b.content),
        );
    }
    let target = |e: &Entry| {
        format!(
            "{:?}",
            String::from_utf8_lossy(e.target.as_deref().unwrap_or_default())
        )
    };
    differ("symlink target", target(a), target(b));
    let dev = |e: &Entry| format!("{}:{}", e.rdev.0, e.rdev.1);
    differ("device", dev(a), dev(b));
    if opts.mtime {
        differ("mtime", a.mtime.to_string(), b.mtime.to_string());
    }
    if opts.hardlinks {
        differ(
            "hardlinked with",
            show_group(&a.links),
            show_group(&b.links),
        );
    }
    if opts.xattrs {
        let names: BTreeSet<&Vec<u8>> = a.xattrs.keys().chain(b.xattrs.keys()).collect();
        for n in names {
            let what = format!("xattr {}", String::from_utf8_lossy(n));
            differ(
                &what,
                show_xattr(a.xattrs.get(n)),
                show_xattr(b.xattrs.get(n)),
            );
        }
    }
}

fn show_path(p: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(p))
}

fn short(digest: &Option<Vec<u8>>) -> String {
    digest
        .as_deref()
        .map_or_else(|| "none".into(), |d| hex::encode(&d[..d.len().min(6)]))
}

fn show_xattr(v: Option<&Vec<u8>>) -> String {
    match v {
        None => "absent".into(),
        Some(v) => format!("{:?}", String::from_utf8_lossy(v)),
    }
}

fn show_group(g: &[Vec<u8>]) -> String {
    let names: Vec<String> = g.iter().map(|p| show_path(p)).collect();
    format!("[{}]", names.join(", "))
}

/// Panics with every difference, one per line, unless the trees match.
pub fn assert_same_trees(a: &Path, b: &Path, opts: &CompareOpts) {
    let diffs = compare_trees(a, b, opts);
    assert!(
        diffs.is_empty(),
        "trees differ (a = {}, b = {}):\n  {}",
        a.display(),
        b.display(),
        diffs.join("\n  ")
    );
}

/// Panics with every difference between two snapshots (a = `expected`, b = `actual`).
pub fn assert_same(expected: &Tree, actual: &Tree, opts: &CompareOpts, what: &str) {
    let diffs = differences(expected, actual, opts);
    assert!(
        diffs.is_empty(),
        "{what}: {} differences (a = expected, b = actual)\n  {}",
        diffs.len(),
        diffs.join("\n  ")
    );
}

/// A digest of the non-zero 4 KiB blocks and their offsets, reading only the data extents: two
/// files of equal size get the same digest exactly when their bytes are equal, and a 1 GiB
/// sparse file costs what its data costs.
pub fn content_digest(path: &Path, size: u64) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
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
            f.read_exact(&mut buf[..want])
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
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

/// Extended attributes of `path` itself (not a symlink's target), except `trusted.*`.
fn raw_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 65536]; // XATTR_LIST_MAX and XATTR_SIZE_MAX
    let n = match rustix::fs::llistxattr(path, &mut buf[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return out,
        Err(e) => panic!("listing xattrs of {}: {e}", path.display()),
    };
    let names: Vec<Vec<u8>> = buf[..n]
        .split(|&c| c == 0)
        .filter(|s| !s.is_empty() && !s.starts_with(b"trusted."))
        .map(<[u8]>::to_vec)
        .collect();
    for name in names {
        let mut v = vec![0u8; 65536];
        let cname = std::ffi::OsStr::from_bytes(&name);
        match rustix::fs::lgetxattr(path, cname, &mut v[..]) {
            Ok(n) => v.truncate(n),
            Err(rustix::io::Errno::NODATA) => continue, // removed since listed
            Err(e) => panic!("reading xattr {cname:?} of {}: {e}", path.display()),
        }
        out.insert(name, v);
    }
    out
}

/// Extended attributes of `path` itself, except `trusted.*`, by name.
pub fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    raw_xattrs(path)
        .into_iter()
        .map(|(n, v)| (String::from_utf8_lossy(&n).into_owned(), v))
        .collect()
}

/// sha256 of a file's bytes, hex.
pub fn sha256_file(p: &Path) -> String {
    let mut f = File::open(p).unwrap_or_else(|e| panic!("opening {}: {e}", p.display()));
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    hex::encode(h.finalize())
}
