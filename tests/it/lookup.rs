//! What gets committed: only a runtime whose rootfs is the host snapshot, the running instance
//! of a restarted pod, the image the snapshot was made from (not what its name points to now),
//! under a lease that outlives its TTL while the commit works.

use crate::lab::{Lab, RunOpts};
use crate::safety::{leases, throttling_proxy};
use std::process::Stdio;
use std::time::Duration;

#[test]
fn a_runc_container_whose_options_name_another_binary_is_refused() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    // runc under the name of gVisor's runtime: what the runc shim's BinaryName option selects.
    let bin = lab.dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let runc = crate::lab::check(std::process::Command::new("sh").args(["-c", "command -v runc"]));
    std::os::unix::fs::symlink(runc.trim(), bin.join("runsc")).unwrap();
    let runsc = bin.join("runsc");
    lab.ctr(&[
        "run",
        "-d",
        "--runc-binary",
        runsc.to_str().unwrap(),
        "--runc-root",
        lab.runc_root.to_str().unwrap(),
        "--cgroup",
        &format!("{}/b1", lab.cgroup_parent),
        &base,
        "b1",
        "sleep",
        "1000000",
    ]);
    lab.wait_status("b1", "RUNNING", Duration::from_secs(20));
    let out = lab.commit_output("b1", "snap/b1:v1", &[]);
    let stderr = crate::cli::stderr_text(&out);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains(&format!("BinaryName {:?}", runsc.to_str().unwrap())),
        "{stderr}"
    );
    assert_eq!(lab.task_status("b1"), "RUNNING");
    assert!(lab.tags("snap/b1").is_empty());
}

#[test]
fn pod_commits_the_running_instance_after_a_restart_and_says_when_none_runs() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    for (id, attempt) in [("web-0", "0"), ("web-1", "1")] {
        let opts = RunOpts::cri("shop", "web", "app")
            .label("io.kubernetes.container.restartCount", attempt);
        lab.run_container(id, &base, &opts);
        lab.exec(id, &format!("echo {id} > /instance"));
    }
    // The first instance exited; the kubelet keeps it (and its task, STOPPED) until GC.
    lab.ctr(&["tasks", "kill", "-s", "SIGKILL", "web-0"]);
    lab.wait_status("web-0", "STOPPED", Duration::from_secs(10));
    let commit = |tag: &str| {
        lab.committer(&[
            "commit",
            "--pod",
            "shop/web",
            "--image",
            &format!("{}/snap/web:{tag}", lab.registry),
            "--plain-http",
        ])
    };
    let result = crate::lab::result_of(&commit("v1"));
    assert_eq!(result.container, "web-1");
    let tree = lab.pull_unpack(&result.image);
    assert_eq!(
        std::fs::read_to_string(tree.join("instance")).unwrap(),
        "web-1\n"
    );

    lab.ctr(&["tasks", "kill", "-s", "SIGKILL", "web-1"]);
    lab.wait_status("web-1", "STOPPED", Duration::from_secs(10));
    let out = commit("v2");
    let stderr = crate::cli::stderr_text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("no container of pod shop/web is running"),
        "{stderr}"
    );
    assert!(
        stderr.contains("web-0") && stderr.contains("web-1"),
        "{stderr}"
    );
}

#[test]
fn a_commit_longer_than_the_lease_ttl_keeps_its_lease() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("l1", &base, &RunOpts::default());
    lab.exec("l1", "head -c 8388608 /dev/urandom > /blob");
    // 8 MiB through 1 MiB/s: ~8 s, more than twice the 3 s TTL.
    let proxy = throttling_proxy(lab.registry.clone(), 1 << 20);
    let mut cmd = lab.committer_command();
    cmd.env("COMMITTER_LEASE_TTL_SECONDS", "3").args([
        "commit",
        "--container",
        "l1",
        "--image",
        &format!("{proxy}/snap/l1:v1"),
        "--plain-http",
        "--compression",
        "none",
    ]);
    let first = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let second = lab.commit_output("l1", "snap/l1b:v1", &[]);
    let stderr = crate::cli::stderr_text(&second);
    assert_eq!(
        second.status.code(),
        Some(7),
        "still held after 5 s: {stderr}"
    );
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(!leases(&lab).contains("committer/l1"), "{}", leases(&lab));
    assert!(lab.tags("snap/l1b").is_empty());
}

#[test]
fn a_base_tag_moved_after_the_sandbox_started_is_not_used_as_its_base() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("m1", &base, &RunOpts::default());
    lab.exec("m1", "echo mine > /m1");
    // Another image, one layer more, that the name will point to.
    lab.run_container("o1", &base, &RunOpts::default());
    lab.exec("o1", "echo planted > /planted");
    let other = lab.commit("o1", "other:v1", &[]).tag;
    lab.ctr(&["images", "pull", "--plain-http", &other]);
    // A second record of the original base (the CRI keeps one by digest and one by ID).
    let keep = format!("{}/base:keep", lab.registry);
    lab.ctr(&["images", "tag", &base, &keep]);
    lab.ctr(&["images", "tag", "--force", &other, &base]);

    let commit = |tag: &str| lab.commit_output("m1", &format!("snap/m1:{tag}"), &[]);
    let result = crate::lab::result_of(&commit("v1"));
    assert_eq!(result.base_image, keep);
    let tree = lab.pull_unpack(&result.image);
    assert_eq!(std::fs::read_to_string(tree.join("m1")).unwrap(), "mine\n");
    assert!(
        !tree.join("planted").exists(),
        "a file of the moved tag's image"
    );
    assert!(tree.join("bin/busybox").exists());

    // No image chains to the sandbox's parent any more: refused, naming both.
    lab.ctr(&["images", "rm", &keep]);
    let out = commit("v2");
    let stderr = crate::cli::stderr_text(&out);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains(&base) && stderr.contains("parent is \"sha256:"),
        "{stderr}"
    );
    assert_eq!(lab.task_status("m1"), "RUNNING");
    assert_eq!(lab.tags("snap/m1"), vec!["v1".to_string()]);
}

#[test]
fn a_commit_never_deletes_a_lease_another_commit_took_over() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("l2", &base, &RunOpts::default());
    lab.exec("l2", "head -c 6291456 /dev/urandom > /blob");
    let proxy = throttling_proxy(lab.registry.clone(), 1 << 20);
    let mut cmd = lab.committer_command();
    cmd.env("COMMITTER_LEASE_TTL_SECONDS", "3").args([
        "commit",
        "--container",
        "l2",
        "--image",
        &format!("{proxy}/snap/l2:v1"),
        "--plain-http",
        "--compression",
        "none",
    ]);
    let first = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // What a second commit does once the first one's lease has expired: it takes the lease over.
    lab.ctr(&["leases", "rm", "committer/l2"]);
    lab.ctr(&[
        "leases",
        "create",
        "--id",
        "committer/l2",
        "--expires",
        "1h",
        "committer.owner=the-second-commit",
    ]);
    let first = first.wait_with_output().unwrap();
    let stderr = crate::cli::stderr_text(&first);
    assert!(stderr.contains("belongs to another commit"), "{stderr}");
    let held = lab.ctr(&["leases", "ls"]);
    assert!(
        held.contains("committer/l2") && held.contains("the-second-commit"),
        "the second commit's lease is left alone: {held}"
    );
}
