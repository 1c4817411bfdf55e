//! The supervisor in the Job's shape: committer as PID 1 of its own PID namespace, its commit
//! process killed (SIGKILL, the OOM killer) or interrupted, and containerd restarted while the
//! sandbox is paused. Each ends with the sandbox RUNNING, no lease and no tag (or the tag, when
//! the commit could finish).

use crate::lab::Lab;
use crate::safety::{
    big_sandbox, descendants, leases, signal, spawn_commit, wait_until, worker_of,
};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// `committer commit …` as PID 1 of a new PID namespace, as in the commit Job's container.
fn spawn_commit_as_pid1(lab: &Lab, id: &str, repo: &str, extra: &[&str]) -> Child {
    let target = format!("{}/{repo}:v1", lab.registry);
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc"])
        .arg(env!("CARGO_BIN_EXE_committer"))
        .args([
            "commit",
            "--container",
            id,
            "--image",
            &target,
            "--plain-http",
        ])
        .args(extra)
        .env("CONTAINERD_ADDRESS", &lab.address)
        .env("CONTAINERD_NAMESPACE", &lab.namespace)
        // held 5 s while paused: the test sees the pause however loaded the machine is
        .env("COMMITTER_TEST_STALL", "reading:5")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning unshare")
}

/// The supervisor: PID 1 of the new namespace, unshare's child on the host.
fn pid1_of(unshare: &Child) -> u32 {
    let mut pid = None;
    wait_until("unshare to fork PID 1", Duration::from_secs(10), || {
        pid = descendants(unshare.id()).first().copied();
        pid.is_some()
    });
    let pid = pid.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(
        nspid.trim_end().ends_with("\t1"),
        "not PID 1 of its namespace: {nspid}"
    );
    pid
}

#[test]
fn as_pid1_a_sigkill_of_the_worker_while_paused_is_undone_within_two_seconds() {
    let lab = Lab::start();
    big_sandbox(&lab, "p1");
    let spool = lab.spool_dir.to_string_lossy().into_owned();
    let child = spawn_commit_as_pid1(&lab, "p1", "snap/p1", &["--spool-dir", &spool]);
    let supervisor = pid1_of(&child);
    wait_until("the sandbox to be paused", Duration::from_secs(30), || {
        lab.task_status("p1") == "PAUSED"
    });
    signal(worker_of(supervisor), rustix::process::Signal::KILL);
    let killed = Instant::now();
    wait_until("the sandbox to run again", Duration::from_secs(2), || {
        lab.task_status("p1") == "RUNNING"
    });
    eprintln!("resumed {:?} after the worker's SIGKILL", killed.elapsed());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(137), "{stderr}");
    assert!(stderr.contains("killed"), "{stderr}");
    assert!(!leases(&lab).contains("committer/p1"), "{}", leases(&lab));
    assert!(lab.tags("snap/p1").is_empty());
    assert_eq!(
        crate::cli::spool_files(&lab.spool_dir),
        Vec::<String>::new(),
        "the supervisor removes the spool files"
    );
}

