//! `compare_trees`: the fidelity oracle. Walks two directory trees without following symlinks and returns one
//! readable line per difference, so a failing test prints exactly what the committed image got wrong.
//!
//! The root directory's own attributes are not compared (its mode and mtime belong to the mount point, not to
//! the image); everything below it is.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::fmt;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

#[derive(Clone, Debug, Default)]
pub struct CompareOpts {
    /// Paths (as seen from the tree's root, e.g. "/proc") skipped with everything below them.
    pub ignore: Vec<String>,
    /// Compare mtimes (whole seconds).
    pub mtime: bool,
    /// Compare extended attributes (trusted.* are never compared: they are overlayfs' own).
    pub xattrs: bool,
    /// Compare which paths share an inode.
    pub hardlinks: bool,
}

impl CompareOpts {
    /// What a container's rootfs has that no image holds: the kernel's filesystems and runc's bind mounts.
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
            ..CompareOpts::default()
        }
    }
    pub fn ignoring(mut self, path: &str) -> CompareOpts {
        self.ignore.push(path.to_string());
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
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
        let s = match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::CharDev => "char device",
            Kind::BlockDev => "block device",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        };
        f.write_str(s)
    }
}

#[derive(Debug)]
struct Entry {
    kind: Kind,
    /// Permission bits with setuid/setgid/sticky (mode & 0o7777).
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    rdev: (u32, u32),
    ino: (u64, u64),
    nlink: u64,
    link_target: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    full_path: PathBuf,
}

type Tree = BTreeMap<PathBuf, Entry>;

