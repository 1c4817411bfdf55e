//! Preparing a local diff source from the snapshot's mounts: the overlay upperdir when it alone
//! is exact; otherwise a double walk of a read-only view of the parent and a read-only view of
//! the container's tree (native snapshotter, redirect_dir, metacopy, blind to trusted.*).
//! Owns the temporary read-only mounts and snapshot views that the walk needs, and removes them.

use super::{DiffSourceChoice, DiffSourceKind, SourceError};
use crate::containerd::lookup::{ContainerInfo, SnapshotMount};
use crate::containerd::{Containerd, ContainerdError};
use std::path::{Path, PathBuf};

/// The prepared source. Dropping it unmounts what it mounted.
pub struct PreparedSource {
    pub kind: SourceKind,
    /// Why this source was picked (reported in the result).
    pub reason: String,
    mounts: Vec<TempMount>,
    view: Option<SnapshotView>,
}

pub enum SourceKind {
    Upperdir {
        upper: PathBuf,
        lowers: Vec<PathBuf>,
    },
    Walk {
        lower: Option<PathBuf>,
        upper: PathBuf,
    },
}

impl SourceKind {
    pub fn kind(&self) -> DiffSourceKind {
        match self {
            SourceKind::Upperdir { .. } => DiffSourceKind::Upperdir,
            SourceKind::Walk { .. } => DiffSourceKind::Walk,
        }
    }

    pub fn as_diff_source(&self) -> crate::diff::Source<'_> {
        match self {
            SourceKind::Upperdir { upper, lowers } => {
                crate::diff::Source::Upperdir { upper, lowers }
            }
            SourceKind::Walk { lower, upper } => crate::diff::Source::Walk {
                lower: lower.as_deref(),
                upper,
            },
        }
    }
}

impl PreparedSource {
    /// Removes the temporary snapshot view (the mounts go on drop).
    pub async fn cleanup(mut self) {
        self.mounts.clear();
        if let Some(view) = self.view.take() {
            view.remove().await;
        }
    }
}

/// Picks and prepares the source for this container.
pub async fn prepare(
    ctr: &Containerd,
    info: &ContainerInfo,
    mounts: &[SnapshotMount],
    choice: DiffSourceChoice,
) -> Result<PreparedSource, SourceError> {
    let unsupported = |detail: String| SourceError::Unsupported {
        id: info.id.clone(),
        snapshotter: info.snapshotter.clone(),
        detail,
    };
    let [m] = mounts else {
        return Err(unsupported(format!("{} mounts", mounts.len())));
    };
    match m.kind.as_str() {
        "overlay" => overlay_source(info, m, choice),
        "bind" | "rbind" => bind_source(ctr, info, m).await,
        other => Err(unsupported(format!("a mount of type {other:?}"))),
    }
}

fn overlay_source(
    info: &ContainerInfo,
    m: &SnapshotMount,
    choice: DiffSourceChoice,
) -> Result<PreparedSource, SourceError> {
    let opt = |name: &str| {
        m.options
            .iter()
            .find_map(|o| o.strip_prefix(name).map(str::to_string))
    };
    let lowers: Vec<PathBuf> = opt("lowerdir=")
        .map(|l| l.split(':').map(PathBuf::from).collect())
        .unwrap_or_default();
    let Some(upper) = opt("upperdir=").map(PathBuf::from) else {
        // A read-only overlay (a view): nothing was written.
        return Err(SourceError::Unsupported {
            id: info.id.clone(),
            snapshotter: info.snapshotter.clone(),
            detail: "an overlay mount without an upperdir (a read-only view)".into(),
        });
    };
    if !upper.is_dir() {
        return Err(SourceError::NotVisible { path: upper });
    }
    let exact = crate::diff::upperdir_is_exact(&upper, &m.options);
    match (choice, exact) {
        (DiffSourceChoice::Upperdir | DiffSourceChoice::Auto, Ok(())) => Ok(PreparedSource {
            kind: SourceKind::Upperdir { upper, lowers },
            reason: "overlay upperdir is exact".into(),
            mounts: vec![],
            view: None,
        }),
        (DiffSourceChoice::Upperdir, Err(why)) => Err(SourceError::UpperdirNotExact {
            id: info.id.clone(),
            why: why.to_string(),
        }),
        (_, exact) => {
            let reason = match exact {
                Ok(()) => "--diff-source walk".to_string(),
                Err(why) => format!("overlay upperdir is not exact: {why}"),
            };
            overlay_walk(&upper, &lowers, &m.options, reason)
        }
    }
}

