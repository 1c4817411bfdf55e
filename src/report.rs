//! The result JSON: the one thing on stdout, also written to the termination-message file so a
//! controller can read it from the Job's pod status.

use crate::digest::Digest;
use crate::layer::LayerDescriptor;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitResult {
    /// REGISTRY/REPO@sha256:… — what to pull, immutable.
    pub image: String,
    /// REGISTRY/REPO:TAG as pushed.
    pub tag: String,
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub media_type: String,
    /// The new layer; null when the container had no changes (no empty layer is pushed).
    pub layer: Option<LayerDescriptor>,
    pub base_image: String,
    pub container: String,
    /// Where the diff was read from (upperdir, walk) and why.
    pub diff_source: String,
    pub diff_source_reason: String,
    /// Entries in the layer and bytes of file content read.
    pub entries: u64,
    pub content_bytes: u64,
    /// How long the container was paused (0 with --no-pause).
    pub paused_ms: u64,
    pub duration_ms: u64,
    /// Extra tags pushed (REGISTRY/REPO:TAG).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_tags: Vec<String>,
}

/// Writes the result to the termination-message file. Failure here must not fail a pushed
/// commit; the caller warns.
pub fn write_result_file(path: &Path, json: &str) -> std::io::Result<()> {
    std::fs::write(path, json)
}