/// One line per difference between `a` and `b`, sorted by path; empty when the trees match.
pub fn compare_trees(a: &Path, b: &Path, opts: &CompareOpts) -> Vec<String> {
    let ta = scan(a, opts);
    let tb = scan(b, opts);
    let (la, lb) = if opts.hardlinks {
        (link_groups(&ta), link_groups(&tb))
    } else {
        Default::default()
    };
    let mut diffs = Vec::new();
    let paths: BTreeSet<&PathBuf> = ta.keys().chain(tb.keys()).collect();
    for p in paths {
        let shown = p.display();
        match (ta.get(p), tb.get(p)) {
            (Some(ea), None) => diffs.push(format!("{shown}: only in a ({})", ea.kind)),
            (None, Some(eb)) => diffs.push(format!("{shown}: only in b ({})", eb.kind)),
            (Some(ea), Some(eb)) => {
                compare_entry(&shown.to_string(), ea, eb, opts, &mut diffs);
                if opts.hardlinks {
                    let (ga, gb) = (la.get(p.as_path()), lb.get(p.as_path()));
                    if ga != gb {
                        diffs.push(format!(
                            "{shown}: hardlinked with {} vs {}",
                            show_group(ga),
                            show_group(gb)
                        ));
                    }
                }
            }
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
    if a.kind != Kind::Symlink && a.mode != b.mode {
        // symlink permissions are always 0777 on Linux and not settable
        diffs.push(format!("{p}: mode {:04o} vs {:04o}", a.mode, b.mode));
    }
    if a.uid != b.uid {
        diffs.push(format!("{p}: uid {} vs {}", a.uid, b.uid));
    }
    if a.gid != b.gid {
        diffs.push(format!("{p}: gid {} vs {}", a.gid, b.gid));
    }
    match a.kind {
        Kind::File => {
            if a.size != b.size {
                diffs.push(format!("{p}: size {} vs {}", a.size, b.size));
            } else if !same_content(&a.full_path, &b.full_path) {
                diffs.push(format!(
                    "{p}: content sha256:{} vs sha256:{}",
                    sha256_file(&a.full_path),
                    sha256_file(&b.full_path)
                ));
            }
        }
        Kind::Symlink if a.link_target != b.link_target => diffs.push(format!(
            "{p}: symlink target {:?} vs {:?}",
            a.link_target.as_deref().unwrap_or(Path::new("")),
            b.link_target.as_deref().unwrap_or(Path::new(""))
        )),
        Kind::CharDev | Kind::BlockDev if a.rdev != b.rdev => diffs.push(format!(
            "{p}: device {}:{} vs {}:{}",
            a.rdev.0, a.rdev.1, b.rdev.0, b.rdev.1
        )),
        _ => {}
    }
    if opts.mtime && a.mtime != b.mtime {
        diffs.push(format!("{p}: mtime {} vs {}", a.mtime, b.mtime));
    }
    if opts.xattrs && a.xattrs != b.xattrs {
        let names: BTreeSet<&String> = a.xattrs.keys().chain(b.xattrs.keys()).collect();
        for n in names {
            let (va, vb) = (a.xattrs.get(n), b.xattrs.get(n));
            if va != vb {
                diffs.push(format!(
                    "{p}: xattr {n} {} vs {}",
                    show_xattr(va),
                    show_xattr(vb)
                ));
            }
        }
    }
}

fn show_xattr(v: Option<&Vec<u8>>) -> String {
    match v {
        None => "absent".into(),
        Some(v) => format!("{:?}", String::from_utf8_lossy(v)),
    }
}

fn show_group(g: Option<&Vec<PathBuf>>) -> String {
    match g {
        None => "[]".into(),
        Some(g) => format!(
            "[{}]",
            g.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// For each path whose inode is shared with other paths in the tree: the other paths, sorted.
fn link_groups(tree: &Tree) -> HashMap<PathBuf, Vec<PathBuf>> {
    let mut by_inode: HashMap<(u64, u64), Vec<&PathBuf>> = HashMap::new();
    for (p, e) in tree {
        if e.kind != Kind::Dir && e.nlink > 1 {
            by_inode.entry(e.ino).or_default().push(p);
        }
    }
    let mut groups = HashMap::new();
    for members in by_inode.values().filter(|m| m.len() > 1) {
        for p in members {
            let others: Vec<PathBuf> = members
                .iter()
                .filter(|o| *o != p)
                .map(|o| (*o).clone())
                .collect();
            groups.insert((*p).clone(), others);
        }
    }
    groups
}

fn ignored(rel: &Path, opts: &CompareOpts) -> bool {
    opts.ignore.iter().any(|ig| rel.starts_with(Path::new(ig)))
}

/// Every entry below `root`, keyed by its path as seen from the root ("/etc/passwd").
fn scan(root: &Path, opts: &CompareOpts) -> Tree {
    let mut tree = Tree::new();
    let mut stack = vec![PathBuf::from("/")];
    while let Some(rel) = stack.pop() {
        let dir = root.join(rel.strip_prefix("/").unwrap());
        let rd = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading dir {}: {e}", dir.display()));
        for ent in rd {
            let ent = ent.unwrap_or_else(|e| panic!("reading dir {}: {e}", dir.display()));
            let child = rel.join(ent.file_name());
            if ignored(&child, opts) {
                continue;
            }
            let full = ent.path();
            let e = stat(&full, opts);
            if e.kind == Kind::Dir {
                stack.push(child.clone());
            }
            tree.insert(child, e);
        }
    }
    tree
}

fn stat(full: &Path, opts: &CompareOpts) -> Entry {
    let md =
        std::fs::symlink_metadata(full).unwrap_or_else(|e| panic!("lstat {}: {e}", full.display()));
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_char_device() {
        Kind::CharDev
    } else if ft.is_block_device() {
        Kind::BlockDev
    } else if ft.is_fifo() {
        Kind::Fifo
    } else {
        Kind::Socket
    };
    let rdev = md.rdev();
    Entry {
        link_target: (kind == Kind::Symlink).then(|| {
            std::fs::read_link(full).unwrap_or_else(|e| panic!("readlink {}: {e}", full.display()))
        }),
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: md.size(),
        mtime: md.mtime(),
        rdev: (libc::major(rdev), libc::minor(rdev)),
        ino: (md.dev(), md.ino()),
        nlink: md.nlink(),
        xattrs: if opts.xattrs {
            xattrs(full)
        } else {
            BTreeMap::new()
        },
        full_path: full.to_path_buf(),
    }
}

/// Extended attributes of `path` itself (not a symlink's target), except trusted.*.
pub fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path with NUL");
    let mut out = BTreeMap::new();
    // SAFETY: c is a valid C string; a null buffer with size 0 asks for the needed size.
    let len = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if len <= 0 {
        return out;
    }
    let mut names = vec![0u8; len as usize];
    // SAFETY: names has the room llistxattr asked for.
    let len = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len <= 0 {
        return out;
    }
    names.truncate(len as usize);
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let s = String::from_utf8_lossy(name).into_owned();
        if s.starts_with("trusted.") {
            continue;
        }
        let cname = CString::new(name).unwrap();
        // SAFETY: valid C strings; size query first.
        let vlen = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
        if vlen < 0 {
            continue;
        }
        let mut val = vec![0u8; vlen as usize];
        // SAFETY: val has vlen bytes.
        let vlen = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        if vlen < 0 {
            continue;
        }
        val.truncate(vlen as usize);
        out.insert(s, val);
    }
    out
}

fn same_content(a: &Path, b: &Path) -> bool {
    let open = |p: &Path| {
        std::fs::File::open(p).unwrap_or_else(|e| panic!("opening {}: {e}", p.display()))
    };
    let (mut fa, mut fb) = (open(a), open(b));
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let na = read_full(&mut fa, &mut ba, a);
        let nb = read_full(&mut fb, &mut bb, b);
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8], p: &Path) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading {}: {e}", p.display()),
        }
    }
    n
}

