//! committer: turn a running containerd container's filesystem into an OCI image in a registry.
//!
//! `commit::run` shows the pipeline order; each stage lives in its own module and knows
//! nothing of the stages after it.

pub mod digest;
pub mod diff;
pub mod registry;
pub mod containerd;
pub mod image;
pub mod layer;
