//! The pause window. A container we paused is recorded here until a Resume has *succeeded*, so
//! that every way out of the process — success, error, panic, SIGTERM/SIGINT — can resume it
//! (`resume_if_paused`), and the supervisor is told "resumed" only then. Resuming retries with
//! backoff and reconnects while containerd restarts, and checks the task is no longer PAUSED.
//! A task that was already paused before we started is left paused.
//!
//! `while_paused` is the one way the pipeline pauses: it takes the work as a future, pauses,
//! runs it, and resumes before returning, whatever the work returned.

use crate::containerd::task::TaskStatus;
use crate::containerd::{Containerd, ContainerdError};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the commit itself keeps trying to resume before it fails (the supervisor then tries
/// again for longer).
const RESUME_DEADLINE: Duration = Duration::from_secs(30);

static PAUSED: Mutex<Option<(Containerd, String)>> = Mutex::new(None);

/// Why the sandbox was not paused for a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PauseSkipped {
    /// `--no-pause`.
    NoPause,
    /// Someone else paused it before us: it is read as it is and left paused.
    AlreadyPaused,
    /// No running task (created, stopped, or no task): nothing to freeze.
    NotRunning,
}

/// How the sandbox was held while its filesystem was read (the result's `paused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PauseReport {
    pub ms: u64,
    pub skipped: Option<PauseSkipped>,
    /// How the local source captured the diff (`reflink`: contents cloned while paused, read
    /// after the resume; `copy`: copied while paused); null for containerd's differ.
    pub capture: Option<CaptureKind>,
}

/// How the capture was made (the result's `paused.capture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureKind {
    /// Contents cloned while paused, read after the resume.
    Reflink,
    /// Contents copied while paused.
    Copy,
}

/// Runs `work` with the container paused (when `enabled` and its task runs), and resumes it
/// before returning, whatever `work` returned. A failed resume is the error even when the work
/// succeeded: the caller must not go on as if the sandbox ran.
pub async fn while_paused<T>(
    ctr: &Containerd,
    id: &str,
    enabled: bool,
    work: impl std::future::Future<Output = T>,
) -> Result<(T, PauseReport), ContainerdError> {
    if !enabled {
        let report = PauseReport {
            ms: 0,
            skipped: Some(PauseSkipped::NoPause),
            capture: None,
        };
        return Ok((work.await, report));
    }
    let skipped = match ctr.task_status(id).await? {
        TaskStatus::Running => None,
        TaskStatus::Paused | TaskStatus::Pausing => Some(PauseSkipped::AlreadyPaused),
        _ => Some(PauseSkipped::NotRunning),
    };
    if let Some(skipped) = skipped {
        return Ok((
            work.await,
            PauseReport {
                ms: 0,
                skipped: Some(skipped),
                capture: None,
            },
        ));
    }
    let paused = pause(ctr, id).await?;
    let out = work.await;
    let ms = match paused {
        Some(p) => p.resume().await?,
        None => 0,
    };
    Ok((
        out,
        PauseReport {
            ms,
            skipped: None,
            capture: None,
        },
    ))
}

/// Proof that we paused a container; `resume` consumes it.
pub struct Paused {
    since: Instant,
}

/// Pauses the container's task if it is running. Returns None when there is nothing to pause
/// (no task, already paused or stopped): a paused sandbox is left as the user left it.
pub async fn pause(ctr: &Containerd, id: &str) -> Result<Option<Paused>, ContainerdError> {
    match ctr.task_status(id).await? {
        TaskStatus::Running => {}
        _ => return Ok(None),
    }
    // Record first: if we are killed between the RPC and the record, the resume path still runs.
    *PAUSED.lock().expect("pause lock") = Some((ctr.clone(), id.to_string()));
    crate::guard::tell("paused");
    if let Err(e) = ctr.pause(id).await {
        // A Pause that timed out or lost its answer may still have frozen the task.
        if let Err(r) = resume_if_paused().await {
            crate::log::error(&format!(
                "could not resume {id:?} after a failed pause: {r}"
            ));
        }
        return Err(e);
    }
    Ok(Some(Paused {
        since: Instant::now(),
    }))
}

