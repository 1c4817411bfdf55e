//! committer: turn a running containerd container's filesystem into an OCI image in a registry.
//!
//! `commit::commit` shows the pipeline order; each stage lives in its own module and knows
//! nothing of the stages after it.

pub mod cli;
pub mod commit;
pub mod containerd;
pub mod descriptor;
pub mod diff;
pub mod digest;
pub mod error;
pub mod freeze;
pub mod guard;
pub mod image;
pub mod layer;
pub mod log;
pub mod outputs;
pub mod pgzip;
pub mod progress;
pub mod push;
pub mod registry;
pub mod report;
pub mod source;
pub mod squash;
pub mod supervise;
#[cfg(test)]
mod testing;
