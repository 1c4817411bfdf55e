//! The pipeline, in order: locate → lease → base image → capture (the sandbox paused inside) →
//! then, at once: the layer compressed and uploaded as it is compressed ∥ the base layers
//! uploaded ∥ the config (as soon as the layer's diff_id is known) → manifest → tags → report.
//! Each stage is a call into its own module; this file only sequences them, and holds the lease
//! around everything that reads the container's snapshot.

use crate::base::BaseImage;
use crate::cli::CommitPlan;
use crate::containerd::lease::Lease;
use crate::containerd::lookup::ContainerInfo;
use crate::containerd::Containerd;
use crate::descriptor::base_blobs;
use crate::error::{CommitError, Refusal};
use crate::image::{self, Blob, Edits, Family, HistoryNote, ImageError, Provenance};
use crate::layer::LayerDescriptor;
use crate::registry::{Client, ClientOptions, Reference};
use crate::report::CommitResult;
use crate::source::{
    self, BlobLocation, Destination, FinishedLayer, LayerRequest, SourcePlan, StartedLayer,
};
use crate::{log, push};
use std::time::Instant;

/// `committer commit`: the whole job, in pipeline order.
pub async fn commit(plan: &CommitPlan) -> Result<CommitResult, CommitError> {
    let started = Instant::now();
    let opts = client_options(plan);
    // Connecting to the registry early turns a wrong host, TLS or credential into an error before
    // the sandbox is paused; the containerd lookups run meanwhile.
    let (found, client) = tokio::join!(connect(&plan.source), push_target(plan, &opts));
    let (ctr, info) = found?;
    let client = client?;
    let mut result = with_lease(&ctr, &info, async |lease| {
        let base = leased_base(&ctr, &info, lease).await?;
        let edits = edits(plan, &info, &base)?;
        let family = Family::for_base(&base.manifest_media_type, plan.source.compress.compression);
        // Returns once the sandbox runs again; the layer may still be being compressed.
        let layer = start_layer(plan, &ctr, &info, &base, &edits, family).await?;
        let created = now_rfc3339();
        let image = ImageParts {
            base: &base,
            family,
            plan,
            edits: &edits,
            created: &created,
        };
        let base_ref = base.name.parse().ok();
        let job = push_job(&client, &ctr, &base, base_ref.as_ref(), &opts, &edits);
        let (layer, config) = push_blobs(&job, &image, layer).await?;
        let manifest = image.manifest(&config, layer.blob.desc.as_ref())?;
        push::push_manifest(&client, &manifest, &tags(plan)).await?;
        Ok(result(plan, &info, &base, layer, &config, &manifest))
    })
    .await
    .map_err(source::spool::classify)?;
    result.duration_ms = started.elapsed().as_millis() as u64;
    Ok(result)
}

/// The capture, into the spool; the blob may still be being compressed when it returns.
async fn start_layer(
    plan: &CommitPlan,
    ctr: &Containerd,
    info: &ContainerInfo,
    base: &BaseImage,
    edits: &Edits,
    family: Family,
) -> Result<StartedLayer, CommitError> {
    let dest = Destination {
        spool_dir: plan.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
        output: None,
    };
    source::start_layer(&LayerRequest {
        ctr,
        info,
        plan: &plan.source,
        media_type: family.layer_media_type(plan.source.compress.compression),
        dest: &dest,
        squash: squash_target(base, edits),
    })
    .await
}

fn push_job<'a>(
    client: &'a Client,
    ctr: &'a Containerd,
    base: &'a BaseImage,
    base_ref: Option<&'a Reference>,
    base_opts: &'a ClientOptions,
    edits: &Edits,
) -> push::PushJob<'a> {
    push::PushJob {
        client,
        ctr,
        base,
        base_ref,
        base_opts,
        keep_base_layers: edits
            .chain
            .as_ref()
            .map_or(base.layers().len(), |c| c.keep_layers),
    }
}

/// The new layer (uploaded as it is compressed), the kept base layers and the config, at once.
/// The config needs the diff_id: pushed alongside when the capture knew it, else once the layer
/// is built.
async fn push_blobs(
    job: &push::PushJob<'_>,
    image: &ImageParts<'_>,
    layer: StartedLayer,
) -> Result<(FinishedLayer, Blob), CommitError> {
    let config_now = layer.config_layer();
    let (finish, capture) = layer.split();
    let layer_and_bases =
        async { tokio::try_join!(push::push_layer(job, finish), push::push_base_layers(job)) };
    let (blob, config) = match config_now {
        Some(known) => {
            let config = image.config(known.as_ref())?;
            let ((blob, ()), ()) =
                tokio::try_join!(layer_and_bases, push::push_config(job, &config))?;
            (blob, config)
        }
        None => {
            let (blob, ()) = layer_and_bases.await?;
            let config = image.config(blob.desc.as_ref())?;
            push::push_config(job, &config).await?;
            (blob, config)
        }
    };
    Ok((capture.finished(blob), config))
}

