//! The pipeline, in order: locate → lease → base image → diff (paused) → image → push → report.
//! Each stage is a call into its own module; this file only sequences them.

use crate::cli::{CommitPlan, SourcePlan};
use crate::containerd::content::BaseImage;
use crate::containerd::lease::Lease;
use crate::containerd::lookup::ContainerInfo;
use crate::containerd::Containerd;
use crate::error::CommitError;
use crate::image::{self, Family, HistoryNote};
use crate::layer::{LayerDescriptor, LayerWriter};
use crate::registry::{self, Client, ClientOptions};
use crate::report::CommitResult;
use crate::{diff, diff_source, freeze, log, push};
use std::time::Instant;

/// Runtimes that keep the container's writes somewhere the snapshot does not see.
const OFF_HOST_RUNTIMES: &[&str] = &["runsc", "gvisor", "kata", "firecracker", "krun"];

/// What reading the diff produced.
pub struct LayerRead<W> {
    pub sink: W,
    /// None when the container changed nothing (no layer is written to the image).
    pub layer: Option<LayerDescriptor>,
    pub stats: diff::Stats,
    pub paused_ms: u64,
    pub source: String,
    pub reason: String,
}

/// `committer commit`: the whole job.
pub async fn commit(plan: &CommitPlan) -> Result<CommitResult, CommitError> {
    let started = Instant::now();
    let opts = ClientOptions {
        plain_http: plan.plain_http,
        ca_file: plan.registry_ca.clone(),
        registry_config: plan.registry_config.clone(),
        user_agent: concat!("committer/", env!("CARGO_PKG_VERSION")).to_string(),
    };
    // Connecting to the registry early turns a wrong host, TLS or credential into an error before
    // the sandbox is paused; containerd lookups run meanwhile.
    let (ctr, client) = tokio::join!(
        async {
            let ctr = Containerd::connect(&plan.source.address, &plan.source.namespace).await?;
            let info = locate(&ctr, &plan.source).await?;
            Ok::<_, CommitError>((ctr, info))
        },
        Client::new(&plan.image, &opts)
    );
    let (ctr, info) = ctr?;
    let client = client?;
    let lease = ctr.take_lease(&info.id).await?;
    start_guardian(&ctr, &info, &lease);
    let reporter = crate::progress::start_reporter(std::time::Duration::from_secs(5));
    let result = commit_leased(&ctr, &client, &info, &lease, plan, &opts).await;
    reporter.abort();
    end_lease(&ctr, lease, &result).await;
    let mut result = result?;
    result.duration_ms = started.elapsed().as_millis() as u64;
    Ok(result)
}

