//! Where the layer's bytes come from. Every source — the overlay upperdir, a double walk of two
//! read-only trees, containerd's Diff service — yields the same typed [`FinishedLayer`]: the
//! layer's descriptor, where its blob lives, what was read, how the sandbox was paused, which
//! source ran and why. The pipeline never asks which one it was.
//!
//! - `prepare`: choosing and mounting a local source (upperdir, or the walk's read-only views),
//!   and the temporary snapshot views (`SnapshotView`) the walk, the differ and the squash use.
//! - `local`: a local source read while paused into the spool, then compressed (as it is read,
//!   or from the recipe once the capture is whole).
//! - `reflink`: the per-file capture: each changed file's content cloned (or kernel-copied) into
//!   the spool while paused, the rest of the tar written as a recipe, the tar reassembled after
//!   the resume.
//! - `squash`: `--squash`'s source: the stack of upperdirs since the original base, or two
//!   read-only views.
//! - `spool`: the room check before the pause, and punching out what the compressor consumed.
//! - `growing`: a file read while it is written (the raw spool, the compressed layer).
//! - `compress`: the compressor: any reader of the tar in, a growing layer file out.
//! - `differ`: containerd's Diff service builds the layer in its content store (socket-only mode).
//!
//! With `--diff-source auto`, a snapshot that cannot be read here (its directories are not
//! mounted in this container, or views cannot be mounted) goes to containerd's differ instead.

pub mod compress;
mod differ;
pub mod growing;
mod local;
mod prepare;
mod reflink;
pub mod spool;
pub mod squash;

pub use differ::copy_stored_blob;
pub use prepare::{view_options, PreparedSource, SnapshotView, SourceKind, TempMount};

use crate::containerd::lookup::ContainerInfo;
use crate::containerd::{Containerd, ContainerdError};
use crate::digest::Digest;
use crate::error::{chain_line as chain, CommitError};
use crate::freeze::PauseReport;
use crate::layer::LayerDescriptor;
use crate::{diff, log};
use std::path::{Path, PathBuf};

/// What to read and how to build the layer (from `--diff-source`, `--exclude`, … by `cli`).
#[derive(Debug, Clone)]
pub struct SourcePlan {
    pub address: PathBuf,
    pub namespace: String,
    pub selector: crate::containerd::lookup::Selector,
    pub compress: crate::layer::CompressOptions,
    pub diff_source: DiffSourceChoice,
    pub exclude: Vec<String>,
    pub include: Vec<String>,
    pub source_date_epoch: Option<i64>,
    pub max_layer_bytes: Option<u64>,
    pub max_files: Option<u64>,
    pub keep_xattrs: Vec<String>,
    pub max_hole_bytes: Option<u64>,
    pub pause: bool,
}

/// What the user asked for (`--diff-source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffSourceChoice {
    /// The fastest exact source available.
    Auto,
    /// The overlay upperdir only (fails when it is not exact).
    Upperdir,
    /// Double walk of the parent and the container's tree.
    Walk,
    /// containerd's Diff service builds the layer (no snapshotter mount or CAP_SYS_ADMIN needed).
    Containerd,
}

/// The source that produced the layer (the result's `diffSource`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffSourceKind {
    Upperdir,
    Walk,
    Containerd,
}

impl DiffSourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DiffSourceKind::Upperdir => "upperdir",
            DiffSourceKind::Walk => "walk",
            DiffSourceKind::Containerd => "containerd",
        }
    }
}

