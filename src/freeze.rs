//! The pause window. A container we paused is recorded here until it is resumed, so that every
//! way out of the process — success, error, panic, SIGTERM/SIGINT — can resume it
//! (`resume_if_paused`). A task that was already paused before we started is left paused.

use crate::containerd::task::TaskStatus;
use crate::containerd::{Containerd, ContainerdError};
use std::sync::Mutex;
use std::time::Instant;

static PAUSED: Mutex<Option<(Containerd, String)>> = Mutex::new(None);

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
