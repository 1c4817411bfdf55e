//! The two read-only trees a squashing commit diffs: the *original base* alone, and the
//! container as it is now (earlier snapshot layers + its own writes). Their double walk is the
//! one layer that replaces every snapshot layer: exact with any overlay mode (the views are
//! mounted by the kernel, so redirects, metacopy and opaque dirs resolve as the sandbox saw
//! them), and for the native snapshotter through a view of the original base's chain-ID
//! snapshot. Which lowerdirs belong to the base is a pure function, tested without mounts.

use crate::containerd::lookup::{ContainerInfo, SnapshotMount};
use crate::containerd::{Containerd, ContainerdError};
use crate::image::ChainPlan;
use crate::source::{SourceError, TempMount};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SquashError {
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error("container {id:?}: its snapshot has {lowers} lower layers but its image {layers}; cannot tell which are the original base's (commit without squashing)")]
    LayerMismatch {
        id: String,
        lowers: usize,
        layers: usize,
    },
    #[error("container {id:?}: cannot squash a snapshot mounted as {detail}")]
    Unsupported { id: String, detail: String },
    #[error("{path} (from the snapshot's mounts) is not visible here: mount the snapshotter root at the same path")]
    NotVisible { path: PathBuf },
    #[error("mounting a read-only view at {target}: {source}")]
    Mount {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The lowerdirs (immediate parent first, as in `lowerdir=`) that hold the image's first
/// `base_layers` layers: the last ones. containerd gives each image layer its own snapshot, so
/// a container of an image with `image_layers` layers has exactly that many lowerdirs.
pub fn base_lowers(
    lowers: &[PathBuf],
    image_layers: usize,
    base_layers: usize,
) -> Option<&[PathBuf]> {
    (lowers.len() == image_layers && base_layers <= image_layers)
        .then(|| &lowers[image_layers - base_layers..])
}

/// The walk's view options serve the squash views too.
pub use crate::source::view_options;

fn option<'a>(m: &'a SnapshotMount, name: &str) -> Option<&'a str> {
    m.options.iter().find_map(|o| o.strip_prefix(name))
}

/// The two views; dropping them unmounts, `cleanup` also removes the snapshot view.
pub struct SquashViews {
    /// The original base's tree (None: the base has no layers).
    pub lower: Option<PathBuf>,
    /// The container's tree.
    pub upper: PathBuf,
    mounts: Vec<TempMount>,
    view_key: Option<(Containerd, String, String)>,
}

impl SquashViews {
    /// The walk that yields the squashed layer.
    pub fn as_diff_source(&self) -> crate::diff::Source<'_> {
        crate::diff::Source::Walk {
            lower: self.lower.as_deref(),
            upper: &self.upper,
        }
    }

    pub async fn cleanup(mut self) {
        self.mounts.clear();
        if let Some((ctr, snapshotter, key)) = self.view_key.take() {
            let _ = ctr.remove_snapshot(&snapshotter, &key).await;
        }
    }
}

/// Prepares the views for a squashing commit of a container whose image has `image_layers`
/// layers, `plan.keep_layers` of them the original base's (chain ID `plan.original.chain_id`).
pub async fn views(
    ctr: &Containerd,
    info: &ContainerInfo,
    mounts: &[SnapshotMount],
    image_layers: usize,
    plan: &ChainPlan,
) -> Result<SquashViews, SquashError> {
    let unsupported = |detail: String| SquashError::Unsupported {
        id: info.id.clone(),
        detail,
    };
    let [m] = mounts else {
        return Err(unsupported(format!("{} mounts", mounts.len())));
    };
    match m.kind.as_str() {
        "overlay" => overlay_views(info, m, image_layers, plan.keep_layers),
        "bind" | "rbind" => bind_views(ctr, info, m, &plan.original.chain_id).await,
        other => Err(unsupported(format!("a mount of type {other:?}"))),
    }
}