impl std::fmt::Display for DiffSourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error("container {id:?}: snapshotter {snapshotter:?} gives {detail}; this build reads overlay and bind (native) snapshots only")]
    Unsupported {
        id: String,
        snapshotter: String,
        detail: String,
    },
    #[error("--diff-source upperdir: the upperdir of {id:?} is not exact ({why}); use --diff-source auto or walk")]
    UpperdirNotExact { id: String, why: String },
    #[error("{path} (from the snapshot's mounts) is not visible here: mount the snapshotter root at the same path, or use --diff-source containerd")]
    NotVisible { path: PathBuf },
    #[error("mounting a read-only view for the walk at {target}")]
    Mount {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the spool at {dir} has {free} bytes free, {reserve} of them kept free for the node (COMMITTER_SPOOL_RESERVE), but this diff needs about {need} (the container snapshot's size as containerd reports it): point --spool-dir at a filesystem with more room")]
    SpoolTooSmall {
        dir: PathBuf,
        free: u64,
        need: u64,
        reserve: u64,
    },
    #[error("the spool at {dir} ran out of room ({free} bytes were free, {reserve} are kept free for the node: COMMITTER_SPOOL_RESERVE); nothing was pushed: point --spool-dir at a filesystem with more room (in the Job, a larger spool volume)")]
    SpoolFull {
        dir: PathBuf,
        free: u64,
        reserve: u64,
    },
    #[error("the spool directory {dir} cannot be used (see --spool-dir)")]
    SpoolUnusable {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("containerd's diff service cannot apply {flags} ({advice})")]
    NeedsLocalSource { flags: String, advice: &'static str },
}

/// A layer file on disk: a spool file removed when dropped, or a file the caller named.
#[derive(Debug)]
pub enum LayerFile {
    Temp(tempfile::TempPath),
    Kept(PathBuf),
}

impl LayerFile {
    pub fn path(&self) -> &Path {
        match self {
            LayerFile::Temp(p) => p,
            LayerFile::Kept(p) => p,
        }
    }
}

/// Where the finished layer blob lives.
#[derive(Debug)]
pub enum BlobLocation {
    File(LayerFile),
    /// containerd's content store (its Diff service wrote it there, under our lease).
    ContentStore,
}

/// A layer's blob once it is built: its descriptor (None: the container changed nothing, and no
/// layer goes into the image) and where the blob lies.
#[derive(Debug)]
pub struct LayerBlob {
    pub desc: Option<LayerDescriptor>,
    pub location: BlobLocation,
}

/// What the capture tells of a layer besides its blob: what was read, how the sandbox was
/// paused, which source ran and why.
#[derive(Debug)]
pub struct CaptureReport {
    pub stats: diff::Stats,
    pub paused: PauseReport,
    pub source: DiffSourceKind,
    /// Why this source was used (the result's `diffSourceReason`).
    pub reason: String,
}

impl CaptureReport {
    /// The layer, once its blob is built.
    pub fn finished(self, blob: LayerBlob) -> FinishedLayer {
        FinishedLayer {
            blob,
            capture: self,
        }
    }
}

/// What every source produces.
#[derive(Debug)]
pub struct FinishedLayer {
    pub blob: LayerBlob,
    pub capture: CaptureReport,
}

/// A layer whose capture is done (the sandbox runs again) and whose blob may still be on its way:
/// the config can be written as soon as the diff_id is known while the blob is compressed and
/// uploaded.
pub struct StartedLayer {
    pub id: LayerId,
    pub media_type: String,
    pub capture: CaptureReport,
    pub finish: LayerFinish,
}

/// What is known of the layer's diff_id when the capture ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerId {
    /// The container changed nothing: no layer goes into the image.
    None,
    /// Hashed while the raw tar was captured (or the layer is done).
    Known(Digest),
    /// Known once the blob is built: the per-file capture's tar exists only when the compressor
    /// reassembles it.
    Later,
}

/// The blob of a [`StartedLayer`].
pub enum LayerFinish {
    /// Done.
    Ready(LayerBlob),
    /// Being compressed into `path`; its bytes can be read as they come (`compressing.output`).
    Compressing {
        compressing: compress::Compressing,
        path: LayerFile,
        /// The uncompressed spool (the raw tar or the recipe), kept until the compressor is done
        /// with it.
        raw: LayerFile,
        /// What the tar the compressor reads must hash to, when the capture hashed it.
        expect: Option<Digest>,
    },
}

impl LayerFinish {
    /// Waits for the blob.
    pub async fn wait(self) -> Result<LayerBlob, CommitError> {
        match self {
            LayerFinish::Ready(blob) => Ok(blob),
            LayerFinish::Compressing {
                compressing,
                path,
                raw,
                expect,
            } => {
                let desc = compressing.checked(expect.as_ref()).await?;
                drop(raw);
                Ok(LayerBlob {
                    desc: Some(desc),
                    location: BlobLocation::File(path),
                })
            }
        }
    }
}

impl StartedLayer {
    /// Waits for the blob: the finished layer (its tar checked against the capture's diff_id).
    pub async fn finish(self) -> Result<FinishedLayer, CommitError> {
        let (finish, capture) = self.split();
        Ok(capture.finished(finish.wait().await?))
    }

    /// The blob still to come, apart from what the capture already told: the pipeline uploads
    /// the one while it writes the config from the other, then joins them again
    /// ([`CaptureReport::finished`]).
    pub fn split(self) -> (LayerFinish, CaptureReport) {
        (self.finish, self.capture)
    }

    /// The config's view of the layer before its blob is done, when it can be had: `Some(None)`
    /// for no layer, `Some(Some(_))` with only the diff_id real (the digest and size are the
    /// manifest's business), `None` when the diff_id is known only once the blob is built.
    pub fn config_layer(&self) -> Option<Option<LayerDescriptor>> {
        match &self.id {
            LayerId::None => Some(None),
            LayerId::Known(d) => Some(Some(LayerDescriptor {
                digest: d.clone(),
                diff_id: d.clone(),
                size: 0,
                media_type: self.media_type.clone(),
            })),
            LayerId::Later => None,
        }
    }

    fn ready(layer: FinishedLayer) -> StartedLayer {
        let desc = layer.blob.desc.as_ref();
        StartedLayer {
            id: match desc {
                Some(l) => LayerId::Known(l.diff_id.clone()),
                None => LayerId::None,
            },
            media_type: desc.map(|l| l.media_type.clone()).unwrap_or_default(),
            capture: layer.capture,
            finish: LayerFinish::Ready(layer.blob),
        }
    }
}

/// Where a local source writes: temporary files (the uncompressed capture, and the compressed
/// layer unless `output` names it) go to `spool_dir`.
pub struct Destination {
    pub spool_dir: PathBuf,
    /// The layer file the caller wants kept (`committer diff --output`); None = a spool file.
    pub output: Option<PathBuf>,
}

/// A squashing commit: the layer is the diff of the container against the original base's
/// layers only (the first `keep_layers` of the image's `image_layers`; the chain plan decides).
#[derive(Debug, Clone)]
pub struct SquashTarget {
    /// The image's layers: the container's snapshot has as many lowerdirs.
    pub image_layers: usize,
    /// How many of them are the original base's.
    pub keep_layers: usize,
    /// The chain ID of the original base's layers: the snapshot containerd committed for them.
    pub base_chain_id: String,
}

/// One read of a container's diff.
pub struct LayerRequest<'a> {
    pub ctr: &'a Containerd,
    pub info: &'a ContainerInfo,
    pub plan: &'a SourcePlan,
    /// The layer's media type (its compression, in the image's family).
    pub media_type: &'a str,
    pub dest: &'a Destination,
    /// Squash: diff against the original base rather than the snapshot's parent.
    pub squash: Option<SquashTarget>,
}

