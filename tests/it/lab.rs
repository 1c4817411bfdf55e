//! The lab fixture: a private containerd and registry per test (scripts/lab.sh), and helpers to run containers,
//! exec into them, run the committer binary against them and unpack what it pushed.
//!
//! Every helper panics with the failing command and its output: a test reads as the steps it takes.
//! `Drop` runs `scripts/lab.sh stop` and removes the directory (set `COMMITTER_LAB_KEEP=1` to keep it).
#![allow(dead_code)]

use committer::report::CommitResult;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The namespace every lab helper works in (containerd's, and `CONTAINERD_NAMESPACE` for the committer).
pub const NAMESPACE: &str = "committer-test";

pub struct Lab {
    /// The lab's directory (a tempdir): containerd root/state, registry data, logs, unpacked images.
    pub dir: PathBuf,
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// The registry, as `127.0.0.1:PORT`.
    pub registry: String,
    /// "committer-test".
    pub namespace: String,
    /// The `ctr` matching the containerd that runs (from `COMMITTER_CONTAINERD_BIN_DIR` when set).
    pub ctr_bin: PathBuf,
    /// containerd's pid.
    pub containerd_pid: u32,
    /// Per-lab runc state dir and cgroup parent, so that two labs never share a container's runc state or cgroup.
    pub runc_root: PathBuf,
    pub cgroup_parent: String,
    /// A spool directory for `--spool-dir`: on the lab's XFS when it has one, else under `dir`.
    pub spool_dir: PathBuf,
    /// containerd's root and `spool_dir` are on a loop-mounted XFS with reflink (`Lab::start_xfs`).
    pub xfs: bool,
    counter: AtomicUsize,
}

/// Overlay module parameters (redirect_dir, metacopy) are global to the machine and apply to
/// every overlay mounted while they are set: a test that changes them holds this exclusively,
/// and a test that needs the defaults (it asserts the upperdir source) holds it shared. It is an
/// `flock` on a file under /run, so test processes running at once (two checkouts, two passes)
/// exclude each other too, not only the threads of one test binary.
pub struct OverlayParamsLock(std::fs::File);

fn overlay_params_lock(op: libc::c_int) -> OverlayParamsLock {
    use std::os::fd::AsRawFd;
    let path = "/run/committer-test-overlay-params.lock";
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // flock is per open file description, so two threads of one process exclude each other too.
    let rc = unsafe { libc::flock(f.as_raw_fd(), op) };
    assert_eq!(rc, 0, "flock {path}: {}", std::io::Error::last_os_error());
    OverlayParamsLock(f)
}

pub fn overlay_params_changing() -> OverlayParamsLock {
    overlay_params_lock(libc::LOCK_EX)
}

pub fn overlay_defaults() -> OverlayParamsLock {
    overlay_params_lock(libc::LOCK_SH)
}

/// How `Lab::run_container` runs a container.
#[derive(Clone, Debug)]
pub struct RunOpts {
    /// "overlayfs" (default) or "native".
    pub snapshotter: String,
    /// Container labels, e.g. the CRI ones (see `RunOpts::cri`).
    pub labels: Vec<(String, String)>,
    /// `ctr run --runtime`; None = containerd's default (io.containerd.runc.v2).
    pub runtime: Option<String>,
    /// The process to run; empty = `sleep 1000000`.
    pub args: Vec<String>,
    /// `ctr run --mount` specs, e.g. `type=bind,src=/x,dst=/etc/x,options=rbind:ro`.
    pub mounts: Vec<String>,
}

impl Default for RunOpts {
    fn default() -> Self {
        RunOpts {
            snapshotter: "overlayfs".into(),
            labels: Vec::new(),
            runtime: None,
            args: Vec::new(),
            mounts: Vec::new(),
        }
    }
}

impl RunOpts {
    /// The labels the CRI plugin puts on a Kubernetes container.
    pub fn cri(pod_namespace: &str, pod: &str, container: &str) -> RunOpts {
        RunOpts::default()
            .label("io.kubernetes.pod.namespace", pod_namespace)
            .label("io.kubernetes.pod.name", pod)
            .label("io.kubernetes.container.name", container)
            .label(
                "io.kubernetes.pod.uid",
                &format!("uid-{pod_namespace}-{pod}"),
            )
    }
    pub fn label(mut self, k: &str, v: &str) -> RunOpts {
        self.labels.push((k.into(), v.into()));
        self
    }
    pub fn snapshotter(mut self, s: &str) -> RunOpts {
        self.snapshotter = s.into();
        self
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn lab_sh() -> PathBuf {
    repo_root().join("scripts/lab.sh")
}

/// Runs a command to completion with stdin closed; panics if it cannot be spawned.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null());
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and panics with its output unless it succeeds; returns stdout.
pub fn check(cmd: &mut Command) -> String {
    let out = run(cmd);
    if !out.status.success() {
        panic!("{cmd:?} failed ({}):\n{}", out.status, describe(&out));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stdout and stderr of a finished command, for panic messages.
/// The result on stdout of a `committer commit` that succeeded; panics with the output unless it
/// did and printed one.
pub fn result_of(out: &Output) -> CommitResult {
    assert!(out.status.success(), "{}", describe(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the result ({e}):\n{}", describe(out)))
}

pub fn describe(out: &Output) -> String {
    format!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

impl Lab {
    /// Starts containerd and a registry in a new tempdir. Needs root.
    pub fn start() -> Lab {
        Lab::start_with(&[])
    }

    /// `Lab::start` with more `scripts/lab.sh start` arguments (e.g. `--cri kind`).
    pub fn start_with(args: &[&str]) -> Lab {
        Lab::start_env(args, &[])
    }

    /// A lab whose containerd root and spool directory are on a sparse, loop-mounted XFS with
    /// reflink (`COMMITTER_LAB_XFS`, scripts/lab.sh), removed when the lab stops.
    pub fn start_xfs() -> Lab {
        let lab = Lab::start_env(&[], &[("COMMITTER_LAB_XFS", "2G")]);
        assert!(lab.xfs, "the lab did not say it runs on XFS");
        lab
    }

    fn start_env(args: &[&str], env: &[(&str, &str)]) -> Lab {
        assert!(
            rustix::process::geteuid().is_root(),
            "the lab needs root (containerd, runc, mounts)"
        );
        let tmp = tempfile::Builder::new()
            .prefix("committer-lab-")
            .tempdir()
            .expect("creating the lab tempdir");
        let dir = tmp.keep();
        let mut start = Command::new(lab_sh());
        start.arg("start").arg(&dir).args(args);
        start.envs(env.iter().copied());
        let out = run(&mut start);
        if !out.status.success() {
            let _ = run(Command::new(lab_sh()).arg("stop").arg(&dir));
            panic!(
                "scripts/lab.sh start {} failed ({}):\n{}",
                dir.display(),
                out.status,
                describe(&out)
            );
        }
        let env =
            parse_env(&std::fs::read_to_string(dir.join("env")).expect("reading the lab's env"));
        let get = |k: &str| {
            env.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("{k} missing in {}/env", dir.display()))
        };
        Lab {
            address: get("CONTAINERD_ADDRESS").into(),
            registry: get("REGISTRY"),
            namespace: NAMESPACE.to_string(),
            ctr_bin: get("CTR").into(),
            containerd_pid: get("CONTAINERD_PID").parse().expect("CONTAINERD_PID"),
            runc_root: get("LAB_RUNC_ROOT").into(),
            cgroup_parent: get("LAB_CGROUP_PARENT"),
            spool_dir: get("LAB_SPOOL_DIR").into(),
            xfs: env.get("LAB_XFS").is_some_and(|v| v == "1"),
            counter: AtomicUsize::new(0),
            dir,
        }
    }

    fn next(&self) -> usize {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// Pushes the two-layer busybox base image as `REGISTRY/NAME:1` (OCI media types, or Docker schema2 with
    /// `docker`) and pulls it into containerd; returns the reference.
    pub fn base_image(&self, name: &str, docker: bool) -> String {
        let mut cmd = Command::new(lab_sh());
        cmd.args([
            OsStr::new("base-image"),
            self.dir.as_os_str(),
            OsStr::new(name),
        ]);
        cmd.args(["--namespace", &self.namespace]);
        if docker {
            cmd.arg("--docker");
        }
        check(&mut cmd).trim().to_string()
    }

    /// Pushes the base image as `REGISTRY/NAME:1` (OCI) without pulling it into containerd (a CRI pulls it).
    pub fn base_image_push_only(&self, name: &str) -> String {
        let mut cmd = Command::new(lab_sh());
        cmd.arg("base-image")
            .arg(&self.dir)
            .args([name, "--no-pull"]);
        check(&mut cmd).trim().to_string()
    }

    /// A `ctr` command for this lab's socket and namespace.
    pub fn ctr_command(&self) -> Command {
        let mut cmd = Command::new(&self.ctr_bin);
        cmd.arg("-a")
            .arg(&self.address)
            .arg("-n")
            .arg(&self.namespace);
        cmd
    }

    /// `ctr -a SOCK -n NS args…`; panics with its output on failure; returns stdout.
    pub fn ctr(&self, args: &[&str]) -> String {
        check(self.ctr_command().args(args))
    }

    pub fn try_ctr(&self, args: &[&str]) -> Output {
        run(self.ctr_command().args(args))
    }

    /// Runs `image` as container `id` (detached, output to DIR/logs/ID.log) and waits until its task is RUNNING.
    pub fn run_container(&self, id: &str, image: &str, opts: &RunOpts) {
        let mut cmd = self.ctr_command();
        cmd.args(["run", "-d", "--snapshotter", &opts.snapshotter]);
        cmd.arg("--log-uri").arg(format!(
            "file://{}",
            self.dir.join("logs").join(format!("{id}.log")).display()
        ));
        cmd.arg("--runc-root").arg(&self.runc_root);
        cmd.arg("--cgroup")
            .arg(format!("{}/{id}", self.cgroup_parent));
        if let Some(rt) = &opts.runtime {
            cmd.args(["--runtime", rt]);
        }
        for (k, v) in &opts.labels {
            cmd.arg("--label").arg(format!("{k}={v}"));
        }
        for m in &opts.mounts {
            cmd.arg("--mount").arg(m);
        }
        cmd.args([image, id]);
        if opts.args.is_empty() {
            cmd.args(["sleep", "1000000"]);
        } else {
            cmd.args(&opts.args);
        }
        check(&mut cmd);
        self.wait_status(id, "RUNNING", Duration::from_secs(20));
    }

    /// `ctr run --rm IMAGE ID sh -c SCRIPT` in the foreground with this lab's runc root and cgroup parent (runc
    /// state otherwise lands in /run/containerd/runc/NS/ID, shared by labs running side by side); returns stdout.
    pub fn run_once(&self, image: &str, id: &str, script: &str) -> String {
        let mut cmd = self.ctr_command();
        cmd.args(["run", "--rm"]);
        cmd.arg("--runc-root").arg(&self.runc_root);
        cmd.arg("--cgroup")
            .arg(format!("{}/{id}", self.cgroup_parent));
        cmd.args([image, id, "sh", "-c", script]);
        check(&mut cmd)
    }

    /// Waits until the task's status is `want`; panics after `timeout`.
    pub fn wait_status(&self, id: &str, want: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let status = self.task_status(id);
            if status == want {
                return;
            }
            if start.elapsed() > timeout {
                panic!("task {id} is {status:?}, not {want} after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `sh -c script` in the container; panics with the output unless it exits 0; returns stdout.
    pub fn exec(&self, id: &str, script: &str) -> String {
        let out = self.try_exec(id, script);
        if !out.status.success() {
            panic!(
                "exec in {id} of {script:?} failed ({}):\n{}",
                out.status,
                describe(&out)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sh -c script` in the container; its exit status is ctr's.
    pub fn try_exec(&self, id: &str, script: &str) -> Output {
        let exec_id = format!("exec-{}-{}", std::process::id(), self.next());
        self.try_ctr(&[
            "tasks",
            "exec",
            "--exec-id",
            &exec_id,
            id,
            "sh",
            "-c",
            script,
        ])
    }

    /// The task's merged rootfs as mounted on the host.
    pub fn rootfs(&self, id: &str) -> PathBuf {
        self.dir
            .join("state/io.containerd.runtime.v2.task")
            .join(&self.namespace)
            .join(id)
            .join("rootfs")
    }

    /// RUNNING, PAUSED, STOPPED…, or "" when the container has no task.
    pub fn task_status(&self, id: &str) -> String {
        self.task_row(id).map(|(_, s)| s).unwrap_or_default()
    }

    /// The host pid of the task's init process.
    pub fn task_pid(&self, id: &str) -> u32 {
        self.task_row(id)
            .unwrap_or_else(|| panic!("container {id} has no task"))
            .0
    }

    fn task_row(&self, id: &str) -> Option<(u32, String)> {
        let out = self.ctr(&["tasks", "ls"]);
        out.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[0] == id).then(|| (f[1].parse().unwrap_or(0), f[2].to_string()))
        })
    }

    /// Runs the committer binary with `CONTAINERD_ADDRESS` and `CONTAINERD_NAMESPACE` set to this lab's.
    pub fn committer(&self, args: &[&str]) -> Output {
        run(self.committer_command().args(args))
    }

    /// `committer commit --container ID --image REGISTRY/REPO_TAG --plain-http EXTRA…` to this lab's
    /// registry, as it ran: for tests of a failure or of what it printed. [`result_of`] reads the
    /// result of a success.
    pub fn commit_output(&self, container: &str, repo_tag: &str, extra: &[&str]) -> Output {
        let target = format!("{}/{repo_tag}", self.registry);
        let mut args = vec![
            "commit",
            "--container",
            container,
            "--image",
            &target,
            "--plain-http",
        ];
        args.extend_from_slice(extra);
        self.committer(&args)
    }

    /// [`Lab::commit_output`], which must succeed: its result.
    pub fn commit(&self, container: &str, repo_tag: &str, extra: &[&str]) -> CommitResult {
        result_of(&self.commit_output(container, repo_tag, extra))
    }

    /// [`Lab::commit`]'s result as raw JSON, for tests of the JSON itself.
    pub fn commit_json(
        &self,
        container: &str,
        repo_tag: &str,
        extra: &[&str],
    ) -> serde_json::Value {
        let out = self.commit_output(container, repo_tag, extra);
        assert!(out.status.success(), "{}", describe(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("the result is not JSON ({e}):\n{}", describe(&out)))
    }

    /// The committer binary as a `Command` (environment set), for tests that need to add more.
    pub fn committer_command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_committer"));
        cmd.env("CONTAINERD_ADDRESS", &self.address)
            .env("CONTAINERD_NAMESPACE", &self.namespace);
        cmd
    }

    /// Copies `image_ref` out of the registry with skopeo and unpacks it with umoci; returns the rootfs dir.
    pub fn pull_unpack(&self, image_ref: &str) -> PathBuf {
        let n = self.next();
        let base = self.dir.join("unpacked");
        std::fs::create_dir_all(&base).unwrap();
        let layout = base.join(format!("oci-{n}"));
        let bundle = base.join(format!("bundle-{n}"));
        check(
            Command::new("skopeo")
                .args(["copy", "--quiet", "--src-tls-verify=false"])
                .arg(format!("docker://{image_ref}"))
                .arg(format!("oci:{}:pulled", layout.display())),
        );
        check(
            Command::new("umoci")
                .arg("unpack")
                .arg("--image")
                .arg(format!("{}:pulled", layout.display()))
                .arg(&bundle),
        );
        bundle.join("rootfs")
    }

    /// Mount points at or below the lab's directory (normally none once the lab has stopped).
    pub fn mounts(&self) -> Vec<PathBuf> {
        mounts_under(&self.dir)
    }

    /// The tags the lab registry lists for `repo` (none when the repository does not exist).
    pub fn tags(&self, repo: &str) -> Vec<String> {
        let url = format!("http://{}/v2/{repo}/tags/list", self.registry);
        let out = run(Command::new("curl").args(["-s", &url]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["tags"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs `scripts/lab.sh stop` now (Drop does it too; stopping twice is fine).
    pub fn stop(&self) {
        let out = run(Command::new(lab_sh()).arg("stop").arg(&self.dir));
        if !out.status.success() {
            eprintln!(
                "scripts/lab.sh stop {} failed ({}):\n{}",
                self.dir.display(),
                out.status,
                describe(&out)
            );
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("COMMITTER_LAB_KEEP").is_some() {
            eprintln!(
                "COMMITTER_LAB_KEEP: leaving the lab in {}",
                self.dir.display()
            );
            return;
        }
        // Removing a tree with a mount still in it would delete through the mount: leave it then.
        let left = mounts_under(&self.dir);
        if !left.is_empty() {
            eprintln!(
                "lab {}: still mounted, not removing: {left:?}",
                self.dir.display()
            );
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("removing the lab dir {}: {e}", self.dir.display());
        }
    }
}

/// A plain-HTTP registry besides the lab's (scripts/registry.sh), stopped on drop.
pub struct Registry {
    pub dir: PathBuf,
    /// `127.0.0.1:PORT`
    pub address: String,
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        check(
            Command::new(repo_root().join("scripts/registry.sh"))
                .arg("start")
                .arg(dir),
        );
        let env = parse_env(&std::fs::read_to_string(dir.join("env")).unwrap());
        Registry {
            dir: dir.to_path_buf(),
            address: env["REGISTRY_ADDR"].clone(),
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = run(Command::new(repo_root().join("scripts/registry.sh"))
            .arg("stop")
            .arg(&self.dir));
    }
}

/// Mount points at or below `dir`, from /proc/self/mountinfo (octal escapes decoded).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Pids of processes (other than this one) whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Whether `pid` names a live (not zombie) process.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}
