//! The tree oracle must see every kind of difference it claims to: a comparison that cannot fail
//! proves nothing. Owners and device numbers need root (`--features lab`); the rest runs as any
//! user.

use super::tree::{compare_trees, differences, snapshot, CompareOpts};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

struct Pair {
    _tmp: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

const T: i64 = 1_700_000_000;

/// Two identical trees with a bit of everything an unprivileged user can make.
fn pair() -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for root in [&a, &b] {
        std::fs::create_dir_all(root.join("d/sub")).unwrap();
        std::fs::write(root.join("d/file"), b"hello").unwrap();
        std::fs::write(root.join("d/sub/other"), b"other").unwrap();
        symlink("file", root.join("d/link")).unwrap();
        mknod(&root.join("d/fifo"), libc::S_IFIFO | 0o644, 0);
        std::fs::hard_link(root.join("d/file"), root.join("d/file-link")).unwrap();
        std::fs::write(root.join("d/lonely"), b"x").unwrap();
        chmod(&root.join("d/lonely"), 0o644);
        chmod(&root.join("d/fifo"), 0o644);
        chmod(&root.join("d/sub"), 0o755);
        set_mtime(root, T);
    }
    Pair { _tmp: tmp, a, b }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mknod(p: &Path, mode: u32, dev: libc::dev_t) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    let err = std::io::Error::last_os_error();
    assert_eq!(r, 0, "mknod {}: {err}", p.display());
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

fn setxattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
}

fn all() -> CompareOpts {
    CompareOpts::default()
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
fn identical_trees_have_no_difference() {
    let p = pair();
    assert_eq!(compare_trees(&p.a, &p.b, &all()), Vec::<String>::new());
}

#[test]
fn every_attribute_that_differs_is_reported_once_each() {
    let p = pair();
    let (a, b) = (p.a.join("d"), p.b.join("d"));
    for f in ["mode", "size", "content", "mtime", "xattr", "type", "copy"] {
        for dir in [&a, &b] {
            std::fs::write(dir.join(f), b"1").unwrap();
            chmod(&dir.join(f), 0o644);
        }
    }
    std::fs::hard_link(a.join("copy"), a.join("copy-link")).unwrap();
    // One change each in b.
    chmod(&b.join("mode"), 0o600);
    std::fs::write(b.join("size"), b"12").unwrap();
    std::fs::write(b.join("content"), b"2").unwrap();
    setxattr(&b.join("xattr"), "user.k", b"v");
    std::fs::remove_file(b.join("type")).unwrap();
    std::fs::create_dir(b.join("type")).unwrap();
    std::fs::remove_file(b.join("link")).unwrap();
    symlink("elsewhere", b.join("link")).unwrap();
    std::fs::copy(b.join("copy"), b.join("copy-link")).unwrap();
    std::fs::write(b.join("extra"), b"").unwrap();
    set_mtime(&p.a, T);
    set_mtime(&p.b, T);
    set_mtime(&b.join("mtime"), T + 1);
    let got = compare_trees(&p.a, &p.b, &all());
    let want = [
        "/d/content: content differs",
        "/d/copy: hardlinked with [/d/copy-link] vs []",
        "/d/copy-link: hardlinked with [/d/copy] vs []",
        "/d/extra: only in b (file)",
        "/d/link: symlink target \"file\" vs \"elsewhere\"",
        "/d/mode: mode 0644 vs 0600",
        "/d/mtime: mtime 1700000000 vs 1700000001",
        "/d/size: size 1 vs 2",
        "/d/type: type file vs dir",
        "/d/xattr: xattr user.k absent vs \"v\"",
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            g.starts_with(w),
            "{g:?} should start with {w:?}\nall: {got:#?}"
        );
    }
}

