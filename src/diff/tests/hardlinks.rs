//! Hardlink groups through the double walk, on real overlay mounts read the way committer reads
//! them (the raw lowerdir or a read-only lower view, against a read-only `lowerdir=UPPER:L`
//! view of the container) and on a plain copy of the parent (the native snapshotter). Each
//! layer is unpacked over the parent by our applier and by umoci and must give the container's
//! tree, hardlink groups included; and it must hold only what the group change needs.

use super::fixture::{self, Overlay};
use super::scenario::{self, p, write};
use super::{assert_unpacks_to, layer_file, rawtar, umoci};
use crate::diff::{write_layer, Options, Source};
use std::fs::File;
use std::path::Path;

fn link(root: &Path, from: &[u8], to: &[u8]) {
    std::fs::hard_link(p(root, from), p(root, to)).unwrap();
}

/// The parent: pairs {data/a, data/b} and {data/p, data/q}, a pair nobody touches {keep/x,
/// keep/y}, and a lone data/twin whose bytes, mode and mtime a new file will copy.
fn make_lower(l: &Path) {
    scenario::mkdir(l, b"data");
    scenario::mkdir(l, b"keep");
    write(l, b"data/a", b"shared by a and b\n");
    link(l, b"data/a", b"data/b");
    write(l, b"data/p", b"shared by p and q\n");
    link(l, b"data/p", b"data/q");
    write(l, b"keep/x", b"an untouched pair\n");
    link(l, b"keep/x", b"keep/y");
    write(l, b"data/twin", b"same bytes\n");
    scenario::set_mtime(&p(l, b"data/twin"), 1_600_000_000, 0);
}

#[derive(Debug, Clone, Copy)]
enum Change {
    /// `ln a c`: under overlay, a is copied up and joins c; b stays alone on the old inode.
    LnAC,
    /// `rm b; ln a c`: the link count stays 2, the members change.
    RmBLnAC,
    /// A new group in the upper tree, one of whose names replaces a lower file that has the same
    /// bytes, mode and mtime (so that only the group tells it apart).
    NewGroup,
    /// b replaced by a copy of itself (`cp -p a tmp; mv tmp b`): the pair splits.
    Split,
    /// `rm b`: only the whiteout is needed, a keeps its inode.
    RmB,
    /// `ln -f a p`: p leaves its pair for a's.
    Merge,
}

fn change(m: &Path, c: Change) {
    match c {
        Change::LnAC => link(m, b"data/a", b"data/c"),
        Change::RmBLnAC => {
            std::fs::remove_file(p(m, b"data/b")).unwrap();
            link(m, b"data/a", b"data/c");
        }
        Change::NewGroup => {
            scenario::mkdir(m, b"new");
            write(m, b"new/x", b"same bytes\n");
            scenario::set_mtime(&p(m, b"new/x"), 1_600_000_000, 0);
            link(m, b"new/x", b"new/y");
            std::fs::remove_file(p(m, b"data/twin")).unwrap();
            link(m, b"new/x", b"data/twin");
        }
        Change::Split => {
            let a = p(m, b"data/a");
            std::fs::copy(&a, p(m, b"data/tmp")).unwrap();
            let mtime = std::fs::symlink_metadata(&a).unwrap().modified().unwrap();
            File::options()
                .write(true)
                .open(p(m, b"data/tmp"))
                .unwrap()
                .set_modified(mtime)
                .unwrap();
            std::fs::rename(p(m, b"data/tmp"), p(m, b"data/b")).unwrap();
        }
        Change::RmB => std::fs::remove_file(p(m, b"data/b")).unwrap(),
        Change::Merge => {
            std::fs::remove_file(p(m, b"data/p")).unwrap();
            link(m, b"data/a", b"data/p");
        }
    }
}

/// The non-directory entries of a layer: (type, path, link target).
fn files(tar: &File) -> Vec<(char, String, String)> {
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    rawtar::entries(tar.try_clone().unwrap())
        .into_iter()
        .filter(|e| e.kind != b'5')
        .map(|e| (e.kind as char, s(&e.path), s(&e.link)))
        .collect()
}

type Expect<'a> = &'a [(char, &'a str, &'a str)];

fn owned(e: Expect) -> Vec<(char, String, String)> {
    e.iter()
        .map(|(k, p, l)| (*k, p.to_string(), l.to_string()))
        .collect()
}

/// Walks `lower` against `upper`, checks the entries, then unpacks the layer over `base` with
/// both unpackers and compares with `expected`.
fn check_walk(
    lower: &Path,
    upper: &Path,
    base: &Path,
    expected: &Path,
    scratch: &Path,
    want: Expect,
    what: &str,
) {
    let source = Source::Walk {
        lower: Some(lower),
        upper,
    };
    let (tar, _) = layer_file(&source, &Options::default(), scratch);
    assert_eq!(files(&tar), owned(want), "{what}: entries");
    assert_unpacks_to(tar, base, expected, scratch, what);
    let (top, _) = write_layer(&source, &Options::default(), Vec::new()).unwrap();
    umoci::assert_umoci_unpacks_to(base, top, expected, scratch, &format!("umoci-{what}"));
}

