//! Issue 5: the sandbox is resumed on every way out, no tag is pushed for an interrupted or failed
//! commit, two commits of one container do not run at once, limits are enforced.

use crate::lab::{Lab, RunOpts};
use serde_json::Value;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A sandbox with a diff big enough that reading it takes a while in a debug build (~96 MiB of
/// random data: gzip runs at a few MB/s unoptimised).
fn big_sandbox(lab: &Lab, id: &str) {
    let base = lab.base_image("base", false);
    lab.run_container(id, &base, &RunOpts::default());
    lab.exec(
        id,
        "mkdir -p /big && for i in 1 2 3; do head -c 33554432 /dev/urandom > /big/f$i; done",
    );
}

fn spawn_commit(lab: &Lab, id: &str, repo: &str, extra: &[&str]) -> Child {
    let target = format!("{}/{repo}:v1", lab.registry);
    let mut cmd = lab.committer_command();
    cmd.args([
        "commit",
        "--container",
        id,
        "--image",
        &target,
        "--plain-http",
    ])
    .args(extra);
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning committer")
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tags(lab: &Lab, repo: &str) -> Vec<String> {
    let url = format!("http://{}/v2/{repo}/tags/list", lab.registry);
    let out = std::process::Command::new("curl")
        .args(["-s", &url])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["tags"]
        .as_array()
        .map(|t| t.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn leases(lab: &Lab) -> String {
    lab.ctr(&["leases", "ls"])
}

#[test]
fn sigterm_while_reading_resumes_the_sandbox_and_pushes_no_tag() {
    let lab = Lab::start();
    big_sandbox(&lab, "s1");
    let child = spawn_commit(&lab, "s1", "snap/s1", &[]);
    wait_until("the sandbox to be paused", Duration::from_secs(30), || {
        lab.task_status("s1") == "PAUSED"
    });
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "stderr: {stderr}");
    assert!(stderr.contains("interrupted by SIGTERM"), "{stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(lab.task_status("s1"), "RUNNING");
    assert!(tags(&lab, "snap/s1").is_empty());
    wait_until(
        "the guardian to delete the lease",
        Duration::from_secs(5),
        || !leases(&lab).contains("committer/s1"),
    );
}

#[test]
fn sigkill_while_frozen_is_undone_by_the_guardian_within_two_seconds() {
    let lab = Lab::start();
    big_sandbox(&lab, "s2");
    let mut child = spawn_commit(&lab, "s2", "snap/s2", &[]);
    wait_until("the sandbox to be paused", Duration::from_secs(30), || {
        lab.task_status("s2") == "PAUSED"
    });
    child.kill().unwrap();
    let killed = Instant::now();
    child.wait().unwrap();
    wait_until("the sandbox to run again", Duration::from_secs(2), || {
        lab.task_status("s2") == "RUNNING"
    });
    eprintln!("resumed {:?} after SIGKILL", killed.elapsed());
    wait_until(
        "the guardian to delete the lease",
        Duration::from_secs(5),
        || !leases(&lab).contains("committer/s2"),
    );
    assert!(tags(&lab, "snap/s2").is_empty());
    // The lock is gone with the lease: the next commit of the same container goes through.
    let out = lab.committer(&[
        "commit",
        "--container",
        "s2",
        "--image",
        &format!("{}/snap/s2:v2", lab.registry),
        "--plain-http",
        "--compression",
        "none",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_second_commit_of_the_same_container_fails_clearly_while_the_first_runs() {
    let lab = Lab::start();
    big_sandbox(&lab, "s3");
    let first = spawn_commit(&lab, "s3", "snap/s3", &[]);
    wait_until(
        "the first commit to pause the sandbox",
        Duration::from_secs(30),
        || lab.task_status("s3") == "PAUSED",
    );
    let second = lab.committer(&[
        "commit",
        "--container",
        "s3",
        "--image",
        &format!("{}/snap/s3b:v1", lab.registry),
        "--plain-http",
    ]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("another commit of container \"s3\" is in progress"),
        "{stderr}"
    );
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "the first commit is not disturbed: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(lab.task_status("s3"), "RUNNING");
    assert!(tags(&lab, "snap/s3b").is_empty());
}

#[test]
fn limits_fail_clearly_resume_and_push_nothing() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("s4", &base, &RunOpts::default());
    lab.exec(
        "s4",
        "mkdir /many && for i in 1 2 3 4 5 6 7 8 9; do echo $i > /many/$i; done",
    );
    let target = format!("{}/snap/s4:v1", lab.registry);
    for (flag, value) in [("--max-files", "5"), ("--max-layer-bytes", "4")] {
        let out = lab.committer(&[
            "commit",
            "--container",
            "s4",
            "--image",
            &target,
            "--plain-http",
            flag,
            value,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{flag}: {stderr}");
        assert!(stderr.contains("limit"), "{flag}: {stderr}");
        assert_eq!(lab.task_status("s4"), "RUNNING");
    }
    assert!(tags(&lab, "snap/s4").is_empty());
    assert!(
        !leases(&lab).contains("committer/s4"),
        "the lease is released after a failure"
    );
}

#[test]
fn a_paused_sandbox_is_left_paused() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("s5", &base, &RunOpts::default());
    lab.exec("s5", "echo x > /x");
    lab.ctr(&["tasks", "pause", "s5"]);
    let out = lab.committer(&[
        "commit",
        "--container",
        "s5",
        "--image",
        &format!("{}/snap/s5:v1", lab.registry),
        "--plain-http",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["pausedMs"], 0);
    assert_eq!(lab.task_status("s5"), "PAUSED");
    lab.ctr(&["tasks", "resume", "s5"]);
}
