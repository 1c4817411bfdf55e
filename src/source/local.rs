//! A local source (upperdir or walk) read into the spool. The container is paused only while the
//! diff is captured: by default per file (`reflink`: each changed file's content cloned or
//! kernel-copied into the spool, the rest of the tar written as a recipe), else as the raw tar
//! (`--squash`, `COMMITTER_CAPTURE=tar`; its diff_id hashed on the way). After the resume the
//! compressor reads the tar — reassembled from the recipe, or the raw spool as it grows
//! (`growing`) — and the caller gets the layer while it is still being compressed
//! ([`LayerFinish::Compressing`]), to upload it as it grows. With the raw tar and
//! `COMMITTER_COMPRESS_START=paused` the compressor runs during the pause at nice 19 (on 2 cores
//! that made the pause longer for no gain in wall time: README "Performance"). When the upperdir
//! turns out not to be exact mid-read, the capture is rewound and the diff is read again by a
//! walk, inside the same pause; the compressor starts over with it.

use super::compress::{Compressing, Priority};
use super::growing::{growing, Growing, GrowingWriter};
use super::prepare::{prepare, PreparedSource};
use super::reflink::{self, Clones};
use super::squash;
use super::{
    BlobLocation, CaptureReport, DiffSourceChoice, DiffSourceKind, LayerBlob, LayerFile,
    LayerFinish, LayerId, LayerRequest, StartedLayer,
};
use crate::containerd::lookup::SnapshotMount;
use crate::error::CommitError;
use crate::freeze::CaptureKind;
use crate::layer::{CompressOptions, Compression, LayerDescriptor, LayerWriter};
use crate::{diff, freeze, log};
use std::fs::File;
use std::io::{BufWriter, Read};
use std::path::Path;

const BUF: usize = 1 << 20;

/// The container's diff from a local source: the spool opened (the raw tar's compressor already
/// tailing it), the capture while paused, then the layer's blob on its way.
pub(super) async fn read(req: &LayerRequest<'_>) -> Result<StartedLayer, CommitError> {
    let mounts = req.ctr.snapshot_mounts(req.info).await?;
    let (spool, writer) = Spool::open(req, &mounts).await?;
    let held = match &req.squash {
        None => capture_paused(req, &mounts, writer, spool.hook()).await,
        Some(target) => capture_squash(req, target, &mounts, writer).await,
    };
    // The sandbox runs again (or never paused): the compressor gets its share of the CPU back,
    // and its output may be uploaded.
    spool.resumed();
    let Held {
        captured,
        source,
        reason,
        mut paused,
    } = held?;
    paused.capture = Some(spool.capture_kind());
    let (desc, stats) = captured?;
    check_layer_size(req, spool.tar_size(&desc))?;
    let (id, finish) = spool.finish(req, desc, stats.entries)?;
    Ok(StartedLayer {
        id,
        media_type: req.media_type.to_string(),
        capture: CaptureReport {
            stats,
            paused,
            source,
            reason,
        },
        finish,
    })
}

/// --max-layer-bytes bounds the layer itself (the tar with its headers and padding), not only
/// the file content the diff counted while reading.
fn check_layer_size(req: &LayerRequest<'_>, tar_size: u64) -> Result<(), CommitError> {
    match req.plan.max_layer_bytes {
        Some(limit) if tar_size > limit => Err(diff::DiffError::LimitExceeded {
            what: "bytes (uncompressed layer, --max-layer-bytes)",
            limit,
        }
        .into()),
        _ => Ok(()),
    }
}

/// The capture's spool file and what turns it into the layer's blob.
struct Spool {
    /// The raw tar or the recipe (or the caller's file, when the raw tar is the layer).
    path: LayerFile,
    /// The spool as it is written, for the compressor to tail.
    raw: Growing,
    priority: Priority,
    assembly: Assembly,
}

/// How the captured tar becomes the layer's blob.
enum Assembly {
    /// The raw tar is the layer (uncompressed).
    Raw,
    /// The raw tar, compressed as it is written into `layer`.
    Compressed {
        compressing: Compressing,
        layer: LayerFile,
    },
    /// The per-file capture: the spool holds the recipe (read back through `recipe`), the kept
    /// contents are in `clones`; the tar is rebuilt for the compressor once the capture is whole.
    Recipe {
        clones: Clones,
        kind: CaptureKind,
        recipe: File,
    },
}