/// sha256 of a file's bytes, hex.
pub fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("opening {}: {e}", p.display()));
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    hex::encode(h.finalize())
}

/// Panics with every difference, one per line, unless the trees match.
pub fn assert_same_trees(a: &Path, b: &Path, opts: &CompareOpts) {
    let diffs = compare_trees(a, b, opts);
    if !diffs.is_empty() {
        panic!(
            "trees differ (a = {}, b = {}):\n  {}",
            a.display(),
            b.display(),
            diffs.join("\n  ")
        );
    }
}

#[cfg(test)]
mod tests {
    //! compare_trees must see every kind of difference it claims to: a comparison that cannot fail proves nothing.
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    struct Pair {
        _tmp: tempfile::TempDir,
        a: PathBuf,
        b: PathBuf,
    }

    /// Two identical trees with a bit of everything.
    fn pair() -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        for root in [&a, &b] {
            std::fs::create_dir_all(root.join("d/sub")).unwrap();
            std::fs::write(root.join("d/file"), b"hello").unwrap();
            std::fs::write(root.join("d/sub/other"), b"other").unwrap();
            symlink("file", root.join("d/link")).unwrap();
            mknod(
                &root.join("d/null"),
                libc::S_IFCHR | 0o666,
                libc::makedev(1, 3),
            );
            mknod(&root.join("d/fifo"), libc::S_IFIFO | 0o644, 0);
            std::fs::hard_link(root.join("d/file"), root.join("d/file-link")).unwrap();
            std::fs::write(root.join("d/lonely"), b"x").unwrap();
            set_mtime(root, 1_700_000_000);
        }
        Pair { _tmp: tmp, a, b }
    }

    fn mknod(p: &Path, mode: u32, dev: libc::dev_t) {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C string.
        let r = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
        assert_eq!(
            r,
            0,
            "mknod {}: {} (tests run as root)",
            p.display(),
            std::io::Error::last_os_error()
        );
    }

    fn set_mtime(root: &Path, secs: i64) {
        let st = std::process::Command::new("find")
            .arg(root)
            .args(["-exec", "touch", "-h", "-d"])
            .arg(format!("@{secs}"))
            .args(["{}", "+"])
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn all() -> CompareOpts {
        CompareOpts {
            ignore: vec![],
            mtime: true,
            xattrs: true,
            hardlinks: true,
        }
    }

    /// Exactly one difference, mentioning `path` and `what`.
    fn expect_one(p: &Pair, opts: &CompareOpts, path: &str, what: &str) {
        let d = compare_trees(&p.a, &p.b, opts);
        assert_eq!(
            d.len(),
            1,
            "expected one difference about {path} {what}, got {d:#?}"
        );
        assert!(
            d[0].starts_with(&format!("{path}: ")) && d[0].contains(what),
            "got {:?}",
            d[0]
        );
    }

    #[test]
    fn compare_trees_finds_no_difference_between_identical_trees() {
        let p = pair();
        assert_eq!(compare_trees(&p.a, &p.b, &all()), Vec::<String>::new());
    }

    #[test]
    fn compare_trees_reports_a_path_missing_on_either_side() {
        let p = pair();
        std::fs::remove_file(p.b.join("d/lonely")).unwrap();
        set_mtime(&p.b, 1_700_000_000);
        expect_one(&p, &all(), "/d/lonely", "only in a (file)");
        std::fs::remove_dir_all(p.a.join("d/sub")).unwrap();
        let d = compare_trees(&p.a, &p.b, &all());
        assert!(d.contains(&"/d/sub: only in b (dir)".to_string()), "{d:#?}");
        assert!(
            d.contains(&"/d/sub/other: only in b (file)".to_string()),
            "{d:#?}"
        );
    }

    #[test]
    fn compare_trees_reports_a_type_change() {
        let p = pair();
        std::fs::remove_file(p.b.join("d/lonely")).unwrap();
        std::fs::create_dir(p.b.join("d/lonely")).unwrap();
        set_mtime(&p.b, 1_700_000_000);
        expect_one(&p, &all(), "/d/lonely", "type file vs dir");
    }

    #[test]
    fn compare_trees_reports_mode_including_setuid_setgid_and_sticky() {
        for (mode, shown) in [
            (0o600, "0600"),
            (0o4644, "4644"),
            (0o2644, "2644"),
            (0o1644, "1644"),
        ] {
            let p = pair();
            std::fs::set_permissions(p.b.join("d/lonely"), std::fs::Permissions::from_mode(mode))
                .unwrap();
            expect_one(&p, &all(), "/d/lonely", &format!("mode 0644 vs {shown}"));
        }
        let p = pair();
        std::fs::set_permissions(p.b.join("d/sub"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        expect_one(&p, &all(), "/d/sub", "mode 0755 vs 1777");
    }

    #[test]
    fn compare_trees_reports_uid_and_gid() {
        let p = pair();
        std::os::unix::fs::lchown(p.b.join("d/lonely"), Some(1000), None).unwrap();
        expect_one(&p, &all(), "/d/lonely", "uid 0 vs 1000");
        let p = pair();
        std::os::unix::fs::lchown(p.b.join("d/link"), None, Some(1001)).unwrap();
        expect_one(&p, &all(), "/d/link", "gid 0 vs 1001");
    }

    #[test]
    fn compare_trees_reports_size_and_same_size_content() {
        let p = pair();
        std::fs::write(p.b.join("d/lonely"), b"xy").unwrap();
        set_mtime(&p.b, 1_700_000_000);
        expect_one(&p, &all(), "/d/lonely", "size 1 vs 2");
        let p = pair();
        std::fs::write(p.b.join("d/lonely"), b"y").unwrap();
        set_mtime(&p.b, 1_700_000_000);
        expect_one(&p, &all(), "/d/lonely", "content sha256:2d711642");
    }

    #[test]
    fn compare_trees_reports_symlink_target_without_following_it() {
        let p = pair();
        std::fs::remove_file(p.b.join("d/link")).unwrap();
        symlink("sub/other", p.b.join("d/link")).unwrap();
        set_mtime(&p.b, 1_700_000_000);
        expect_one(
            &p,
            &all(),
            "/d/link",
            r#"symlink target "file" vs "sub/other""#,
        );
        // a symlink to a directory is not walked into
        let p = pair();
        symlink("/", p.a.join("d/root-link")).unwrap();
        symlink("/", p.b.join("d/root-link")).unwrap();
        set_mtime(&p.a, 1_700_000_000);
        set_mtime(&p.b, 1_700_000_000);
        assert_eq!(compare_trees(&p.a, &p.b, &all()), Vec::<String>::new());
    }

    #[test]
    fn compare_trees_reports_device_numbers() {
        let p = pair();
        std::fs::remove_file(p.b.join("d/null")).unwrap();
        mknod(
            &p.b.join("d/null"),
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 5),
        );
        set_mtime(&p.b, 1_700_000_000);
        expect_one(&p, &all(), "/d/null", "device 1:3 vs 1:5");
    }

    #[test]
    fn compare_trees_reports_mtime_only_when_asked() {
        let p = pair();
        set_mtime(&p.b.join("d/lonely"), 1_700_000_001);
        expect_one(&p, &all(), "/d/lonely", "mtime 1700000000 vs 1700000001");
        let opts = CompareOpts {
            mtime: false,
            ..all()
        };
        assert_eq!(compare_trees(&p.a, &p.b, &opts), Vec::<String>::new());
    }

    #[test]
    fn compare_trees_reports_xattrs_only_when_asked_and_never_trusted() {
        let p = pair();
        setxattr(&p.b.join("d/lonely"), "user.color", b"blue");
        expect_one(
            &p,
            &all(),
            "/d/lonely",
            r#"xattr user.color absent vs "blue""#,
        );
        let opts = CompareOpts {
            xattrs: false,
            ..all()
        };
        assert_eq!(compare_trees(&p.a, &p.b, &opts), Vec::<String>::new());
        let p = pair();
        setxattr(&p.b.join("d/lonely"), "trusted.overlay.opaque", b"y");
        assert_eq!(compare_trees(&p.a, &p.b, &all()), Vec::<String>::new());
    }

    fn setxattr(p: &Path, name: &str, value: &[u8]) {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        // SAFETY: valid C strings and buffer.
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(
            r,
            0,
            "setxattr {name} on {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
    }

    #[test]
    fn compare_trees_reports_hardlink_groups_only_when_asked() {
        let p = pair();
        // same content, same metadata, but a copy instead of a link
        std::fs::remove_file(p.b.join("d/file-link")).unwrap();
        std::fs::copy(p.b.join("d/file"), p.b.join("d/file-link")).unwrap();
        set_mtime(&p.b, 1_700_000_000);
        let d = compare_trees(&p.a, &p.b, &all());
        assert_eq!(
            d,
            vec![
                "/d/file: hardlinked with [/d/file-link] vs []".to_string(),
                "/d/file-link: hardlinked with [/d/file] vs []".to_string()
            ]
        );
        let opts = CompareOpts {
            hardlinks: false,
            ..all()
        };
        assert_eq!(compare_trees(&p.a, &p.b, &opts), Vec::<String>::new());
    }

    #[test]
    fn compare_trees_skips_ignored_paths_and_everything_below_them() {
        let p = pair();
        std::fs::write(p.b.join("d/sub/other"), b"changed!").unwrap();
        std::fs::write(p.b.join("d/sub/new"), b"new").unwrap();
        std::fs::remove_file(p.b.join("d/lonely")).unwrap();
        let opts = CompareOpts {
            ignore: vec!["/d/sub".into(), "/d/lonely".into()],
            mtime: false,
            ..all()
        };
        assert_eq!(compare_trees(&p.a, &p.b, &opts), Vec::<String>::new());
        // "/d/sub" does not hide "/d/subway"
        std::fs::write(p.b.join("d/subway"), b"").unwrap();
        assert_eq!(
            compare_trees(&p.a, &p.b, &opts),
            vec!["/d/subway: only in b (file)".to_string()]
        );
    }

    #[test]
    fn compare_trees_reports_fifo_vs_file() {
        let p = pair();
        std::fs::remove_file(p.b.join("d/fifo")).unwrap();
        std::fs::write(p.b.join("d/fifo"), b"").unwrap();
        std::fs::set_permissions(p.b.join("d/fifo"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        set_mtime(&p.b, 1_700_000_000);
        expect_one(&p, &all(), "/d/fifo", "type fifo vs file");
    }
}
