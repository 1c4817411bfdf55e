//! The library's error: which stage failed, the typed cause, and the exit code it maps to.

use crate::containerd::ContainerdError;
use crate::diff_source::SourceError;
use crate::registry::RegistryError;

/// Exit codes (documented in the README).
pub mod exit {
    pub const INTERNAL: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const NOT_FOUND: i32 = 3;
    pub const REFUSED: i32 = 4;
    pub const REGISTRY: i32 = 5;
    pub const CONTAINERD: i32 = 6;
    pub const BUSY: i32 = 7;
    pub const INTERRUPTED: i32 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("reading the container's filesystem: {0}")]
    Diff(#[from] crate::diff::DiffError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// We will not commit this container truthfully (runtime keeps the rootfs off the host, …).
    #[error("{0}")]
    Refused(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted by {0}; no tag was pushed, and no container paused by committer was left paused")]
    Interrupted(&'static str),
    #[error("internal error: {0}")]
    Internal(String),
}

impl CommitError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CommitError {
        let what = what.into();
        move |source| CommitError::Io { what, source }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            CommitError::Containerd(ContainerdError::Busy { .. }) => exit::BUSY,
            CommitError::Containerd(e) if e.is_not_found() => exit::NOT_FOUND,
            CommitError::Containerd(_) => exit::CONTAINERD,
            CommitError::Source(SourceError::Containerd(e)) if e.is_not_found() => exit::NOT_FOUND,
            CommitError::Source(SourceError::Containerd(_)) => exit::CONTAINERD,
            CommitError::Source(_) => exit::REFUSED,
            CommitError::Diff(
                crate::diff::DiffError::LimitExceeded { .. }
                | crate::diff::DiffError::Unrepresentable { .. }
                | crate::diff::DiffError::FileChanged { .. },
            ) => exit::REFUSED,
            CommitError::Diff(_) => exit::INTERNAL,
            CommitError::Image(_) => exit::REFUSED,
            CommitError::Registry(_) => exit::REGISTRY,
            CommitError::Refused(_) => exit::REFUSED,
            CommitError::Io { .. } | CommitError::Internal(_) => exit::INTERNAL,
            CommitError::Interrupted(_) => exit::INTERRUPTED,
        }
    }
}