impl Spool {
    /// The spool for this capture, with room checked; the raw tar's compressor already tails it.
    /// The writer goes to the capture.
    async fn open(
        req: &LayerRequest<'_>,
        mounts: &[SnapshotMount],
    ) -> Result<(Spool, GrowingWriter), CommitError> {
        let compressed = req.plan.compress.compression != Compression::None;
        // A squash reads through overlay views: its captures are the raw tar.
        let clones = match req.squash {
            None => reflink::choose(&req.dest.spool_dir, reflink::data_dir(mounts).as_deref()),
            Some(_) => None,
        };
        // Uncompressed and whole, the capture is the layer: straight into the caller's file.
        let (file, path) = match (&req.dest.output, compressed, &clones) {
            (Some(out), false, None) => (create(out)?, LayerFile::Kept(out.clone())),
            _ => spool_file(&req.dest.spool_dir, ".committer-tar-")?,
        };
        super::spool::check_room(req.ctr, req.info, mounts, &req.dest.spool_dir).await?;
        // The recipe, read back by the assembler once the capture is done.
        let recipe = match &clones {
            Some(_) => Some(
                file.try_clone()
                    .map_err(CommitError::io("duplicating the spool file handle"))?,
            ),
            None => None,
        };
        let start = CompressStart::from_env();
        let (writer, raw) = growing(file, start == CompressStart::Resumed);
        let priority = match start {
            CompressStart::Paused => Priority::low(),
            CompressStart::Resumed => Priority::default(),
        };
        // The raw tar is compressed as it is written; a recipe only once it is whole.
        let assembly = match (clones.zip(recipe), compressed) {
            (Some(((clones, kind), recipe)), _) => Assembly::Recipe {
                clones,
                kind,
                recipe,
            },
            (None, true) => {
                let (out, layer) = layer_file(req)?;
                let compressing = start_compressor(req, &raw, out, priority.clone())
                    .map_err(CommitError::io("starting the compressor thread"))?;
                Assembly::Compressed { compressing, layer }
            }
            (None, false) => Assembly::Raw,
        };
        let spool = Spool {
            path,
            raw,
            priority,
            assembly,
        };
        Ok((spool, writer))
    }

    /// What the per-file capture gives each file's content to.
    fn hook(&self) -> Option<diff::ContentHook> {
        match &self.assembly {
            Assembly::Recipe { clones, .. } => Some(clones.hook()),
            _ => None,
        }
    }

    fn capture_kind(&self) -> CaptureKind {
        match &self.assembly {
            Assembly::Recipe { kind, .. } => *kind,
            _ => CaptureKind::Copy,
        }
    }

    /// The sandbox runs again: the spool may be read as it grows, the compressor runs at its
    /// normal priority and its output may be uploaded.
    fn resumed(&self) {
        self.raw.unhold();
        self.priority.restore();
        if let Assembly::Compressed { compressing, .. } = &self.assembly {
            compressing.output.unhold();
        }
    }

    /// The layer's tar size: the recipe lacks the kept contents; the layer has them.
    fn tar_size(&self, desc: &LayerDescriptor) -> u64 {
        match &self.assembly {
            Assembly::Recipe { clones, .. } => desc.size + clones.stored_bytes(),
            _ => desc.size,
        }
    }

    /// What is known of the layer's diff_id now, and its blob (ready, or being compressed).
    fn finish(
        self,
        req: &LayerRequest<'_>,
        desc: LayerDescriptor,
        entries: u64,
    ) -> Result<(LayerId, LayerFinish), CommitError> {
        let Spool { path, assembly, .. } = self;
        if entries == 0 {
            let blob = LayerBlob {
                desc: None,
                location: BlobLocation::File(path),
            };
            return Ok((LayerId::None, LayerFinish::Ready(blob)));
        }
        let (id, compressing, layer, expect) = match assembly {
            Assembly::Raw => {
                let blob = LayerBlob {
                    desc: Some(desc.clone()),
                    location: BlobLocation::File(path),
                };
                return Ok((LayerId::Known(desc.diff_id), LayerFinish::Ready(blob)));
            }
            // The tar exists only as recipe + kept contents: rebuilt for the compressor (which
            // computes the diff_id), even uncompressed.
            Assembly::Recipe { clones, recipe, .. } => {
                let (out, layer) = layer_file(req)?;
                let compressing = start_assembled(req, clones, recipe, out)
                    .map_err(CommitError::io("starting the compressor thread"))?;
                (LayerId::Later, compressing, layer, None)
            }
            Assembly::Compressed { compressing, layer } => {
                let expect = Some(desc.diff_id.clone());
                (LayerId::Known(desc.diff_id), compressing, layer, expect)
            }
        };
        crate::progress::captured();
        let finish = LayerFinish::Compressing {
            compressing,
            path: layer,
            // The raw spool lives until the compressor is done with it.
            raw: path,
            expect,
        };
        Ok((id, finish))
    }
}

