//! Pausing the sandbox while its filesystem is read, and resuming it whatever happens.

use super::{Containerd, ContainerdError};
use containerd_client::services::v1::{GetRequest, PauseTaskRequest, ResumeTaskRequest};

/// containerd's task status values (containerd.v1.types.Status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    Unknown,
    Created,
    Running,
    Stopped,
    Paused,
    Pausing,
    /// The container has no task (not started, or already deleted).
    NoTask,
}

impl TaskStatus {
    fn from_proto(v: i32) -> Self {
        match v {
            1 => TaskStatus::Created,
            2 => TaskStatus::Running,
            3 => TaskStatus::Stopped,
            4 => TaskStatus::Paused,
            5 => TaskStatus::Pausing,
            _ => TaskStatus::Unknown,
        }
    }
}

impl Containerd {
    pub async fn task_status(&self, id: &str) -> Result<TaskStatus, ContainerdError> {
        match self
            .tasks()
            .get(GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            })
            .await
        {
            Ok(r) => Ok(r
                .into_inner()
                .process
                .map(|p| TaskStatus::from_proto(p.status))
                .unwrap_or(TaskStatus::NoTask)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(TaskStatus::NoTask),
            Err(s) => Err(ContainerdError::rpc(
                format!("reading the task state of {id:?}"),
                s,
            )),
        }
    }

    pub async fn pause(&self, id: &str) -> Result<(), ContainerdError> {
        self.tasks()
            .pause(PauseTaskRequest {
                container_id: id.to_string(),
            })
            .await
            .map(|_| ())
            .map_err(|s| ContainerdError::rpc(format!("pausing {id:?}"), s))
    }

    pub async fn resume(&self, id: &str) -> Result<(), ContainerdError> {
        self.tasks()
            .resume(ResumeTaskRequest {
                container_id: id.to_string(),
            })
            .await
            .map(|_| ())
            .map_err(|s| ContainerdError::rpc(format!("resuming {id:?}"), s))
    }
}
