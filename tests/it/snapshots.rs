//! Snapshot chains on the real thing: a sandbox committed, restored from the pushed image as a
//! new container, changed, and read again through the squash views — the original base alone on
//! one side, the whole sandbox on the other — for the overlayfs and native snapshotters. The
//! squashed layer on the original base, unpacked by umoci, must equal the sandbox's rootfs.

use crate::lab::{Lab, RunOpts};
use crate::tree::{compare_trees, CompareOpts};
use committer::containerd::lookup::Selector;
use committer::containerd::Containerd;
use committer::image::{chain, BaseConfig};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

/// Commits container `id` to `REGISTRY/snap:TAG`; returns the pushed image by digest.
fn commit(lab: &Lab, id: &str, tag: &str) -> String {
    lab.commit(id, &format!("snap:{tag}"), &[]).image
}

/// The tar entry names of the squashed layer of container `id`, read from the source committer
/// picks (`expect`: "upperdir" for the stack of upperdirs, "walk" for the views); the two walk
/// views are also compared with the base image and the container's rootfs.
async fn squash_layer(lab: &Lab, id: &str, base_rootfs: &Path, expect: &str) -> BTreeSet<String> {
    let ctr = Containerd::connect(&lab.address, &lab.namespace)
        .await
        .unwrap();
    let info = ctr.find_container(&Selector::Id(id.into())).await.unwrap();
    let image = ctr.base_image(&info.image).await.unwrap();
    let plan = BaseConfig::read(&image)
        .unwrap()
        .plan(&image, chain::Mode::Squash);
    assert!(plan.squash, "{plan:?}");
    assert_eq!(plan.keep_layers, 2, "the base image's two layers");
    let mounts = ctr.snapshot_mounts(&info).await.unwrap();
    let target = committer::source::SquashTarget {
        image_layers: image.layers().len(),
        keep_layers: plan.keep_layers,
        base_chain_id: plan.original.chain_id.clone(),
    };
    let views = committer::source::squash::views(&ctr, &info, &mounts, &target)
        .await
        .unwrap();

    let lower = views.lower.clone().expect("the base has layers");
    // containerd's native snapshotter copies the base's directories with the copy's mtime (its
    // CopyDir sets times before filling a directory): mtimes are compared on overlayfs only.
    let opts = CompareOpts {
        mtime: info.snapshotter != "native",
        ..CompareOpts::default()
    };
    let diffs = compare_trees(&lower, base_rootfs, &opts);
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
        copied_dir_mtimes: committer::source::squash::copies_trees(&mounts),
        ..Default::default()
    };
    views.cleanup().await;
    let (source, reason) = committer::source::squash::source(
        &ctr,
        &info,
        &mounts,
        &target,
        committer::source::DiffSourceChoice::Auto,
    )
    .await
    .unwrap();
    assert_eq!(source.kind().as_str(), expect, "{reason}");
    committer::diff::write_layer(&source.as_diff_source(), &opts, file).unwrap();
    source.cleanup().await;
    let mut archive = tar::Archive::new(std::fs::File::open(&tar_path).unwrap());
    archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The original base with `layer` (an uncompressed tar) on top, unpacked by skopeo + umoci.
fn base_plus_layer(lab: &Lab, base: &str, layer: &Path) -> std::path::PathBuf {
    use crate::lab::check;
    use std::process::Command;
    let layout = lab.dir.join("squash-layout");
    let bundle = lab.dir.join("squash-bundle");
    check(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{base}"),
        &format!("oci:{}:base", layout.display()),
    ]));
    check(
        Command::new("umoci")
            .args(["raw", "add-layer", "--image"])
            .arg(format!("{}:base", layout.display()))
            .args(["--tag", "squashed"])
            .arg(layer),
    );
    check(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:squashed", layout.display()))
            .arg(&bundle),
    );
    bundle.join("rootfs")
}

/// The pushed manifest names the original base (two commits later) and the image it ran.
fn assert_provenance(image: &str, original: &str, parent: &str) {
    let raw = crate::lab::check(std::process::Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ]));
    let m: Value = serde_json::from_str(&raw).unwrap();
    let ann = &m["annotations"];
    assert_eq!(ann["org.opencontainers.image.base.name"], original, "{raw}");
    assert_eq!(ann["dev.committer.parent.name"], parent, "{raw}");
    assert!(ann["org.opencontainers.image.created"].is_string(), "{raw}");
    assert_eq!(
        m["layers"].as_array().unwrap().len(),
        4,
        "appended twice on 2 layers"
    );
}

/// Sets an overlay module parameter and puts the old value back on drop (also on panic).
struct ParamGuard {
    path: String,
    old: String,
}

impl ParamGuard {
    fn set(name: &str, value: &str) -> ParamGuard {
        let path = format!("/sys/module/overlay/parameters/{name}");
        let old = std::fs::read_to_string(&path).unwrap().trim().to_string();
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        ParamGuard { path, old }
    }
}

impl Drop for ParamGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.old);
    }
}

