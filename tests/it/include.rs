//! `--include PATH`: only the changes under the path go in; everything else keeps the base's
//! version, even below an ancestor the sandbox deleted and recreated (an opaque directory in the
//! upperdir), with every diff source and combined with `--squash`.

use crate::lab::{Lab, RunOpts};
use crate::tree::{compare_trees, CompareOpts};
use std::path::Path;

/// /data is deleted and recreated (opaque in the upperdir) with a new /data/sub; /etc changes
/// and /data/keep.txt vanishes, both outside the inclusion.
const CHANGES: &str = "rm -rf /data && mkdir -p /data/sub/deep /data/sub/new \
    && echo rewritten > /data/sub/deep/file && echo added > /data/sub/new/f \
    && echo outside > /etc/outside && echo x >> /etc/passwd";

fn commit(lab: &Lab, id: &str, extra: &[&str]) -> std::path::PathBuf {
    let result = lab.commit(id, &format!("inc/{id}:v1"), extra);
    lab.pull_unpack(&result.image)
}

/// The image equals the sandbox under /data/sub and the base everywhere else.
fn assert_included_only(lab: &Lab, id: &str, base: &Path, image: &Path) {
    let opts = CompareOpts::container_rootfs();
    let inside = compare_trees(
        &lab.rootfs(id).join("data/sub"),
        &image.join("data/sub"),
        &opts,
    );
    assert!(inside.is_empty(), "under /data/sub:\n{}", inside.join("\n"));
    let mut outside_opts = CompareOpts::container_rootfs();
    outside_opts.ignore.push("/data/sub".into());
    // /data itself is written as the sandbox has it (the directory above the inclusion).
    outside_opts.mtime = false;
    let outside = compare_trees(base, image, &outside_opts);
    let outside: Vec<_> = outside
        .into_iter()
        .filter(|d| !d.starts_with("/data:") && !d.starts_with("/data "))
        .collect();
    assert!(
        outside.is_empty(),
        "outside /data/sub:\n{}",
        outside.join("\n")
    );
    assert_eq!(
        std::fs::read_to_string(image.join("data/keep.txt")).unwrap(),
        "keep me\n"
    );
    assert!(!image.join("etc/outside").exists());
}

#[test]
fn only_changes_under_an_included_path_go_in_with_each_source_and_with_squash() {
    let _defaults = crate::lab::overlay_defaults();
    let lab = Lab::start();
    let base_ref = lab.base_image("base", false);
    let base = lab.pull_unpack(&base_ref);
    for (id, extra) in [
        ("i-upper", vec!["--include", "/data/sub/"]),
        (
            "i-walk",
            vec!["--include", "/data/./sub", "--diff-source", "walk"],
        ),
        ("i-squash", vec!["--include", "/data/sub", "--squash"]),
    ] {
        lab.run_container(id, &base_ref, &RunOpts::default());
        lab.exec(id, CHANGES);
        let image = commit(&lab, id, &extra);
        assert_included_only(&lab, id, &base, &image);
    }
}
