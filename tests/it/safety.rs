//! Safety: the sandbox is resumed on every way out, no tag is pushed for an interrupted or failed
//! commit, two commits of one container do not run at once, limits are enforced.

use crate::lab::{Lab, RunOpts};
use committer::freeze::PauseSkipped;
use serde_json::Value;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A sandbox with a diff big enough that reading it takes a while in a debug build (~96 MiB of
/// random data: gzip runs at a few MB/s unoptimised).
pub(crate) fn big_sandbox(lab: &Lab, id: &str) {
    let base = lab.base_image("base", false);
    lab.run_container(id, &base, &RunOpts::default());
    lab.exec(
        id,
        "mkdir -p /big && for i in 1 2 3; do head -c 33554432 /dev/urandom > /big/f$i; done",
    );
}

pub(crate) fn spawn_commit(lab: &Lab, id: &str, repo: &str, extra: &[&str]) -> Child {
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
    .args(extra)
    // The read is held 5 s with the sandbox paused, so a test polling `ctr tasks ls` on a loaded
    // machine sees the pause (a per-file capture can pause for less than 200 ms).
    .env("COMMITTER_TEST_STALL", "reading:5");
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning committer")
}

pub(crate) fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn leases(lab: &Lab) -> String {
    lab.ctr(&["leases", "ls"])
}

/// Pids of `pid`'s descendants, children first.
pub(crate) fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        let kids =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for k in kids
            .split_whitespace()
            .filter_map(|k| k.parse::<u32>().ok())
        {
            out.push(k);
            queue.push(k);
        }
    }
    out
}

/// The commit worker under the process `pid` started (the supervisor's child: it has the
/// supervisor channel in its environment).
pub(crate) fn worker_of(pid: u32) -> u32 {
    let mut found = None;
    wait_until(
        "the commit worker to start",
        Duration::from_secs(10),
        || {
            found = descendants(pid).into_iter().find(|d| {
                std::fs::read(format!("/proc/{d}/environ"))
                    .map(|e| {
                        e.split(|b| *b == 0)
                            .any(|v| v.starts_with(b"COMMITTER_SUPERVISOR_FD="))
                    })
                    .unwrap_or(false)
            });
            found.is_some()
        },
    );
    found.unwrap()
}

pub(crate) fn signal(pid: u32, sig: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), sig)
        .unwrap();
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
    assert!(lab.tags("snap/s1").is_empty());
    wait_until(
        "the supervisor to delete the lease",
        Duration::from_secs(5),
        || !leases(&lab).contains("committer/s1"),
    );
}

#[test]
fn sigkill_of_the_worker_while_frozen_is_undone_by_the_supervisor_within_two_seconds() {
    let lab = Lab::start();
    big_sandbox(&lab, "s2");
    let spool = lab.spool_dir.to_string_lossy().into_owned();
    let child = spawn_commit(&lab, "s2", "snap/s2", &["--spool-dir", &spool]);
    wait_until("the sandbox to be paused", Duration::from_secs(30), || {
        lab.task_status("s2") == "PAUSED"
    });
    signal(worker_of(child.id()), rustix::process::Signal::KILL);
    let killed = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("the sandbox to run again", Duration::from_secs(2), || {
        lab.task_status("s2") == "RUNNING"
    });
    eprintln!("resumed {:?} after SIGKILL", killed.elapsed());
    assert_eq!(
        crate::cli::spool_files(&lab.spool_dir),
        Vec::<String>::new(),
        "the supervisor removes the spool files"
    );
    wait_until(
        "the supervisor to delete the lease",
        Duration::from_secs(5),
        || !leases(&lab).contains("committer/s2"),
    );
    assert!(lab.tags("snap/s2").is_empty());
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
    let errors = crate::cli::error_lines(&stderr);
    assert!(
        errors[0].contains("another commit of container \"s3\" is in progress"),
        "{stderr}"
    );
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "the first commit is not disturbed: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(lab.task_status("s3"), "RUNNING");
    assert!(lab.tags("snap/s3b").is_empty());
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
    assert!(lab.tags("snap/s4").is_empty());
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
    let paused = lab.commit("s5", "snap/s5:v1", &[]).paused;
    assert_eq!(
        (paused.ms, paused.skipped),
        (0, Some(PauseSkipped::AlreadyPaused))
    );
    assert_eq!(lab.task_status("s5"), "PAUSED");
    lab.ctr(&["tasks", "resume", "s5"]);

    // A stopped task has nothing to freeze: read as it is, and said so.
    lab.ctr(&["tasks", "kill", "-s", "SIGKILL", "s5"]);
    lab.wait_status("s5", "STOPPED", Duration::from_secs(10));
    let paused = lab.commit("s5", "snap/s5:v2", &[]).paused;
    assert_eq!(
        (paused.ms, paused.skipped),
        (0, Some(PauseSkipped::NotRunning))
    );
}

