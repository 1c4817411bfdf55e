//! Pushing the image: every blob first (base layers by HEAD, cross-repo mount, or a stream from
//! the node's content store; the new layer from the spool; the config), concurrently; the
//! manifest last; then each tag. A tag can only ever name a manifest whose blobs are all there.

use crate::containerd::content::BaseImage;
use crate::containerd::Containerd;
use crate::digest::Digest;
use crate::error::CommitError;
use crate::image::Blob;
use crate::layer::LayerDescriptor;
use crate::log;
use crate::registry::{Client, ClientOptions, MountOutcome, Reference};
use futures_util::future::try_join_all;
use std::path::Path;

/// Where the new layer's bytes are.
#[derive(Clone, Copy)]
pub enum LayerBlob<'a> {
    /// The spool file the local diff wrote.
    File(&'a Path),
    /// containerd's content store (built by its Diff service).
    ContentStore,
}

pub struct PushJob<'a> {
    pub client: &'a Client,
    pub ctr: &'a Containerd,
    pub base: &'a BaseImage,
    /// The base image's name as a reference, when it parses as one (a cross-repo mount source).
    pub base_ref: Option<&'a Reference>,
    pub base_opts: &'a ClientOptions,
    pub layer: Option<(&'a LayerDescriptor, LayerBlob<'a>)>,
    pub config: &'a Blob,
    pub manifest: &'a Blob,
    pub tags: Vec<String>,
}

pub async fn push(job: &PushJob<'_>) -> Result<(), CommitError> {
    let mut base_layers = Vec::new();
    for l in job.base.layers() {
        let digest: Digest = l
            .get("digest")
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| crate::image::ImageError {
                image: job.base.name.clone(),
                detail: format!("base layer without a valid digest: {l}"),
            })?;
        base_layers.push(digest);
    }
    let bases = try_join_all(base_layers.iter().map(|d| push_base_layer(job, d)));
    let new_layer = async {
        if let Some((desc, blob)) = job.layer {
            if job.client.blob_exists(&desc.digest).await?.is_none() {
                log::info(&format!(
                    "uploading layer {} ({} bytes)",
                    desc.digest, desc.size
                ));
                match blob {
                    LayerBlob::File(path) => {
                        job.client
                            .upload_blob_file(&desc.digest, path, desc.size)
                            .await?
                    }
                    LayerBlob::ContentStore => {
                        let stream = job.ctr.blob_stream(&desc.digest).await?;
                        job.client
                            .upload_blob_stream(&desc.digest, Some(desc.size), stream)
                            .await?
                    }
                }
            }
        }
        Ok::<_, CommitError>(())
    };
    let config = async {
        if job.client.blob_exists(&job.config.digest).await?.is_none() {
            job.client
                .upload_blob_bytes(&job.config.digest, job.config.bytes.clone().into())
                .await?;
        }
        Ok::<_, CommitError>(())
    };
    tokio::try_join!(bases, new_layer, config)?;

    // The manifest goes up by digest first, so no tag moves until the registry holds it whole.
    job.client
        .put_manifest(
            job.manifest.digest.as_str(),
            &job.manifest.media_type,
            job.manifest.bytes.clone().into(),
        )
        .await?;
    for tag in &job.tags {
        job.client
            .put_manifest(
                tag,
                &job.manifest.media_type,
                job.manifest.bytes.clone().into(),
            )
            .await?;
    }
    Ok(())
}

/// A base layer: already there, mountable from the base's repository, or streamed from the
/// node's content store.
async fn push_base_layer(job: &PushJob<'_>, digest: &Digest) -> Result<(), CommitError> {
    if job.client.blob_exists(digest).await?.is_some() {
        return Ok(());
    }
    if let Some(base) = job.base_ref.filter(|b| b.registry == job.client.registry()) {
        if let MountOutcome::Mounted = job.client.mount_blob(digest, &base.repository).await? {
            log::debug(&format!("mounted {digest} from {}", base.repository));
            return Ok(());
        }
    }
    if job.ctr.has_blob(digest).await? {
        log::info(&format!(
            "uploading base layer {digest} from the node's content store"
        ));
        let size = job
            .base
            .layers()
            .iter()
            .find(|l| l.get("digest").and_then(|d| d.as_str()) == Some(digest.as_str()))
            .and_then(|l| l.get("size").and_then(|s| s.as_u64()));
        let stream = job.ctr.blob_stream(digest).await?;
        job.client.upload_blob_stream(digest, size, stream).await?;
        return Ok(());
    }
    // Discarded from the node (containerd's discard_unpacked_layers): stream it from the
    // registry the base came from, with that registry's credentials.
    if let Some(base) = job.base_ref {
        log::info(&format!(
            "base layer {digest} is not on this node; copying it from {}",
            base.repo_url_name()
        ));
        let source = Client::new(base, job.base_opts).await?;
        let stream = source.fetch_blob(digest).await?;
        let size = stream.size();
        job.client.upload_blob_stream(digest, size, stream).await?;
        return Ok(());
    }
    Err(crate::error::Refusal::BaseLayerUnavailable {
        digest: digest.clone(),
        image: job.base.name.clone(),
    }
    .into())
}