async fn commit_leased(
    ctr: &Containerd,
    client: &Client,
    info: &ContainerInfo,
    lease: &Lease,
    plan: &CommitPlan,
    opts: &ClientOptions,
) -> Result<CommitResult, CommitError> {
    ctr.lease_resource(
        lease,
        &info.snapshot_key,
        &format!("snapshots/{}", info.snapshotter),
    )
    .await?;
    let base = ctr.base_image(&info.image).await?;
    for d in base_digests(&base) {
        ctr.lease_resource(lease, &d, "content").await?;
    }
    let family = Family::for_base(&base.manifest_media_type, plan.source.compress.compression);
    let layer_mt = family.layer_media_type(plan.source.compress.compression);

    let spool_dir = plan.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
    let (raw_file, raw_path) = spool_file(&spool_dir, "committer-tar-")?;
    let (out_file, out_path) = spool_file(&spool_dir, "committer-layer-")?;
    let compressed = plan.source.compress.compression != crate::image::Compression::None;
    let spool_path = if compressed { &out_path } else { &raw_path };
    let read =
        match read_layer_or_fallback(ctr, info, &plan.source, layer_mt, raw_file, Some(out_file))
            .await?
        {
            Either::Local(read) => {
                drop(read.sink);
                LayerRead {
                    sink: push::LayerBlob::File(spool_path.as_ref()),
                    layer: read.layer,
                    stats: read.stats,
                    paused_ms: read.paused_ms,
                    source: read.source,
                    reason: read.reason,
                }
            }
            Either::Stored(read) => read,
        };

    let created = now_rfc3339();
    let note = HistoryNote {
        created: &created,
        created_by: "committer",
        comment: &plan.message,
        author: None,
    };
    let edits = image::Edits::default();
    let config = image::new_config(&base, read.layer.as_ref(), family, &note, &edits)?;
    let manifest = image::new_manifest(
        &base,
        &config,
        read.layer.as_ref(),
        family,
        &edits,
        &created,
    )?;

    let base_ref: Option<registry::Reference> = base.name.parse().ok();
    let job = push::PushJob {
        client,
        ctr,
        base: &base,
        base_ref: base_ref.as_ref(),
        base_opts: opts,
        layer: read.layer.as_ref().map(|l| (l, read.sink)),
        config: &config,
        manifest: &manifest,
        tags: std::iter::once(plan.image.tag_or_latest().to_string())
            .chain(plan.extra_tags.iter().cloned())
            .collect(),
    };
    push::push(&job).await?;

    let repo = plan.image.repo_url_name();
    Ok(CommitResult {
        image: format!("{repo}@{}", manifest.digest),
        tag: format!("{repo}:{}", plan.image.tag_or_latest()),
        manifest_digest: manifest.digest.clone(),
        config_digest: config.digest.clone(),
        media_type: manifest.media_type.clone(),
        layer: read.layer,
        base_image: base.name.clone(),
        container: info.id.clone(),
        diff_source: read.source,
        diff_source_reason: read.reason,
        entries: read.stats.entries,
        content_bytes: read.stats.content_bytes,
        paused_ms: read.paused_ms,
        duration_ms: 0,
        extra_tags: plan
            .extra_tags
            .iter()
            .map(|t| format!("{repo}:{t}"))
            .collect(),
    })
}

enum Either<'a> {
    Local(LayerRead<std::fs::File>),
    Stored(LayerRead<push::LayerBlob<'a>>),
}

/// The layer from the chosen source; with `auto`, containerd's differ when the snapshot cannot
/// be read here (its directories are not mounted in this container, or we may not mount views).
async fn read_layer_or_fallback<'a>(
    ctr: &Containerd,
    info: &ContainerInfo,
    plan: &SourcePlan,
    media_type: &str,
    raw: std::fs::File,
    out: Option<std::fs::File>,
) -> Result<Either<'a>, CommitError> {
    use diff_source::{DiffSourceChoice, SourceError};
    if plan.diff_source == DiffSourceChoice::Containerd {
        let read = containerd_layer(
            ctr,
            info,
            plan,
            media_type,
            "--diff-source containerd".into(),
        )
        .await?;
        return Ok(Either::Stored(read));
    }
    match read_layer(ctr, info, plan, media_type, raw, out).await {
        Err(CommitError::Source(
            e @ (SourceError::NotVisible { .. } | SourceError::Mount { .. }),
        )) if plan.diff_source == DiffSourceChoice::Auto => {
            log::info(&format!("{e}; asking containerd's diff service instead"));
            let reason = format!("snapshot not readable here ({e})");
            Ok(Either::Stored(
                containerd_layer(ctr, info, plan, media_type, reason).await?,
            ))
        }
        other => other.map(Either::Local),
    }
}

/// sha256 of an empty tar (two zero blocks): what a differ writes for "no changes".
const EMPTY_TAR_DIFF_ID: &str =
    "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";