#[derive(Debug, Clone, Copy)]
enum Mount {
    /// containerd's default options (redirect_dir and metacopy off).
    Plain,
    /// redirect_dir=on and metacopy=on: what makes committer walk.
    Metacopy,
}

fn overlay_case(c: Change, mode: Mount, want: Expect) {
    let mut ov = Overlay::new(1);
    make_lower(&ov.lowers[0]);
    let view_opts: &[&str] = match mode {
        Mount::Plain => {
            ov.mount();
            &[]
        }
        Mount::Metacopy => {
            ov.mount_with_params(&[("redirect_dir", "Y"), ("metacopy", "Y")]);
            &["metacopy=on", "redirect_dir=follow"]
        }
    };
    change(&ov.merged, c);
    let container = ov.mount_container_view(view_opts);
    let lower_view = ov.mount_lower_view();
    let raw = ov.lowers[0].clone();
    for (name, lower) in [("raw-lowerdir", &raw), ("lower-view", &lower_view)] {
        let what = format!("{c:?}-{mode:?}-{name}");
        check_walk(
            lower,
            &container,
            &raw,
            &ov.merged,
            ov.dir.path(),
            want,
            &what,
        );
    }
}

/// The native snapshotter: the container's tree is a copy of the parent's (hardlinks kept).
fn native_case(c: Change, want: Expect) {
    let t = tempfile::Builder::new()
        .prefix("committer-diff-")
        .tempdir()
        .unwrap();
    let (lower, container) = (t.path().join("parent"), t.path().join("container"));
    std::fs::create_dir(&lower).unwrap();
    make_lower(&lower);
    fixture::copy_tree(&lower, &container);
    change(&container, c);
    let what = format!("{c:?}-native");
    check_walk(
        &lower,
        &container,
        &lower,
        &container,
        t.path(),
        want,
        &what,
    );
}

#[test]
fn ln_a_c_over_a_lower_pair_moves_a_to_c_and_leaves_b_alone() {
    // Overlay breaks the lower link: only a (copied up) and c need to be in the layer, and a's
    // entry replaces the inode b keeps.
    let ovl = [('0', "data/a", ""), ('1', "data/c", "data/a")];
    overlay_case(Change::LnAC, Mount::Plain, &ovl);
    overlay_case(Change::LnAC, Mount::Metacopy, &ovl);
    // A plain tree: nlink 2 -> 3, all three names are one group.
    let native = [
        ('0', "data/a", ""),
        ('1', "data/b", "data/a"),
        ('1', "data/c", "data/a"),
    ];
    native_case(Change::LnAC, &native);
}

#[test]
fn rm_b_then_ln_a_c_with_the_link_count_unchanged() {
    let want = [
        ('0', "data/a", ""),
        ('0', "data/.wh.b", ""),
        ('1', "data/c", "data/a"),
    ];
    overlay_case(Change::RmBLnAC, Mount::Plain, &want);
    overlay_case(Change::RmBLnAC, Mount::Metacopy, &want);
    native_case(Change::RmBLnAC, &want);
}

#[test]
fn a_new_group_in_upper_takes_over_a_lookalike_lower_file() {
    let want = [
        ('0', "data/twin", ""),
        ('1', "new/x", "data/twin"),
        ('1', "new/y", "data/twin"),
    ];
    overlay_case(Change::NewGroup, Mount::Plain, &want);
    overlay_case(Change::NewGroup, Mount::Metacopy, &want);
    native_case(Change::NewGroup, &want);
}

#[test]
fn a_split_pair_emits_only_the_member_that_left() {
    // a stays on the parent's inode (under overlay it is that inode; in a copy it is the first
    // member and its bytes are unchanged); b's own entry takes it off.
    let want = [('0', "data/b", "")];
    overlay_case(Change::Split, Mount::Plain, &want);
    overlay_case(Change::Split, Mount::Metacopy, &want);
    native_case(Change::Split, &want);
}

#[test]
fn rm_b_emits_only_the_whiteout() {
    let want = [('0', "data/.wh.b", "")];
    overlay_case(Change::RmB, Mount::Plain, &want);
    overlay_case(Change::RmB, Mount::Metacopy, &want);
    native_case(Change::RmB, &want);
}

#[test]
fn a_member_moved_between_two_lower_pairs() {
    // Overlay: {a, p} on a's copy-up; b and q each stay on their parent inode.
    let ovl = [('0', "data/a", ""), ('1', "data/p", "data/a")];
    overlay_case(Change::Merge, Mount::Plain, &ovl);
    overlay_case(Change::Merge, Mount::Metacopy, &ovl);
    // A plain tree: {a, b, p} is one group; q stays alone on its parent inode.
    let native = [
        ('0', "data/a", ""),
        ('1', "data/b", "data/a"),
        ('1', "data/p", "data/a"),
    ];
    native_case(Change::Merge, &native);
}
