//! The guards: hostile trees, files changing under the reader, limits, exactness detection
//! (redirect_dir, metacopy, no CAP_SYS_ADMIN), exclusions, mount stubs, hardlink headers.

use super::fixture::{Overlay, MOUNT_LOCK};
use super::scenario::{self, p, write};
use super::tree::{self, CompareOpts, Tree};
use super::{apply, entry_names, fixture, layer_file};
use crate::diff::fsx::hook::{self, Stage};
use crate::diff::{upperdir_is_exact, write_layer, DiffError, NotExact, Options, Source};
use std::io::Read;
use std::path::Path;

fn walk_all(dir: &Path, opts: &Options) -> Result<Vec<u8>, DiffError> {
    let r = write_layer(
        &Source::Walk {
            lower: None,
            upper: dir,
        },
        opts,
        Vec::new(),
    )
    .map(|(v, _)| v);
    hook::set(None);
    r
}

#[test]
fn symlink_swapped_in_during_the_walk_cannot_read_outside() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    scenario::mkdir(&root, b"victim");
    write(&root, b"victim/inner", b"i");
    write(&root, b"victimfile", b"v");
    std::os::unix::fs::symlink("/etc", root.join("already_a_link")).unwrap();
    for (name, target) in [(&b"victim"[..], "/etc"), (b"victimfile", "/etc/passwd")] {
        let r = root.clone();
        hook::set(Some(Box::new(move |stage, n| {
            if stage == Stage::AfterStat && n == name {
                let path = p(&r, name);
                if path.is_dir() {
                    std::fs::remove_dir_all(&path).unwrap();
                } else {
                    std::fs::remove_file(&path).unwrap();
                }
                std::os::unix::fs::symlink(target, &path).unwrap();
            }
        })));
        match walk_all(&root, &Options::default()) {
            Err(DiffError::FileChanged { path, .. }) => {
                assert_eq!(path.as_bytes(), [b"/", name].concat())
            }
            other => panic!("swap of {name:?}: expected FileChanged, got {other:?}"),
        }
    }
    // Both are symlinks now: emitted as such, nothing read through them.
    let tar = walk_all(&root, &Options::default()).unwrap();
    let passwd = std::fs::read("/etc/passwd").unwrap();
    assert!(!tar
        .windows(passwd.len().min(32))
        .any(|w| w == &passwd[..passwd.len().min(32)]));
    assert_eq!(
        entry_names(&tar[..]),
        [&b"already_a_link"[..], b"victim", b"victimfile"]
    );
}

#[test]
fn file_truncated_while_read_is_file_changed() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), b"big", &vec![7u8; 4 << 20]);
    let path = t.path().join("big");
    hook::set(Some(Box::new(move |stage, n| {
        if stage == Stage::BeforeRead && n == b"big" {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
        }
    })));
    match walk_all(t.path(), &Options::default()) {
        Err(DiffError::FileChanged {
            path,
            expected,
            found,
        }) => {
            assert_eq!(
                (path.as_str(), expected.as_str()),
                ("/big", "4194304 bytes")
            );
            assert!(found.contains("1048576"), "{found}");
        }
        other => panic!("expected FileChanged, got {other:?}"),
    }
}

#[test]
fn file_grown_while_read_is_cut_at_its_header_size() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), b"log", b"0123456789");
    let path = t.path().join("log");
    hook::set(Some(Box::new(move |stage, n| {
        if stage == Stage::BeforeRead && n == b"log" {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap()
                .write_all(&[b'+'; 5000])
                .unwrap();
        }
    })));
    let tar = walk_all(t.path(), &Options::default()).unwrap();
    let mut a = tar::Archive::new(&tar[..]);
    let mut e = a.entries().unwrap().next().unwrap().unwrap();
    let mut content = Vec::new();
    e.read_to_end(&mut content).unwrap();
    assert_eq!(content, b"0123456789");
}

