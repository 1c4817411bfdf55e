//! The library's error: which stage failed, the typed cause, and the exit code it maps to.
//!
//! One rule for messages: a variant either marks its cause `#[source]` (and its Display says only
//! what was being done) or formats the cause into its Display (and has no source) — never both.
//! `main` prints the chain joined with ": " ([`chain_line`]), so each cause appears once. Every
//! error type of a stage says its own exit class (`ExitClass`), so the mapping lives next to
//! nothing else.

use crate::containerd::ContainerdError;
use crate::diff::DiffError;
use crate::digest::Digest;
use crate::image::{ChangeError, ImageError, ProcessError};
use crate::registry::{ErrorKind, RegistryError};
use crate::source::squash::SquashError;
use crate::source::SourceError;

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

/// An error and its causes on one line, joined with ": " — what `main` prints. Each cause
/// appears once because no variant both formats its cause and marks it `#[source]`.
pub fn chain_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        line.push_str(": ");
        line.push_str(&s.to_string());
        next = s.source();
    }
    line
}

/// The exit code an error stands for.
pub trait ExitClass {
    fn exit_code(&self) -> i32;
}

/// Containers and states we will not commit, because the image would not be the truth.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Runtime(#[from] crate::containerd::lookup::RuntimeRefused),
    #[error("container {container:?} was not created from an image; committer needs the base image to build on")]
    NoImage { container: String },
    #[error("container {container:?} has no changes: the layer would be empty")]
    EmptyDiff { container: String },
    #[error("base layer {digest} of {image} is neither in the target registry nor in the node's content store, and the base's name is not a registry reference to fetch it from")]
    BaseLayerUnavailable { digest: Digest, image: String },
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("reading the container's filesystem")]
    Diff(#[from] DiffError),
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Boxed: the registry's errors are the largest, and every `Result` carries the enum.
    #[error(transparent)]
    Registry(Box<RegistryError>),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Change(#[from] ChangeError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Squash(#[from] SquashError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the tar spool reads back as {read} but {written} was written: is the spool disk failing?"
    )]
    SpoolCorrupt { written: Digest, read: Digest },
    #[error("interrupted by {0}; no tag was pushed, and no container paused by committer was left paused")]
    Interrupted(&'static str),
    #[error("internal error: {what} stopped: {detail}")]
    Task { what: &'static str, detail: String },
}

impl From<RegistryError> for CommitError {
    fn from(e: RegistryError) -> Self {
        CommitError::Registry(Box::new(e))
    }
}

impl CommitError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CommitError {
        let what = what.into();
        move |source| CommitError::Io { what, source }
    }

    pub fn exit_code(&self) -> i32 {
        ExitClass::exit_code(self)
    }
}

impl ExitClass for CommitError {
    fn exit_code(&self) -> i32 {
        match self {
            CommitError::Containerd(e) => e.exit_code(),
            CommitError::Source(e) => e.exit_code(),
            CommitError::Diff(e) => e.exit_code(),
            CommitError::Image(e) => e.exit_code(),
            CommitError::Registry(e) => e.exit_code(),
            CommitError::Refused(e) => e.exit_code(),
            CommitError::Change(e) => e.exit_code(),
            CommitError::Process(e) => e.exit_code(),
            CommitError::Squash(e) => e.exit_code(),
            CommitError::Io { .. }
            | CommitError::SpoolCorrupt { .. }
            | CommitError::Task { .. } => exit::INTERNAL,
            CommitError::Interrupted(_) => exit::INTERRUPTED,
        }
    }
}

impl ExitClass for ContainerdError {
    fn exit_code(&self) -> i32 {
        match self {
            ContainerdError::Busy { .. } => exit::BUSY,
            // The base the name points to now is not the one the sandbox runs on.
            ContainerdError::BaseMismatch { .. } => exit::REFUSED,
            // A base we cannot build on, like a malformed descriptor (ImageError).
            ContainerdError::MalformedBase { .. } => exit::REFUSED,
            e if e.is_not_found() => exit::NOT_FOUND,
            _ => exit::CONTAINERD,
        }
    }
}

impl ExitClass for Refusal {
    fn exit_code(&self) -> i32 {
        exit::REFUSED
    }
}

impl ExitClass for ChangeError {
    /// A --change the base makes impossible: the user's instruction.
    fn exit_code(&self) -> i32 {
        exit::USAGE
    }
}

impl ExitClass for ProcessError {
    /// A process config that cannot go into an image.
    fn exit_code(&self) -> i32 {
        exit::REFUSED
    }
}

