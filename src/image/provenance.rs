//! The manifest annotations committer writes: where the image came from. The original base
//! (OCI `org.opencontainers.image.base.*`), when it was made, and which sandbox it was taken
//! from. Only names and IDs the cluster already shows to anyone who can list pods; nothing from
//! the sandbox's environment, arguments or files.

use super::chain::OriginalBase;
use crate::base::BaseImage;
use serde_json::{Map, Value};

pub const BASE_NAME: &str = "org.opencontainers.image.base.name";
pub const BASE_DIGEST: &str = "org.opencontainers.image.base.digest";
pub const CREATED: &str = "org.opencontainers.image.created";
pub const VERSION: &str = "dev.committer.version";
/// The image the container ran, when it is a snapshot and not the original base.
pub const PARENT_NAME: &str = "dev.committer.parent.name";
pub const PARENT_DIGEST: &str = "dev.committer.parent.digest";
pub const POD_NAMESPACE: &str = "dev.committer.source.pod.namespace";
pub const POD_NAME: &str = "dev.committer.source.pod.name";
pub const POD_UID: &str = "dev.committer.source.pod.uid";
pub const CONTAINER_NAME: &str = "dev.committer.source.container.name";
pub const CONTAINER_ID: &str = "dev.committer.source.container.id";
pub const NODE: &str = "dev.committer.source.node";

/// Which sandbox the image was taken from (each field only when known).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Provenance {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub container_name: Option<String>,
    pub container_id: Option<String>,
    pub node: Option<String>,
}

impl Provenance {
    /// From the CRI labels containerd keeps on the container (absent for `ctr run` ones).
    pub fn from_labels(labels: &std::collections::HashMap<String, String>) -> Provenance {
        let get = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
        Provenance {
            pod_namespace: get("io.kubernetes.pod.namespace"),
            pod_name: get("io.kubernetes.pod.name"),
            pod_uid: get("io.kubernetes.pod.uid"),
            container_name: get("io.kubernetes.container.name"),
            ..Provenance::default()
        }
    }
}

/// The annotations of a new OCI manifest. The base ones name the original base of the chain,
/// whose layers are the image's first layers whether the chain was appended to or squashed.
pub fn annotations(
    original: &OriginalBase,
    parent: &BaseImage,
    created: &str,
    p: &Provenance,
) -> Map<String, Value> {
    let mut out = Map::new();
    let mut put = |k: &str, v: Option<&str>| {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            out.insert(k.into(), Value::String(v.into()));
        }
    };
    put(BASE_NAME, Some(&original.name));
    put(BASE_DIGEST, Some(&original.digest));
    put(CREATED, Some(created));
    put(VERSION, Some(env!("CARGO_PKG_VERSION")));
    let parent_digest = parent.manifest_digest.to_string();
    if parent_digest != original.digest {
        put(PARENT_NAME, Some(&parent.name));
        put(PARENT_DIGEST, Some(&parent_digest));
    }
    put(POD_NAMESPACE, p.pod_namespace.as_deref());
    put(POD_NAME, p.pod_name.as_deref());
    put(POD_UID, p.pod_uid.as_deref());
    put(CONTAINER_NAME, p.container_name.as_deref());
    put(CONTAINER_ID, p.container_id.as_deref());
    put(NODE, p.node.as_deref());
    out
}
