//! The base image, read from containerd's content store: the image record, its manifest
//! (an index resolved to this node's platform) and its config — kept as the exact bytes
//! containerd holds, so that unknown keys and key order survive.

use super::{Containerd, ContainerdError};
use crate::digest::Digest;
use crate::image::media;
use containerd_client::services::v1::{GetImageRequest, ReadContentRequest};

/// Manifests and configs are small; anything bigger than this in the content store is not one.
const MAX_METADATA_BLOB: i64 = 8 << 20;

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

impl Containerd {
    /// Reads the named image's manifest and config from the content store.
    pub async fn base_image(&self, name: &str) -> Result<BaseImage, ContainerdError> {
        let image = super::timed(self.images().get(GetImageRequest {
            name: name.to_string(),
        }))
        .await
        .map_err(|s| {
            ContainerdError::rpc(
                format!("reading image {name:?} the container was created from"),
                s,
            )
        })?
        .into_inner()
        .image
        .and_then(|i| i.target)
        .ok_or_else(|| invalid(name, "the image record has no target"))?;
        let mut media_type = image.media_type;
        let mut digest = parse_digest(name, &image.digest)?;
        let mut bytes = self.read_small_blob(&digest).await?;
        if media::is_index(&media_type) {
            let (d, mt) = select_platform(name, &bytes)?;
            digest = d;
            media_type = mt;
            bytes = self.read_small_blob(&digest).await?;
        }
        if !media::is_manifest(&media_type) {
            return Err(invalid(
                name,
                &format!("its target has media type {media_type:?}, not an image manifest"),
            ));
        }
        let manifest: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(name, &format!("manifest {digest} is not JSON: {e}")))?;
        let config_digest = manifest
            .pointer("/config/digest")
            .and_then(|d| d.as_str())
            .ok_or_else(|| invalid(name, &format!("manifest {digest} has no config digest")))?;
        let config_digest = parse_digest(name, config_digest)?;
        let config_bytes = self.read_small_blob(&config_digest).await?;
        Ok(BaseImage {
            name: name.to_string(),
            manifest_digest: digest,
            manifest_media_type: media_type,
            manifest,
            config_bytes,
        })
    }

    /// Reads a whole (small) blob and checks it against its digest.
    pub async fn read_small_blob(&self, digest: &Digest) -> Result<Vec<u8>, ContainerdError> {
        use futures_util::StreamExt;
        let what = format!("reading {digest} from the content store");
        let mut stream = std::pin::pin!(self.blob_stream(digest).await?);
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ContainerdError::Invalid {
                what: what.clone(),
                detail: e.to_string(),
            })?;
            out.extend_from_slice(&chunk);
            if out.len() as i64 > MAX_METADATA_BLOB {
                return Err(ContainerdError::Invalid {
                    what,
                    detail: "larger than any manifest or config".into(),
                });
            }
        }
        let found = Digest::of(&out);
        if &found != digest {
            return Err(ContainerdError::Invalid {
                what,
                detail: format!("content hashes to {found}"),
            });
        }
        Ok(out)
    }
}

/// The node's platform in OCI terms.
pub fn node_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

/// Picks the manifest for this node from an index (containerd pulled only that one).
fn select_platform(name: &str, index: &[u8]) -> Result<(Digest, String), ContainerdError> {
    let index: serde_json::Value = serde_json::from_slice(index)
        .map_err(|e| invalid(name, &format!("index is not JSON: {e}")))?;
    let (os, arch) = node_platform();
    let manifests = index
        .get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    let pick = manifests
        .iter()
        .find(|m| {
            m.pointer("/platform/os").and_then(|v| v.as_str()) == Some(os)
                && m.pointer("/platform/architecture").and_then(|v| v.as_str()) == Some(arch)
        })
        .or_else(|| {
            if manifests.len() == 1 {
                manifests.first()
            } else {
                None
            }
        })
        .ok_or_else(|| invalid(name, &format!("its index has no manifest for {os}/{arch}")))?;
    let digest = pick
        .get("digest")
        .and_then(|d| d.as_str())
        .unwrap_or_default();
    let mt = pick
        .get("mediaType")
        .and_then(|d| d.as_str())
        .unwrap_or(media::OCI_MANIFEST)
        .to_string();
    Ok((parse_digest(name, digest)?, mt))
}

fn parse_digest(name: &str, d: &str) -> Result<Digest, ContainerdError> {
    d.parse().map_err(|e| invalid(name, &format!("{e}")))
}

fn invalid(name: &str, detail: &str) -> ContainerdError {
    ContainerdError::Invalid {
        what: format!("base image {name:?}"),
        detail: detail.to_string(),
    }
}

impl Containerd {
    /// Streams a blob out of the content store (≤ 1 MiB messages), never holding it whole.
    pub async fn blob_stream(
        &self,
        digest: &Digest,
    ) -> Result<
        impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
        ContainerdError,
    > {
        use futures_util::StreamExt;
        let what = format!("reading {digest} from the content store");
        let stream = super::timed(self.content().read(ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        }))
        .await
        .map_err(|s| ContainerdError::rpc(what.clone(), s))?
        .into_inner();
        Ok(stream.map(move |msg| {
            msg.map(|m| bytes::Bytes::from(m.data))
                .map_err(|s| std::io::Error::other(format!("{what}: {}", s.message())))
        }))
    }

    /// True when the content store holds this blob.
    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, ContainerdError> {
        use containerd_client::services::v1::InfoRequest;
        match super::timed(self.content().info(InfoRequest {
            digest: digest.to_string(),
        }))
        .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(ContainerdError::rpc(
                format!("looking up {digest} in the content store"),
                s,
            )),
        }
    }
}