/// The layer built by containerd's Diff service into its content store, under our lease.
async fn containerd_layer<'a>(
    ctr: &Containerd,
    info: &ContainerInfo,
    plan: &SourcePlan,
    media_type: &str,
    reason: String,
) -> Result<LayerRead<push::LayerBlob<'a>>, CommitError> {
    if !plan.exclude.is_empty() || plan.source_date_epoch.is_some() {
        return Err(CommitError::Refused(
            "--exclude and --source-date-epoch need a local diff source; containerd's diff service cannot apply them".into(),
        ));
    }
    let upper = ctr.snapshot_mounts(info).await?;
    let view_key = format!("committer-view-{}-{}", info.id, std::process::id());
    let lower = match ctr
        .snapshot_parent(&info.snapshotter, &info.snapshot_key)
        .await?
    {
        Some(parent) => {
            ctr.view_snapshot(&info.snapshotter, &view_key, &parent)
                .await?
        }
        None => vec![],
    };
    // containerd names compressions by OCI media types; Docker's gzip type is the same bytes.
    let oci_type = match media_type {
        crate::image::media::DOCKER_LAYER_GZIP => crate::image::media::OCI_LAYER_GZIP,
        crate::image::media::DOCKER_LAYER_TAR => crate::image::media::OCI_LAYER_TAR,
        other => other,
    };
    let paused = if plan.pause {
        freeze::pause(ctr, &info.id).await?
    } else {
        None
    };
    let stored = ctr
        .diff_in_containerd(
            &lower,
            &upper,
            oci_type,
            &format!("committer-{}-{}", info.id, std::process::id()),
        )
        .await;
    let paused_ms = match paused {
        Some(p) => p.resume().await?,
        None => 0,
    };
    if !lower.is_empty() {
        let _ = ctr.remove_snapshot(&info.snapshotter, &view_key).await;
    }
    let stored = stored?;
    let layer = (stored.diff_id.as_str() != EMPTY_TAR_DIFF_ID).then(|| LayerDescriptor {
        digest: stored.digest,
        diff_id: stored.diff_id,
        size: stored.size,
        media_type: media_type.to_string(),
    });
    Ok(LayerRead {
        sink: push::LayerBlob::ContentStore,
        layer,
        stats: diff::Stats {
            source: "containerd",
            ..Default::default()
        },
        paused_ms,
        source: "containerd".into(),
        reason,
    })
}

/// Finds the container and refuses what we cannot commit truthfully.
pub async fn locate(ctr: &Containerd, plan: &SourcePlan) -> Result<ContainerInfo, CommitError> {
    let info = ctr.find_container(&plan.selector).await?;
    let runtime = info.runtime.to_ascii_lowercase();
    if let Some(r) = OFF_HOST_RUNTIMES.iter().find(|r| runtime.contains(*r)) {
        return Err(CommitError::Refused(format!(
            "container {:?} runs on runtime {:?} ({r}), which keeps the container's writes off the host snapshot; \
             committing it would silently miss them — commit it from inside the sandbox instead",
            info.id, info.runtime
        )));
    }
    if info.image.is_empty() {
        return Err(CommitError::Refused(format!(
            "container {:?} was not created from an image; committer needs the base image to build on",
            info.id
        )));
    }
    Ok(info)
}

