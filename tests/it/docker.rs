//! The laptop: what committer pushes, pulled and run by Docker Engine, and its root filesystem compared with the
//! sandbox's; and which Docker and containerd versions read which layer compression (README, "Compatibility").
//!
//! The engines are Debian's: bookworm's docker.io 20.10 and unstable's 28.x, extracted from their .debs by
//! `scripts/lab.sh fetch-docker` (scripts/test.sh fetches them and names the bin dirs in
//! COMMITTER_DOCKER_20_BIN_DIR / COMMITTER_DOCKER_28_BIN_DIR). Each dockerd runs privately inside the lab's
//! directory (its own --data-root, --exec-root, socket, pidfile and cgroup parent; no iptables, no bridge) with
//! Debian 12's containerd and runc from PATH. Without the variables the Docker checks are skipped with a line
//! saying so: only scripts/test.sh can fetch the engines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lab::{check, describe, run, Lab, RunOpts};
use crate::tree::{compare_trees, CompareOpts};

/// Docker's own files in a container's root filesystem: no image holds them, so they are not compared.
pub const DOCKER_OWN_FILES: [&str; 5] = [
    "/.dockerenv",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/etc/mtab",
];

/// A private dockerd, stopped (and its containers with it) on drop.
pub struct Docker {
    pub version: String,
    dir: PathBuf,
    bin: PathBuf,
    host: String,
    daemon: Child,
}

