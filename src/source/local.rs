//! A local source (upperdir or walk) read into the spool. The container is paused only while the
//! uncompressed tar is captured (its diff_id hashed on the way); compression runs from the
//! capture after the resume (bench: gzip while paused cost ~15 s of pause per GiB, the copy
//! alone ~2 s). When the upperdir turns out not to be exact mid-read, the capture is rewound and
//! the diff is read again by a walk, inside the same pause.

use super::prepare::{prepare, PreparedSource};
use super::reflink::{self, CaptureKind};
use super::{BlobLocation, DiffSourceChoice, FinishedLayer, LayerFile, LayerRequest};
use crate::containerd::lookup::SnapshotMount;
use crate::digest::Digest;
use crate::error::CommitError;
use crate::image::Compression;
use crate::layer::{CompressOptions, LayerDescriptor, LayerWriter};
use crate::{diff, freeze, log, squash};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

const BUF: usize = 1 << 20;

/// The uncompressed tar, as captured while paused.
struct Capture {
    file: File,
    path: LayerFile,
    desc: LayerDescriptor,
    stats: diff::Stats,
}

pub(super) async fn read(req: &LayerRequest<'_>) -> Result<FinishedLayer, CommitError> {
    let compressed = req.plan.compress.compression != Compression::None;
    let mounts = req.ctr.snapshot_mounts(req.info).await?;
    // A squash reads through overlay views: its captures copy.
    let clones = match req.squash {
        None => reflink::choose(&req.dest.spool_dir, reflink::data_dir(&mounts).as_deref()),
        Some(_) => None,
    };
    // Uncompressed, the capture is the layer: straight into the caller's file when there is one.
    let (file, path) = match (&req.dest.output, compressed, &clones) {
        (Some(out), false, None) => (create(out)?, LayerFile::Kept(out.clone())),
        _ => spool_file(&req.dest.spool_dir, ".committer-tar-")?,
    };
    super::spool::check_room(req.ctr, req.info, &mounts, &req.dest.spool_dir).await?;
    let hook = clones.as_ref().map(|(c, _)| c.hook());
    let (captured, kind, reason, mut paused) = match &req.squash {
        None => capture_paused(req, &mounts, file, hook).await?,
        Some(target) => capture_squash(req, target, &mounts, file).await?,
    };
    paused.capture = Some(clones.as_ref().map_or(CaptureKind::Copy, |(_, k)| *k));
    let (file, mut desc, stats) = captured?;
    if let Some((c, _)) = &clones {
        // The recipe lacks the cloned contents; the layer has them.
        desc.size += c.stored_bytes();
    }
    // --max-layer-bytes bounds the layer itself (the tar with its headers and padding), not only
    // the file content the diff counted while reading.
    if let Some(limit) = req.plan.max_layer_bytes.filter(|l| desc.size > *l) {
        return Err(diff::DiffError::LimitExceeded {
            what: "bytes (uncompressed layer, --max-layer-bytes)",
            limit,
        }
        .into());
    }
    let capture = Capture {
        file,
        path,
        desc,
        stats,
    };
    let (layer, blob) = match (capture.stats.entries, compressed, clones) {
        (0, _, _) => (None, BlobLocation::File(capture.path)),
        (_, _, Some((clones, _))) => {
            let (desc, path) = reflink::compress_assembled(req, clones, capture.file).await?;
            (Some(desc), BlobLocation::File(path))
        }
        (_, false, None) => (Some(capture.desc), BlobLocation::File(capture.path)),
        (_, true, None) => {
            let (desc, path) = compress(req, capture.file, capture.desc.diff_id).await?;
            (Some(desc), BlobLocation::File(path))
        }
    };
    Ok(FinishedLayer {
        layer,
        blob,
        stats: capture.stats,
        paused,
        source: kind,
        reason,
    })
}

type Captured = Result<(File, LayerDescriptor, diff::Stats), CommitError>;

/// A capture, which source made it and why, and how the sandbox was held meanwhile.
type Held = (Captured, super::DiffSourceKind, String, freeze::PauseReport);