/// Reads the diff, pausing the container only while the tar is copied out: the uncompressed
/// tar goes to `raw` (hashing its diff_id) while paused; compression into `out` runs after the
/// resume (bench: gzip while paused cost ~15 s per GiB of pause, the copy alone ~2). With
/// `--compression none`, or no `out`, `raw` is the layer. When the upperdir turns out not to be
/// exact mid-read, the spool is rewound and the diff is read again by a walk, in the same pause.
pub async fn read_layer(
    ctr: &Containerd,
    info: &ContainerInfo,
    plan: &SourcePlan,
    media_type: &str,
    spool: std::fs::File,
    out: Option<std::fs::File>,
) -> Result<LayerRead<std::fs::File>, CommitError> {
    let mounts = ctr.snapshot_mounts(info).await?;
    let mut source = diff_source::prepare(ctr, info, &mounts, plan.diff_source).await?;
    let opts = diff::Options {
        exclude: plan.exclude.clone(),
        skip_mount_stubs: info.mount_destinations.clone(),
        source_date_epoch: plan.source_date_epoch,
        max_files: plan.max_files,
        max_bytes: plan.max_layer_bytes,
    };
    let paused = if plan.pause {
        freeze::pause(ctr, &info.id).await?
    } else {
        None
    };
    let mut spool = Some(spool);
    let outcome = loop {
        let file = spool
            .take()
            .expect("spool is handed back after each attempt");
        let raw_opts = crate::layer::CompressOptions {
            compression: crate::image::Compression::None,
            level: None,
            threads: 1,
        };
        let (out, file, src) =
            write_blocking(source, opts.clone(), raw_opts, media_type, file).await?;
        source = src;
        match out {
            Err(CommitError::Diff(diff::DiffError::NotExact(why)))
                if source.kind.name() == "upperdir" =>
            {
                log::info(&format!(
                    "upperdir is not exact ({why}); reading the diff by a walk"
                ));
                source.cleanup().await;
                rewind(&file)?;
                spool = Some(file);
                source =
                    diff_source::prepare(ctr, info, &mounts, diff_source::DiffSourceChoice::Walk)
                        .await?;
                source.reason = format!("overlay upperdir is not exact: {why}");
            }
            out => break out.map(|(desc, stats)| (file, desc, stats)),
        }
    };
    // Resume before anything else can fail.
    let paused_ms = match paused {
        Some(p) => p.resume().await?,
        None => 0,
    };
    let (kind, reason) = (source.kind.name().to_string(), source.reason.clone());
    source.cleanup().await;
    let (raw, desc, stats) = outcome?;
    let (sink, desc) = match out {
        Some(out)
            if plan.compress.compression != crate::image::Compression::None
                && stats.entries > 0 =>
        {
            compress_spool(raw, out, plan.compress, media_type, desc.diff_id).await?
        }
        _ => (raw, desc),
    };
    let layer = (stats.entries > 0).then_some(desc);
    Ok(LayerRead {
        sink,
        layer,
        stats,
        paused_ms,
        source: kind,
        reason,
    })
}

type Attempt = (
    Result<(LayerDescriptor, diff::Stats), CommitError>,
    std::fs::File,
    diff_source::PreparedSource,
);

/// One read of the diff on a blocking thread: tar → hash → compress → hash → spool file.
async fn write_blocking(
    source: diff_source::PreparedSource,
    opts: diff::Options,
    compress: crate::layer::CompressOptions,
    media_type: &str,
    file: std::fs::File,
) -> Result<Attempt, CommitError> {
    let media_type = media_type.to_string();
    let spool_copy = file
        .try_clone()
        .map_err(CommitError::io("duplicating the spool file handle"))?;
    tokio::task::spawn_blocking(move || {
        let run = || -> Result<_, CommitError> {
            let sink = std::io::BufWriter::with_capacity(1 << 20, file);
            let w = LayerWriter::new(sink, &compress, &media_type)
                .map_err(CommitError::io("starting the compressor"))?;
            let (w, stats) = diff::write_layer(&source.kind.as_diff_source(), &opts, w)?;
            let (sink, desc, _) = w
                .finish()
                .map_err(CommitError::io("writing the layer to the spool"))?;
            sink.into_inner()
                .map_err(|e| CommitError::io("writing the layer to the spool")(e.into_error()))?;
            Ok((desc, stats))
        };
        (run(), spool_copy, source)
    })
    .await
    .map_err(|e| CommitError::Internal(format!("diff reader: {e}")))
}

/// Compresses the tar spool into `out` on a blocking thread, checking that the bytes read back
/// still hash to the diff_id taken while they were written (a full or failing disk shows here).
async fn compress_spool(
    raw: std::fs::File,
    out: std::fs::File,
    compress: crate::layer::CompressOptions,
    media_type: &str,
    diff_id: crate::digest::Digest,
) -> Result<(std::fs::File, LayerDescriptor), CommitError> {
    use std::io::{Seek, SeekFrom};
    let media_type = media_type.to_string();
    tokio::task::spawn_blocking(move || {
        let mut raw = raw;
        raw.seek(SeekFrom::Start(0))
            .map_err(CommitError::io("rewinding the tar spool"))?;
        let what = "compressing the layer from the tar spool";
        let sink = std::io::BufWriter::with_capacity(1 << 20, out);
        let mut w =
            LayerWriter::new(sink, &compress, &media_type).map_err(CommitError::io(what))?;
        std::io::copy(&mut std::io::BufReader::with_capacity(1 << 20, raw), &mut w)
            .map_err(CommitError::io(what))?;
        let (sink, desc, _) = w.finish().map_err(CommitError::io(what))?;
        let file = sink
            .into_inner()
            .map_err(|e| CommitError::io(what)(e.into_error()))?;
        if desc.diff_id != diff_id {
            return Err(CommitError::Internal(format!(
                "the tar spool reads back as {} but {} was written: is the spool disk failing?",
                desc.diff_id, diff_id
            )));
        }
        Ok((file, desc))
    })
    .await
    .map_err(|e| CommitError::Internal(format!("compressor: {e}")))?
}