#[test]
fn a_path_missing_on_either_side_is_reported() {
    let p = pair();
    std::fs::remove_file(p.b.join("d/lonely")).unwrap();
    set_mtime(&p.b, T);
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
fn mode_includes_setuid_setgid_and_sticky() {
    for (mode, shown) in [
        (0o600, "0600"),
        (0o4644, "4644"),
        (0o2644, "2644"),
        (0o1644, "1644"),
    ] {
        let p = pair();
        chmod(&p.b.join("d/lonely"), mode);
        expect_one(&p, &all(), "/d/lonely", &format!("mode 0644 vs {shown}"));
    }
    let p = pair();
    chmod(&p.b.join("d/sub"), 0o1777);
    expect_one(&p, &all(), "/d/sub", "mode 0755 vs 1777");
}

#[test]
fn same_size_content_is_compared_and_holes_equal_zeros() {
    let p = pair();
    std::fs::write(p.b.join("d/lonely"), b"y").unwrap();
    set_mtime(&p.b, T);
    expect_one(&p, &all(), "/d/lonely", "content differs");
    // A sparse file and one with the zeros written out hold the same bytes.
    let p = pair();
    let f = std::fs::File::create(p.a.join("d/big")).unwrap();
    f.set_len(1 << 20).unwrap();
    std::fs::write(p.b.join("d/big"), vec![0u8; 1 << 20]).unwrap();
    for root in [&p.a, &p.b] {
        chmod(&root.join("d/big"), 0o644);
        set_mtime(root, T);
    }
    assert_eq!(compare_trees(&p.a, &p.b, &all()), Vec::<String>::new());
}

#[test]
fn symlinks_are_compared_not_followed() {
    let p = pair();
    symlink("/", p.a.join("d/root-link")).unwrap();
    symlink("/", p.b.join("d/root-link")).unwrap();
    set_mtime(&p.a, T);
    set_mtime(&p.b, T);
    assert_eq!(compare_trees(&p.a, &p.b, &all()), Vec::<String>::new());
}

#[test]
fn mtime_xattrs_and_hardlinks_are_left_out_only_when_asked() {
    let p = pair();
    set_mtime(&p.b.join("d/lonely"), T + 1);
    expect_one(&p, &all(), "/d/lonely", "mtime 1700000000 vs 1700000001");
    let opts = CompareOpts {
        mtime: false,
        ..all()
    };
    assert_eq!(compare_trees(&p.a, &p.b, &opts), Vec::<String>::new());

    let p = pair();
    setxattr(&p.b.join("d/lonely"), "user.color", b"blue");
    expect_one(
        &p,
        &all(),
        "/d/lonely",
        r#"xattr user.color absent vs "blue""#,
    );
    expect_one(&p, &CompareOpts::layer(), "/d/lonely", "xattr user.color");
    let opts = CompareOpts {
        xattrs: false,
        ..all()
    };
    assert_eq!(compare_trees(&p.a, &p.b, &opts), Vec::<String>::new());

    let p = pair();
    std::fs::remove_file(p.b.join("d/file-link")).unwrap();
    std::fs::copy(p.b.join("d/file"), p.b.join("d/file-link")).unwrap();
    set_mtime(&p.b, T);
    assert_eq!(compare_trees(&p.a, &p.b, &all()).len(), 2);
    let opts = CompareOpts {
        hardlinks: false,
        ..all()
    };
    assert_eq!(compare_trees(&p.a, &p.b, &opts), Vec::<String>::new());
}

#[test]
fn sockets_are_compared_unless_left_out() {
    let p = pair();
    let _l = std::os::unix::net::UnixListener::bind(p.b.join("d/sock")).unwrap();
    set_mtime(&p.b, T);
    let d = compare_trees(&p.a, &p.b, &all());
    assert!(
        d.contains(&"/d/sock: only in b (socket)".to_string()),
        "{d:#?}"
    );
    // The directory's mtime changed with it; a layer drops the socket itself.
    let opts = CompareOpts {
        mtime: false,
        ..CompareOpts::layer()
    };
    assert_eq!(compare_trees(&p.a, &p.b, &opts), Vec::<String>::new());
}

#[test]
fn ignored_paths_hide_everything_below_them_and_nothing_beside() {
    let p = pair();
    std::fs::write(p.b.join("d/sub/other"), b"changed!").unwrap();
    std::fs::write(p.b.join("d/sub/new"), b"new").unwrap();
    std::fs::remove_file(p.b.join("d/lonely")).unwrap();
    let opts = CompareOpts {
        mtime: false,
        ..all()
    }
    .ignoring("/d/sub")
    .ignoring("/d/lonely");
    assert_eq!(compare_trees(&p.a, &p.b, &opts), Vec::<String>::new());
    std::fs::write(p.b.join("d/subway"), b"").unwrap();
    assert_eq!(
        compare_trees(&p.a, &p.b, &opts),
        vec!["/d/subway: only in b (file)".to_string()]
    );
}

#[test]
fn a_snapshot_is_compared_after_the_tree_changed() {
    let p = pair();
    let before = snapshot(&p.a, &all());
    std::fs::write(p.a.join("d/lonely"), b"z").unwrap();
    set_mtime(&p.a, T);
    let d = differences(&before, &snapshot(&p.a, &all()), &all());
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(d[0].starts_with("/d/lonely: content differs"), "{d:#?}");
}

#[test]
fn a_fifo_is_not_a_file() {
    let p = pair();
    std::fs::remove_file(p.b.join("d/fifo")).unwrap();
    std::fs::write(p.b.join("d/fifo"), b"").unwrap();
    chmod(&p.b.join("d/fifo"), 0o644);
    set_mtime(&p.b, T);
    expect_one(&p, &all(), "/d/fifo", "type fifo vs file");
}

/// Owners and devices: root only.
#[cfg(feature = "lab")]
mod privileged {
    use super::*;

    #[test]
    fn owners_are_compared() {
        let p = pair();
        std::os::unix::fs::lchown(p.b.join("d/lonely"), Some(1000), None).unwrap();
        expect_one(&p, &all(), "/d/lonely", "uid 0 vs 1000");
        let p = pair();
        std::os::unix::fs::lchown(p.b.join("d/link"), None, Some(1001)).unwrap();
        expect_one(&p, &all(), "/d/link", "gid 0 vs 1001");
    }

    #[test]
    fn device_numbers_are_compared() {
        let p = pair();
        mknod(
            &p.a.join("d/null"),
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 3),
        );
        mknod(
            &p.b.join("d/null"),
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 5),
        );
        for root in [&p.a, &p.b] {
            chmod(&root.join("d/null"), 0o666);
            set_mtime(root, T);
        }
        expect_one(&p, &all(), "/d/null", "device 1:3 vs 1:5");
    }
}
