//! Pushing the image. Its blobs go up concurrently (the client bounds uploads in flight), each
//! through the registry client's one path — exists → mount from the base's repository → upload
//! with retries that re-read the blob's source; the manifest goes last, then each tag. A tag can
//! only ever name a manifest whose blobs are all there.
//!
//! The new layer is uploaded while it is compressed ([`push_layer`]): one streamed PATCH tails the
//! growing compressed file, and the blob is committed with the digest known at its end. The file
//! stays on disk, so when the streamed upload fails for any reason the layer is uploaded again
//! from the file by the robust path (chunks, quirks, retries), never compressed again. The base
//! layers and the config (which needs only the diff_id) go up meanwhile ([`push_base_layers`], [`push_config`]).
//!
//! Sources: the new layer from the spool file or containerd's content store; the config from memory;
//! a base layer from the node's content store, or — when the node discarded it (containerd's
//! `discard_unpacked_layers`, the default on kind and EKS nodes) — from the base image's registry,
//! through one pull-only client per commit (its own scheme, credentials and `certs.d` mirrors).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::future::{try_join_all, BoxFuture};
use futures_util::StreamExt;
use tokio::sync::OnceCell;

use crate::base::BaseImage;
use crate::containerd::Containerd;
use crate::digest::Digest;
use crate::error::CommitError;
use crate::image::Blob;
use crate::layer::LayerDescriptor;
use crate::log;
use crate::registry::{
    BlobPushed, BlobSource, ByteStream, BytesSource, Client, ClientOptions, FileSource, Reference,
    RegistryBlob,
};
use crate::source::compress::Compressing;
use crate::source::{BlobLocation, LayerBlob, LayerFile, LayerFinish};

pub struct PushJob<'a> {
    /// The target repository (push scope).
    pub client: &'a Client,
    pub ctr: &'a Containerd,
    pub base: &'a BaseImage,
    /// The base image's name as a reference, when it parses as one (mount source, and where to copy
    /// discarded base layers from).
    pub base_ref: Option<&'a Reference>,
    /// The target's options; the base's registry gets its own derived from them
    /// ([`ClientOptions::for_base`]).
    pub base_opts: &'a ClientOptions,
    /// How many of the base's layers the new manifest keeps (all, unless squashing).
    pub keep_base_layers: usize,
}

/// The kept base layers, concurrently.
pub async fn push_base_layers(job: &PushJob<'_>) -> Result<(), CommitError> {
    let base_registry = BaseRegistry::default();
    // A squashed image keeps only the original base's layers: the snapshot layers it replaces
    // are not pushed.
    let base_layers: Vec<(Digest, u64)> = crate::descriptor::base_blobs(job.base)?
        .layers
        .into_iter()
        .take(job.keep_base_layers)
        .map(|l| (l.digest, l.size))
        .collect();
    try_join_all(
        base_layers
            .iter()
            .map(|(d, s)| push_base_layer(job, &base_registry, d, *s)),
    )
    .await?;
    Ok(())
}

/// The image config.
pub async fn push_config(job: &PushJob<'_>, config: &Blob) -> Result<(), CommitError> {
    let source = BytesSource(config.bytes.clone().into());
    let size = config.bytes.len() as u64;
    job.client
        .push_blob(&config.digest, size, &source, None)
        .await?;
    Ok(())
}

/// The manifest, once every blob it names is there: by digest first, so no tag moves until the
/// registry holds it whole; then each tag.
pub async fn push_manifest(
    client: &Client,
    manifest: &Blob,
    tags: &[String],
) -> Result<(), CommitError> {
    let refs = std::iter::once(manifest.digest.as_str()).chain(tags.iter().map(String::as_str));
    for r in refs {
        client
            .put_manifest(r, &manifest.media_type, manifest.bytes.clone().into())
            .await?;
    }
    Ok(())
}