/// The diff against the snapshot's parent, captured while paused; the source is cleaned up
/// after the resume.
async fn capture_paused(
    req: &LayerRequest<'_>,
    mounts: &[SnapshotMount],
    file: File,
    content: Option<diff::ContentHook>,
) -> Result<Held, CommitError> {
    let source = prepare(req.ctr, req.info, mounts, req.plan.diff_source).await?;
    let work = capture(req, mounts, source, file, content);
    let ((captured, source), paused) =
        freeze::while_paused(req.ctr, &req.info.id, req.plan.pause, work).await?;
    let (kind, reason) = match &source {
        Some(s) => (s.kind.kind(), s.reason.clone()),
        None => (super::DiffSourceKind::Walk, String::new()),
    };
    if let Some(s) = source {
        s.cleanup().await;
    }
    Ok((captured, kind, reason, paused))
}

/// `--squash`: the container against the original base's layers only, captured while paused:
/// from the stack of upperdirs when they are exact, else (or when the stack's walk meets a
/// redirect or metacopy) from a walk of two read-only views.
async fn capture_squash(
    req: &LayerRequest<'_>,
    target: &super::SquashTarget,
    mounts: &[SnapshotMount],
    file: File,
) -> Result<Held, CommitError> {
    let (ctr, info) = (req.ctr, req.info);
    let (layers, plan) = (target.image_layers, &target.plan);
    let choice = req.plan.diff_source;
    let (source, reason) = squash::source(ctr, info, mounts, layers, plan, choice).await?;
    let opts = diff::Options {
        copied_dir_mtimes: squash::copies_trees(mounts),
        ..diff_options(req, mounts)
    };
    let work = async {
        let (out, file, source) =
            tar_blocking(source, opts.clone(), req.media_type.into(), file).await?;
        let why = match out {
            Err(CommitError::Diff(diff::DiffError::NotExact(why)))
                if matches!(source, squash::Squash::Stack(_)) =>
            {
                why
            }
            out => return Ok((out.map(|(d, s)| (file, d, s)), source, reason)),
        };
        log::info(&format!(
            "upperdir is not exact ({why}); reading the squash by a walk"
        ));
        rewind(&file)?;
        let views = squash::views(ctr, info, mounts, layers, plan).await?;
        let (out, file, views) = tar_blocking(
            squash::Squash::Views(Box::new(views)),
            opts,
            req.media_type.into(),
            file,
        )
        .await?;
        let reason = squash::walk_reason(plan.keep_layers, &why.to_string());
        Ok::<_, CommitError>((out.map(|(d, s)| (file, d, s)), views, reason))
    };
    let (attempt, paused) = freeze::while_paused(ctr, &info.id, req.plan.pause, work).await?;
    let (captured, source, reason) = attempt?;
    let kind = source.kind();
    source.cleanup().await;
    Ok((captured, kind, reason, paused))
}

