//! "Unpacked image = merged rootfs" for both sources, plus the facts that make layers small and
//! reproducible: determinism, no-op copy-ups dropped, whiteouts over nothing skipped.

use super::fixture::Overlay;
use super::scenario::{self, p, write};
use super::{assert_unpacks_to, entry_names, layer_file};
use crate::diff::fsx::hook::{self, Stage};
use crate::diff::{upperdir_is_exact, write_layer, Options, Source};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

fn scenario_overlay(sparse: u64) -> Overlay {
    let mut ov = Overlay::new(1);
    scenario::make_lower(&ov.lowers[0]);
    ov.mount();
    scenario::change(&ov.merged, sparse);
    ov
}

#[test]
fn upperdir_layer_unpacks_to_the_merged_tree() {
    let ov = scenario_overlay(1 << 30);
    {
        // The module-parameter check must not see another test's temporary setting.
        let _g = super::fixture::MOUNT_LOCK
            .read()
            .unwrap_or_else(|e| e.into_inner());
        assert_eq!(upperdir_is_exact(&ov.upper, &ov.options()), Ok(()));
    }
    let source = Source::Upperdir {
        upper: &ov.upper,
        lowers: &ov.lowers,
    };
    let (tar, stats) = layer_file(&source, &Options::default(), ov.dir.path());
    assert_eq!(stats.source, "upperdir");
    assert!(stats.content_bytes >= 1 << 30, "{stats:?}");
    let names = entry_names(tar.try_clone().unwrap());
    assert!(
        !names.iter().any(|n| n == b"noop.txt"),
        "a no-op copy-up was emitted"
    );
    assert!(
        ov.upper.join("noop.txt").exists(),
        "the scenario should produce a copy-up"
    );
    assert!(!names.iter().any(|n| n == b"sock"), "sockets are skipped");
    assert_unpacks_to(tar, &ov.lowers[0], &ov.merged, ov.dir.path(), "upperdir");
}

#[test]
fn walk_layer_unpacks_to_the_merged_tree() {
    let ov = scenario_overlay(1 << 30);
    let source = Source::Walk {
        lower: Some(&ov.lowers[0]),
        upper: &ov.merged,
    };
    let compared = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let c = compared.clone();
    hook::set(Some(Box::new(move |stage, name| {
        if stage == Stage::Compare {
            c.borrow_mut().push(name.to_vec());
        }
    })));
    let (tar, stats) = layer_file(&source, &Options::default(), ov.dir.path());
    hook::set(None);
    // Bytes are compared only where overlay copied a file up and kept size and mtime; files
    // never copied up are recognised by inode number and ctime.
    assert_eq!(*compared.borrow(), [&b"noop.txt"[..], b"sneaky.bin"]);
    assert_eq!(stats.source, "walk");
    let names = entry_names(tar.try_clone().unwrap());
    for unchanged in [&b"noop.txt"[..], b"keepdir/untouched", b"keepdir/"] {
        assert!(
            !names.iter().any(|n| n == unchanged),
            "{} emitted",
            String::from_utf8_lossy(unchanged)
        );
    }
    assert!(
        names.iter().any(|n| n == b"sneaky.bin"),
        "same size and mtime, new bytes: must be emitted"
    );
    assert!(
        names.iter().any(|n| n == b"repdir/.wh.old1"),
        "recreated dir: whiteout per missing child"
    );
    assert_unpacks_to(tar, &ov.lowers[0], &ov.merged, ov.dir.path(), "walk");
}

#[test]
fn walk_without_lower_takes_everything_and_equals_the_tree() {
    let ov = scenario_overlay(1 << 20);
    let source = Source::Walk {
        lower: None,
        upper: &ov.merged,
    };
    let (tar, stats) = layer_file(&source, &Options::default(), ov.dir.path());
    assert_eq!(stats.whiteouts, 0);
    let empty = ov.dir.path().join("empty-base");
    std::fs::create_dir(&empty).unwrap();
    assert_unpacks_to(tar, &empty, &ov.merged, ov.dir.path(), "walk from nothing");
}

fn digest(source: &Source) -> (Vec<u8>, u64) {
    let (h, stats) = write_layer(source, &Options::default(), Hasher(Sha256::new())).unwrap();
    (h.0.finalize().to_vec(), stats.entries)
}