/// `committer diff`: the layer written to `output`; returns its descriptor.
pub async fn diff_to_file(
    plan: &SourcePlan,
    output: &std::path::Path,
) -> Result<LayerDescriptor, CommitError> {
    let (ctr, info) = connect(plan).await?;
    with_lease(&ctr, &info, async |lease| {
        lease_snapshot(&ctr, &info, lease).await?;
        let dir = output.parent().filter(|p| !p.as_os_str().is_empty());
        let dest = Destination {
            spool_dir: dir.unwrap_or(std::path::Path::new(".")).to_path_buf(),
            output: Some(output.to_path_buf()),
        };
        let media_type = Family::Oci.layer_media_type(plan.compress.compression);
        let layer = source::read_layer(&LayerRequest {
            ctr: &ctr,
            info: &info,
            plan,
            media_type,
            dest: &dest,
            squash: None,
        })
        .await?;
        let desc = layer.blob.desc.ok_or_else(|| Refusal::EmptyDiff {
            container: info.id.clone(),
        })?;
        if let BlobLocation::ContentStore = layer.blob.location {
            source::copy_stored_blob(&ctr, &desc.digest, output).await?;
        }
        Ok(desc)
    })
    .await
    .map_err(source::spool::classify)
}

async fn connect(plan: &SourcePlan) -> Result<(Containerd, ContainerInfo), CommitError> {
    let ctr = Containerd::connect(&plan.address, &plan.namespace).await?;
    let info = locate(&ctr, plan).await?;
    Ok((ctr, info))
}

/// Finds the container and refuses what we cannot commit truthfully.
pub async fn locate(ctr: &Containerd, plan: &SourcePlan) -> Result<ContainerInfo, CommitError> {
    let info = ctr.find_container(&plan.selector).await?;
    crate::containerd::lookup::check_runtime(&info).map_err(Refusal::from)?;
    if info.image.is_empty() {
        return Err(Refusal::NoImage {
            container: info.id.clone(),
        }
        .into());
    }
    Ok(info)
}

/// Holds the container's lease (the per-container lock, and what keeps the snapshot and base
/// content from the GC) while `work` runs, with the supervisor told (it cleans up if this
/// process dies). On every way out the sandbox is resumed if an error left it paused, the lease
/// is released and the supervisor told.
async fn with_lease<T>(
    ctr: &Containerd,
    info: &ContainerInfo,
    work: impl AsyncFnOnce(&Lease) -> Result<T, CommitError>,
) -> Result<T, CommitError> {
    let lease = ctr.take_lease(&info.id).await?;
    if let Err(e) = crate::guard::start(&ctr.address, &ctr.namespace, &info.id, &lease.id) {
        log::warn(&format!(
            "could not reach the supervisor ({e}); a SIGKILL could leave the container paused"
        ));
    }
    let out = work(&lease).await;
    if out.is_err() {
        if let Err(e) = crate::freeze::resume_if_paused().await {
            log::error(&format!("could not resume the container: {e}"));
        }
    }
    if let Err(e) = ctr.drop_lease(lease).await {
        log::warn(&format!("{e} (it expires by itself within an hour)"));
    }
    crate::guard::finish();
    out
}

async fn lease_snapshot(
    ctr: &Containerd,
    info: &ContainerInfo,
    lease: &Lease,
) -> Result<(), CommitError> {
    let kind = format!("snapshots/{}", info.snapshotter);
    Ok(ctr.lease_resource(lease, &info.snapshot_key, &kind).await?)
}

/// The base image, with the container's snapshot and every base blob under our lease.
async fn leased_base(
    ctr: &Containerd,
    info: &ContainerInfo,
    lease: &Lease,
) -> Result<BaseImage, CommitError> {
    lease_snapshot(ctr, info, lease).await?;
    // The image the snapshot really descends from, not whatever its name points to now.
    let base = ctr.base_of(info).await?;
    for d in base_blobs(&base)?.all_digests() {
        ctr.lease_resource(lease, d.as_str(), "content").await?;
    }
    Ok(base)
}

