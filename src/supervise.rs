//! The supervisor: `committer` starts as a small process that runs the commit in a child (the
//! worker, this binary re-executed) and outlives it. In the commit Job it is the container's
//! PID 1, and the kernel kills every other process of a PID namespace when its init dies
//! (pid_namespaces(7)): a helper *below* the commit would die with it, a parent does not.
//!
//! When the worker dies without saying "done" (SIGKILL, the OOM killer, a crash) the supervisor
//! unmounts the walk views it left, removes its spool files, resumes a sandbox it left paused
//! (retrying until containerd answers and the task is no longer PAUSED) and deletes its lease if
//! the lease is still the worker's. SIGTERM, SIGINT, SIGHUP and SIGQUIT are forwarded to the
//! worker, which stops at its next step, resumes and exits 130; the supervisor then releases
//! the lease and exits with the worker's code.
//!
//! It is used on every run, not only as PID 1: one code path, tested by every test, and a local
//! `kill -9` of the worker is covered the same way. The worker asks the kernel for SIGTERM when
//! the supervisor dies (PR_SET_PDEATHSIG), so `kill -9` of the supervisor makes the worker stop
//! cleanly by itself. Exit codes: the worker's own; 128+N when it was killed by signal N (137:
//! SIGKILL, including the OOM killer — said on stderr); `LEFT_PAUSED` when the sandbox could
//! not be resumed.

