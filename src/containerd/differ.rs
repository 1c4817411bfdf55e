//! Socket-only mode: containerd's own Diff service builds the layer from two sets of mounts
//! into its content store (for Jobs that may not mount the snapshotter root or hold
//! CAP_SYS_ADMIN). We then stream it from the content store to the registry.

use super::lookup::SnapshotMount;
use super::{Containerd, ContainerdError};
use crate::digest::Digest;
use containerd_client::services::v1::{DiffRequest, InfoRequest};
use containerd_client::types::Mount;

/// containerd records the uncompressed digest of what its differ wrote under this label.
const UNCOMPRESSED_LABEL: &str = "containerd.io/uncompressed";

/// A layer blob in containerd's content store.
#[derive(Debug, Clone)]
pub struct StoredLayer {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
}

impl Containerd {
    /// Asks containerd to diff `lower` against `upper` as a layer of `media_type`.
    pub async fn diff_in_containerd(
        &self,
        lower: &[SnapshotMount],
        upper: &[SnapshotMount],
        media_type: &str,
        reference: &str,
    ) -> Result<StoredLayer, ContainerdError> {
        let what = "building the layer with containerd's diff service";
        let desc =
            containerd_client::services::v1::diff_client::DiffClient::new(self.intercepted())
                .diff(DiffRequest {
                    left: to_proto(lower),
                    right: to_proto(upper),
                    media_type: media_type.to_string(),
                    r#ref: reference.to_string(),
                    labels: Default::default(),
                    source_date_epoch: None,
                })
                .await
                .map_err(|s| ContainerdError::rpc(what, s))?
                .into_inner()
                .diff
                .ok_or_else(|| ContainerdError::Invalid {
                    what: what.into(),
                    detail: "no descriptor returned".into(),
                })?;
        let digest: Digest = desc.digest.parse().map_err(|e| ContainerdError::Invalid {
            what: what.into(),
            detail: format!("{e}"),
        })?;
        let diff_id = self.uncompressed_digest(&digest).await?;
        Ok(StoredLayer {
            digest,
            diff_id,
            size: desc.size.max(0) as u64,
        })
    }

    /// The diff_id of a layer the differ wrote: containerd records it as a label; an
    /// uncompressed layer is its own.
    async fn uncompressed_digest(&self, digest: &Digest) -> Result<Digest, ContainerdError> {
        let info = self
            .content()
            .info(InfoRequest {
                digest: digest.to_string(),
            })
            .await
            .map_err(|s| ContainerdError::rpc(format!("reading the labels of {digest}"), s))?
            .into_inner()
            .info
            .unwrap_or_default();
        match info.labels.get(UNCOMPRESSED_LABEL) {
            Some(d) => d.parse().map_err(|e| ContainerdError::Invalid {
                what: format!("the {UNCOMPRESSED_LABEL} label of {digest}"),
                detail: format!("{e}"),
            }),
            None => Ok(digest.clone()),
        }
    }
}

fn to_proto(ms: &[SnapshotMount]) -> Vec<Mount> {
    ms.iter()
        .map(|m| Mount {
            r#type: m.kind.clone(),
            source: m.source.clone(),
            target: String::new(),
            options: m.options.clone(),
        })
        .collect()
}