/// The config edits of this commit (`--change`, `--author`, the process config, the chain
/// record, provenance), checked against the base before anything is paused.
fn edits(plan: &CommitPlan, info: &ContainerInfo, base: &BaseImage) -> Result<Edits, CommitError> {
    let process = match plan.process_config {
        true => Some(image::process_config(&info.spec)?),
        false => None,
    };
    let mut provenance = Provenance::from_labels(&info.labels);
    provenance.container_id = Some(info.id.clone());
    // The Job sets NODE_NAME from the downward API (spec.nodeName).
    provenance.node = std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty());
    let chain = image::BaseConfig::read(base)?.plan(base, plan.chain);
    if let Some(note) = &chain.note {
        log::info(note);
    }
    let edits = Edits {
        changes: plan.changes.clone(),
        process,
        chain: Some(chain),
        provenance,
    };
    if let Err(Some(e)) = image::check_changes(base, &edits) {
        return Err(e.into());
    }
    Ok(edits)
}

/// What the config and the manifest are made of, besides the layer.
struct ImageParts<'a> {
    base: &'a BaseImage,
    family: Family,
    plan: &'a CommitPlan,
    edits: &'a Edits,
    created: &'a str,
}

impl ImageParts<'_> {
    fn note(&self) -> HistoryNote<'_> {
        HistoryNote {
            created: self.created,
            created_by: "committer",
            comment: &self.plan.message,
            author: self.plan.author.as_deref(),
        }
    }

    /// The config needs only the layer's diff_id, known when the capture ends.
    fn config(&self, layer: Option<&LayerDescriptor>) -> Result<Blob, ImageError> {
        let note = self.note();
        image::new_config(self.base, layer, self.family, &note, self.edits)
    }

    /// The manifest needs the compressed layer's digest and size.
    fn manifest(&self, config: &Blob, layer: Option<&LayerDescriptor>) -> Result<Blob, ImageError> {
        image::new_manifest(
            self.base,
            config,
            layer,
            self.family,
            self.edits,
            self.created,
        )
    }
}

/// When the chain plan squashes, the layer is the diff against the original base's layers only.
fn squash_target(base: &BaseImage, edits: &Edits) -> Option<source::SquashTarget> {
    let plan = edits.chain.as_ref().filter(|p| p.squash)?;
    Some(source::SquashTarget {
        image_layers: base.layers().len(),
        keep_layers: plan.keep_layers,
        base_chain_id: plan.original.chain_id.clone(),
    })
}

fn tags(plan: &CommitPlan) -> Vec<String> {
    let mut tags = vec![plan.image.tag_or_latest().to_string()];
    for t in &plan.extra_tags {
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    tags
}

fn client_options(plan: &CommitPlan) -> ClientOptions {
    ClientOptions {
        plain_http: plan.plain_http,
        ca_file: plan.registry_ca.clone(),
        registry_config: plan.registry_config.clone(),
        certs_dir: plan.certs_dir.clone(),
        max_transfers: plan.max_transfers,
        chunk_size: plan.chunk_size,
        request_timeout: plan.request_timeout,
        ..ClientOptions::default()
    }
}

/// The target repository, with the right to push proven (an upload session is opened and kept
/// for the first blob): wrong credentials fail here, before the sandbox is paused.
async fn push_target(plan: &CommitPlan, opts: &ClientOptions) -> Result<Client, CommitError> {
    let client = Client::new(&plan.image, opts).await?;
    client.check_push().await?;
    Ok(client)
}

fn result(
    plan: &CommitPlan,
    info: &ContainerInfo,
    base: &BaseImage,
    layer: FinishedLayer,
    config: &Blob,
    manifest: &Blob,
) -> CommitResult {
    let repo = plan.image.repo_url_name();
    let extra_tags = tags(plan)
        .iter()
        .skip(1)
        .map(|t| format!("{repo}:{t}"))
        .collect();
    CommitResult {
        schema_version: crate::report::SCHEMA_VERSION,
        image: format!("{repo}@{}", manifest.digest),
        tag: format!("{repo}:{}", plan.image.tag_or_latest()),
        extra_tags,
        manifest_digest: manifest.digest.clone(),
        config_digest: config.digest.clone(),
        media_type: manifest.media_type.clone(),
        layer: layer.blob.desc,
        base_image: base.name.clone(),
        base_digest: base.manifest_digest.clone(),
        container: info.id.clone(),
        diff_source: layer.capture.source.to_string(),
        diff_source_reason: layer.capture.reason,
        entries: layer.capture.stats.entries,
        content_bytes: layer.capture.stats.content_bytes,
        paused: layer.capture.paused,
        duration_ms: 0,
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}
