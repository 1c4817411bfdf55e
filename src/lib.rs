//! committer: turn a running containerd container's filesystem into an OCI image in a registry.
//!
//! `commit::commit` shows the pipeline order; each stage lives in its own module. Dependencies
//! point down from the pipeline: the stages use the two clients (`containerd`, `registry`) and the
//! shared types (`base`, `media`, `digest`, `descriptor`, `layer`), and nothing but `commit` uses
//! `push`. Two cycles are kept on purpose: the stages' errors meet in `error::CommitError`, which
//! `source` also returns (`source` ↔ `error`); and `log` ↔ `progress`, which share stderr (a log
//! line clears the bar, the bar's JSON events are log lines).

pub mod base;
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
pub mod media;
pub mod outputs;
pub mod pgzip;
pub mod progress;
pub mod push;
pub mod registry;
pub mod report;
pub mod source;
pub mod supervise;
#[cfg(test)]
mod testing;
