//! committer: turn a running containerd container's filesystem into an OCI image in a registry.
//!
//! `commit::commit` shows the pipeline order; each stage lives in its own module and knows
//! nothing of the stages after it.

#[cfg(feature = "pipeline")]
pub mod cli;
#[cfg(feature = "pipeline")]
pub mod commit;
pub mod containerd;
pub mod diff;
#[cfg(feature = "pipeline")]
pub mod diff_source;
pub mod digest;
#[cfg(feature = "pipeline")]
pub mod error;
#[cfg(feature = "pipeline")]
pub mod freeze;
pub mod image;
pub mod layer;
#[cfg(feature = "pipeline")]
pub mod log;
#[cfg(feature = "pipeline")]
pub mod push;
pub mod registry;
#[cfg(feature = "pipeline")]
pub mod report;
