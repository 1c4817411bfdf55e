//! The pause window. A container we paused is recorded here until it is resumed, so that every
//! way out of the process — success, error, panic, SIGTERM/SIGINT — can resume it
//! (`resume_if_paused`). A task that was already paused before we started is left paused.
//!
//! `while_paused` is the one way the pipeline pauses: it takes the work as a future, pauses,
//! runs it, and resumes before returning, whatever the work returned.

use crate::containerd::task::TaskStatus;
use crate::containerd::{Containerd, ContainerdError};
use std::sync::Mutex;
use std::time::Instant;

static PAUSED: Mutex<Option<(Containerd, String)>> = Mutex::new(None);

/// Why the sandbox was not paused for a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PauseReport {
    pub ms: u64,
    pub skipped: Option<PauseSkipped>,
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
            },
        ));
    }
    let paused = pause(ctr, id).await?;
    let out = work.await;
    let ms = match paused {
        Some(p) => p.resume().await?,
        None => 0,
    };
    Ok((out, PauseReport { ms, skipped: None }))
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
        PAUSED.lock().expect("pause lock").take();
        crate::guard::tell("resumed");
        return Err(e);
    }
    Ok(Some(Paused {
        since: Instant::now(),
    }))
}

impl Paused {
    /// Resumes the container; returns how long it was paused.
    pub async fn resume(self) -> Result<u64, ContainerdError> {
        let ms = self.since.elapsed().as_millis() as u64;
        resume_if_paused().await?;
        Ok(ms)
    }
}

/// Resumes the container we paused, if any. Safe to call any number of times.
pub async fn resume_if_paused() -> Result<(), ContainerdError> {
    let entry = PAUSED.lock().expect("pause lock").take();
    if let Some((ctr, id)) = entry {
        ctr.resume(&id).await?;
        crate::guard::tell("resumed");
    }
    Ok(())
}