#[test]
fn limits_stop_with_a_typed_error() {
    let t = tempfile::tempdir().unwrap();
    for i in 0..5 {
        write(t.path(), format!("f{i}").as_bytes(), &[1u8; 1000]);
    }
    let few = Options {
        max_files: Some(3),
        ..Options::default()
    };
    assert!(matches!(
        walk_all(t.path(), &few),
        Err(DiffError::LimitExceeded {
            what: "entries",
            limit: 3
        })
    ));
    let small = Options {
        max_bytes: Some(4500),
        ..Options::default()
    };
    assert!(matches!(
        walk_all(t.path(), &small),
        Err(DiffError::LimitExceeded { limit: 4500, .. })
    ));
    let exact = Options {
        max_files: Some(5),
        max_bytes: Some(5000),
        ..Options::default()
    };
    assert!(walk_all(t.path(), &exact).is_ok());
}

#[test]
fn hardlinks_repeat_the_first_entrys_metadata_and_xattrs() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), b"a", b"shared");
    scenario::setx(&t.path().join("a"), "user.k", b"v");
    std::os::unix::fs::chown(t.path().join("a"), Some(3_000_000), Some(7)).unwrap();
    scenario::chmod(&t.path().join("a"), 0o4750);
    for l in ["b", "c"] {
        std::fs::hard_link(t.path().join("a"), t.path().join(l)).unwrap();
    }
    let tar = walk_all(t.path(), &Options::default()).unwrap();
    let seen = super::rawtar::entries(&tar[..]);
    assert_eq!(seen.len(), 3);
    let first = &seen[0];
    assert_eq!(
        (first.kind, first.uid, first.mode),
        (b'0', 3_000_000, 0o4750)
    );
    for e in &seen[1..] {
        assert_eq!((e.kind, &e.link[..], e.size), (b'1', &b"a"[..], 0));
        let same = |x: &super::rawtar::Entry| (x.mode, x.uid, x.gid, x.mtime, x.xattrs.clone());
        assert_eq!(
            same(e),
            same(first),
            "{:?}",
            String::from_utf8_lossy(&e.path)
        );
    }
}

#[test]
fn layer_has_only_pax_and_ustar_headers() {
    let t = tempfile::tempdir().unwrap();
    scenario::odd_names(t.path());
    let f = std::fs::File::create(t.path().join("sparse")).unwrap();
    f.set_len(64 << 20).unwrap();
    let tar = walk_all(t.path(), &Options::default()).unwrap();
    let mut a = tar::Archive::new(&tar[..]);
    for e in a.entries().unwrap().raw(true) {
        let e = e.unwrap();
        let h = e.header();
        assert!(h.as_ustar().is_some(), "not a ustar header");
        assert!(matches!(
            h.entry_type().as_byte(),
            b'0' | b'1' | b'2' | b'3' | b'4' | b'5' | b'6' | b'x'
        ));
    }
    // GNU tar agrees on the long and odd names.
    let out = std::process::Command::new("tar")
        .args(["-tf", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&tar)?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains(&"f".repeat(200)), "{listing}");
}

#[test]
fn source_date_epoch_clamps_newer_mtimes_only() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), b"new", b"n");
    write(t.path(), b"old", b"o");
    scenario::set_mtime(&t.path().join("old"), 1000, 0);
    let opts = Options {
        source_date_epoch: Some(5000),
        ..Options::default()
    };
    let tar = walk_all(t.path(), &opts).unwrap();
    let mut a = tar::Archive::new(&tar[..]);
    let times: Vec<u64> = a
        .entries()
        .unwrap()
        .map(|e| e.unwrap().header().mtime().unwrap())
        .collect();
    assert_eq!(times, [5000, 1000]);
}

fn redirect_metacopy_overlay(change: impl FnOnce(&Path)) -> Overlay {
    let mut ov = Overlay::new(1);
    scenario::mkdir(&ov.lowers[0], b"dir/with");
    write(&ov.lowers[0], b"dir/with/content", b"c");
    write(&ov.lowers[0], b"file", &[5u8; 100_000]);
    ov.mount_with_params(&[("redirect_dir", "Y"), ("metacopy", "Y")]);
    change(&ov.merged);
    ov
}