impl ExitClass for SquashError {
    fn exit_code(&self) -> i32 {
        match self {
            SquashError::Containerd(e) => e.exit_code(),
            _ => exit::REFUSED,
        }
    }
}

impl ExitClass for SourceError {
    fn exit_code(&self) -> i32 {
        match self {
            SourceError::Containerd(e) => e.exit_code(),
            _ => exit::REFUSED,
        }
    }
}

impl ExitClass for DiffError {
    fn exit_code(&self) -> i32 {
        match self {
            DiffError::LimitExceeded { .. }
            | DiffError::Unrepresentable { .. }
            | DiffError::FileChanged { .. }
            | DiffError::ReservedName { .. }
            | DiffError::Sparse { .. }
            | DiffError::HeaderTooLarge { .. }
            | DiffError::XattrName { .. }
            | DiffError::PathTooLong { .. } => exit::REFUSED,
            _ => exit::INTERNAL,
        }
    }
}

impl ExitClass for ImageError {
    /// A base whose manifest or config we cannot build on.
    fn exit_code(&self) -> i32 {
        exit::REFUSED
    }
}

impl ExitClass for RegistryError {
    fn exit_code(&self) -> i32 {
        match self.kind() {
            // A local file (the spool) could not be read: not the registry's doing.
            ErrorKind::Io => exit::INTERNAL,
            _ => exit::REGISTRY,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::diff::NotExact;

    fn line(e: &(dyn std::error::Error + 'static)) -> String {
        chain_line(e)
    }

    fn enospc() -> std::io::Error {
        std::io::Error::from_raw_os_error(28)
    }

    /// Every error that wraps a cause, printed as main prints it: the cause once, after what
    /// was being done.
    #[test]
    fn each_cause_is_printed_once() {
        let errors: Vec<CommitError> = vec![
            DiffError::io("read", b"etc/passwd")(enospc()).into(),
            DiffError::Write(enospc()).into(),
            SquashError::Mount {
                target: "/tmp/v".into(),
                source: enospc(),
            }
            .into(),
            RegistryError::Io {
                context: "reading /spool/x".into(),
                cause: enospc(),
            }
            .into(),
            SourceError::Mount {
                target: "/tmp/w".into(),
                source: enospc(),
            }
            .into(),
            CommitError::io("creating /spool/x")(enospc()),
        ];
        for e in &errors {
            let l = line(e);
            assert_eq!(l.matches("No space left").count(), 1, "{l}");
        }
        let e: CommitError = DiffError::from(NotExact::Redirect("/a".into())).into();
        let l = line(&e);
        assert_eq!(l.matches("overlay.redirect").count(), 1, "{l}");
        assert_eq!(l.matches("not exact").count(), 1, "{l}");
    }

    #[test]
    fn an_io_error_names_the_action_then_the_cause_once() {
        let e = CommitError::io("creating /spool/x")(std::io::Error::from_raw_os_error(28));
        let l = line(&e);
        assert!(
            l.starts_with("creating /spool/x: No space left on device"),
            "{l}"
        );
        assert_eq!(l.matches("No space left").count(), 1, "{l}");
        assert_eq!(e.exit_code(), exit::INTERNAL);
    }

    #[test]
    fn refusals_exit_4_and_name_the_container() {
        let e: CommitError = Refusal::NoImage {
            container: "sb".into(),
        }
        .into();
        assert_eq!(e.exit_code(), exit::REFUSED);
        assert!(line(&e).contains("\"sb\""));
    }

    #[test]
    fn a_malformed_base_is_refused_wherever_it_is_found() {
        // Read from the content store (its manifest is not JSON) …
        let in_store: CommitError = ContainerdError::MalformedBase {
            image: "reg/base:1".into(),
            detail: "manifest sha256:… is not JSON".into(),
        }
        .into();
        // … or typed later (a layer descriptor without a digest).
        let base = crate::base::BaseImage {
            name: "reg/base:1".into(),
            manifest_digest: Digest::of(b"m"),
            manifest_media_type: crate::media::OCI_MANIFEST.into(),
            manifest: serde_json::json!({"config": {}, "layers": [{"size": 1}]}),
            config_bytes: b"{}".to_vec(),
        };
        let typed: CommitError = crate::descriptor::base_blobs(&base).unwrap_err().into();
        assert_eq!(in_store.exit_code(), exit::REFUSED);
        assert_eq!(typed.exit_code(), exit::REFUSED);
    }

    #[test]
    fn a_busy_container_exits_7() {
        let e: CommitError = ContainerdError::Busy {
            container: "sb".into(),
            lease: "committer/sb".into(),
            until: "later".into(),
        }
        .into();
        assert_eq!(e.exit_code(), exit::BUSY);
    }
}