/// Reads the container's diff as a layer, from the source the plan chose, and waits for its blob.
pub async fn read_layer(req: &LayerRequest<'_>) -> Result<FinishedLayer, CommitError> {
    start_layer(req).await?.finish().await
}

/// Reads the container's diff, returning as soon as the capture is done (the sandbox runs again);
/// the blob may still be being compressed.
pub async fn start_layer(req: &LayerRequest<'_>) -> Result<StartedLayer, CommitError> {
    if req.squash.is_some() {
        // containerd's differ can only diff against the snapshot's parent.
        if req.plan.diff_source == DiffSourceChoice::Containerd {
            return Err(SourceError::NeedsLocalSource {
                flags: "--squash".into(),
                advice: "use --diff-source auto, upperdir or walk",
            }
            .into());
        }
        return local::read(req).await;
    }
    if req.plan.diff_source == DiffSourceChoice::Containerd {
        let layer = differ::read(req, "--diff-source containerd".into()).await?;
        return Ok(StartedLayer::ready(layer));
    }
    match local::read(req).await {
        Err(CommitError::Source(
            e @ (SourceError::NotVisible { .. } | SourceError::Mount { .. }),
        )) if req.plan.diff_source == DiffSourceChoice::Auto => {
            differ::refuse_local_only_flags(req.plan)?;
            log::info(&format!(
                "{}; asking containerd's diff service instead",
                chain(&e)
            ));
            let reason = format!("snapshot not readable here ({})", chain(&e));
            Ok(StartedLayer::ready(differ::read(req, reason).await?))
        }
        other => other,
    }
}