#[test]
fn as_pid1_sigterm_exits_130_with_the_sandbox_running_and_no_lease_or_tag() {
    let lab = Lab::start();
    big_sandbox(&lab, "p2");
    let child = spawn_commit_as_pid1(&lab, "p2", "snap/p2", &[]);
    let supervisor = pid1_of(&child);
    wait_until("the sandbox to be paused", Duration::from_secs(30), || {
        lab.task_status("p2") == "PAUSED"
    });
    signal(supervisor, rustix::process::Signal::TERM);
    let termed = Instant::now();
    let out = child.wait_with_output().unwrap();
    eprintln!("exited {:?} after SIGTERM", termed.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted by SIGTERM"), "{stderr}");
    // Checked the moment it exits: the lease is released before PID 1 ends, not later.
    assert_eq!(lab.task_status("p2"), "RUNNING");
    assert!(!leases(&lab).contains("committer/p2"), "{}", leases(&lab));
    assert!(lab.tags("snap/p2").is_empty());
}

/// A memory cgroup (v2, or v1's memory controller) below this process's own, unlimited until
/// `limit_near_usage`; removed on drop.
struct MemCgroup {
    path: std::path::PathBuf,
    /// The limit's file and the usage's file (v1 or v2 names).
    max: &'static str,
    usage: &'static str,
}

impl MemCgroup {
    fn new(name: &str) -> MemCgroup {
        // v1's memory controller when mounted (this machine), else the v2 unified hierarchy.
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let (dir, max, usage) = match own.lines().find_map(|l| l.split_once(":memory:")) {
            Some((_, v1)) => (
                format!("/sys/fs/cgroup/memory{v1}"),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            ),
            None => {
                let v2 = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
                (
                    format!("/sys/fs/cgroup{v2}"),
                    "memory.max",
                    "memory.current",
                )
            }
        };
        let path = std::path::Path::new(&dir).join(name);
        std::fs::create_dir_all(&path).unwrap();
        MemCgroup { path, max, usage }
    }
    fn add(&self, pid: u32) {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string()).unwrap();
    }
    /// Limits the cgroup to what it uses now plus `headroom` bytes: the next `headroom` bytes
    /// its processes charge (tmpfs pages cannot be reclaimed without swap) bring the OOM killer.
    /// Retried while the usage grows past the limit being written (v1 answers EBUSY).
    fn limit_near_usage(&self, headroom: u64) {
        for _ in 0..100 {
            let used: u64 = std::fs::read_to_string(self.path.join(self.usage))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            if std::fs::write(self.path.join(self.max), (used + headroom).to_string()).is_ok() {
                return;
            }
        }
        panic!("could not limit {} near its usage", self.path.display());
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A sandbox whose capture lasts: 30 000 small files walked first (seconds of paused work in a
/// debug build) and 96 MiB of data after them (`/zbig` sorts last).
pub(crate) fn long_capture_sandbox(lab: &Lab, id: &str) {
    let base = lab.base_image("base", false);
    lab.run_container(id, &base, &crate::lab::RunOpts::default());
    lab.exec(
        id,
        "mkdir -p /many /zbig && i=0; while [ $i -lt 30000 ]; do echo $i > /many/$i; i=$((i+1)); done; \
         for i in 1 2 3; do head -c 33554432 /dev/urandom > /zbig/f$i; done",
    );
}

#[test]
fn as_pid1_an_oom_kill_of_the_worker_while_paused_is_undone_and_its_spool_removed() {
    let lab = Lab::start();
    long_capture_sandbox(&lab, "p3");
    // The spool on tmpfs: its pages are charged to the worker's cgroup and cannot be reclaimed.
    let spool = tempfile::Builder::new()
        .prefix("committer-oom-spool-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let cgroup = MemCgroup::new(&format!("committer-oom-{}", std::process::id()));
    let mut child = spawn_commit_as_pid1(
        &lab,
        "p3",
        "snap/p3",
        &["--spool-dir", spool.path().to_str().unwrap()],
    );
    let supervisor = pid1_of(&child);
    cgroup.add(worker_of(supervisor));
    // The limit comes only once the sandbox is paused: the OOM kill cannot come before it.
    wait_until("the sandbox to be paused", Duration::from_secs(60), || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the commit ended before the sandbox was seen paused"
        );
        lab.task_status("p3") == "PAUSED"
    });
    cgroup.limit_near_usage(8 << 20);
    let out = child.wait_with_output().unwrap();
    let stderr = crate::cli::stderr_text(&out);
    assert_eq!(out.status.code(), Some(137), "{stderr}");
    assert!(stderr.contains("OOM killer"), "{stderr}");
    // The supervisor's own resume (it names the sandbox only when it found it paused and resumed
    // it), not a worker that resumed before it died.
    assert!(
        stderr.contains("cleaned up after it; the sandbox \"p3\" is running again"),
        "{stderr}"
    );
    assert_eq!(lab.task_status("p3"), "RUNNING");
    assert!(!leases(&lab).contains("committer/p3"), "{}", leases(&lab));
    assert!(lab.tags("snap/p3").is_empty());
    let left: Vec<_> = std::fs::read_dir(spool.path()).unwrap().collect();
    assert!(left.is_empty(), "spool files left: {left:?}");
}

/// Kills the lab's containerd with SIGKILL (shims and tasks live on), as a node restart of
/// containerd does.
fn kill_containerd(lab: &Lab) {
    // The pid in the lab's env file: `restart_containerd` writes the new one there.
    let env = std::fs::read_to_string(lab.dir.join("env")).unwrap();
    let pid: u32 = env
        .lines()
        .find_map(|l| l.strip_prefix("CONTAINERD_PID="))
        .map_or(lab.containerd_pid, |p| p.parse().unwrap());
    signal(pid, rustix::process::Signal::KILL);
    wait_until("containerd to die", Duration::from_secs(5), || {
        !crate::lab::process_alive(pid)
    });
}

/// Starts the lab's containerd again on the same config and records its pid for `lab.sh stop`.
fn restart_containerd(lab: &Lab) {
    use std::os::unix::process::CommandExt;
    let bindir = lab.ctr_bin.parent().unwrap();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(lab.dir.join("containerd.log"))
        .unwrap();
    let mut cmd = std::process::Command::new(bindir.join("containerd"));
    cmd.arg("--config")
        .arg(lab.dir.join("config.toml"))
        .env(
            "PATH",
            format!("{}:{}", bindir.display(), std::env::var("PATH").unwrap()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let pid = cmd.spawn().unwrap().id();
    let env = std::fs::read_to_string(lab.dir.join("env")).unwrap();
    let env: String = env
        .lines()
        .map(|l| match l.starts_with("CONTAINERD_PID=") {
            true => format!("CONTAINERD_PID={pid}\n"),
            false => format!("{l}\n"),
        })
        .collect();
    std::fs::write(lab.dir.join("env"), env).unwrap();
    wait_until(
        "containerd to answer again",
        Duration::from_secs(10),
        || lab.try_ctr(&["version"]).status.success(),
    );
}

#[test]
fn containerd_restarting_while_the_sandbox_is_paused_does_not_lose_the_resume() {
    use std::io::BufRead;
    let lab = Lab::start();
    big_sandbox(&lab, "r1");
    let mut child = spawn_commit(&lab, "r1", "snap/r1", &[]);
    let stderr = child.stderr.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                lines.lock().unwrap().push(l);
            }
        })
    };
    wait_until("the sandbox to be paused", Duration::from_secs(30), || {
        lab.task_status("r1") == "PAUSED"
    });
    kill_containerd(&lab);
    // containerd stays down until the commit has tried, and failed, to resume at least once.
    wait_until("a failed resume", Duration::from_secs(60), || {
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("retrying to resume"))
    });
    restart_containerd(&lab);
    let out = child.wait_with_output().unwrap();
    reader.join().unwrap();
    let stderr = lines.lock().unwrap().join("\n");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(lab.task_status("r1"), "RUNNING");
    assert!(!leases(&lab).contains("committer/r1"), "{}", leases(&lab));
    assert_eq!(lab.tags("snap/r1"), vec!["v1".to_string()]);
}

