//! The guardian: a small child process (this binary, re-executed as `committer __guard`) that
//! outlives a committer killed by SIGKILL or the OOM killer. The parent tells it over a pipe when
//! it pauses and resumes the sandbox; if the pipe closes without a final "done" (the parent died),
//! the guardian resumes a sandbox left paused and deletes the commit's lease (the per-container
//! lock), within milliseconds of the parent's death.
//!
//! It ignores SIGINT/SIGTERM: those reach the parent, which resumes and then says "done". Only
//! a SIGKILL of the whole container (the Job's pod being killed) can take both down; the lease
//! then expires by itself and a frozen task stays frozen — documented in SECURITY.md.

use crate::containerd::task::TaskStatus;
use crate::containerd::Containerd;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;

/// The name of the hidden subcommand.
pub const SUBCOMMAND: &str = "__guard";

static GUARDIAN: Mutex<Option<Guardian>> = Mutex::new(None);

struct Guardian {
    child: Child,
    pipe: ChildStdin,
}

/// Starts the guardian for this commit. Failing to start it is not fatal: we log and go on,
/// as every in-process path still resumes.
pub fn start(address: &Path, namespace: &str, container: &str, lease: &str) -> std::io::Result<()> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg(SUBCOMMAND)
        .arg(address)
        .arg(namespace)
        .arg(container)
        .arg(lease)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pipe = child.stdin.take().expect("stdin was piped");
    *GUARDIAN.lock().expect("guardian lock") = Some(Guardian { child, pipe });
    Ok(())
}

/// Tells the guardian the sandbox state ("paused" / "resumed").
pub fn tell(state: &str) {
    if let Some(g) = GUARDIAN.lock().expect("guardian lock").as_mut() {
        let _ = writeln!(g.pipe, "{state}");
    }
}

/// A read-only view mounted for the walk: unmounted by the guardian if we die holding it.
pub fn tell_mounted(path: &Path) {
    tell(&format!("mount {}", path.display()));
}

pub fn tell_unmounted(path: &Path) {
    tell(&format!("unmount {}", path.display()));
}

/// The commit is over and cleaned up: the guardian exits without doing anything.
pub fn finish() {
    if let Some(mut g) = GUARDIAN.lock().expect("guardian lock").take() {
        let _ = writeln!(g.pipe, "done");
        drop(g.pipe);
        let _ = g.child.wait();
    }
}

/// `committer __guard ADDRESS NAMESPACE CONTAINER LEASE`: waits for the parent, cleans up after it.
pub fn run(args: &[String]) -> i32 {
    let [address, namespace, container, lease] = args else {
        eprintln!("committer: {SUBCOMMAND} is internal: ADDRESS NAMESPACE CONTAINER LEASE");
        return 2;
    };
    // SIGINT/SIGTERM go to the parent, which handles them and then says "done".
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    let mut paused = false;
    let mut mounts: Vec<String> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        match line.as_deref() {
            Ok("paused") => paused = true,
            Ok("resumed") => paused = false,
            Ok("done") => return 0,
            Ok(l) if l.starts_with("mount ") => mounts.push(l["mount ".len()..].to_string()),
            Ok(l) if l.starts_with("unmount ") => mounts.retain(|m| m != &l["unmount ".len()..]),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // The parent is gone without saying "done": first the walk's views it left mounted.
    for m in &mounts {
        let _ = rustix::mount::unmount(m.as_str(), rustix::mount::UnmountFlags::DETACH);
        let _ = std::fs::remove_dir(m);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return 1,
    };
    rt.block_on(clean_up(
        PathBuf::from(address),
        namespace,
        container,
        lease,
        paused,
    ))
}

async fn clean_up(
    address: PathBuf,
    namespace: &str,
    container: &str,
    lease: &str,
    paused: bool,
) -> i32 {
    let ctr = match Containerd::connect(&address, namespace).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("committer guardian: {e}");
            return 1;
        }
    };
    let mut code = 0;
    if paused && matches!(ctr.task_status(container).await, Ok(TaskStatus::Paused)) {
        match ctr.resume(container).await {
            Ok(()) => eprintln!(
                "committer guardian: committer died while {container:?} was paused; resumed it"
            ),
            Err(e) => {
                eprintln!("committer guardian: {e}");
                code = 1;
            }
        }
    }
    if let Err(e) = ctr.delete_lease(lease).await {
        eprintln!("committer guardian: {e}");
    }
    code
}
