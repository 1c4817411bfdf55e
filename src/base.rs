//! The base image as containerd holds it: its name, and the exact bytes of its manifest and
//! config (so that unknown keys and key order survive the edits). Read by `containerd::content`,
//! built on by `descriptor`, `image` and `push`; it depends on none of them.

use crate::digest::Digest;

/// The image the container was created from.
#[derive(Debug, Clone)]
pub struct BaseImage {
    pub name: String,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub manifest: serde_json::Value,
    pub config_bytes: Vec<u8>,
}

impl BaseImage {
    /// The base manifest's layer descriptors, as JSON objects (annotations and all).
    pub fn layers(&self) -> Vec<serde_json::Value> {
        self.manifest
            .get("layers")
            .and_then(|l| l.as_array())
            .cloned()
            .unwrap_or_default()
    }
}
