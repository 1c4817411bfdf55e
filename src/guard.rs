//! The worker's side of the supervisor channel (see `supervise`): the commit runs in a child of
//! the supervisor and tells it, over an inherited pipe, what it would have to undo if it died
//! now — the sandbox it paused, the lease it holds, the walk views it mounted, the spool files it
//! created. The supervisor outlives the worker (it is the Job container's PID 1), so a SIGKILL or
//! an OOM kill of the worker is cleaned up within milliseconds; `finish` says "nothing to undo".
//!
//! One line per message, fields separated by tabs: `target ADDRESS NAMESPACE CONTAINER LEASE`,
//! `paused`, `resumed`, `mount PATH`, `unmount PATH`, `own PATH`, `disown PATH`, `done`.
//! Without a supervisor (the library used on its own) every call here is a no-op.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::Path;
use std::sync::Mutex;

/// The environment variable that hands the worker the write end of the channel.
pub const CHANNEL_ENV: &str = "COMMITTER_SUPERVISOR_FD";
/// The environment variable that hands the worker the owner token it writes on its lease.
pub const OWNER_ENV: &str = "COMMITTER_OWNER";

static CHANNEL: Mutex<Option<File>> = Mutex::new(None);
static OWNER: Mutex<Option<String>> = Mutex::new(None);

/// Takes over the channel fd named in the environment (the worker, once, at start). The fd is
/// made close-on-exec so that nothing the worker runs can hold the supervisor's pipe open.
pub fn attach(fd: RawFd, owner: String) {
    if let Ok(flags) = rustix::io::fcntl_getfd(unsafe { rustix::fd::BorrowedFd::borrow_raw(fd) }) {
        let _ = rustix::io::fcntl_setfd(
            unsafe { rustix::fd::BorrowedFd::borrow_raw(fd) },
            flags | rustix::io::FdFlags::CLOEXEC,
        );
    }
    *CHANNEL.lock().expect("channel lock") = Some(unsafe { File::from_raw_fd(fd) });
    *OWNER.lock().expect("owner lock") = Some(owner);
}

/// The token this commit writes on its lease, so that only its owner ever deletes it.
pub fn owner_token() -> String {
    OWNER
        .lock()
        .expect("owner lock")
        .get_or_insert_with(|| format!("pid-{}-{}", std::process::id(), nanos()))
        .clone()
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Tells the supervisor which sandbox and lease this commit works on (once the lease is taken):
/// from here on a death of the worker is cleaned up.
pub fn start(address: &Path, namespace: &str, container: &str, lease: &str) -> std::io::Result<()> {
    send(&format!(
        "target\t{}\t{namespace}\t{container}\t{lease}",
        address.display()
    ))
}

fn send(line: &str) -> std::io::Result<()> {
    match CHANNEL.lock().expect("channel lock").as_mut() {
        Some(pipe) => writeln!(pipe, "{line}"),
        None => Ok(()),
    }
}

/// Tells the supervisor the sandbox state ("paused" before the Pause RPC, "resumed" only after
/// a Resume succeeded).
pub fn tell(state: &str) {
    let _ = send(state);
}

/// A read-only view mounted for the walk: unmounted by the supervisor if the worker dies.
pub fn tell_mounted(path: &Path) {
    let _ = send(&format!("mount\t{}", path.display()));
}

pub fn tell_unmounted(path: &Path) {
    let _ = send(&format!("unmount\t{}", path.display()));
}

/// A spool file or directory this commit created: removed by the supervisor if the worker dies
/// (a directory with everything in it, never following a symlink).
pub fn tell_owned_path(path: &Path) {
    let _ = send(&format!("own\t{}", path.display()));
}

/// The path is gone or handed over: the supervisor leaves it alone.
pub fn tell_released_path(path: &Path) {
    let _ = send(&format!("disown\t{}", path.display()));
}

/// The commit is over and cleaned up: the supervisor has nothing to undo.
pub fn finish() {
    let _ = send("done");
}

/// What the supervisor would have to undo, as told by the worker.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pending {
    /// containerd address, namespace, container, lease.
    pub target: Option<(String, String, String, String)>,
    pub paused: bool,
    pub mounts: Vec<String>,
    pub owned: Vec<String>,
    pub done: bool,
}

impl Pending {
    /// Applies one line of the channel.
    pub fn apply(&mut self, line: &str) {
        let mut f = line.split('\t');
        match (f.next(), f.next()) {
            (Some("target"), Some(address)) => {
                if let (Some(ns), Some(c), Some(l)) = (f.next(), f.next(), f.next()) {
                    self.target = Some((address.into(), ns.into(), c.into(), l.into()));
                }
            }
            (Some("paused"), None) => self.paused = true,
            (Some("resumed"), None) => self.paused = false,
            (Some("done"), None) => self.done = true,
            (Some("mount"), Some(p)) => self.mounts.push(p.into()),
            (Some("unmount"), Some(p)) => self.mounts.retain(|m| m != p),
            (Some("own"), Some(p)) => self.owned.push(p.into()),
            (Some("disown"), Some(p)) => self.owned.retain(|m| m != p),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Pending;

    #[test]
    fn the_channel_tracks_what_is_left_to_undo() {
        let mut p = Pending::default();
        for l in [
            "target\t/run/c.sock\tk8s.io\tabc\tcommitter/abc",
            "paused",
            "mount\t/tmp/v1",
            "own\t/spool/a",
            "own\t/spool/b",
            "disown\t/spool/a",
            "resumed",
            "paused",
            "unmount\t/tmp/v1",
        ] {
            p.apply(l);
        }
        assert!(p.paused && !p.done);
        assert!(p.mounts.is_empty());
        assert_eq!(p.owned, vec!["/spool/b".to_string()]);
        assert_eq!(p.target.as_ref().unwrap().3, "committer/abc");
        p.apply("done");
        assert!(p.done);
    }
}