#[test]
fn as_pid1_a_worker_killed_while_containerd_is_down_is_resumed_once_containerd_is_back() {
    let lab = Lab::start();
    big_sandbox(&lab, "p4");
    let child = spawn_commit_as_pid1(&lab, "p4", "snap/p4", &[]);
    let supervisor = pid1_of(&child);
    wait_until("the sandbox to be paused", Duration::from_secs(30), || {
        lab.task_status("p4") == "PAUSED"
    });
    kill_containerd(&lab);
    signal(worker_of(supervisor), rustix::process::Signal::KILL);
    std::thread::sleep(Duration::from_secs(2));
    restart_containerd(&lab);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(137), "{stderr}");
    assert!(stderr.contains("retrying to resume"), "{stderr}");
    assert!(stderr.contains("running again"), "{stderr}");
    assert_eq!(lab.task_status("p4"), "RUNNING");
    assert!(!leases(&lab).contains("committer/p4"), "{}", leases(&lab));
}

/// The worker killed while containerd stays down past the supervisor's resume deadline (2 s here,
/// 60 s in a release build): exit 8, in one line in the chosen format (after the resume's retry
/// warnings) that says the sandbox may still be paused and how to resume it.
#[test]
fn a_worker_killed_while_containerd_stays_down_exits_8_saying_how_to_resume() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("p5", &base, &crate::lab::RunOpts::default());
    lab.exec("p5", "echo changed > /data/modify.txt");
    let target = format!("{}/snap/p5:v1", lab.registry);
    for json in [false, true] {
        let format = if json { "json" } else { "text" };
        let args = [
            "commit",
            "p5",
            &target,
            "--plain-http",
            "--log-format",
            format,
        ];
        let (child, worker) =
            crate::cli::spawn_stalled(&lab, "p5", &args, &[("COMMITTER_TEST_RESUME_SECONDS", "2")]);
        kill_containerd(&lab);
        signal(worker, rustix::process::Signal::KILL);
        let out = child.wait_with_output().unwrap();
        crate::cli::assert_one_line_besides(&out, json, 8, "left paused", |l| {
            l.contains("retrying to resume")
        });
        let line = crate::cli::stderr_text(&out);
        assert!(
            line.contains("killed (signal 9)")
                && line.contains("THE SANDBOX \"p5\" MAY STILL BE PAUSED")
                && line.contains(&format!("ctr -n {} tasks resume p5", lab.namespace)),
            "{line}"
        );
        assert!(
            line.contains("lease committer/p5 expires by itself"),
            "{line}"
        );
        restart_containerd(&lab);
        assert_eq!(lab.task_status("p5"), "PAUSED");
        lab.ctr(&["tasks", "resume", "p5"]);
        lab.ctr(&["leases", "rm", "committer/p5"]);
    }
}