/// Where the compressed layer goes: the caller's file, else the spool.
fn layer_file(req: &LayerRequest<'_>) -> Result<(File, LayerFile), CommitError> {
    match &req.dest.output {
        Some(p) => Ok((create(p)?, LayerFile::Kept(p.clone()))),
        None => spool_file(&req.dest.spool_dir, ".committer-layer-"),
    }
}

/// The compressor on the tar rebuilt from the recipe and the kept contents. The recipe is whole
/// before it starts, so it is never started over.
fn start_assembled(
    req: &LayerRequest<'_>,
    clones: Clones,
    recipe: File,
    out: File,
) -> std::io::Result<Compressing> {
    let mut parts = Some((clones, recipe));
    let input = move || -> Box<dyn Read + Send> {
        match parts.take().map(|(c, r)| c.assemble(r)) {
            Some(Ok(assembler)) => Box::new(assembler),
            Some(Err(e)) => Box::new(FailedRead(Some(e))),
            None => Box::new(FailedRead(Some(std::io::Error::other(
                "the captured contents were already consumed",
            )))),
        }
    };
    super::compress::start(
        input,
        out,
        req.plan.compress,
        req.media_type.to_string(),
        Priority::default(),
        req.dest.output.is_some(),
        false,
    )
}

/// A reader that fails with the error that kept it from being made.
struct FailedRead(Option<std::io::Error>);

impl Read for FailedRead {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(self
            .0
            .take()
            .unwrap_or_else(|| std::io::Error::other("no input")))
    }
}

/// When the compressor starts: after the resume (the default), or with the capture, at the
/// lowest CPU priority until the resume (`COMMITTER_COMPRESS_START=paused`: more cores than the
/// capture needs may make that worth it; on 2 cores it lengthened the pause).
#[derive(Clone, Copy, PartialEq, Eq)]
enum CompressStart {
    Paused,
    Resumed,
}

impl CompressStart {
    fn from_env() -> CompressStart {
        match std::env::var("COMMITTER_COMPRESS_START").as_deref() {
            Ok("paused") => CompressStart::Paused,
            _ => CompressStart::Resumed,
        }
    }
}

/// The compressor, tailing the raw spool (punching out what it consumed, so that the spool holds
/// one copy of the diff), into the layer file.
fn start_compressor(
    req: &LayerRequest<'_>,
    raw: &Growing,
    out: File,
    priority: Priority,
) -> std::io::Result<Compressing> {
    let raw = raw.clone();
    let input =
        move || Box::new(raw.reader(Some(super::spool::PUNCH_STEP))) as Box<dyn Read + Send>;
    // A file the caller keeps is synced; a spool file is only read back.
    let sync = req.dest.output.is_some();
    // Its upload waits for the resume: the network and a registry on this node would take CPU
    // from the paused capture.
    super::compress::start(
        input,
        out,
        req.plan.compress,
        req.media_type.to_string(),
        priority,
        sync,
        true,
    )
}

type Captured = Result<(LayerDescriptor, diff::Stats), CommitError>;

/// A capture, which source made it and why, and how the sandbox was held meanwhile.
struct Held {
    captured: Captured,
    source: DiffSourceKind,
    reason: String,
    paused: freeze::PauseReport,
}