/// Two appended snapshots, then a third sandbox (started with the overlay `params`) whose squash
/// layer must hold every change since the original base and nothing that was deleted.
fn cycles_squash_to_changes_since_the_original_base(
    snapshotter: &str,
    params: &[&str],
    expect: &str,
) {
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
    lab.exec("c2", "rm /big && echo two > /a && echo c2 > /c2");
    let snap2 = commit(&lab, "c2", "2");
    assert_provenance(&snap2, &base, &snap1);
    lab.ctr(&["images", "pull", "--plain-http", &snap2]);

    let _params: Vec<ParamGuard> = params.iter().map(|p| ParamGuard::set(p, "Y")).collect();
    lab.run_container("c3", &snap2, &opts);
    lab.exec(
        "c3",
        "mv /data/sub /data/sub-moved && chmod 0600 /data/keep.txt && echo three > /a && echo b > /b",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let names = rt.block_on(squash_layer(&lab, "c3", &base_rootfs, expect));
    let restored = base_plus_layer(&lab, &base, &lab.dir.join("squash-c3.tar"));
    let same = CompareOpts {
        hardlinks: true,
        ..CompareOpts::container_rootfs()
    };
    let diffs = compare_trees(&lab.rootfs("c3"), &restored, &same);
    assert!(
        diffs.is_empty(),
        "original base + squashed layer differs from the sandbox:\n{}",
        diffs.join("\n")
    );

    let has = |n: &str| names.iter().any(|e| e.trim_end_matches('/') == n);
    for n in [
        "a",
        "b",
        "c2",
        "k",
        "bin/.wh.true",
        "data/keep.txt",
        "data/sub-moved/deep/file",
    ] {
        assert!(has(n), "{n} missing from {names:?}");
    }
    assert!(
        has("data/.wh.sub") || has("data/sub/.wh..wh..opq"),
        "{names:?}"
    );
    for n in ["etc", "usr", "usr/bin", "home", "var", "data/dir-to-delete"] {
        assert!(!has(n), "{n} is unchanged since the base: {names:?}");
    }
    assert!(
        !names.iter().any(|e| e.contains("big")),
        "a file created and deleted after the base is in no layer: {names:?}"
    );
}

#[test]
fn squash_views_overlayfs_hold_every_change_since_the_original_base_and_nothing_deleted() {
    let _defaults = crate::lab::overlay_defaults();
    cycles_squash_to_changes_since_the_original_base("overlayfs", &[], "upperdir");
}

#[test]
fn squash_views_overlayfs_redirect_dir_and_metacopy_are_exact() {
    let _turn = crate::lab::overlay_params_changing();
    // The module defaults turn redirects and metacopy on: the uppers are not exact, the views are.
    cycles_squash_to_changes_since_the_original_base(
        "overlayfs",
        &["redirect_dir", "metacopy"],
        "walk",
    );
}

#[test]
fn squash_views_native_hold_every_change_since_the_original_base_and_nothing_deleted() {
    cycles_squash_to_changes_since_the_original_base("native", &[], "walk");
}

#[test]
fn process_config_reads_the_spec_containerd_wrote() {
    let lab = Lab::start();
    let base = lab.base_image("base-oci", false);
    let opts = RunOpts {
        args: ["sh", "-c", "sleep 1000000"].map(String::from).to_vec(),
        ..RunOpts::default()
    };
    lab.run_container("p1", &base, &opts);
    let info: Value = serde_json::from_str(&lab.ctr(&["containers", "info", "p1"])).unwrap();
    let spec = serde_json::to_vec(&info["Spec"]).unwrap();
    let p = committer::image::process_config(&spec).unwrap();
    assert_eq!(p.args, ["sh", "-c", "sleep 1000000"]);
    assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/", "0:0"));
    assert!(p.env.iter().any(|e| e.starts_with("PATH=")), "{:?}", p.env);
}

/// A redirect the stack's walk meets only as it reads (planted in a snapshot layer's directory
/// after the options and the upperdir were found exact): the squash is read again by the walk
/// of the two views, in the same pause, and says why; the restore equals the sandbox.
#[test]
fn squash_stack_meeting_a_redirect_falls_back_to_the_views() {
    let _defaults = crate::lab::overlay_defaults();
    let lab = Lab::start();
    let base = lab.base_image("base-oci", false);
    lab.run_container("r1", &base, &RunOpts::default());
    lab.exec("r1", "mkdir /made && echo x > /made/x");
    let snap1 = commit(&lab, "r1", "1");
    lab.ctr(&["images", "pull", "--plain-http", &snap1]);
    lab.run_container("r2", &snap1, &RunOpts::default());
    lab.exec("r2", "echo y > /made/y");
    // The snapshot layer of snap1 is the container's first lowerdir.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let layer = rt.block_on(async {
        let ctr = Containerd::connect(&lab.address, &lab.namespace)
            .await
            .unwrap();
        let info = ctr
            .find_container(&Selector::Id("r2".into()))
            .await
            .unwrap();
        let mounts = ctr.snapshot_mounts(&info).await.unwrap();
        let lowers = mounts[0]
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .unwrap()
            .to_string();
        std::path::PathBuf::from(lowers.split(':').next().unwrap())
    });
    // A redirect to its own name: what overlay shows does not change.
    rustix::fs::lsetxattr(
        layer.join("made"),
        "trusted.overlay.redirect",
        b"made",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let result = lab.commit("r2", "snap:2", &["--squash"]);
    assert_eq!(result.diff_source, "walk", "{result:?}");
    assert!(
        result.diff_source_reason.contains("renamed directory"),
        "{result:?}"
    );
    let image = result.image.as_str();
    lab.ctr(&["images", "pull", "--plain-http", image]);
    lab.run_container("r3", image, &RunOpts::default());
    let diffs = compare_trees(
        &lab.rootfs("r2"),
        &lab.rootfs("r3"),
        &CompareOpts::container_rootfs(),
    );
    assert!(
        diffs.is_empty(),
        "r3 differs from r2:\n{}",
        diffs.join("\n")
    );
}
