//! The base image, read from containerd's content store: the image record, its manifest
//! (an index resolved to this node's platform) and its config — kept as the exact bytes
//! containerd holds, so that unknown keys and key order survive.
//!
//! The base is what the container's snapshot was made from, not whatever its image *name*
//! points to now: a re-pull of a moved tag (or `ctr images tag --force`) re-points the name,
//! and layers of another image under our diff would restore files the sandbox never had.
//! `base_of` checks that the chain ID of the base config's `rootfs.diff_ids` is the parent of
//! the container's snapshot (the unpacker names committed snapshots by chain ID), finds the
//! right image among the other records when the name moved, and refuses when none matches.

use super::lookup::ContainerInfo;
use super::{Containerd, ContainerdError};
use crate::base::BaseImage;
use crate::digest::Digest;
use crate::media;
use containerd_client::services::v1::{GetImageRequest, ListImagesRequest, ReadContentRequest};

/// Manifests and configs are small; anything bigger than this in the content store is not one.
const MAX_METADATA_BLOB: i64 = 8 << 20;

// Read here; the type is in `crate::base`, where the stages that build on it find it.
impl BaseImage {
    /// The chain ID of the config's `rootfs.diff_ids` ("" for an image with no layers): the
    /// name containerd's unpacker gives the snapshot of the image's top layer.
    pub fn chain_id(&self) -> Result<String, ContainerdError> {
        let config: serde_json::Value = serde_json::from_slice(&self.config_bytes)
            .map_err(|e| invalid(&self.name, &format!("config is not JSON: {e}")))?;
        let ids = config
            .pointer("/rootfs/diff_ids")
            .and_then(|d| d.as_array())
            .ok_or_else(|| invalid(&self.name, "config has no rootfs.diff_ids"))?;
        let ids: Vec<&str> = ids.iter().filter_map(|d| d.as_str()).collect();
        Ok(chain_id(&ids))
    }
}

impl Containerd {
    /// Reads the named image's manifest and config from the content store.
    pub async fn base_image(&self, name: &str) -> Result<BaseImage, ContainerdError> {
        let image = self
            .images()
            .get(GetImageRequest {
                name: name.to_string(),
            })
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

/// identity.ChainID of the OCI image spec: ChainID(L0) = DiffID(L0), ChainID(L0..n) =
/// sha256(ChainID(L0..n-1) + " " + DiffID(Ln)).
pub fn chain_id(diff_ids: &[&str]) -> String {
    let mut ids = diff_ids.iter();
    let Some(first) = ids.next() else {
        return String::new();
    };
    ids.fold(first.to_string(), |chain, d| {
        Digest::of(format!("{chain} {d}").as_bytes()).to_string()
    })
}

impl Containerd {
    /// The image the container's snapshot was made from (see the module header): its layers
    /// chain to the snapshot's parent and, when the CRI recorded the image's ID, its config is
    /// that one (an image with the same layers and another Env/Cmd/User is not the base). A
    /// refusal is `ContainerdError::BaseMismatch`, naming the image and the snapshot's parent.
    pub async fn base_of(&self, info: &ContainerInfo) -> Result<BaseImage, ContainerdError> {
        let parent = self
            .snapshot_parent(&info.snapshotter, &info.snapshot_key)
            .await?
            .unwrap_or_default();
        let config_ok = |b: &BaseImage| {
            info.image_config
                .as_ref()
                .is_none_or(|want| Digest::of(&b.config_bytes) == *want)
        };
        let named = self.base_image(&info.image).await;
        let named_chain = match &named {
            Ok(b) => b.chain_id()?,
            Err(e) => format!("unreadable ({e})"),
        };
        if named_chain == parent && named.as_ref().is_ok_and(config_ok) {
            return named;
        }
        let names = self
            .images()
            .list(ListImagesRequest { filters: vec![] })
            .await
            .map_err(|s| super::ContainerdError::rpc("listing images", s))?
            .into_inner()
            .images
            .into_iter()
            .map(|i| i.name)
            .filter(|n| n != &info.image);
        for name in names {
            let Ok(b) = self.base_image(&name).await else {
                continue;
            };
            if b.chain_id().ok().as_deref() == Some(parent.as_str()) && config_ok(&b) {
                crate::log::warn(&format!(
                    "image {:?} no longer is what container {:?} was created from; using {name:?}, whose layers are the container's snapshot parent {parent} (and whose config is the one the CRI recorded, if it did)",
                    info.image, info.id
                ));
                return Ok(b);
            }
        }
        Err(ContainerdError::BaseMismatch {
            container: info.id.clone(),
            image: info.image.clone(),
            image_chain: named_chain,
            parent,
            config: match &info.image_config {
                Some(d) => format!(" with the image config {d} the CRI recorded for it"),
                None => String::new(),
            },
        })
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
    ContainerdError::MalformedBase {
        image: name.to_string(),
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
        self.blob_stream_at(digest, 0).await
    }

    /// True when the content store holds this blob.
    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, ContainerdError> {
        use containerd_client::services::v1::InfoRequest;
        match self
            .content()
            .info(InfoRequest {
                digest: digest.to_string(),
            })
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

    /// Streams a blob from `offset` to its end (containerd's Read takes an offset), so an upload that
    /// broke part way can re-read from where the registry stands.
    pub async fn blob_stream_at(
        &self,
        digest: &Digest,
        offset: u64,
    ) -> Result<
        impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
        ContainerdError,
    > {
        use futures_util::StreamExt;
        let what = match offset {
            0 => format!("reading {digest} from the content store"),
            n => format!("reading {digest} at byte {n} from the content store"),
        };
        // Only opening the stream is under the deadline: the bytes take as long as they take.
        let stream = self
            .content()
            .read(ReadContentRequest {
                digest: digest.to_string(),
                offset: offset as i64,
                size: 0,
            })
            .await
            .map_err(|s| ContainerdError::rpc(what.clone(), s))?
            .into_inner();
        Ok(stream.map(move |msg| {
            msg.map(|m| bytes::Bytes::from(m.data))
                .map_err(|s| std::io::Error::other(format!("{what}: {}", s.message())))
        }))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn chain_id_follows_the_oci_definition() {
        let a = "sha256:aaaa";
        let b = "sha256:bbbb";
        assert_eq!(super::chain_id(&[]), "");
        assert_eq!(super::chain_id(&[a]), a);
        let ab = crate::digest::Digest::of(b"sha256:aaaa sha256:bbbb").to_string();
        assert_eq!(super::chain_id(&[a, b]), ab);
    }
}
