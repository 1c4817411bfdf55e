//! The lowerdirs seen as overlay merges them, one directory at a time, walked in step with the
//! upperdir: for each upper directory we hold an fd per lower layer that has that directory,
//! stopping at the first layer where it is opaque or where a whiteout or non-directory hides
//! the layers below. Every step is a single-name `openat(O_NOFOLLOW)`, so a lookup can never
//! leave a lower tree. Lower layers are earlier upperdirs, so they hold whiteouts and opaque
//! directories too; a lower directory with `overlay.redirect` pulls content from elsewhere,
//! which we do not follow, so lookups beneath one answer `Unknown`.

use super::fsx;
use super::fsx::St;
use super::meta::{is_whiteout_at, read_meta_fd, XattrPolicy};
use super::DiffError;
use rustix::fs::FileType;
use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

/// One directory of the merged lower tree.
pub(crate) struct LowerView {
    /// Topmost first; only layers that are visible at this directory.
    layers: Vec<OwnedFd>,
    /// A redirect was seen on the way here: what is below cannot be known from names alone.
    uncertain: bool,
    /// Overlay's private xattr prefix on this mount (markers are read, nothing is kept).
    policy: XattrPolicy,
}

/// What the merged lower tree has at a name.
pub(crate) enum Below {
    Absent,
    /// Present in layer `layer` (the topmost that has it), with its lstat.
    Present {
        layer: usize,
        st: St,
    },
    /// Cannot tell (beneath a redirected directory).
    Unknown,
}

impl LowerView {
    /// The root of the lowerdirs (immediate parent first).
    pub fn root(lowers: &[PathBuf], policy: &XattrPolicy) -> Result<LowerView, DiffError> {
        let mut view = LowerView::empty(policy);
        for dir in lowers {
            let fd = fsx::open_root(dir).map_err(DiffError::io_host("opening lowerdir", dir))?;
            let (opaque, redirect) = dir_marks(fd.as_fd(), b"", &view.policy)?;
            view.layers.push(fd);
            view.uncertain |= redirect;
            if opaque {
                break;
            }
        }
        Ok(view)
    }

    /// Nothing below (a new or opaque directory).
    pub fn empty(policy: &XattrPolicy) -> LowerView {
        LowerView {
            layers: Vec::new(),
            uncertain: false,
            policy: policy.markers(),
        }
    }

    pub fn layer(&self, i: usize) -> BorrowedFd<'_> {
        self.layers[i].as_fd()
    }

    /// What the lower tree has at `name` in this directory (`rel` is its path, for messages).
    pub fn lookup(&self, name: &[u8], rel: &[u8]) -> Result<Below, DiffError> {
        for (i, fd) in self.layers.iter().enumerate() {
            let Some(st) = fsx::lstat_opt(fd.as_fd(), name)
                .map_err(DiffError::io("lstat in lowerdir", rel))?
            else {
                continue;
            };
            if is_whiteout_at(fd.as_fd(), name, &st, rel, self.policy.private())? {
                break;
            }
            return Ok(Below::Present { layer: i, st });
        }
        Ok(if self.uncertain {
            Below::Unknown
        } else {
            Below::Absent
        })
    }

    /// The view of subdirectory `name`.
    pub fn child(&self, name: &[u8], rel: &[u8]) -> Result<LowerView, DiffError> {
        let mut view = LowerView {
            layers: Vec::new(),
            uncertain: self.uncertain,
            policy: self.policy.markers(),
        };
        for fd in &self.layers {
            let Some(st) = fsx::lstat_opt(fd.as_fd(), name)
                .map_err(DiffError::io("lstat in lowerdir", rel))?
            else {
                continue;
            };
            if st.ftype != FileType::Directory {
                break; // a whiteout or a non-directory hides every layer below
            }
            let sub = fsx::open_dir_at(fd.as_fd(), name)
                .map_err(DiffError::io("opening lower directory", rel))?;
            let (opaque, redirect) = dir_marks(sub.as_fd(), rel, &self.policy)?;
            view.layers.push(sub);
            view.uncertain |= redirect;
            if opaque {
                break;
            }
        }
        Ok(view)
    }

    /// The names this directory has in the merged lower tree, sorted. Fails with `NotExact`
    /// where a redirect makes the listing unknowable.
    pub fn names(&self, rel: &[u8]) -> Result<Vec<Vec<u8>>, DiffError> {
        if self.uncertain {
            return Err(super::NotExact::LowerRedirect(super::display(rel)).into());
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for fd in &self.layers {
            for name in fsx::list_names(fd.as_fd())
                .map_err(DiffError::io("listing lower directory", rel))?
            {
                if !seen.insert(name.clone()) {
                    continue;
                }
                let Some(st) = fsx::lstat_opt(fd.as_fd(), &name)
                    .map_err(DiffError::io("lstat in lowerdir", rel))?
                else {
                    continue;
                };
                if is_whiteout_at(fd.as_fd(), &name, &st, rel, self.policy.private())? {
                    continue;
                }
                out.push(name);
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

/// (opaque, redirect) of an open lower directory.
fn dir_marks(fd: BorrowedFd, rel: &[u8], policy: &XattrPolicy) -> Result<(bool, bool), DiffError> {
    let st = fsx::fstat(fd).map_err(DiffError::io("fstat lower directory", rel))?;
    let meta = read_meta_fd(fd, st, rel, policy)?;
    Ok((meta.marks.opaque, meta.marks.redirect))
}