/// The paused part: tar the diff into `file`, falling back from the upperdir to a walk when the
/// upperdir proves inexact. Hands the source back so it is cleaned up after the resume.
async fn capture(
    req: &LayerRequest<'_>,
    mounts: &[SnapshotMount],
    mut source: PreparedSource,
    file: File,
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
                if source.kind.kind() == super::DiffSourceKind::Upperdir =>
            {
                why
            }
            out => return (out.map(|(d, s)| (file, d, s)), Some(source)),
        };
        log::info(&format!(
            "upperdir is not exact ({why}); reading the diff by a walk"
        ));
        source.cleanup().await;
        if let Err(e) = rewind(&file) {
            return (Err(e), None);
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

type Attempt<S> = (Result<(LayerDescriptor, diff::Stats), CommitError>, File, S);

/// One read of the diff on a blocking thread: tar → diff_id → file. Hands the file and the
/// source back whatever happened, so the caller can retry or clean up.
async fn tar_blocking<S: Walkable>(
    source: S,
    opts: diff::Options,
    media_type: String,
    file: File,
) -> Result<Attempt<S>, CommitError> {
    let handle = file
        .try_clone()
        .map_err(CommitError::io("duplicating the spool file handle"))?;
    tokio::task::spawn_blocking(move || {
        let run = || -> Result<_, CommitError> {
            let what = "writing the layer to the spool";
            let plain = CompressOptions {
                compression: Compression::None,
                level: None,
                threads: 1,
            };
            let sink = BufWriter::with_capacity(BUF, file);
            let w = LayerWriter::new(sink, &plain, &media_type).map_err(CommitError::io(what))?;
            let (w, stats) = diff::write_layer(&source.diff_source(), &opts, w)?;
            let finished = w.finish().map_err(CommitError::io(what))?;
            finished
                .sink
                .into_inner()
                .map_err(|e| CommitError::io(what)(e.into_error()))?;
            Ok((finished.descriptor, stats))
        };
        (run(), handle, source)
    })
    .await
    .map_err(|e| CommitError::Task {
        what: "the diff reader",
        detail: e.to_string(),
    })
}

/// Compresses the capture into the layer file on a blocking thread, checking that the bytes read
/// back still hash to the diff_id taken while they were written (a full or failing disk shows here).
async fn compress(
    req: &LayerRequest<'_>,
    raw: File,
    diff_id: Digest,
) -> Result<(LayerDescriptor, LayerFile), CommitError> {
    let (out, path) = match &req.dest.output {
        Some(p) => (create(p)?, LayerFile::Kept(p.clone())),
        None => spool_file(&req.dest.spool_dir, ".committer-layer-")?,
    };
    let (opts, media_type) = (req.plan.compress, req.media_type.to_string());
    let desc = tokio::task::spawn_blocking(move || {
        let what = "compressing the layer from the tar spool";
        let mut raw = raw;
        raw.seek(SeekFrom::Start(0))
            .map_err(CommitError::io(what))?;
        let sink = BufWriter::with_capacity(BUF, out);
        let mut w = LayerWriter::new(sink, &opts, &media_type).map_err(CommitError::io(what))?;
        consume(&raw, &mut w).map_err(CommitError::io(what))?;
        let finished = w.finish().map_err(CommitError::io(what))?;
        let file = finished
            .sink
            .into_inner()
            .map_err(|e| CommitError::io(what)(e.into_error()))?;
        file.sync_data().map_err(CommitError::io(what))?;
        if finished.descriptor.diff_id != diff_id {
            return Err(CommitError::SpoolCorrupt {
                written: diff_id,
                read: finished.descriptor.diff_id,
            });
        }
        Ok(finished.descriptor)
    })
    .await
    .map_err(|e| CommitError::Task {
        what: "the compressor",
        detail: e.to_string(),
    })??;
    Ok((desc, path))
}

/// Copies the capture into the compressor, giving each consumed 8 MiB back to the filesystem so
/// that the spool holds one copy of the diff (see `spool`).
fn consume(raw: &File, w: &mut impl Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUF];
    let (mut read, mut released) = (0u64, 0u64);
    loop {
        let n = match (&*raw).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // The compressor copies what it is handed: those bytes are no longer needed on disk.
        w.write_all(&buf[..n])?;
        read += n as u64;
        if read - released >= super::spool::PUNCH_STEP {
            super::spool::release(raw, released, read);
            released = read;
        }
    }
    Ok(())
}

pub(super) fn create(path: &Path) -> Result<File, CommitError> {
    File::create(path).map_err(CommitError::io(format!("creating {}", path.display())))
}

pub(super) fn spool_file(dir: &Path, prefix: &str) -> Result<(File, LayerFile), CommitError> {
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

fn rewind(file: &File) -> Result<(), CommitError> {
    file.set_len(0)
        .map_err(CommitError::io("truncating the spool file"))?;
    (&*file)
        .seek(SeekFrom::Start(0))
        .map_err(CommitError::io("rewinding the spool file"))?;
    Ok(())
}