/// A TCP proxy to `upstream` that lets at most `bytes_per_sec` through towards the registry.
pub(crate) fn throttling_proxy(upstream: String, bytes_per_sec: u64) -> String {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = c_read.read(&mut buf) {
                    if n == 0 || s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(n as u64 * 1_000_000 / bytes_per_sec));
                }
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

#[test]
fn with_a_slow_registry_the_sandbox_is_resumed_long_before_the_upload_ends() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("s6", &base, &RunOpts::default());
    lab.exec("s6", "head -c 8388608 /dev/urandom > /blob");
    let proxy = throttling_proxy(lab.registry.clone(), 2 << 20);
    let target = format!("{proxy}/snap/s6:v1");
    let started = Instant::now();
    let out = lab.committer(&[
        "commit",
        "--container",
        "s6",
        "--image",
        &target,
        "--plain-http",
    ]);
    let wall = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let paused = result["paused"]["ms"].as_u64().unwrap();
    eprintln!("paused {paused} ms of a {wall:?} commit through a 2 MiB/s link");
    assert!(
        wall >= Duration::from_secs(3),
        "8 MiB through 2 MiB/s takes ≥ 3 s: {wall:?}"
    );
    assert!(
        paused > 0 && (paused as u128) * 4 < wall.as_millis(),
        "paused {paused} ms of {wall:?}"
    );
}

#[test]
fn base_image_removed_and_content_pruned_mid_commit_does_not_break_it() {
    let lab = Lab::start();
    big_sandbox(&lab, "s7");
    let base = lab.base_image("base", false);
    let child = spawn_commit(&lab, "s7", "snap/s7", &[]);
    wait_until("the sandbox to be paused", Duration::from_secs(30), || {
        lab.task_status("s7") == "PAUSED"
    });
    lab.ctr(&["images", "rm", "--sync", &base]);
    lab.ctr(&["content", "prune", "references"]);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let unpacked = lab.pull_unpack(result["image"].as_str().unwrap());
    assert_eq!(
        std::fs::metadata(unpacked.join("big/f3")).unwrap().len(),
        33554432
    );
}

#[test]
fn symlink_swaps_racing_a_no_pause_commit_never_leak_host_files() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    // A host-only canary: if the committer ever followed a symlink out of the rootfs, this would
    // end up in a layer.
    let canary = lab.dir.join("canary");
    std::fs::create_dir_all(canary.join("sub")).unwrap();
    let secret = "HOST-CANARY-9f3b1c";
    std::fs::write(canary.join("secret"), secret).unwrap();
    std::fs::write(canary.join("sub/secret"), secret).unwrap();
    let c = canary.to_string_lossy().into_owned();
    lab.run_container("s8", &base, &RunOpts::default());
    let racer = format!(
        "mkdir -p /race; cd /race; i=0; while [ $i -lt 100000 ]; do \
           mkdir -p d/sub; echo inside > d/secret; echo inside > d/sub/secret; rm -rf d; ln -s {c} d; \
           rm d; ln -s {c}/secret f; rm f; echo inside > f; rm f; i=$((i+1)); done"
    );
    let mut race = lab.ctr_command();
    race.args([
        "tasks",
        "exec",
        "--exec-id",
        "racer",
        "s8",
        "sh",
        "-c",
        &racer,
    ]);
    let mut race = race
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (mut ok, mut failed) = (0, 0);
    for i in 0..25 {
        let path = lab.dir.join(format!("race-{i}.tar"));
        let out = lab.committer(&[
            "diff",
            "--container",
            "s8",
            "--no-pause",
            "--compression",
            "none",
            "--output",
            path.to_str().unwrap(),
        ]);
        if out.status.success() {
            ok += 1;
            let tar = std::fs::read(&path).unwrap();
            assert!(
                !tar.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "commit {i} leaked the canary"
            );
            // The layer is a valid tar that lists cleanly.
            let list = std::process::Command::new("tar")
                .arg("-tf")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                list.status.success(),
                "commit {i}: invalid tar: {}",
                String::from_utf8_lossy(&list.stderr)
            );
        } else {
            failed += 1;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                crate::cli::error_lines(&stderr).len(),
                1,
                "one clear error line: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
    let _ = race.kill();
    let _ = race.wait();
    eprintln!("{ok} commits succeeded, {failed} failed cleanly while the racer ran");
    assert!(ok > 0, "at least some commits must succeed under the race");
}