impl Paused {
    /// Resumes the container; returns how long it was paused.
    pub async fn resume(self) -> Result<u64, ContainerdError> {
        resume_if_paused().await?;
        Ok(self.since.elapsed().as_millis() as u64)
    }
}

/// Resumes the container we paused, if any. Safe to call any number of times; the record is
/// cleared only once the task is no longer paused.
pub async fn resume_if_paused() -> Result<(), ContainerdError> {
    let entry = PAUSED.lock().expect("pause lock").clone();
    if let Some((ctr, id)) = entry {
        let target = Target {
            address: ctr.address.clone(),
            namespace: ctr.namespace.clone(),
            container: id,
        };
        resume_until_running(&target, Some(ctr), RESUME_DEADLINE).await?;
        PAUSED.lock().expect("pause lock").take();
        crate::guard::tell("resumed");
    }
    Ok(())
}

/// The sandbox to resume, by address (a fresh connection can be made to it).
pub struct Target {
    pub address: PathBuf,
    pub namespace: String,
    pub container: String,
}

/// Resumes `target` until its task is no longer PAUSED or PAUSING: a Resume whose answer was
/// lost, a containerd that restarts (the shim and the frozen task outlive it) or hangs (every
/// call has a deadline) are retried with backoff, on a new connection when the old one fails,
/// until `deadline`; then the last error is returned.
pub async fn resume_until_running(
    target: &Target,
    conn: Option<Containerd>,
    deadline: Duration,
) -> Result<(), ContainerdError> {
    let started = Instant::now();
    let mut conn = conn;
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        // One attempt never runs past the deadline (a hung containerd answers no call): the
        // budget is exact, and the Job's grace period can be set to cover it.
        let left = deadline
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        let err = match tokio::time::timeout(left, step(&mut conn, target)).await {
            Ok(Ok(true)) => return Ok(()),
            Ok(Ok(false)) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(ContainerdError::Invalid {
                what: format!("resuming {:?}", target.container),
                detail: format!("containerd did not answer within the {deadline:?} allowed"),
            }),
        };
        if started.elapsed() + delay > deadline {
            return Err(err.unwrap_or_else(|| ContainerdError::Invalid {
                what: format!("resuming {:?}", target.container),
                detail: format!(
                    "the task is still paused after {attempt} attempts in {deadline:?}"
                ),
            }));
        }
        if let Some(e) = &err {
            if attempt == 1 || attempt.is_multiple_of(10) {
                crate::log::warn(&format!(
                    "{e}; retrying to resume {:?} (attempt {attempt})",
                    target.container
                ));
            }
            conn = None;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// One try: connect if needed, read the status, resume if paused. True once it is not paused.
async fn step(conn: &mut Option<Containerd>, t: &Target) -> Result<bool, ContainerdError> {
    let ctr = match conn {
        Some(c) => c.clone(),
        None => {
            // Bounded by the connect deadline (containerd::deadline).
            let c = Containerd::connect(&t.address, &t.namespace).await?;
            *conn = Some(c.clone());
            c
        }
    };
    match ctr.task_status(&t.container).await? {
        TaskStatus::Paused | TaskStatus::Pausing => {
            ctr.resume(&t.container).await?;
            Ok(matches!(
                ctr.task_status(&t.container).await?,
                TaskStatus::Running
                    | TaskStatus::Stopped
                    | TaskStatus::NoTask
                    | TaskStatus::Created
            ))
        }
        _ => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_resume_that_cannot_reach_containerd_retries_until_its_deadline_then_fails() {
        let target = Target {
            address: "/nonexistent/containerd.sock".into(),
            namespace: "k8s.io".into(),
            container: "c".into(),
        };
        let started = Instant::now();
        let err = resume_until_running(&target, None, Duration::from_millis(800))
            .await
            .unwrap_err();
        let took = started.elapsed();
        // 50 + 100 + 200 + 400 ms of backoff fit in 800 ms: several attempts, then the error.
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert!(
            err.to_string().contains("/nonexistent/containerd.sock"),
            "{err}"
        );
    }
}
