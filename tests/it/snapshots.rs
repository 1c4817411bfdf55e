//! Snapshot chains on the real thing: a sandbox committed, restored from the pushed image as a
//! new container, changed, and read again through the squash views — the original base alone on
//! one side, the whole sandbox on the other — for the overlayfs and native snapshotters.

use crate::lab::{Lab, RunOpts};
use crate::tree::{compare_trees, CompareOpts};
use committer::containerd::lookup::Selector;
use committer::containerd::Containerd;
use committer::image::chain;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

/// Commits container `id` to `REGISTRY/snap:TAG`; returns the pushed image by digest.
fn commit(lab: &Lab, id: &str, tag: &str) -> String {
    let target = format!("{}/snap:{tag}", lab.registry);
    let out = lab.committer(&[
        "commit",
        "--container",
        id,
        "--image",
        &target,
        "--plain-http",
    ]);
    assert!(
        out.status.success(),
        "commit of {id} failed:\n{}",
        crate::lab::describe(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("result JSON");
    v["image"].as_str().unwrap().to_string()
}

/// The tar entry names of the squashed layer of container `id`, and its two views compared with
/// the base image and the container's rootfs.
async fn squash_layer(lab: &Lab, id: &str, base_rootfs: &Path) -> BTreeSet<String> {
    let ctr = Containerd::connect(&lab.address, &lab.namespace)
        .await
        .unwrap();
    let info = ctr.find_container(&Selector::Id(id.into())).await.unwrap();
    let image = ctr.base_image(&info.image).await.unwrap();
    let config: Value = serde_json::from_slice(&image.config_bytes).unwrap();
    let original = chain::recorded_original(&config)
        .expect("a record that matches the image's layers")
        .expect("the snapshot image records its original base");
    let mounts = ctr.snapshot_mounts(&info).await.unwrap();
    let views = committer::squash::views(
        &ctr,
        &info,
        &mounts,
        image.layers().len(),
        original.layers,
        &original.chain_id,
    )
    .await
    .unwrap();

    let lower = views.lower.clone().expect("the base has layers");
    let diffs = compare_trees(&lower, base_rootfs, &CompareOpts::default());
    assert!(
        diffs.is_empty(),
        "base view differs from the base image:\n{}",
        diffs.join("\n")
    );
    let diffs = compare_trees(
        &views.upper,
        &lab.rootfs(id),
        &CompareOpts::container_rootfs(),
    );
    assert!(
        diffs.is_empty(),
        "container view differs from its rootfs:\n{}",
        diffs.join("\n")
    );

    let tar_path = lab.dir.join(format!("squash-{id}.tar"));
    let file = std::fs::File::create(&tar_path).unwrap();
    let opts = committer::diff::Options {
        skip_mount_stubs: info.mount_destinations.clone(),
        ..Default::default()
    };
    committer::diff::write_layer(&views.as_diff_source(), &opts, file).unwrap();
    views.cleanup().await;
    let mut archive = tar::Archive::new(std::fs::File::open(&tar_path).unwrap());
    archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn cycle_squashes_to_changes_since_the_original_base(snapshotter: &str) {
    let _params = crate::lab::overlay_defaults();
    let lab = Lab::start();
    let base = lab.base_image("base-oci", false);
    let base_rootfs = lab.pull_unpack(&base);
    let opts = RunOpts::default().snapshotter(snapshotter);
    lab.run_container("c1", &base, &opts);
    lab.exec(
        "c1",
        "head -c 4194304 /dev/urandom > /big && echo one > /a && echo keep > /k && rm /bin/true",
    );
    let snap1 = commit(&lab, "c1", "1");

    lab.ctr(&["images", "pull", "--plain-http", &snap1]);
    lab.run_container("c2", &snap1, &opts);
    lab.exec("c2", "rm /big && echo two > /a && echo new > /b");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let names = rt.block_on(squash_layer(&lab, "c2", &base_rootfs));

    let has = |n: &str| names.iter().any(|e| e.trim_end_matches('/') == n);
    assert!(has("a") && has("b") && has("k"), "{names:?}");
    assert!(
        has("bin/.wh.true"),
        "the base file deleted in cycle 1 stays deleted: {names:?}"
    );
    assert!(
        !names.iter().any(|e| e.contains("big")),
        "a file created and deleted after the base is in no layer: {names:?}"
    );
    if snapshotter == "overlayfs" {
        // The native snapshotter's copies also re-emit directories whose times differ.
        let want = ["a", "b", "bin/", "bin/.wh.true", "k"].map(String::from);
        assert_eq!(names, BTreeSet::from(want));
    }
}

#[test]
fn squash_views_overlayfs_hold_every_change_since_the_original_base_and_nothing_deleted() {
    cycle_squashes_to_changes_since_the_original_base("overlayfs");
}

#[test]
fn squash_views_native_hold_every_change_since_the_original_base_and_nothing_deleted() {
    cycle_squashes_to_changes_since_the_original_base("native");
}
