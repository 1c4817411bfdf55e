//! containerd's Diff service as a layer source (socket-only mode): containerd diffs a read-only
//! view of the parent snapshot against the container's mounts and writes the compressed layer
//! into its content store, under our lease. Needs no snapshotter mount and no CAP_SYS_ADMIN
//! here; cannot apply `--exclude` or `--source-date-epoch`.

use super::prepare::SnapshotView;
use super::{BlobLocation, CaptureReport, FinishedLayer, LayerBlob, LayerRequest, SourceError};
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
    if !req.plan.exclude.is_empty()
        || !req.plan.include.is_empty()
        || req.plan.source_date_epoch.is_some()
    {
        return Err(SourceError::NeedsLocalSource {
            flags: "--exclude, --include and --source-date-epoch",
        }
        .into());
    }
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