use crate::guard::{self, Pending};
use std::io::BufRead;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Exit code: the worker died and its sandbox is still paused (containerd did not resume it in
/// time). The one outcome that needs a human or a controller: `ctr tasks resume ID`.
pub const LEFT_PAUSED: i32 = 8;

/// How long the supervisor keeps trying to resume a sandbox the worker left paused.
const RESUME_DEADLINE: Duration = Duration::from_secs(60);

static CHILD: AtomicI32 = AtomicI32::new(0);
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The first call in `main`. In the worker (the channel fd is in the environment) it takes the
/// channel and returns; otherwise it becomes the supervisor and never returns.
pub fn enter() {
    if let Some(fd) = std::env::var(guard::CHANNEL_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        let owner = std::env::var(guard::OWNER_ENV).unwrap_or_default();
        guard::attach(fd, owner);
        return;
    }
    std::process::exit(supervise());
}

fn supervise() -> i32 {
    // The worker's own flags say how the supervisor's lines look too.
    crate::log::init_from_args(&crate::log::args_lossy());
    let (read, write) = match pipe() {
        Ok(p) => p,
        Err(e) => return fail(&format!("cannot create the supervisor's pipe: {e}")),
    };
    install_forwarding();
    let owner = format!("committer-{}-{}", std::process::id(), now_nanos());
    let child = match spawn_worker(&write, &owner) {
        Ok(c) => c,
        Err(e) => return fail(&format!("cannot start the commit process: {e}")),
    };
    drop(write);
    let pid = child.id() as i32;
    CHILD.store(pid, Ordering::SeqCst);
    let pending_sig = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
    if pending_sig != 0 {
        unsafe { libc::kill(pid, pending_sig) };
    }
    let pending = Arc::new(Mutex::new(Pending::default()));
    let reader = {
        let pending = pending.clone();
        std::thread::spawn(move || {
            let r = std::io::BufReader::new(std::fs::File::from(read));
            for line in r.lines().map_while(Result::ok) {
                pending.lock().expect("pending lock").apply(&line);
            }
        })
    };
    let oom = OomWatch::start(pid);
    let status = wait_worker(pid);
    CHILD.store(0, Ordering::SeqCst);
    let oom = Some(oom.kills());
    let _ = reader.join();
    let pending = pending.lock().expect("pending lock").clone();
    finish(status, oom, &pending, &owner)
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn spawn_worker(write: &OwnedFd, owner: &str) -> std::io::Result<std::process::Child> {
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "committer".into());
    let fd = write.as_raw_fd();
    let parent = std::process::id() as i32;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0(arg0)
        .args(args)
        .env(guard::CHANNEL_ENV, fd.to_string())
        .env(guard::OWNER_ENV, owner);
    unsafe {
        cmd.pre_exec(move || {
            // The write end crosses exec; the worker makes it close-on-exec again at once.
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The supervisor killed outright: the worker stops as on SIGTERM (resumes, releases).
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if libc::getppid() != parent {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        unsafe { libc::kill(pid, sig) };
    } else {
        PENDING_SIGNAL.store(sig, Ordering::SeqCst);
    }
}

fn install_forwarding() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Waits for the worker, reaping any orphan re-parented to us (as PID 1).
fn wait_worker(pid: i32) -> std::process::ExitStatus {
    loop {
        let mut status = 0;
        let who = unsafe { libc::waitpid(-1, &mut status, 0) };
        if who == pid {
            return std::process::ExitStatus::from_raw(status);
        }
        if who < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return std::process::ExitStatus::from_raw(1 << 8);
        }
    }
}

/// Watches which memory cgroups the worker lives in (a dead process reads as in the root
/// cgroup, so this is noted while it runs) and their OOM-kill counts when first seen: a count
/// that grew by the worker's death says the OOM killer took it.
struct OomWatch {
    seen: Mutex<Vec<(String, u64)>>,
}

impl OomWatch {
    fn start(pid: i32) -> Arc<OomWatch> {
        let watch = Arc::new(OomWatch {
            seen: Mutex::new(Vec::new()),
        });
        let w = watch.clone();
        std::thread::spawn(move || {
            // Our own cgroup is the worker's at first (its baseline counts kills before us);
            // one the worker is moved into later starts from zero.
            let mut baseline_known = false;
            while CHILD.load(Ordering::SeqCst) == pid {
                if let Some(file) = oom_file(pid) {
                    let mut seen = w.seen.lock().expect("oom lock");
                    if !seen.iter().any(|(f, _)| *f == file) {
                        let base = if baseline_known {
                            0
                        } else {
                            oom_count(&file).unwrap_or(0)
                        };
                        seen.push((file, base));
                        baseline_known = true;
                    }
                }
                // Often enough to see the worker moved into a cgroup before it can fill it.
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        watch
    }

    /// OOM kills counted since the worker entered its cgroups.
    fn kills(&self) -> u64 {
        self.seen
            .lock()
            .expect("oom lock")
            .iter()
            .map(|(f, base)| oom_count(f).unwrap_or(0).saturating_sub(*base))
            .sum()
    }
}

/// The file that counts OOM kills of the process's memory cgroup (v1 `memory.oom_control`,
/// v2 `memory.events`).
fn oom_file(pid: i32) -> Option<String> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    cgroups.lines().find_map(|l| {
        let (_, rest) = l.split_once(':')?;
        let (ctrl, path) = rest.split_once(':')?;
        match ctrl {
            "memory" => Some(format!("/sys/fs/cgroup/memory{path}/memory.oom_control")),
            "" if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() => {
                Some(format!("/sys/fs/cgroup{path}/memory.events"))
            }
            _ => None,
        }
    })
}

fn oom_count(file: &str) -> Option<u64> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
}

/// The worker's exit code, after undoing what it left. A killed worker's outcome is one line: what
/// killed it, and whether its sandbox runs again.
fn finish(
    status: std::process::ExitStatus,
    oom: Option<u64>,
    pending: &Pending,
    owner: &str,
) -> i32 {
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    };
    if pending.done && !pending.paused {
        return code;
    }
    let undone = undo(pending, owner);
    let Some(sig) = status.signal() else {
        // The worker exited by itself and said why in its own line.
        if let Some(note) = &undone.lease {
            crate::log::warn(note);
        }
        return match undone.resumed {
            Ok(Some(container)) => {
                crate::log::warn(&format!(
                    "the commit process exited while {container:?} was paused; the sandbox is running again"
                ));
                code
            }
            Ok(None) => code,
            Err(still_paused) => {
                crate::log::failure(&still_paused, LEFT_PAUSED);
                LEFT_PAUSED
            }
        };
    };
    let why = match oom {
        Some(n) if n > 0 && sig == libc::SIGKILL => {
            format!(" by the OOM killer (its memory cgroup counts {n} OOM kills)")
        }
        _ => String::new(),
    };
    let lease = undone.lease.map_or(String::new(), |n| format!("; {n}"));
    let (line, code) = match undone.resumed {
        Ok(resumed) => {
            let sandbox = resumed.map_or(String::new(), |c| {
                format!("; the sandbox {c:?} is running again")
            });
            (format!("cleaned up after it{sandbox}{lease}"), code)
        }
        Err(still_paused) => (format!("{still_paused}{lease}"), LEFT_PAUSED),
    };
    crate::log::failure(
        &format!("the commit process was killed{why} (signal {sig}) before it finished; {line}"),
        code,
    );
    code
}

/// What undoing a dead worker's leftovers came to.
struct Undone {
    /// Ok(the container resumed, if it was paused), or Err(the sandbox may still be paused: the
    /// words that say so and how to resume it).
    resumed: Result<Option<String>, String>,
    /// Why the lease could not be deleted (it expires by itself).
    lease: Option<String>,
}

/// Unmounts the worker's views, removes its spool files, resumes its sandbox and releases its lease.
fn undo(p: &Pending, owner: &str) -> Undone {
    if !p.done {
        for m in &p.mounts {
            let _ = rustix::mount::unmount(m.as_str(), rustix::mount::UnmountFlags::DETACH);
            let _ = std::fs::remove_dir(m);
        }
        for path in &p.owned {
            remove_owned(std::path::Path::new(path));
        }
    }
    let Some((address, ns, container, lease)) = &p.target else {
        return Undone {
            resumed: Ok(None),
            lease: None,
        };
    };
    let still_paused = |e: &dyn std::fmt::Display| {
        format!(
            "THE SANDBOX {container:?} MAY STILL BE PAUSED: {e}; resume it with `ctr -n {ns} tasks resume {container}`"
        )
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let e = format!("cannot start the async runtime: {e}");
            return Undone {
                resumed: if p.paused {
                    Err(still_paused(&e))
                } else {
                    Ok(None)
                },
                lease: Some(format!("lease {lease} expires by itself")),
            };
        }
    };
    rt.block_on(async {
        let resumed = match p.paused {
            true => resume(address, ns, container)
                .await
                .map(|()| Some(container.clone()))
                .map_err(|e| still_paused(&e)),
            false => Ok(None),
        };
        let lease = match p.done {
            false => release(address, ns, lease, owner).await.err(),
            true => None,
        };
        Undone { resumed, lease }
    })
}

/// Removes a spool file or directory without following symlinks.
fn remove_owned(path: &std::path::Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

async fn resume(
    address: &str,
    ns: &str,
    container: &str,
) -> Result<(), crate::containerd::ContainerdError> {
    let target = crate::freeze::Target {
        address: address.into(),
        namespace: ns.into(),
        container: container.into(),
    };
    crate::freeze::resume_until_running(&target, None, resume_deadline()).await
}

/// How long the supervisor keeps trying to resume: `RESUME_DEADLINE`, or in test builds
/// `COMMITTER_TEST_RESUME_SECONDS` (a test of the "left paused" outcome need not wait a minute).
fn resume_deadline() -> Duration {
    #[cfg(any(debug_assertions, feature = "lab"))]
    if let Some(s) = std::env::var("COMMITTER_TEST_RESUME_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_secs(s);
    }
    RESUME_DEADLINE
}

/// Deletes the worker's lease; Err(why it could not, and that it expires by itself).
async fn release(address: &str, ns: &str, lease: &str, owner: &str) -> Result<(), String> {
    let connect = crate::containerd::Containerd::connect(std::path::Path::new(address), ns);
    let result = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(ctr)) => {
            let handover = format!("{lease}.handover");
            let _ = ctr.delete_lease_if_owned(&handover, owner).await;
            ctr.delete_lease_if_owned(lease, owner).await
        }
        Ok(Err(e)) => Err(e),
        Err(_) => {
            return Err(format!(
                "containerd did not answer within 10 s; lease {lease} expires by itself"
            ))
        }
    };
    result.map_err(|e| format!("{e}; lease {lease} expires by itself"))
}

fn fail(msg: &str) -> i32 {
    crate::log::failure(msg, crate::error::exit::INTERNAL);
    crate::error::exit::INTERNAL
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