fn check_inexact(ov: &Overlay, want: fn(&NotExact) -> bool) {
    let exact = {
        let _g = MOUNT_LOCK.read().unwrap_or_else(|e| e.into_inner());
        upperdir_is_exact(&ov.upper, &ov.options())
    };
    // The scan finds the xattr; if another process has just set the module default to Y
    // (the integration tests do), that is reported first, which is right too.
    let found = |n: &NotExact| want(n) || matches!(n, NotExact::ModuleDefault(_));
    assert!(exact.as_ref().is_err_and(found), "{exact:?}");
    let up = write_layer(
        &Source::Upperdir {
            upper: &ov.upper,
            lowers: &ov.lowers,
        },
        &Options::default(),
        Vec::new(),
    );
    assert!(
        matches!(&up, Err(DiffError::NotExact(n)) if want(n)),
        "{:?}",
        up.map(|_| ())
    );
    // The fallback is exact.
    let source = Source::Walk {
        lower: Some(&ov.lowers[0]),
        upper: &ov.merged,
    };
    let (tar, _) = layer_file(&source, &Options::default(), ov.dir.path());
    super::assert_unpacks_to(
        tar,
        &ov.lowers[0],
        &ov.merged,
        ov.dir.path(),
        "walk fallback",
    );
}

#[test]
fn renamed_lower_dir_under_redirect_dir_is_not_exact_and_the_walk_is() {
    let ov =
        redirect_metacopy_overlay(|m| std::fs::rename(m.join("dir"), m.join("moved")).unwrap());
    check_inexact(&ov, |n| matches!(n, NotExact::Redirect(p) if p == "/moved"));
}

#[test]
fn chmod_under_metacopy_is_not_exact_and_the_walk_is() {
    let ov = redirect_metacopy_overlay(|m| scenario::chmod(&m.join("file"), 0o600));
    check_inexact(&ov, |n| matches!(n, NotExact::Metacopy(p) if p == "/file"));
}

#[test]
fn without_cap_sys_admin_trusted_xattrs_are_unreadable_so_not_exact() {
    let mut ov = Overlay::new(1);
    ov.mount();
    let (upper, opts) = (ov.upper.clone(), ov.options());
    let r = std::thread::spawn(move || {
        // Capabilities are per thread: only this one loses CAP_SYS_ADMIN.
        let mut caps = rustix::thread::capabilities(None).unwrap();
        caps.effective
            .remove(rustix::thread::CapabilitySet::SYS_ADMIN);
        rustix::thread::set_capabilities(None, caps).unwrap();
        let _g = MOUNT_LOCK.read().unwrap_or_else(|e| e.into_inner());
        upperdir_is_exact(&upper, &opts)
    })
    .join()
    .unwrap();
    assert!(
        matches!(r, Err(NotExact::TrustedXattrsUnreadable(_))),
        "{r:?}"
    );
}