/// Read-only views for a walk over an overlay snapshot: the parent as `lowerdir=L1:L2…` and the
/// container as `lowerdir=UPPER:L1:L2…` — no upperdir, so nothing can be written through them.
fn overlay_walk(
    upper: &Path,
    lowers: &[PathBuf],
    options: &[String],
    reason: String,
) -> Result<PreparedSource, SourceError> {
    // The lower layers may use redirects and metacopy when the container's mount did.
    let mut extra = vec!["ro".to_string()];
    extra.extend(view_options(options));
    let join = |dirs: &[&Path]| {
        dirs.iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":")
    };
    let mut mounts = Vec::new();
    let lower = match lowers {
        [] => None,
        [one] => Some(one.clone()),
        many => {
            let dirs: Vec<&Path> = many.iter().map(PathBuf::as_path).collect();
            let m = TempMount::overlay(&join(&dirs), &extra)?;
            let p = m.path().to_path_buf();
            mounts.push(m);
            Some(p)
        }
    };
    let mut dirs: Vec<&Path> = vec![upper];
    dirs.extend(lowers.iter().map(PathBuf::as_path));
    let merged = TempMount::overlay(&join(&dirs), &extra)?;
    let upper_view = merged.path().to_path_buf();
    mounts.push(merged);
    Ok(PreparedSource {
        kind: SourceKind::Walk {
            lower,
            upper: upper_view,
        },
        reason,
        mounts,
        view: None,
    })
}

/// Overlay options a read-only view needs to read the container's layers as its own mount
/// does: the lower layers may hold redirects and metacopy files when the container's mount made
/// them, and on a `userxattr` mount overlay's markers are `user.overlay.*`.
pub fn view_options(mount_options: &[String]) -> Vec<String> {
    let has = |o: &str| mount_options.iter().any(|m| m == o);
    let metacopy = has("metacopy=on");
    let redirect = mount_options
        .iter()
        .any(|o| o.starts_with("redirect_dir=") && o != "redirect_dir=off");
    let mut extra = Vec::new();
    if metacopy {
        extra.push("metacopy=on".to_string());
    }
    if metacopy || redirect {
        extra.push("redirect_dir=follow".to_string());
    }
    if has("userxattr") {
        extra.push("userxattr".to_string());
    }
    extra
}

/// Native (and other bind-mount) snapshotters: the container's tree is the bind source; the
/// parent, if any, comes from a temporary view of the parent snapshot.
async fn bind_source(
    ctr: &Containerd,
    info: &ContainerInfo,
    m: &SnapshotMount,
) -> Result<PreparedSource, SourceError> {
    let upper = PathBuf::from(&m.source);
    if !upper.is_dir() {
        return Err(SourceError::NotVisible { path: upper });
    }
    let Some(view) = SnapshotView::of_parent(ctr, info).await? else {
        return Ok(PreparedSource {
            kind: SourceKind::Walk { lower: None, upper },
            reason: format!(
                "{} snapshot without a parent: everything is new",
                info.snapshotter
            ),
            mounts: vec![],
            view: None,
        });
    };
    match view.mounts.as_slice() {
        [v] if v.kind == "bind" || v.kind == "rbind" => Ok(PreparedSource {
            kind: SourceKind::Walk {
                lower: Some(PathBuf::from(&v.source)),
                upper,
            },
            reason: format!(
                "{} snapshotter: double walk against the parent snapshot",
                info.snapshotter
            ),
            mounts: vec![],
            view: Some(view),
        }),
        other => {
            let detail = format!(
                "a parent view of {} mounts ({:?})",
                other.len(),
                other.first().map(|m| &m.kind)
            );
            view.remove().await;
            Err(SourceError::Unsupported {
                id: info.id.clone(),
                snapshotter: info.snapshotter.clone(),
                detail,
            })
        }
    }
}