/// Whether the registry holds bytes of an upload into `repo` (a session `check_push` opened
/// before the pause holds none).
fn upload_has_bytes(lab: &Lab, repo: &str) -> bool {
    let uploads = lab
        .dir
        .join("registry/data/docker/registry/v2/repositories")
        .join(repo)
        .join("_uploads");
    std::fs::read_dir(&uploads)
        .map(|d| {
            d.flatten()
                .any(|s| std::fs::metadata(s.path().join("data")).is_ok_and(|m| m.len() > 0))
        })
        .unwrap_or(false)
}

/// SIGTERM once the layer's bytes are reaching the registry (through a 1 MiB/s link, so the upload
/// runs for seconds after the resume): exit 130, the sandbox running, no tag. Returns stderr.
fn sigterm_during_the_layer_upload(
    lab: &Lab,
    id: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> String {
    lab.exec(id, "head -c 16777216 /dev/urandom > /blob");
    let proxy = throttling_proxy(lab.registry.clone(), 1 << 20);
    let repo = format!("snap/{id}");
    let mut cmd = lab.committer_command();
    cmd.envs(env.iter().copied());
    cmd.args([
        "commit",
        "--container",
        id,
        "--image",
        &format!("{proxy}/{repo}:v1"),
        "--plain-http",
    ])
    .args(extra);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        "layer bytes in the registry",
        Duration::from_secs(60),
        || upload_has_bytes(lab, &repo),
    );
    wait_until("the sandbox to run again", Duration::from_secs(30), || {
        lab.task_status(id) == "RUNNING"
    });
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        !stderr.contains("uploaded layer"),
        "interrupted before the end: {stderr}"
    );
    assert_eq!(lab.task_status(id), "RUNNING");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        lab.tags(&repo).is_empty(),
        "no tag after an interrupted upload"
    );
    wait_until("the lease to go", Duration::from_secs(5), || {
        !leases(lab).contains(&format!("committer/{id}"))
    });
    stderr
}

#[test]
fn sigterm_while_uploading_stops_before_any_tag_and_leaves_the_sandbox_running() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("s9", &base, &RunOpts::default());
    // Uncompressed and captured as the raw tar: the layer is the capture, uploaded from its file
    // after the resume (the per-file capture's tar is reassembled and streamed like a compressed one).
    let stderr = sigterm_during_the_layer_upload(
        &lab,
        "s9",
        &["--compression", "none"],
        &[("COMMITTER_CAPTURE", "tar")],
    );
    assert!(!stderr.contains("while it is compressed"), "{stderr}");
}

#[test]
fn sigterm_during_the_streamed_layer_upload_stops_before_any_tag_and_leaves_the_sandbox_running() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("s10", &base, &RunOpts::default());
    let stderr = sigterm_during_the_layer_upload(&lab, "s10", &[], &[]);
    assert!(
        stderr.contains("uploading the layer while it is compressed"),
        "{stderr}"
    );
    assert!(!stderr.contains("uploading it again"), "{stderr}");
}

/// Read-only walk views still mounted that reference this lab's snapshots.
fn leftover_views(lab: &Lab) -> Vec<String> {
    let lab_dir = lab.dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains("committer-view-") && l.contains(&lab_dir))
        .map(String::from)
        .collect()
}

#[test]
fn the_walks_views_are_nosuid_nodev_and_a_sigkill_during_the_walk_leaves_none_mounted() {
    let lab = Lab::start();
    big_sandbox(&lab, "s10");
    let child = spawn_commit(&lab, "s10", "snap/s10", &["--diff-source", "walk"]);
    wait_until("the sandbox to be paused", Duration::from_secs(30), || {
        lab.task_status("s10") == "PAUSED"
    });
    let views = leftover_views(&lab);
    assert!(!views.is_empty(), "the walk mounts its read-only views");
    // Nothing in the sandbox's tree may act as a device or a setuid program through a view.
    for v in &views {
        let opts: Vec<&str> = v.split(' ').nth(5).unwrap().split(',').collect();
        for want in ["ro", "nosuid", "nodev"] {
            assert!(opts.contains(&want), "view without {want}: {v}");
        }
    }
    signal(worker_of(child.id()), rustix::process::Signal::KILL);
    child.wait_with_output().unwrap();
    wait_until(
        "the supervisor to unmount the views",
        Duration::from_secs(2),
        || leftover_views(&lab).is_empty(),
    );
    wait_until("the sandbox to run again", Duration::from_secs(2), || {
        lab.task_status("s10") == "RUNNING"
    });
}
