//! The one integration-test binary: a lab (real containerd + registry) per test, and the tests that use it.
//! Needs root, containerd, runc, docker-registry, skopeo, umoci and busybox-static (scripts/test.sh installs them).

mod cli;
mod cri;
mod docker;
mod docker_change;
mod e2e;
mod fidelity;
mod hostile;
mod image;
mod include;
mod kind;
mod lab;
mod lookup;
mod process_run;
mod push;
mod quirks;
mod reflink;
mod safety;
mod snapshots;
mod spool;
mod squash_push;
mod supervisor;
#[path = "../../src/testing/tree.rs"]
mod tree;

use std::path::Path;
use std::time::Instant;

use lab::{Lab, RunOpts};
use tree::CompareOpts;

#[test]
fn lab_runs_a_container_and_exec_changes_its_rootfs() {
    let t = Instant::now();
    let lab = Lab::start();
    let started = t.elapsed();
    let oci = lab.base_image("base-oci", false);
    let built = t.elapsed();
    let docker = lab.base_image("base-docker", true);
    eprintln!(
        "Lab::start {started:?}, first base_image {:?}, second base_image {:?}",
        built - started,
        t.elapsed() - built
    );

    let images = lab.ctr(&["images", "ls"]);
    let media_type = |r: &str| {
        images
            .lines()
            .find(|l| l.starts_with(r))
            .and_then(|l| l.split_whitespace().nth(1))
    };
    assert_eq!(
        media_type(&oci),
        Some("application/vnd.oci.image.manifest.v1+json"),
        "{images}"
    );
    assert_eq!(
        media_type(&docker),
        Some("application/vnd.docker.distribution.manifest.v2+json"),
        "{images}"
    );

    lab.run_container("web", &oci, &RunOpts::cri("shop", "web-0", "app"));
    let info = lab.ctr(&["containers", "info", "web"]);
    for label in [
        r#""io.kubernetes.pod.namespace": "shop""#,
        r#""io.kubernetes.pod.name": "web-0""#,
        r#""io.kubernetes.container.name": "app""#,
    ] {
        assert!(info.contains(label), "{label} not in {info}");
    }

    let root = lab.rootfs("web");
    let owned = std::fs::symlink_metadata(root.join("data/owned.txt")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (owned.mode() & 0o7777, owned.uid(), owned.gid()),
        (0o640, 1000, 1000)
    );
    assert!(
        !root.join("etc/removed-in-layer2").exists(),
        "layer 2's whiteout was not applied"
    );

    let out = lab.exec("web", "echo changed > /data/modify.txt; rm /data/delete.txt; mkdir /data/new; echo hi > /data/new/f; id -u");
    assert_eq!(out, "0\n");
    assert_eq!(
        std::fs::read_to_string(root.join("data/modify.txt")).unwrap(),
        "changed\n"
    );
    assert!(!root.join("data/delete.txt").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("data/new/f")).unwrap(),
        "hi\n"
    );
    assert_eq!(
        lab.try_exec("web", "exit 3").status.code(),
        Some(3),
        "exec must report the script's exit status"
    );

    lab.run_container("plain", &docker, &RunOpts::default().snapshotter("native"));
    lab.exec("plain", "touch /data/native-was-here");
    assert!(lab.rootfs("plain").join("data/native-was-here").exists());

    // Leave one task paused: stop must thaw it to kill it.
    let pids = [lab.task_pid("web"), lab.task_pid("plain")];
    lab.ctr(&["tasks", "pause", "web"]);
    assert_eq!(lab.task_status("web"), "PAUSED");

    let (dir, sock, cgroup) = (
        lab.dir.clone(),
        lab.address.clone(),
        lab.cgroup_parent.clone(),
    );
    drop(lab);
    assert_no_leftovers(&dir, &sock, &cgroup, &pids);
}

#[test]
fn lab_base_image_unpacks_to_the_tree_a_fresh_container_sees() {
    let lab = Lab::start();
    let image = lab.base_image("base", false);
    lab.run_container("fresh", &image, &RunOpts::default());
    let unpacked = lab.pull_unpack(&image);
    let opts = CompareOpts {
        mtime: true,
        xattrs: true,
        hardlinks: true,
        ..CompareOpts::container_rootfs()
    };
    tree::assert_same_trees(&lab.rootfs("fresh"), &unpacked, &opts);

    // and the oracle does see a change made in the container
    lab.exec("fresh", "echo changed > /data/modify.txt");
    let diffs = tree::compare_trees(&lab.rootfs("fresh"), &unpacked, &opts);
    assert!(
        diffs
            .iter()
            .any(|d| d.starts_with("/data/modify.txt: size 8 vs 10")),
        "{diffs:#?}"
    );
}

fn assert_no_leftovers(dir: &Path, sock: &Path, cgroup: &str, pids: &[u32]) {
    let mentioning: Vec<_> = [dir.to_str().unwrap(), sock.to_str().unwrap()]
        .iter()
        .flat_map(|n| lab::processes_mentioning(n))
        .collect();
    assert!(
        mentioning.is_empty(),
        "processes left after stop: {mentioning:?}"
    );
    for pid in pids {
        assert!(
            !lab::process_alive(*pid),
            "container process {pid} survived stop"
        );
    }
    assert_eq!(
        lab::mounts_under(dir),
        Vec::<std::path::PathBuf>::new(),
        "mounts left after stop"
    );
    assert!(!dir.exists(), "{} not removed", dir.display());
    let cgroups: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|h| h.path().join(cgroup.trim_start_matches('/')))
        .chain([Path::new("/sys/fs/cgroup").join(cgroup.trim_start_matches('/'))])
        .filter(|p| p.exists())
        .collect();
    assert!(cgroups.is_empty(), "cgroups left after stop: {cgroups:?}");
}