/// The new layer into the target repository: uploaded as it is compressed when it still is,
/// else from where it lies. Returns its descriptor (None: no layer) and where its blob is.
pub async fn push_layer(job: &PushJob<'_>, finish: LayerFinish) -> Result<LayerBlob, CommitError> {
    match finish {
        LayerFinish::Ready(blob) => {
            if let Some(desc) = &blob.desc {
                push_new_layer(job, desc, &blob.location).await?;
            }
            Ok(blob)
        }
        LayerFinish::Compressing {
            compressing,
            path,
            raw,
            expect,
        } if job.client.chunk_size.is_some() => {
            // Ranged chunks (`--chunk-size`) need the blob's length: the layer goes up from the
            // file once it is compressed, not while.
            let desc = compressing.checked(expect.as_ref()).await?;
            drop(raw);
            let file = Box::new(FileSource::new(path.path()));
            push_new_layer_from(job.client, &desc, file).await?;
            Ok(LayerBlob {
                desc: Some(desc),
                location: BlobLocation::File(path),
            })
        }
        LayerFinish::Compressing {
            compressing,
            path,
            raw,
            expect,
        } => {
            let desc = stream_new_layer(job.client, compressing, raw, &path, expect).await?;
            Ok(LayerBlob {
                desc: Some(desc),
                location: BlobLocation::File(path),
            })
        }
    }
}

/// Streams the layer to the registry as the compressor writes it; on any failure of that upload,
/// uploads the finished file instead.
async fn stream_new_layer(
    client: &Client,
    compressing: Compressing,
    raw: LayerFile,
    path: &LayerFile,
    diff_id: Option<Digest>,
) -> Result<LayerDescriptor, CommitError> {
    log::info("uploading the layer while it is compressed");
    crate::progress::begin_streamed_upload();
    let body = compressing.output.stream();
    let compressed = async {
        let desc = compressing.checked(diff_id.as_ref()).await;
        // Every byte of the capture is in the layer: its spool file can go.
        drop(raw);
        if let Ok(d) = &desc {
            crate::progress::upload_total_known(d.size);
        }
        desc
    };
    let (streamed, desc) = tokio::join!(client.stream_blob(body), compressed);
    let desc = desc?;
    let streamed = match streamed {
        Ok(upload) => upload.commit(&desc.digest).await,
        Err(e) => Err(e),
    };
    match streamed {
        Ok(()) => log::info(&format!(
            "uploaded layer {} ({} bytes) while it was compressed",
            desc.digest, desc.size
        )),
        Err(e) => {
            log::warn(&format!(
                "the streamed upload of layer {} failed ({e}); uploading it again from the compressed file",
                desc.digest
            ));
            push_new_layer_from(client, &desc, Box::new(FileSource::new(path.path()))).await?;
        }
    }
    Ok(desc)
}

/// The new layer, from the spool file or the content store.
async fn push_new_layer(
    job: &PushJob<'_>,
    desc: &LayerDescriptor,
    blob: &BlobLocation,
) -> Result<(), CommitError> {
    let source: Box<dyn BlobSource + '_> = match blob {
        BlobLocation::File(path) => Box::new(FileSource::new(path.path())),
        BlobLocation::ContentStore => Box::new(ContentStore {
            ctr: job.ctr,
            digest: desc.digest.clone(),
        }),
    };
    push_new_layer_from(job.client, desc, source).await
}

async fn push_new_layer_from(
    client: &Client,
    desc: &LayerDescriptor,
    source: Box<dyn BlobSource + '_>,
) -> Result<(), CommitError> {
    crate::progress::begin_upload(desc.size);
    let pushed = client
        .push_blob(&desc.digest, desc.size, source.as_ref(), None)
        .await?;
    if pushed == BlobPushed::Uploaded {
        log::info(&format!(
            "uploaded layer {} ({} bytes)",
            desc.digest, desc.size
        ));
    }
    Ok(())
}

