//! Registries that refuse or stop: a read-only token and an unresponsive host fail before the
//! sandbox is paused; a registry that stalls mid-upload after the pause ends the commit within
//! the deadline, the sandbox running; and the bound on blob uploads in flight.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::proxy::{self, Profile, Proxy};
use super::{commit_ok, docker_config, CHANGES};
use crate::lab::{Lab, RunOpts};
use crate::push::Registry;

/// containerd's task events while it runs (`ctr events`): shows whether the sandbox was paused.
struct TaskEvents {
    child: Child,
    out: PathBuf,
}

impl TaskEvents {
    fn watch(lab: &Lab, name: &str) -> TaskEvents {
        let out = lab.dir.join(format!("events-{name}.log"));
        let child = lab
            .ctr_command()
            .arg("events")
            .stdout(File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Subscribed before anything happens.
        std::thread::sleep(Duration::from_secs(1));
        TaskEvents { child, out }
    }

    fn stop(mut self) -> String {
        // Events still in flight reach the file first.
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.out).unwrap()
    }
}

fn assert_never_paused(events: &str, stderr: &str) {
    assert!(!events.contains("/tasks/paused"), "paused:\n{events}");
    // Nothing was captured either (the layer is compressed from the capture).
    assert!(!stderr.contains("compressed the layer"), "{stderr}");
}

#[test]
fn push_permission_and_an_unresponsive_host_fail_before_the_pause_with_exit_5() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("r", &base, &RunOpts::default());
    lab.exec("r", "echo r > /data/r");
    let upstream = Registry::start(&lab.dir.join("upstream"), &[]);

    // A read-only account on a Docker Hub-like token service.
    let hub = rt.block_on(Proxy::start(Profile::DockerHub, &upstream.addr));
    let config = docker_config(&lab.dir, &hub.addr, "reader", "pw");
    let events = TaskEvents::watch(&lab, "read-only");
    let out = lab.committer(&[
        "commit",
        "--container",
        "r",
        "--image",
        &format!("{}/someone/else:v1", hub.addr),
        "--plain-http",
        "--registry-config",
        &config,
    ]);
    let events = events.stop();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("cannot push to"), "{stderr}");
    assert_never_paused(&events, &stderr);
    assert!(
        !hub.log().iter().any(|l| l.starts_with("PATCH")),
        "nothing was sent"
    );
    assert_eq!(lab.task_status("r"), "RUNNING");

    // A registry that accepts connections and never answers.
    let (stalled, _task) = rt.block_on(proxy::stalled());
    let events = TaskEvents::watch(&lab, "unresponsive");
    let t = Instant::now();
    let out = lab.committer(&[
        "commit",
        "--container",
        "r",
        "--image",
        &format!("{stalled}/a/b:v1"),
        "--plain-http",
        "--request-timeout",
        "2",
    ]);
    let elapsed = t.elapsed();
    let events = events.stop();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains(&stalled), "names the host: {stderr}");
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    assert_never_paused(&events, &stderr);
    assert_eq!(lab.task_status("r"), "RUNNING");
}

/// The registry takes the push-permission check, then stops reading every blob body after 64 KiB
/// and never answers: the commit ends with exit 5 naming the host, within a bound set by
/// `--request-timeout` (each stalled transfer is given up after it, a few tries per blob), and the
/// sandbox, paused for the capture, runs again.
#[test]
fn a_registry_that_stalls_mid_upload_after_the_pause_ends_with_exit_5_naming_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("st", &base, &RunOpts::default());
    lab.exec("st", CHANGES);
    let upstream = Registry::start(&lab.dir.join("upstream"), &[]);
    let p = rt.block_on(Proxy::start(Profile::Stall, &upstream.addr));
    let events = TaskEvents::watch(&lab, "stall");
    let t = Instant::now();
    let out = lab.committer(&[
        "commit",
        "--container",
        "st",
        "--image",
        &format!("{}/a/b:v1", p.addr),
        "--plain-http",
        "--request-timeout",
        "2",
    ]);
    let elapsed = t.elapsed();
    let events = events.stop();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "stalled registry: exit {:?} after {elapsed:?}",
        out.status.code()
    );
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains(&p.addr), "names the host: {stderr}");
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    assert!(
        p.log().iter().any(|l| l.contains("stalled")),
        "{:#?}",
        p.log()
    );
    assert!(events.contains("/tasks/paused"), "paused:\n{events}");
    assert!(events.contains("/tasks/resumed"), "resumed:\n{events}");
    assert_eq!(lab.task_status("st"), "RUNNING");
}

/// `--max-transfers N`: the registry never sees more than N blob bodies at once (each answered
/// late, so that concurrent ones overlap); with the default 4 it sees more than one.
#[test]
fn at_most_max_transfers_blob_uploads_are_in_flight() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("mt", &base, &RunOpts::default());
    lab.exec("mt", CHANGES);
    let upstream = Registry::start(&lab.dir.join("upstream"), &[]);
    let one = rt.block_on(Proxy::start(Profile::Slow, &upstream.addr));
    commit_ok(
        &lab,
        "mt",
        &format!("{}/one/mt:v1", one.addr),
        &["--max-transfers", "1"],
    );
    let default = rt.block_on(Proxy::start(Profile::Slow, &upstream.addr));
    commit_ok(&lab, "mt", &format!("{}/four/mt:v1", default.addr), &[]);
    let (one, default) = (one.max_in_flight(), default.max_in_flight());
    eprintln!("most blob bodies in flight: {one} with --max-transfers 1, {default} by default");
    assert_eq!(one, 1);
    assert!((2..=4).contains(&default), "{default}");
}
