//! Where a squashing commit reads the one layer that replaces every snapshot layer since the
//! *original base*.
//!
//! - On overlayfs with exact upperdirs: the **stack** of the container's upperdir over the
//!   lowerdirs of the snapshot layers committed since the base, merged as overlay merges them
//!   and diffed against the base's lowerdirs by name lookups (cost ∝ the stack, see
//!   `diff::Source::Uppers`).
//! - Otherwise (redirect_dir, metacopy, index=on, an option we do not know, the native
//!   snapshotter, or `--diff-source walk`): two read-only **views**, the original base alone and
//!   the container as it is now, walked side by side (cost ∝ the whole tree). They are exact
//!   with any overlay mode (the kernel resolves redirects, metacopy and opaque dirs as the
//!   sandbox saw them), and for the native snapshotter the base is a view of its chain-ID
//!   snapshot. The stack's walk also stops with `NotExact` on a redirect or metacopy xattr it
//!   meets; the caller then reads the views instead, in the same pause.
//!
//! Which lowerdirs belong to the base is a pure function, tested without mounts.

use super::{DiffSourceChoice, DiffSourceKind, SnapshotView, SourceError, SquashTarget, TempMount};
use crate::containerd::lookup::{ContainerInfo, SnapshotMount};
use crate::containerd::{Containerd, ContainerdError};
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
    #[error("mounting a read-only view at {target}")]
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

/// The squash's source: the stack of upperdirs, or the two views.
pub enum Squash {
    Stack(SquashStack),
    Views(Box<SquashViews>),
}

/// The container's upperdir over the snapshot layers above the original base (topmost first),
/// and the base's lowerdirs.
pub struct SquashStack {
    pub uppers: Vec<PathBuf>,
    pub lowers: Vec<PathBuf>,
}

impl Squash {
    pub fn as_diff_source(&self) -> crate::diff::Source<'_> {
        match self {
            Squash::Stack(s) => crate::diff::Source::Uppers {
                uppers: &s.uppers,
                lowers: &s.lowers,
            },
            Squash::Views(v) => v.as_diff_source(),
        }
    }

    pub fn kind(&self) -> DiffSourceKind {
        match self {
            Squash::Stack(_) => DiffSourceKind::Upperdir,
            Squash::Views(_) => DiffSourceKind::Walk,
        }
    }

    pub async fn cleanup(self) {
        if let Squash::Views(v) = self {
            v.cleanup().await;
        }
    }
}

/// The fastest exact squash source for this container, and why it was picked. `choice` is
/// `--diff-source`: `walk` always reads the views, `upperdir` refuses inexact upperdirs.
pub async fn source(
    ctr: &Containerd,
    info: &ContainerInfo,
    mounts: &[SnapshotMount],
    target: &SquashTarget,
    choice: DiffSourceChoice,
) -> Result<(Squash, String), SquashError> {
    let (image_layers, keep) = (target.image_layers, target.keep_layers);
    let why_not = match (choice, mounts) {
        (DiffSourceChoice::Walk, _) => "--diff-source walk".to_string(),
        (_, [m]) if m.kind == "overlay" => match stack(m, image_layers, keep) {
            Ok(s) => {
                let reason = format!(
                    "--squash: the upperdir and {} snapshot layers merged against the original base's {keep} layers",
                    s.uppers.len() - 1
                );
                return Ok((Squash::Stack(s), reason));
            }
            Err(why) if choice == DiffSourceChoice::Upperdir => {
                return Err(SquashError::Unsupported {
                    id: info.id.clone(),
                    detail: format!(
                        "an upperdir that is not exact ({why}) with --diff-source upperdir"
                    ),
                })
            }
            Err(why) => why,
        },
        _ => "not an overlay snapshot".to_string(),
    };
    let views = views(ctr, info, mounts, target).await?;
    Ok((Squash::Views(Box::new(views)), walk_reason(keep, &why_not)))
}

/// The snapshotter copies trees (native: a bind mount of a directory that containerd filled by
/// copying its parent), so directory mtimes say when it copied them.
pub fn copies_trees(mounts: &[SnapshotMount]) -> bool {
    mounts.iter().any(|m| m.kind == "bind" || m.kind == "rbind")
}

/// Why the views were read instead of the stack.
pub fn walk_reason(keep_layers: usize, why_not: &str) -> String {
    format!("--squash: a walk against the original base's {keep_layers} layers ({why_not})")
}

/// The stack for an overlay mount whose upperdirs are exact, or why not (a mount the views
/// cannot read either fails there, with its own error).
fn stack(m: &SnapshotMount, image_layers: usize, keep: usize) -> Result<SquashStack, String> {
    let lowers: Vec<PathBuf> = option(m, "lowerdir=")
        .map(|l| l.split(':').map(PathBuf::from).collect())
        .unwrap_or_default();
    let upper = option(m, "upperdir=")
        .map(PathBuf::from)
        .ok_or("an overlay without an upperdir")?;
    let base = base_lowers(&lowers, image_layers, keep)
        .ok_or("the lowerdirs do not match the image's layers")?;
    // index=on lets a copied-up lower hardlink be seen through names the uppers do not show.
    if m.options.iter().any(|o| o == "index=on") {
        return Err("mount option \"index=on\"".into());
    }
    crate::diff::upperdir_is_exact(&upper, &m.options).map_err(|why| why.to_string())?;
    let mut uppers = vec![upper];
    uppers.extend_from_slice(&lowers[..lowers.len() - base.len()]);
    Ok(SquashStack {
        uppers,
        lowers: base.to_vec(),
    })
}

// The walk's view options serve the squash views too.
use super::view_options;

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
    view: Option<SnapshotView>,
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
        if let Some(view) = self.view.take() {
            view.remove().await;
        }
    }
}

/// Prepares the views for a squashing commit: the original base (`target.keep_layers` of the
/// image's `target.image_layers`, chain ID `target.base_chain_id`) and the container.
pub async fn views(
    ctr: &Containerd,
    info: &ContainerInfo,
    mounts: &[SnapshotMount],
    target: &SquashTarget,
) -> Result<SquashViews, SquashError> {
    let unsupported = |detail: String| SquashError::Unsupported {
        id: info.id.clone(),
        detail,
    };
    let [m] = mounts else {
        return Err(unsupported(format!("{} mounts", mounts.len())));
    };
    match m.kind.as_str() {
        "overlay" => overlay_views(info, m, target.image_layers, target.keep_layers),
        "bind" | "rbind" => bind_views(ctr, info, m, &target.base_chain_id).await,
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
        view: None,
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
    let view = SnapshotView::new(ctr, info, "squash", base_chain_id).await?;
    match view.mounts.as_slice() {
        [v] if (v.kind == "bind" || v.kind == "rbind") && Path::new(&v.source).is_dir() => {
            let lower = Some(PathBuf::from(&v.source));
            Ok(SquashViews {
                lower,
                upper,
                mounts: vec![],
                view: Some(view),
            })
        }
        other => {
            let detail = format!(
                "a base view of {} mounts ({:?})",
                other.len(),
                other.first().map(|m| &m.kind)
            );
            view.remove().await;
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
