//! A squash's stack of upperdirs: cycles of changes made through real overlay mounts, each
//! cycle's upperdir becoming a lower layer of the next, read as one layer against the original
//! base. The layer on a copy of the base must equal the last merged tree, and hold no whiteout
//! for what the base never had.

use super::fixture::{copy_tree, mount_overlay, MOUNT_LOCK};
use super::scenario::{self, write};
use super::{apply, entry_names, layer_file, tree, CompareOpts, Options, Source};
use std::path::{Path, PathBuf};

/// Overlay mounts in one temp dir, unmounted on drop (lazily if busy).
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn mount(&mut self, opts: &str, target: &Path) {
        let _g = MOUNT_LOCK.read().unwrap_or_else(|e| e.into_inner());
        std::fs::create_dir_all(target).unwrap();
        mount_overlay(opts, target);
        self.0.push(target.to_path_buf());
    }

    fn unmount_last(&mut self) {
        let m = self.0.pop().unwrap();
        let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::umount2(c.as_ptr(), 0) }, 0, "umount {m:?}");
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.drain(..).rev() {
            let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: as above.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn join(dirs: &[PathBuf]) -> String {
    let v: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    v.join(":")
}

fn sh(dir: &Path, script: &str) {
    let out = std::process::Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {out:?}");
}

/// Runs `cycles` one after the other, each in a fresh upperdir over the earlier ones and the
/// base; returns the uppers, topmost first.
fn run_cycles(root: &Path, base: &Path, cycles: &[&str], mounts: &mut Mounts) -> Vec<PathBuf> {
    let mut uppers: Vec<PathBuf> = Vec::new();
    for (i, script) in cycles.iter().enumerate() {
        let (upper, work, merged) = (
            root.join(format!("u{i}")),
            root.join(format!("w{i}")),
            root.join(format!("m{i}")),
        );
        std::fs::create_dir_all(&upper).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        let mut lowers = uppers.clone();
        lowers.push(base.to_path_buf());
        let opts = format!(
            "index=off,redirect_dir=off,metacopy=off,lowerdir={},upperdir={},workdir={}",
            join(&lowers),
            upper.display(),
            work.display()
        );
        mounts.mount(&opts, &merged);
        sh(&merged, script);
        mounts.unmount_last();
        uppers.insert(0, upper);
    }
    uppers
}

#[test]
fn a_stack_of_uppers_squashes_to_the_last_tree_with_whiteouts_only_for_the_base() {
    let dir = tempfile::Builder::new()
        .prefix("committer-squash-")
        .tempdir()
        .unwrap();
    let root = dir.path();
    let base = root.join("base");
    for d in ["opq/sub", "gone", "todir", "tofile/x", "keep"] {
        scenario::mkdir(&base, d.as_bytes());
    }
    for f in [
        "recreated",
        "mod",
        "opq/a",
        "opq/b",
        "opq/sub/c",
        "gone/y",
        "tofile/x/z",
        "keep/k",
    ] {
        write(&base, f.as_bytes(), f.as_bytes());
    }
    std::fs::remove_dir(base.join("todir")).unwrap();
    write(&base, b"todir", b"a file that becomes a directory");
    std::os::unix::fs::symlink("keep/k", base.join("link")).unwrap();

    let mut mounts = Mounts(Vec::new());
    let uppers = run_cycles(
        root,
        &base,
        &[
            // 1: add, delete base files, empty a dir and refill it, type changes.
            "echo 1 > new1 && mkdir -p newdir/s && echo n > newdir/s/f && rm recreated \
             && rm -r opq && mkdir opq && echo a1 > opq/a && echo 1 > mod \
             && rm todir && mkdir todir && echo t > todir/t && echo h > hl && ln hl hl2",
            // 2: delete what cycle 1 added, re-create a base file, partly refill the opaque dir,
            // delete a whole base dir, a dir becomes a file.
            "rm new1 && rm -r newdir && echo back > recreated && echo x2 > opq/x \
             && rm -r gone && rm -r tofile && echo f > tofile && chmod 0600 keep/k",
            // 3: a dir of cycle 1 comes back (opaque over cycle 2's whiteout, nothing in the
            // base), the deleted base dir comes back with other content, rewrite again.
            "mkdir newdir && echo again > newdir/g && mkdir gone && echo g2 > gone/y2 \
             && echo 3 > mod && rm opq/a && touch -h -d @1000 link",
        ],
        &mut mounts,
    );
    let mut all = uppers.clone();
    all.push(base.clone());
    let last = root.join("last");
    mounts.mount(&format!("ro,lowerdir={}", join(&all)), &last);

    let source = Source::Uppers {
        uppers: &uppers,
        lowers: std::slice::from_ref(&base),
    };
    let (tar, stats) = layer_file(&source, &Options::default(), root);
    assert_eq!(stats.source, "upperdir");
    let names: Vec<String> = entry_names(tar.try_clone().unwrap())
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    let has = |n: &str| names.iter().any(|e| e.trim_end_matches('/') == n);
    for n in [
        "recreated",
        "opq/.wh..wh..opq",
        "opq/x",
        ".wh.tofile",
        "tofile",
        "gone/.wh..wh..opq",
        "gone/y2",
        "newdir/g",
        "mod",
        "keep/k",
        "link",
        "todir/t",
        "hl",
        "hl2",
    ] {
        assert!(has(n), "{n} missing from {names:?}");
    }
    for n in [
        ".wh.new1",
        ".wh.newdir",
        "newdir/.wh..wh..opq",
        ".wh.recreated",
        "new1",
    ] {
        assert!(!has(n), "{n} in {names:?}");
    }
    assert!(!has("opq/a"), "deleted again in cycle 3: {names:?}");

    let applied = root.join("applied");
    copy_tree(&base, &applied);
    let mut tar = tar;
    std::io::Seek::seek(&mut tar, std::io::SeekFrom::Start(0)).unwrap(); // clones share it
    apply::apply(std::io::BufReader::new(tar), &applied);
    tree::assert_same(
        &tree::snapshot(&last, &CompareOpts::layer()),
        &tree::snapshot(&applied, &CompareOpts::layer()),
        &CompareOpts::layer(),
        "base + squashed stack",
    );
}