impl Docker {
    /// Starts `bin_dir`'s dockerd in `dir` (short paths: containerd's sockets live under its exec root).
    pub fn start(bin_dir: &Path, dir: &Path, cgroup_parent: &str) -> Docker {
        std::fs::create_dir_all(dir).unwrap();
        let host = format!("unix://{}/docker.sock", dir.display());
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let daemon = Command::new(bin_dir.join("dockerd"))
            .env("PATH", &path)
            .args(["--data-root", &format!("{}/data", dir.display())])
            .args(["--exec-root", &format!("{}/x", dir.display())])
            .args(["--pidfile", &format!("{}/docker.pid", dir.display())])
            .args(["-H", &host])
            .args([
                "--iptables=false",
                "--ip-masq=false",
                "--bridge=none",
                "--userland-proxy=false",
            ])
            .args(["--cgroup-parent", &format!("{cgroup_parent}/docker")])
            .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}/dockerd: {e}", bin_dir.display()));
        let mut docker = Docker {
            version: String::new(),
            dir: dir.to_path_buf(),
            bin: bin_dir.join("docker"),
            host,
            daemon,
        };
        docker.wait_ready();
        docker
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            let out = self.try_cli(&["version", "--format", "{{.Server.Version}}"]);
            if out.status.success() {
                self.version = String::from_utf8_lossy(&out.stdout).trim().to_string();
                return;
            }
            let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
            if let Ok(Some(st)) = self.daemon.try_wait() {
                panic!("dockerd exited during start ({st}):\n{log}");
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!("dockerd did not answer within 60 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `unix://…/docker.sock`, for DOCKER_HOST.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn try_cli(&self, args: &[&str]) -> Output {
        run(Command::new(&self.bin).args(["-H", &self.host]).args(args))
    }

    pub fn cli(&self, args: &[&str]) -> String {
        check(Command::new(&self.bin).args(["-H", &self.host]).args(args))
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        let _ = self.try_cli(&["rm", "-f", "-v", "sandbox-copy"]);
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.daemon.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        );
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.daemon.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// The Docker engines scripts/test.sh fetched: (name, bin dir); none when run outside it.
fn engines() -> Vec<(&'static str, PathBuf)> {
    let mut found = Vec::new();
    for (name, var) in [
        ("docker-20.10", "COMMITTER_DOCKER_20_BIN_DIR"),
        ("docker-28", "COMMITTER_DOCKER_28_BIN_DIR"),
    ] {
        match std::env::var_os(var) {
            Some(d) => found.push((name, PathBuf::from(d))),
            None => eprintln!(
                "SKIP {name}: {var} is not set (scripts/test.sh fetches Debian's docker.io)"
            ),
        }
    }
    found
}

const CHANGES: &str = "set -e; echo changed > /data/modify.txt; rm /data/delete.txt; rm -r /data/dir-to-delete; \
    mkdir -p /data/new/sub; echo hi > /data/new/sub/f; ln -s ../keep.txt /data/new/link; \
    chmod 0600 /data/keep.txt; echo linked > /data/hard-a; ln /data/hard-a /data/hard-b; \
    chown 1234:5678 /data/new/sub/f; dd if=/dev/urandom of=/data/new/random bs=64k count=48 2>/dev/null";
// (3 MiB of random data: whole 1 MiB gzip blocks of it are written as stored deflate blocks, which every reader must
// take.)

/// A sandbox committed three times, once per layer compression; returns (compression, reference).
fn commit_each_compression(lab: &Lab, id: &str) -> Vec<(&'static str, String)> {
    let base = lab.base_image("base", false);
    lab.run_container(id, &base, &RunOpts::cri("laptop", id, "app"));
    lab.exec(id, CHANGES);
    ["gzip", "zstd", "none"]
        .into_iter()
        .map(|c| {
            let target = format!("{}/snaps/{id}:{c}", lab.registry);
            let out = lab.committer(&[
                "commit",
                "--container",
                id,
                "--image",
                &target,
                "--plain-http",
                "--compression",
                c,
                // Distinct configs: two commits in one second would otherwise make byte-equal configs (same diff_id,
                // same history), and Docker skips the layers of an image ID it already has.
                "--message",
                &format!("committed with {c}"),
            ]);
            assert!(
                out.status.success(),
                "commit --compression {c}:\n{}",
                describe(&out)
            );
            let result: Value = serde_json::from_slice(&out.stdout).unwrap();
            eprintln!("{c}: layer {}", result["layer"]["mediaType"]);
            (c, target)
        })
        .collect()
}

/// The Docker engine the fidelity tests read their images back with: Docker 28 when scripts/test.sh fetched it,
/// else 20.10 (both read gzip); None, with a SKIP line, without either, and in the containerd 1.7 and 2.x
/// passes (Docker runs its own containerd: the 1.6 pass has read the same images).
pub fn reader() -> Option<(&'static str, PathBuf)> {
    if std::env::var_os("COMMITTER_CONTAINERD_BIN_DIR").is_some() {
        eprintln!(
            "SKIP docker as a reader: this pass tests another containerd; the 1.6 pass runs it"
        );
        return None;
    }
    engines().pop()
}

/// Docker as the laptop's reader of `image` (a gzip image): pulled and run by a private `reader()` engine, its
/// root filesystem compared with `sandbox` under `opts`, Docker's own files (`DOCKER_OWN_FILES`) excepted.
/// Returns the differences, or None when no engine is available. Prints how long it took.
pub fn docker_readback(
    lab: &Lab,
    image: &str,
    sandbox: &Path,
    opts: &CompareOpts,
) -> Option<Vec<String>> {
    let (name, bin) = reader()?;
    let t = Instant::now();
    let docker = Docker::start(
        &bin,
        &lab.dir.join(format!("{name}-reader")),
        &lab.cgroup_parent,
    );
    let merged = docker_run(&docker, image).unwrap_or_else(|e| {
        panic!(
            "{name} ({}) could not pull/run {image}: {e}",
            docker.version
        )
    });
    let mut opts = opts.clone();
    for f in DOCKER_OWN_FILES {
        opts = opts.ignoring(f);
    }
    let diffs = compare_trees(sandbox, &merged, &opts);
    eprintln!(
        "{name} ({}) read {image} back in {:?}",
        docker.version,
        t.elapsed()
    );
    Some(diffs)
}

/// Pulls `image` into `docker` and runs it; Ok(merged rootfs of the running container) or Err(docker's error).
fn docker_run(docker: &Docker, image: &str) -> Result<PathBuf, String> {
    let _ = docker.try_cli(&["rm", "-f", "sandbox-copy"]);
    let pull = docker.try_cli(&["pull", "-q", image]);
    if !pull.status.success() {
        return Err(String::from_utf8_lossy(&pull.stderr).trim().to_string());
    }
    let run = docker.try_cli(&[
        "run",
        "-d",
        "--name",
        "sandbox-copy",
        "--network",
        "none",
        image,
        "sleep",
        "1000000",
    ]);
    if !run.status.success() {
        return Err(String::from_utf8_lossy(&run.stderr).trim().to_string());
    }
    let merged = docker.cli(&[
        "inspect",
        "-f",
        "{{.GraphDriver.Data.MergedDir}}",
        "sandbox-copy",
    ]);
    Ok(PathBuf::from(merged.trim()))
}

/// `docker_run`, and the committed file seen from inside the container.
fn docker_pull_and_run(docker: &Docker, image: &str) -> Result<PathBuf, String> {
    let merged = docker_run(docker, image)?;
    let hi = docker.cli(&["exec", "sandbox-copy", "cat", "/data/new/sub/f"]);
    assert_eq!(hi, "hi\n", "the committed file inside docker run");
    Ok(merged)
}

/// Each Docker engine pulls, runs and reproduces the sandbox for each compression it can read; Docker 20.10 refuses
/// zstd with "archive/tar: invalid tar header" (it takes the zstd stream for a tar), the only failure allowed. The
/// matrix printed at the end is what the README's compatibility table reports.
#[test]
fn docker_engines_run_what_committer_pushed_equal_to_the_sandbox() {
    let engines = engines();
    if engines.is_empty() {
        return;
    }
    let lab = Lab::start();
    let images = commit_each_compression(&lab, "laptop-1");
    let mut opts = CompareOpts {
        hardlinks: true,
        xattrs: true,
        ..CompareOpts::container_rootfs()
    };
    for f in DOCKER_OWN_FILES {
        opts = opts.ignoring(f);
    }
    let mut matrix = Vec::new();
    for (name, bin) in engines {
        let t = Instant::now();
        let docker = Docker::start(&bin, &lab.dir.join(name), &lab.cgroup_parent);
        for (compression, image) in &images {
            let outcome = docker_pull_and_run(&docker, image);
            matrix.push(format!(
                "{name} ({}) {compression}: {}",
                docker.version,
                outcome
                    .as_ref()
                    .map(|_| "runs")
                    .unwrap_or_else(|e| e.as_str())
            ));
            let zstd_on_20 = *compression == "zstd" && docker.version.starts_with("20.");
            match outcome {
                Ok(merged) => {
                    assert!(
                        !zstd_on_20,
                        "Docker 20.10 read a zstd layer: update the README"
                    );
                    let diffs = compare_trees(&lab.rootfs("laptop-1"), &merged, &opts);
                    assert!(
                        diffs.is_empty(),
                        "{name} {compression}: docker's rootfs differs from the sandbox:\n{}",
                        diffs.join("\n")
                    );
                }
                Err(e) => assert!(
                    zstd_on_20 && e.contains("archive/tar: invalid tar header"),
                    "{name} ({}) could not pull/run the {compression} image: {e}",
                    docker.version
                ),
            }
        }
        eprintln!("{name}: {:?}", t.elapsed());
    }
    eprintln!("measured:\n{}", matrix.join("\n"));
}

/// The containerd that runs this pass (1.6, 1.7 or 2.x) pulls, unpacks and runs each compression.
#[test]
fn containerd_pulls_and_runs_each_compression_committer_pushes() {
    let lab = Lab::start();
    let images = commit_each_compression(&lab, "node-1");
    for (compression, image) in &images {
        let out = lab.try_ctr(&["images", "pull", "--plain-http", image]);
        assert!(
            out.status.success(),
            "ctr pull of {compression}:\n{}",
            describe(&out)
        );
        let id = format!("copy-{compression}");
        lab.run_container(&id, image, &RunOpts::default());
        assert_eq!(
            std::fs::read_to_string(lab.rootfs(&id).join("data/new/sub/f")).unwrap(),
            "hi\n",
            "{compression}"
        );
        let opts = CompareOpts {
            hardlinks: true,
            ..CompareOpts::container_rootfs()
        };
        let diffs = compare_trees(&lab.rootfs("node-1"), &lab.rootfs(&id), &opts);
        assert!(diffs.is_empty(), "{compression}:\n{}", diffs.join("\n"));
    }
}