/// A temporary read-only view of a committed snapshot, named after the container and this
/// process. Removed by [`SnapshotView::remove`]; it is under the commit's lease, so it goes with
/// the lease if that removal fails or never runs.
pub struct SnapshotView {
    ctr: Containerd,
    snapshotter: String,
    key: String,
    pub mounts: Vec<SnapshotMount>,
}

impl SnapshotView {
    /// A view of `parent` (a committed snapshot's key) in the container's snapshotter; `what`
    /// names the view's use in its key (`committer-{what}-{container}-{pid}`).
    pub async fn new(
        ctr: &Containerd,
        info: &ContainerInfo,
        what: &str,
        parent: &str,
    ) -> Result<SnapshotView, ContainerdError> {
        let key = format!("committer-{what}-{}-{}", info.id, std::process::id());
        let mounts = ctr.view_snapshot(&info.snapshotter, &key, parent).await?;
        Ok(SnapshotView {
            ctr: ctr.clone(),
            snapshotter: info.snapshotter.clone(),
            key,
            mounts,
        })
    }

    /// A view of the container snapshot's parent; None for a snapshot without one.
    pub async fn of_parent(
        ctr: &Containerd,
        info: &ContainerInfo,
    ) -> Result<Option<SnapshotView>, ContainerdError> {
        let parent = ctr
            .snapshot_parent(&info.snapshotter, &info.snapshot_key)
            .await?;
        match parent {
            Some(p) => Ok(Some(SnapshotView::new(ctr, info, "view", &p).await?)),
            None => Ok(None),
        }
    }

    /// Best effort: the view is under our lease and goes with it if this fails.
    pub async fn remove(self) {
        let _ = self.ctr.remove_snapshot(&self.snapshotter, &self.key).await;
    }
}

/// A read-only mount on a private temp dir, unmounted (lazily) and removed on drop. The walk's
/// views and the squash's views are both these.
pub struct TempMount {
    dir: tempfile::TempDir,
}

impl TempMount {
    /// A read-only overlay of `lowers` (topmost first), nosuid and nodev.
    pub fn overlay_of(lowers: &[PathBuf], extra: &[String]) -> Result<TempMount, SourceError> {
        let joined: Vec<String> = lowers
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        TempMount::overlay(&joined.join(":"), extra)
    }

    fn overlay(lowerdir: &str, extra: &[String]) -> Result<TempMount, SourceError> {
        let dir = tempfile::Builder::new()
            .prefix("committer-view-")
            .tempdir()
            .map_err(|source| SourceError::Mount {
                target: std::env::temp_dir(),
                source,
            })?;
        let mut data = format!("lowerdir={lowerdir}");
        for e in extra.iter().filter(|e| *e != "ro") {
            data.push(',');
            data.push_str(e);
        }
        let data = std::ffi::CString::new(data).map_err(|e| SourceError::Mount {
            target: dir.path().to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
        rustix::mount::mount(
            "overlay",
            dir.path(),
            "overlay",
            // nosuid, nodev: nothing in the sandbox's tree may act as a device or setuid
            // program through our view, whatever reads it.
            rustix::mount::MountFlags::RDONLY
                | rustix::mount::MountFlags::NOSUID
                | rustix::mount::MountFlags::NODEV,
            Some(data.as_c_str()),
        )
        .map_err(|e| SourceError::Mount {
            target: dir.path().to_path_buf(),
            source: e.into(),
        })?;
        crate::guard::tell_mounted(dir.path());
        Ok(TempMount { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(self.dir.path(), rustix::mount::UnmountFlags::DETACH);
        crate::guard::tell_unmounted(self.dir.path());
    }
}