struct Hasher(Sha256);
impl std::io::Write for Hasher {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn two_runs_over_an_unchanged_tree_are_byte_identical() {
    let ov = scenario_overlay(8 << 20);
    let up = Source::Upperdir {
        upper: &ov.upper,
        lowers: &ov.lowers,
    };
    let walk = Source::Walk {
        lower: Some(&ov.lowers[0]),
        upper: &ov.merged,
    };
    for s in [up, walk] {
        let (a, n) = digest(&s);
        // Reading must not change anything either (atime aside, which is not recorded).
        let (b, _) = digest(&s);
        assert_eq!(a, b, "{s:?}");
        assert!(n > 30, "{s:?}: only {n} entries");
    }
}

#[test]
fn whiteout_with_nothing_below_is_skipped() {
    let mut ov = Overlay::new(2);
    let (l0, l1) = (ov.lowers[0].clone(), ov.lowers[1].clone());
    write(&l1, b"gone_in_l0", b"hidden by l0's whiteout");
    write(&l1, b"real", b"r");
    scenario::mknod(
        &p(&l0, b"gone_in_l0"),
        rustix::fs::FileType::CharacterDevice,
        0,
        0,
    );
    // Whiteouts in the upperdir: over nothing, over something hidden, over something real.
    for name in [&b"ghost"[..], b"gone_in_l0", b"real"] {
        scenario::mknod(
            &p(&ov.upper, name),
            rustix::fs::FileType::CharacterDevice,
            0,
            0,
        );
    }
    ov.mount();
    let source = Source::Upperdir {
        upper: &ov.upper,
        lowers: &ov.lowers,
    };
    let (tar, stats) = layer_file(&source, &Options::default(), ov.dir.path());
    assert_eq!(entry_names(tar), vec![b".wh.real".to_vec()]);
    assert_eq!(stats.whiteouts, 1);
}

#[test]
fn whiteouts_and_opaque_dirs_in_lower_layers_are_honoured() {
    let mut ov = Overlay::new(3);
    let l: Vec<PathBuf> = ov.lowers.clone();
    // l2 (bottom): a dir with content; l1: the dir made opaque with new content, a file
    // whiteout; l0 (top): an xattr whiteout.
    scenario::mkdir(&l[2], b"d/sub");
    write(&l[2], b"d/old", b"o");
    write(&l[2], b"d/sub/deep", b"o");
    write(&l[2], b"f", b"f");
    write(&l[2], b"x", b"x");
    scenario::mkdir(&l[1], b"d");
    scenario::setx(&l[1].join("d"), "trusted.overlay.opaque", b"y");
    write(&l[1], b"d/new", b"n");
    scenario::mknod(&l[1].join("f"), rustix::fs::FileType::CharacterDevice, 0, 0);
    write(&l[0], b"x", b"");
    scenario::setx(&l[0].join("x"), "trusted.overlay.whiteout", b"");
    // Since Linux 6.8 overlay looks for xattr whiteouts only in directories marked opaque=x.
    scenario::setx(&l[0], "trusted.overlay.opaque", b"x");
    ov.mount();
    let lower_view = ov.mount_lower_view();
    let m = ov.merged.clone();
    std::fs::remove_file(m.join("d/new")).unwrap();
    write(&m, b"d/old", b"recreated"); // was hidden by the opaque l1
    write(&m, b"f", b"recreated");
    write(&m, b"x", b"recreated");
    let source = Source::Upperdir {
        upper: &ov.upper,
        lowers: &ov.lowers,
    };
    let (tar, _) = layer_file(&source, &Options::default(), ov.dir.path());
    assert_unpacks_to(tar, &lower_view, &ov.merged, ov.dir.path(), "three lowers");
}

#[test]
fn userxattr_mounts_mark_opaque_dirs_with_user_overlay_xattrs() {
    let mut ov = Overlay::new(1);
    let l = ov.lowers[0].clone();
    scenario::mkdir(&l, b"d");
    write(&l, b"d/old", b"o");
    write(&l, b"f", b"f");
    // The kernel refuses redirect_dir=off/metacopy=off beside userxattr (it forces both off).
    ov.extra = vec!["userxattr".into()];
    ov.mount();
    let m = ov.merged.clone();
    std::fs::remove_dir_all(m.join("d")).unwrap();
    scenario::mkdir(&m, b"d");
    write(&m, b"d/new", b"n");
    std::fs::remove_file(m.join("f")).unwrap();
    let opaque = rustix::fs::getxattr(ov.upper.join("d"), "user.overlay.opaque", &mut [0u8; 8][..]);
    assert_eq!(
        opaque.ok(),
        Some(1),
        "the kernel should mark d opaque with user.overlay.opaque"
    );
    {
        let _g = super::fixture::MOUNT_LOCK
            .read()
            .unwrap_or_else(|e| e.into_inner());
        assert_eq!(upperdir_is_exact(&ov.upper, &ov.options()), Ok(()));
    }
    let source = Source::Upperdir {
        upper: &ov.upper,
        lowers: &ov.lowers,
    };
    let opts = Options {
        userxattr: true,
        ..Options::default()
    };
    let (tar, _) = layer_file(&source, &opts, ov.dir.path());
    let names = entry_names(tar.try_clone().unwrap());
    assert_eq!(names, [&b"d/"[..], b"d/.wh..wh..opq", b"d/new", b".wh.f"]);
    assert_unpacks_to(tar, &l, &m, ov.dir.path(), "userxattr");
}
