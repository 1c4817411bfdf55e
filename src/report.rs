//! The result JSON: the one thing on stdout, also written to the termination-message file so a
//! controller can read it from the Job's pod status. Its shape is a contract, described by
//! `docs/result.schema.json`: every field is always present (null or empty when it does not
//! apply), and `schemaVersion` changes when a field changes meaning or goes away.

use crate::digest::Digest;
use crate::freeze::PauseReport;
use crate::layer::LayerDescriptor;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Bumped when a field changes meaning or is removed (adding one keeps the version).
pub const SCHEMA_VERSION: u32 = 1;

/// The kubelet keeps at most this many bytes of a termination message and cuts the rest, which
/// would leave invalid JSON.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// Also `Deserialize`, for tools and tests that read it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitResult {
    pub schema_version: u32,
    /// REGISTRY/REPO@sha256:… — what to pull, immutable.
    pub image: String,
    /// REGISTRY/REPO:TAG as pushed.
    pub tag: String,
    /// Extra tags pushed (REGISTRY/REPO:TAG), without duplicates; empty without --tag.
    pub extra_tags: Vec<String>,
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub media_type: String,
    /// The new layer; null when the container had no changes (no empty layer is pushed).
    pub layer: Option<LayerDescriptor>,
    /// The base image's name as containerd knows it, and its manifest's digest.
    pub base_image: String,
    pub base_digest: Digest,
    pub container: String,
    /// Where the diff was read from (upperdir, walk, containerd) and why.
    pub diff_source: String,
    pub diff_source_reason: String,
    /// Entries in the layer and bytes of file content read.
    pub entries: u64,
    pub content_bytes: u64,
    /// How the sandbox was held while it was read: `{ms, skipped}`.
    pub paused: PauseReport,
    pub duration_ms: u64,
}

/// The result as one JSON line (stdout).
pub fn to_json(result: &CommitResult) -> String {
    serde_json::to_string(result).expect("the result serialises")
}

/// The result as a termination message: valid JSON of at most 4096 bytes. Only what explains
/// (the diff source's reason, which can quote sandbox paths; then the extra tags) is cut,
/// never the image reference, digests or the tag.
pub fn termination_message(result: &CommitResult) -> String {
    let mut r = result.clone();
    let mut json = to_json(&r);
    while json.len() > TERMINATION_MESSAGE_LIMIT && !r.diff_source_reason.is_empty() {
        let over = json.len() - TERMINATION_MESSAGE_LIMIT;
        let keep = r.diff_source_reason.len().saturating_sub(over + 16);
        r.diff_source_reason = shorten(&r.diff_source_reason, keep);
        json = to_json(&r);
    }
    while json.len() > TERMINATION_MESSAGE_LIMIT && r.extra_tags.pop().is_some() {
        json = to_json(&r);
    }
    json
}

/// The first `keep` bytes of `s` (on a character boundary) and "…", or "" when nothing fits.
fn shorten(s: &str, keep: usize) -> String {
    if keep == 0 {
        return String::new();
    }
    let mut end = keep.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Writes the result to the termination-message file. Failure here must not fail a pushed
/// commit; the caller warns. (Its directory was checked before the commit started.)
pub fn write_result_file(path: &Path, result: &CommitResult) -> std::io::Result<()> {
    std::fs::write(path, termination_message(result))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> CommitResult {
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        CommitResult {
            schema_version: SCHEMA_VERSION,
            image: format!("reg.example/snap@{d}"),
            tag: "reg.example/snap:v1".into(),
            extra_tags: vec![],
            manifest_digest: d.clone(),
            config_digest: d.clone(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            layer: None,
            base_image: "reg.example/base:1".into(),
            base_digest: d,
            container: "c1".into(),
            diff_source: "walk".into(),
            diff_source_reason: "x".into(),
            entries: 0,
            content_bytes: 0,
            paused: PauseReport {
                ms: 0,
                skipped: None,
                capture: Some(crate::freeze::CaptureKind::Reflink),
            },
            duration_ms: 1,
        }
    }

    #[test]
    fn a_4kb_reason_is_cut_to_a_valid_termination_message_that_keeps_the_image() {
        let mut r = sample();
        r.diff_source_reason = format!("overlay upperdir is not exact: /{}", "é/".repeat(3000));
        r.extra_tags = (0..5).map(|i| format!("reg.example/snap:t{i}")).collect();
        let msg = termination_message(&r);
        assert!(msg.len() <= TERMINATION_MESSAGE_LIMIT, "{}", msg.len());
        let v: serde_json::Value = serde_json::from_str(&msg).unwrap();
        assert_eq!(v["image"], r.image);
        assert_eq!(v["extraTags"].as_array().unwrap().len(), 5);
        assert!(v["diffSourceReason"].as_str().unwrap().ends_with('…'));
        assert_eq!(termination_message(&sample()), to_json(&sample()));
    }

    #[test]
    fn the_result_reads_back_as_it_was_written() {
        let mut r = sample();
        r.layer = Some(LayerDescriptor {
            digest: r.config_digest.clone(),
            diff_id: r.base_digest.clone(),
            size: 7,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        });
        r.paused.skipped = Some(crate::freeze::PauseSkipped::AlreadyPaused);
        let back: CommitResult = serde_json::from_str(&to_json(&r)).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn the_result_has_exactly_the_fields_its_schema_requires() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../docs/result.schema.json")).unwrap();
        let mut required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let json = serde_json::to_value(sample()).unwrap();
        let mut fields: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        required.sort();
        fields.sort();
        assert_eq!(fields, required);
        assert_eq!(
            schema["properties"]["schemaVersion"]["const"],
            SCHEMA_VERSION
        );
    }
}