/// The diff against the snapshot's parent, captured while paused; the source is cleaned up
/// after the resume.
async fn capture_paused(
    req: &LayerRequest<'_>,
    mounts: &[SnapshotMount],
    file: GrowingWriter,
    content: Option<diff::ContentHook>,
) -> Result<Held, CommitError> {
    let source = prepare(req.ctr, req.info, mounts, req.plan.diff_source).await?;
    let work = capture(req, mounts, source, file, content);
    let ((captured, source), paused) =
        freeze::while_paused(req.ctr, &req.info.id, req.plan.pause, work).await?;
    let (kind, reason) = match &source {
        Some(s) => (s.kind.kind(), s.reason.clone()),
        None => (DiffSourceKind::Walk, String::new()),
    };
    if let Some(s) = source {
        s.cleanup().await;
    }
    Ok(Held {
        captured,
        source: kind,
        reason,
        paused,
    })
}

/// `--squash`: the container against the original base's layers only, captured while paused:
/// from the stack of upperdirs when they are exact, else (or when the stack's walk meets a
/// redirect or metacopy) from a walk of two read-only views.
async fn capture_squash(
    req: &LayerRequest<'_>,
    target: &super::SquashTarget,
    mounts: &[SnapshotMount],
    file: GrowingWriter,
) -> Result<Held, CommitError> {
    let (ctr, info) = (req.ctr, req.info);
    let first = squash::source(ctr, info, mounts, target, req.plan.diff_source).await?;
    let work = squash_paused(req, target, mounts, first, file);
    let (attempt, paused) = freeze::while_paused(ctr, &info.id, req.plan.pause, work).await?;
    let (captured, source, reason) = attempt?;
    let held = Held {
        captured,
        source: source.kind(),
        reason,
        paused,
    };
    source.cleanup().await;
    Ok(held)
}

/// The paused part of a squash: tar the diff into `file` from the stack, or read the views
/// instead when the stack's walk meets a redirect or metacopy. Hands the source back so it is
/// cleaned up after the resume.
async fn squash_paused(
    req: &LayerRequest<'_>,
    target: &super::SquashTarget,
    mounts: &[SnapshotMount],
    (source, reason): (squash::Squash, String),
    file: GrowingWriter,
) -> Result<(Captured, squash::Squash, String), CommitError> {
    let opts = diff::Options {
        copied_dir_mtimes: squash::copies_trees(mounts),
        ..diff_options(req, mounts)
    };
    let (out, mut file, source) =
        tar_blocking(source, opts.clone(), req.media_type.into(), file).await?;
    let why = match out {
        Err(CommitError::Diff(diff::DiffError::NotExact(why)))
            if matches!(source, squash::Squash::Stack(_)) =>
        {
            why
        }
        out => {
            if out.is_ok() {
                file.finish();
            }
            return Ok((out, source, reason));
        }
    };
    log::info(&format!(
        "upperdir is not exact ({why}); reading the squash by a walk"
    ));
    source.cleanup().await;
    file.rewind()
        .map_err(CommitError::io("rewinding the spool file"))?;
    let views = squash::views(req.ctr, req.info, mounts, target).await?;
    let (out, file, views) = tar_blocking(
        squash::Squash::Views(Box::new(views)),
        opts,
        req.media_type.into(),
        file,
    )
    .await?;
    if out.is_ok() {
        file.finish();
    }
    let reason = squash::walk_reason(target.keep_layers, &why.to_string());
    Ok((out, views, reason))
}

/// The paused part: tar the diff into `file`, falling back from the upperdir to a walk when the
/// upperdir proves inexact. Hands the source back so it is cleaned up after the resume.
async fn capture(
    req: &LayerRequest<'_>,
    mounts: &[SnapshotMount],
    mut source: PreparedSource,
    file: GrowingWriter,
    content: Option<diff::ContentHook>,
) -> (Captured, Option<PreparedSource>) {
    let opts = diff::Options {
        content,
        ..diff_options(req, mounts)
    };
    let mut file = file;
    loop {
        let (out, f, src) =
            match tar_blocking(source, opts.clone(), req.media_type.to_string(), file).await {
                Ok(attempt) => attempt,
                Err(e) => return (Err(e), None),
            };
        (source, file) = (src, f);
        let why = match out {
            Err(CommitError::Diff(diff::DiffError::NotExact(why)))
                if source.kind.kind() == DiffSourceKind::Upperdir =>
            {
                why
            }
            out => {
                if out.is_ok() {
                    file.finish();
                }
                return (out, Some(source));
            }
        };
        log::info(&format!(
            "upperdir is not exact ({why}); reading the diff by a walk"
        ));
        source.cleanup().await;
        if let Err(e) = file.rewind() {
            return (Err(CommitError::io("rewinding the spool file")(e)), None);
        }
        source = match prepare(req.ctr, req.info, mounts, DiffSourceChoice::Walk).await {
            Ok(s) => s,
            Err(e) => return (Err(e.into()), None),
        };
        source.reason = format!("overlay upperdir is not exact: {why}");
    }
}