fn spool_file(
    dir: &std::path::Path,
    prefix: &str,
) -> Result<(std::fs::File, tempfile::TempPath), CommitError> {
    let f = tempfile::Builder::new()
        .prefix(prefix)
        .tempfile_in(dir)
        .map_err(CommitError::io(format!(
            "creating a spool file in {} (see --spool-dir)",
            dir.display()
        )))?;
    Ok(f.into_parts())
}

fn rewind(file: &std::fs::File) -> Result<(), CommitError> {
    use std::io::Seek;
    file.set_len(0)
        .map_err(CommitError::io("truncating the spool file"))?;
    (&*file)
        .seek(std::io::SeekFrom::Start(0))
        .map_err(CommitError::io("rewinding the spool file"))?;
    Ok(())
}

fn base_digests(base: &BaseImage) -> Vec<String> {
    let mut out = vec![base.manifest_digest.to_string()];
    if let Some(c) = base
        .manifest
        .pointer("/config/digest")
        .and_then(|d| d.as_str())
    {
        out.push(c.to_string());
    }
    for l in base.layers() {
        if let Some(d) = l.get("digest").and_then(|d| d.as_str()) {
            out.push(d.to_string());
        }
    }
    out
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

/// `committer diff`: the layer written to a local file; prints its descriptor.
pub async fn diff_to_file(
    plan: &SourcePlan,
    output: &std::path::Path,
) -> Result<LayerDescriptor, CommitError> {
    let ctr = Containerd::connect(&plan.address, &plan.namespace).await?;
    let info = locate(&ctr, plan).await?;
    let lease = ctr.take_lease(&info.id).await?;
    start_guardian(&ctr, &info, &lease);
    let out = async {
        ctr.lease_resource(
            &lease,
            &info.snapshot_key,
            &format!("snapshots/{}", info.snapshotter),
        )
        .await?;
        let file = std::fs::File::create(output)
            .map_err(CommitError::io(format!("creating {}", output.display())))?;
        let media_type = crate::image::Family::Oci.layer_media_type(plan.compress.compression);
        let read = if plan.compress.compression == crate::image::Compression::None {
            read_layer(&ctr, &info, plan, media_type, file, None).await?
        } else {
            let dir = output
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let (raw, _raw_path) = spool_file(dir, ".committer-tar-")?;
            read_layer(&ctr, &info, plan, media_type, raw, Some(file)).await?
        };
        read.sink
            .sync_all()
            .map_err(CommitError::io(format!("syncing {}", output.display())))?;
        read.layer.ok_or_else(|| {
            CommitError::Refused(format!(
                "container {:?} has no changes: the layer would be empty",
                info.id
            ))
        })
    }
    .await;
    end_lease(&ctr, lease, &out).await;
    out
}

fn start_guardian(ctr: &Containerd, info: &ContainerInfo, lease: &Lease) {
    if let Err(e) = crate::guard::start(&ctr.address, &ctr.namespace, &info.id, &lease.id) {
        log::warn(&format!("could not start the guardian process ({e}); a SIGKILL could leave the container paused"));
    }
}

/// Resumes (if an error left the sandbox paused), releases the lease, and dismisses the guardian.
async fn end_lease<T>(ctr: &Containerd, lease: Lease, result: &Result<T, CommitError>) {
    if result.is_err() {
        if let Err(e) = freeze::resume_if_paused().await {
            log::error(&format!("could not resume the container: {e}"));
        }
    }
    if let Err(e) = ctr.drop_lease(lease).await {
        log::warn(&format!("{e} (it expires by itself within an hour)"));
    }
    crate::guard::finish();
}