fn overlay_views(
    info: &ContainerInfo,
    m: &SnapshotMount,
    image_layers: usize,
    base_layers: usize,
) -> Result<SquashViews, SquashError> {
    let lowers: Vec<PathBuf> = option(m, "lowerdir=")
        .map(|l| l.split(':').map(PathBuf::from).collect())
        .unwrap_or_default();
    let upper =
        option(m, "upperdir=")
            .map(PathBuf::from)
            .ok_or_else(|| SquashError::Unsupported {
                id: info.id.clone(),
                detail: "an overlay without an upperdir (a read-only view)".into(),
            })?;
    if !upper.is_dir() {
        return Err(SquashError::NotVisible { path: upper });
    }
    let base =
        base_lowers(&lowers, image_layers, base_layers).ok_or(SquashError::LayerMismatch {
            id: info.id.clone(),
            lowers: lowers.len(),
            layers: image_layers,
        })?;
    let extra = view_options(&m.options);
    let mut mounts = Vec::new();
    let lower = match base {
        [] => None,
        [one] => Some(one.clone()),
        many => {
            let v = TempMount::overlay_of(many, &extra).map_err(mount_error)?;
            let p = v.path().to_path_buf();
            mounts.push(v);
            Some(p)
        }
    };
    let mut all = vec![upper];
    all.extend(lowers);
    let merged = TempMount::overlay_of(&all, &extra).map_err(mount_error)?;
    let upper = merged.path().to_path_buf();
    mounts.push(merged);
    Ok(SquashViews {
        lower,
        upper,
        mounts,
        view_key: None,
    })
}

/// Native snapshotter: the container's tree is the bind source; the original base is a view
/// of the snapshot containerd committed for its layers, named by their chain ID.
async fn bind_views(
    ctr: &Containerd,
    info: &ContainerInfo,
    m: &SnapshotMount,
    base_chain_id: &str,
) -> Result<SquashViews, SquashError> {
    let upper = PathBuf::from(&m.source);
    if !upper.is_dir() {
        return Err(SquashError::NotVisible { path: upper });
    }
    let key = format!("committer-squash-{}-{}", info.id, std::process::id());
    let view = ctr
        .view_snapshot(&info.snapshotter, &key, base_chain_id)
        .await?;
    let views = SquashViews {
        lower: None,
        upper,
        mounts: vec![],
        view_key: Some((ctr.clone(), info.snapshotter.clone(), key)),
    };
    match view.as_slice() {
        [v] if (v.kind == "bind" || v.kind == "rbind") && Path::new(&v.source).is_dir() => {
            Ok(SquashViews {
                lower: Some(PathBuf::from(&v.source)),
                ..views
            })
        }
        other => {
            let detail = format!(
                "a base view of {} mounts ({:?})",
                other.len(),
                other.first().map(|m| &m.kind)
            );
            views.cleanup().await;
            Err(SquashError::Unsupported {
                id: info.id.clone(),
                detail,
            })
        }
    }
}

/// The views are mounted by the walk's mount type; its errors name the mount point.
fn mount_error(e: SourceError) -> SquashError {
    match e {
        SourceError::Mount { target, source } => SquashError::Mount { target, source },
        other => SquashError::Mount {
            target: std::env::temp_dir(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(n: usize) -> Vec<PathBuf> {
        // Immediate parent first: the top layer (n-1) comes first.
        (0..n)
            .rev()
            .map(|i| PathBuf::from(format!("/s/{i}")))
            .collect()
    }

    #[test]
    fn the_base_lowers_are_the_last_ones() {
        let lowers = dirs(5);
        let base = base_lowers(&lowers, 5, 2).unwrap();
        assert_eq!(base, [PathBuf::from("/s/1"), PathBuf::from("/s/0")]);
        assert_eq!(base_lowers(&lowers, 5, 5).unwrap().len(), 5);
        assert!(base_lowers(&lowers, 5, 0).unwrap().is_empty());
    }

    #[test]
    fn lowers_that_do_not_match_the_image_are_refused() {
        assert!(base_lowers(&dirs(4), 5, 2).is_none());
        assert!(base_lowers(&dirs(5), 5, 6).is_none());
    }

    #[test]
    fn views_follow_redirects_and_metacopy_when_the_container_used_them() {
        let opts = |o: &[&str]| view_options(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(opts(&["index=off", "redirect_dir=off"]).is_empty());
        assert_eq!(opts(&["redirect_dir=on"]), ["redirect_dir=follow"]);
        assert_eq!(
            opts(&["metacopy=on"]),
            ["metacopy=on", "redirect_dir=follow"]
        );
    }
}