/// A base layer: already there, mountable from the base's repository (same registry), or uploaded
/// from the node's content store or the base's registry.
async fn push_base_layer(
    job: &PushJob<'_>,
    registry: &BaseRegistry,
    digest: &Digest,
    size: u64,
) -> Result<(), CommitError> {
    // Without a base reference the node's content store is the only source: say so plainly (exit 4)
    // rather than as a failed upload.
    if job.base_ref.is_none()
        && !job.ctr.has_blob(digest).await?
        && job.client.blob_exists(digest).await?.is_none()
    {
        return Err(crate::error::Refusal::BaseLayerUnavailable {
            digest: digest.clone(),
            image: job.base.name.clone(),
        }
        .into());
    }
    let mount_from = job
        .base_ref
        .filter(|b| b.registry == job.client.registry())
        .map(|b| b.repository.as_str());
    let source = BaseLayer {
        job,
        registry,
        digest: digest.clone(),
        size,
        announced: AtomicBool::new(false),
    };
    match job
        .client
        .push_blob(digest, size, &source, mount_from)
        .await?
    {
        BlobPushed::Mounted => log::debug(&format!(
            "mounted {digest} from {}",
            mount_from.unwrap_or("?")
        )),
        BlobPushed::Existed => log::debug(&format!("{digest} is already in the repository")),
        BlobPushed::Uploaded => {}
    }
    Ok(())
}

/// A blob in containerd's content store, re-readable from any offset.
struct ContentStore<'a> {
    ctr: &'a Containerd,
    digest: Digest,
}

impl BlobSource for ContentStore<'_> {
    fn open_at(&self, offset: u64) -> BoxFuture<'_, io::Result<ByteStream>> {
        Box::pin(async move {
            let stream = self
                .ctr
                .blob_stream_at(&self.digest, offset)
                .await
                .map_err(io::Error::other)?;
            Ok(stream.boxed())
        })
    }
}

/// The pull-only clients of the base image's registry (mirrors first), connected on first need and
/// shared by every base layer of the commit.
#[derive(Default)]
struct BaseRegistry {
    clients: OnceCell<Vec<Client>>,
}

/// A base layer, read from the node's content store when it is there, else from the base's registry.
struct BaseLayer<'a> {
    job: &'a PushJob<'a>,
    registry: &'a BaseRegistry,
    digest: Digest,
    size: u64,
    announced: AtomicBool,
}

impl BaseLayer<'_> {
    fn announce(&self, msg: impl FnOnce() -> String) {
        if !self.announced.swap(true, Ordering::Relaxed) {
            log::info(&msg());
        }
    }

    async fn read_from_registry(&self, offset: u64) -> io::Result<ByteStream> {
        let job = self.job;
        let Some(base) = job.base_ref else {
            return Err(io::Error::other(format!(
                "base layer {} left the node's content store during the upload",
                self.digest
            )));
        };
        self.announce(|| {
            format!(
                "base layer {} is not on this node; copying it from {}",
                self.digest,
                base.repo_url_name()
            )
        });
        let opts = job
            .base_opts
            .for_base(job.client.registry(), &base.registry);
        let clients = self
            .registry
            .clients
            .get_or_try_init(|| Client::pull_hosts(base, &opts))
            .await
            .map_err(io::Error::other)?;
        let mut last = None;
        for client in clients {
            let blob = RegistryBlob {
                client: client.clone(),
                digest: self.digest.clone(),
                size: self.size,
            };
            match blob.open_at(offset).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no host to read the base layer from")))
    }
}

impl BlobSource for BaseLayer<'_> {
    fn open_at(&self, offset: u64) -> BoxFuture<'_, io::Result<ByteStream>> {
        Box::pin(async move {
            let on_node = self
                .job
                .ctr
                .has_blob(&self.digest)
                .await
                .map_err(io::Error::other)?;
            if !on_node {
                return self.read_from_registry(offset).await;
            }
            self.announce(|| {
                format!(
                    "uploading base layer {} from the node's content store",
                    self.digest
                )
            });
            let stream = self
                .job
                .ctr
                .blob_stream_at(&self.digest, offset)
                .await
                .map_err(io::Error::other)?;
            Ok(stream.boxed())
        })
    }
}
