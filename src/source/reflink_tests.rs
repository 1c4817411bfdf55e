use super::*;
use crate::diff;
use std::io::Write;

/// A tree with big files (kept), small ones (inline), a sparse one and odd sizes.
fn tree() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    std::fs::create_dir(p.join("d")).unwrap();
    let big: Vec<u8> = (0..3_000_001u32)
        .map(|i| (i * 7 + i / 4099) as u8)
        .collect();
    std::fs::write(p.join("d/big"), &big).unwrap();
    std::fs::write(p.join("d/exact"), vec![5u8; 128 << 10]).unwrap();
    std::fs::write(p.join("small"), b"hello").unwrap();
    std::fs::write(p.join("edge"), vec![9u8; INLINE as usize]).unwrap();
    let sparse = File::create(p.join("sparse")).unwrap();
    sparse.set_len(4 << 20).unwrap();
    (&sparse).write_all(b"head").unwrap();
    std::os::unix::fs::symlink("d/big", p.join("link")).unwrap();
    t
}

fn opts(content: Option<ContentHook>) -> diff::Options {
    diff::Options {
        source_date_epoch: Some(1),
        content,
        ..Default::default()
    }
}

fn plain_tar(root: &Path) -> Vec<u8> {
    let src = diff::Source::Walk {
        lower: None,
        upper: root,
    };
    diff::write_layer(&src, &opts(None), Vec::new()).unwrap().0
}

/// Writes the recipe with `clones` and reads the tar back.
fn assembled(root: &Path, clones: Clones) -> (Vec<u8>, u64, u64) {
    let src = diff::Source::Walk {
        lower: None,
        upper: root,
    };
    let mut recipe = tempfile::tempfile().unwrap();
    let (_, stats) = diff::write_layer(&src, &opts(Some(clones.hook())), &mut recipe).unwrap();
    assert!(stats.files >= 4);
    let recipe_len = recipe.metadata().unwrap().len();
    let stored = clones.stored_bytes();
    let dir = clones.lock().dir.path().to_path_buf();
    let mut out = Vec::new();
    let mut tar = clones.assemble(recipe).unwrap();
    tar.read_to_end(&mut out).unwrap();
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "every clone is deleted once read"
    );
    drop(tar);
    assert!(!dir.exists(), "the clone directory goes with the assembler");
    (out, recipe_len, stored)
}

#[test]
fn the_assembled_tar_is_byte_for_byte_the_tar_written_whole() {
    let t = tree();
    let want = plain_tar(t.path());
    let spool = tempfile::tempdir().unwrap();
    let (got, recipe_len, stored) = assembled(t.path(), Clones::new(spool.path()).unwrap());
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the assembled tar differs from the whole one");
    // big, exact, edge and sparse were kept outside the recipe; small went inline.
    assert_eq!(stored, 3_000_320 + (128 << 10) + INLINE + (4 << 20));
    assert_eq!(recipe_len + stored, want.len() as u64);
}

#[test]
fn without_copy_file_range_the_contents_are_copied_by_read_and_write() {
    let t = tree();
    let want = plain_tar(t.path());
    let spool = tempfile::tempdir().unwrap();
    let clones = Clones::new(spool.path()).unwrap();
    {
        let mut s = clones.lock();
        s.clone = false;
        s.kernel_copy = false;
    }
    let (got, _, _) = assembled(t.path(), clones);
    assert!(got == want);
}

#[test]
fn a_file_shorter_than_its_header_is_reported_short() {
    let spool = tempfile::tempdir().unwrap();
    let clones = Clones::new(spool.path()).unwrap();
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&vec![1u8; 100_000]).unwrap();
    let mut s = clones.lock();
    assert_eq!(s.keep(&f, 200_000, 0).unwrap(), Kept::Short(100_000));
    assert_eq!(s.keep(&f, 100_000, 0).unwrap(), Kept::Stored);
    assert_eq!(s.keep(&f, 10, 0).unwrap(), Kept::Inline);
    assert_eq!(s.kept, vec![(0, 100_000)]);
    s.reset();
    assert!(s.kept.is_empty());
    assert_eq!(std::fs::read_dir(s.dir.path()).unwrap().count(), 0);
}

#[test]
fn a_clone_is_the_content_at_capture_time() {
    // Where clones are refused (ext4 here) this proves the copy; on XFS/btrfs, the clone.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
    let clones = Clones::new(dir.path()).unwrap();
    let f = File::open(&path).unwrap();
    assert_eq!(clones.lock().keep(&f, 1 << 20, 0).unwrap(), Kept::Stored);
    std::fs::write(&path, vec![2u8; 2 << 20]).unwrap();
    let clone = std::fs::read(clones.lock().dir.path().join("0")).unwrap();
    assert_eq!(clone, vec![1u8; 1 << 20]);
}