fn diff_options(req: &LayerRequest<'_>, mounts: &[SnapshotMount]) -> diff::Options {
    diff::Options {
        exclude: req.plan.exclude.clone(),
        include: req.plan.include.clone(),
        skip_mount_stubs: req.info.mount_destinations.clone(),
        source_date_epoch: req.plan.source_date_epoch,
        max_files: req.plan.max_files,
        max_bytes: req.plan.max_layer_bytes,
        // On a `userxattr` mount, user.overlay.* are overlay's markers; elsewhere they are the
        // sandbox's own data.
        userxattr: mounts
            .iter()
            .any(|m| m.options.iter().any(|o| o == "userxattr")),
        keep_xattrs: req.plan.keep_xattrs.clone(),
        max_hole_bytes: req.plan.max_hole_bytes,
        // Only the squash's views of a native snapshotter compare directories without mtime
        // (capture_squash): the append walk keeps every directory's mtime exact.
        copied_dir_mtimes: false,
        content: None,
    }
}

/// What a capture reads: a prepared local source, or a squash's two views.
trait Walkable: Send + 'static {
    fn diff_source(&self) -> diff::Source<'_>;
}

impl Walkable for PreparedSource {
    fn diff_source(&self) -> diff::Source<'_> {
        self.kind.as_diff_source()
    }
}

impl Walkable for squash::Squash {
    fn diff_source(&self) -> diff::Source<'_> {
        self.as_diff_source()
    }
}

type Attempt<S> = (
    Result<(LayerDescriptor, diff::Stats), CommitError>,
    GrowingWriter,
    S,
);

/// One read of the diff on a blocking thread: tar → diff_id → file. Hands the file and the
/// source back whatever happened, so the caller can retry or clean up.
async fn tar_blocking<S: Walkable>(
    source: S,
    opts: diff::Options,
    media_type: String,
    mut file: GrowingWriter,
) -> Result<Attempt<S>, CommitError> {
    tokio::task::spawn_blocking(move || {
        let _reading = crate::progress::reading_thread();
        let mut run = || -> Result<_, CommitError> {
            let what = "writing the layer to the spool";
            let plain = CompressOptions {
                compression: Compression::None,
                level: None,
                threads: 1,
            };
            let sink = BufWriter::with_capacity(BUF, &mut file);
            let w = LayerWriter::new(sink, &plain, &media_type).map_err(CommitError::io(what))?;
            let (w, stats) = diff::write_layer(&source.diff_source(), &opts, w)?;
            let finished = w.finish().map_err(CommitError::io(what))?;
            finished
                .sink
                .into_inner()
                .map_err(|e| CommitError::io(what)(e.into_error()))?;
            Ok((finished.descriptor, stats))
        };
        let out = run();
        (out, file, source)
    })
    .await
    .map_err(|e| CommitError::Task {
        what: "the diff reader",
        detail: e.to_string(),
    })
}

fn create(path: &Path) -> Result<File, CommitError> {
    File::create(path).map_err(CommitError::io(format!("creating {}", path.display())))
}

fn spool_file(dir: &Path, prefix: &str) -> Result<(File, LayerFile), CommitError> {
    let f = tempfile::Builder::new()
        .prefix(prefix)
        .tempfile_in(dir)
        .map_err(CommitError::io(format!(
            "creating a spool file in {} (see --spool-dir)",
            dir.display()
        )))?;
    // Deleted by the supervisor if this process dies before the TempPath's drop can.
    crate::guard::tell_owned_path(f.path());
    let (file, path) = f.into_parts();
    Ok((file, LayerFile::Temp(path)))
}