/// Expected tree after an excluding layer: merged, except that excluded paths are as in lower.
fn merged_with_lower_at(merged: &Tree, lower: &Tree, excluded: &[&[u8]]) -> Tree {
    let under = |path: &[u8]| {
        excluded
            .iter()
            .any(|e| path == *e || path.starts_with(&[*e, b"/"].concat()))
    };
    let mut t: Tree = merged
        .iter()
        .filter(|(k, _)| !under(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    t.extend(
        lower
            .iter()
            .filter(|(k, _)| under(k))
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    t
}

/// Lower paths that exclusions will protect, then a container that deletes or changes them
/// (and recreates `opq`, which makes it opaque).
fn exclusion_overlay() -> Overlay {
    let mut ov = Overlay::new(1);
    let l = ov.lowers[0].clone();
    for f in [
        &b"excl/keep.txt"[..],
        b"cache/a.tmp",
        b"cache/b.txt",
        b"opq/excluded/x",
        b"opq/other",
    ] {
        scenario::mkdir(&l, &f[..f.iter().rposition(|&c| c == b'/').unwrap()]);
        write(&l, f, b"lower");
    }
    ov.mount();
    let m = ov.merged.clone();
    std::fs::remove_dir_all(m.join("excl")).unwrap();
    write(&m, b"cache/a.tmp", b"changed");
    write(&m, b"cache/b.txt", b"changed");
    std::fs::remove_dir_all(m.join("opq")).unwrap();
    scenario::mkdir(&m, b"opq");
    write(&m, b"opq/new", b"n");
    ov
}

#[test]
fn exclusions_keep_lower_paths_as_they_were() {
    let ov = exclusion_overlay();
    let (l, m) = (ov.lowers[0].clone(), ov.merged.clone());
    let opts = Options {
        exclude: vec![
            "/excl".into(),
            "/cache/*.tmp".into(),
            "/opq/excluded".into(),
        ],
        ..Options::default()
    };
    let expected = merged_with_lower_at(
        &tree::snapshot(&m, &CompareOpts::layer()),
        &tree::snapshot(&l, &CompareOpts::layer()),
        &[b"excl", b"cache/a.tmp", b"opq/excluded"],
    );
    let up = Source::Upperdir {
        upper: &ov.upper,
        lowers: &ov.lowers,
    };
    let walk = Source::Walk {
        lower: Some(&l),
        upper: &m,
    };
    for (what, source) in [("upperdir", up), ("walk", walk)] {
        let (tar, _) = layer_file(&source, &opts, ov.dir.path());
        let names = entry_names(tar.try_clone().unwrap());
        for absent in [
            &b".wh.excl"[..],
            b"cache/a.tmp",
            b"opq/.wh..wh..opq",
            b"opq/.wh.excluded",
        ] {
            assert!(
                !names.iter().any(|n| n == absent),
                "{what}: {}",
                String::from_utf8_lossy(absent)
            );
        }
        assert!(
            names.iter().any(|n| n == b"opq/.wh.other"),
            "{what}: explicit whiteout expected"
        );
        let mut tar = tar;
        std::io::Seek::seek(&mut tar, std::io::SeekFrom::Start(0)).unwrap();
        let root = ov.dir.path().join(format!("applied-{what}"));
        fixture::copy_tree(&l, &root);
        apply::apply(std::io::BufReader::new(tar), &root);
        tree::assert_same(
            &expected,
            &tree::snapshot(&root, &CompareOpts::layer()),
            &CompareOpts::layer(),
            what,
        );
    }
}

#[test]
fn empty_mount_stubs_and_their_new_parents_are_left_out() {
    let mut ov = Overlay::new(1);
    let l = ov.lowers[0].clone();
    scenario::mkdir(&l, b"etc");
    scenario::mkdir(&l, b"dev");
    write(&l, b"etc/passwd", b"root");
    ov.mount();
    let m = ov.merged.clone();
    write(&m, b"etc/hosts", b"");
    write(&m, b"etc/hostname", b"has content: kept");
    write(&m, b"dev/termination-log", b"");
    scenario::mkdir(&m, b"run/secrets/kubernetes.io/serviceaccount");
    let stubs = [
        "/etc/hosts",
        "/etc/hostname",
        "/dev/termination-log",
        "/run/secrets/kubernetes.io/serviceaccount",
    ];
    let opts = Options {
        skip_mount_stubs: stubs.iter().map(|s| s.to_string()).collect(),
        ..Options::default()
    };
    let up = Source::Upperdir {
        upper: &ov.upper,
        lowers: &ov.lowers,
    };
    let walk = Source::Walk {
        lower: Some(&l),
        upper: &m,
    };
    for source in [up, walk] {
        let (tar, _) = layer_file(&source, &opts, ov.dir.path());
        let names = entry_names(tar);
        assert!(names.iter().any(|n| n == b"etc/hostname"), "{source:?}");
        // dev/ and etc/ themselves may appear (their mtime changed); nothing in run/ may.
        let stub =
            |n: &Vec<u8>| n.starts_with(b"run") || n == b"etc/hosts" || n == b"dev/termination-log";
        assert!(!names.iter().any(stub), "{source:?}: {names:?}");
    }
}
