//! containerd's Diff service as a layer source (socket-only mode): containerd diffs a read-only
//! view of the parent snapshot against the container's mounts and writes the compressed layer
//! into its content store, under our lease. Needs no snapshotter mount and no CAP_SYS_ADMIN
//! here; cannot apply `--exclude`, `--include`, `--source-date-epoch`, the limits or
//! `--keep-xattrs`, which are refused (`refuse_local_only_flags`).

use super::prepare::SnapshotView;
use super::{
    BlobLocation, CaptureReport, DiffSourceChoice, FinishedLayer, LayerBlob, LayerRequest,
    SourceError, SourcePlan,
};
use crate::error::CommitError;
use crate::layer::LayerDescriptor;
use crate::media;
use crate::{diff, freeze};

/// sha256 of an empty tar (two zero blocks): what a differ writes for "no changes".
const EMPTY_TAR_DIFF_ID: &str =
    "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";

pub(super) async fn read(
    req: &LayerRequest<'_>,
    reason: String,
) -> Result<FinishedLayer, CommitError> {
    refuse_local_only_flags(req.plan)?;
    let (ctr, info) = (req.ctr, req.info);
    let upper = ctr.snapshot_mounts(info).await?;
    // The parent's view (none for a parentless snapshot: everything is new).
    let view = SnapshotView::of_parent(ctr, info).await?;
    let parent = view.as_ref().map_or(&[][..], |v| &v.mounts[..]);
    let reference = format!("committer-{}-{}", info.id, std::process::id());
    let work = ctr.diff_in_containerd(parent, &upper, oci_type(req.media_type), &reference);
    let result = freeze::while_paused(ctr, &info.id, req.plan.pause, work).await;
    if let Some(view) = view {
        view.remove().await;
    }
    let (stored, paused) = result?;
    let stored = stored?;
    let layer = (stored.diff_id.as_str() != EMPTY_TAR_DIFF_ID).then(|| LayerDescriptor {
        digest: stored.digest,
        diff_id: stored.diff_id,
        size: stored.size,
        media_type: req.media_type.to_string(),
    });
    let capture = CaptureReport {
        stats: diff::Stats {
            source: "containerd",
            ..Default::default()
        },
        paused,
        source: super::DiffSourceKind::Containerd,
        reason,
    };
    Ok(capture.finished(LayerBlob {
        desc: layer,
        location: BlobLocation::ContentStore,
    }))
}

/// Flags containerd's differ cannot apply (it would silently ignore them: a limit not enforced, an
/// exclusion not made) are refused before the sandbox is touched, naming those given.
pub(super) fn refuse_local_only_flags(plan: &SourcePlan) -> Result<(), SourceError> {
    let given: Vec<&str> = [
        ("--exclude", !plan.exclude.is_empty()),
        ("--include", !plan.include.is_empty()),
        ("--source-date-epoch", plan.source_date_epoch.is_some()),
        ("--max-layer-bytes", plan.max_layer_bytes.is_some()),
        ("--max-files", plan.max_files.is_some()),
        ("--keep-xattrs", !plan.keep_xattrs.is_empty()),
        ("--max-hole-bytes", plan.max_hole_bytes.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, set)| set.then_some(flag))
    .collect();
    if given.is_empty() {
        return Ok(());
    }
    let advice = match plan.diff_source {
        DiffSourceChoice::Auto => "--diff-source auto uses it because the snapshot is not readable here: mount the snapshotter's root at the same path, or drop them",
        _ => "use --diff-source auto, upperdir or walk, or drop them",
    };
    Err(SourceError::NeedsLocalSource {
        flags: given.join(", "),
        advice,
    })
}

/// containerd names compressions by OCI media types; Docker's gzip and tar types are the same bytes.
fn oci_type(media_type: &str) -> &str {
    match media_type {
        media::DOCKER_LAYER_GZIP => media::OCI_LAYER_GZIP,
        media::DOCKER_LAYER_TAR => media::OCI_LAYER_TAR,
        other => other,
    }
}

/// Copies a layer the differ left in the content store to a local file (`committer diff`).
pub async fn copy_stored_blob(
    ctr: &crate::containerd::Containerd,
    digest: &crate::digest::Digest,
    path: &std::path::Path,
) -> Result<(), CommitError> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let what = format!(
        "copying {digest} from containerd's content store to {}",
        path.display()
    );
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(CommitError::io(what.clone()))?;
    let mut stream = std::pin::pin!(ctr.blob_stream(digest).await?);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(CommitError::io(what.clone()))?;
        file.write_all(&chunk)
            .await
            .map_err(CommitError::io(what.clone()))?;
    }
    file.sync_all().await.map_err(CommitError::io(what))
}
