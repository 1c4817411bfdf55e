//! The double-walk source: compares the parent's tree (`lower`) with the container's current
//! tree (`upper`) name by name, for snapshotters without an upperdir and for overlay mounts whose
//! upperdir is not exact. Cost is the whole rootfs' metadata, plus the bytes of every file whose
//! size and mtime match but that is not provably the same inode. "Same inode" is the same inode
//! number and ctime to the nanosecond: overlay shows a lower file that was never copied up with
//! the lower inode's number and ctime (only st_dev differs), so a walk of a merged overlay view
//! against its lowerdir compares bytes only for copied-up files. Distinct files do not share an
//! inode number on one filesystem, and across two they would also need the same ctime (which no
//! process can set) to the nanosecond.
//!
//! Deletions become whiteouts. A directory replaced by a non-directory (or the reverse) gets a
//! whiteout before the new entry. A directory deleted and recreated is, as in containerd's own
//! differ, the directory entry plus a whiteout per lower child that is gone — never an opaque
//! marker — which also keeps excluded lower paths intact.
//!
//! Hardlink groups are reproduced exactly: a metadata-only pass over both trees first finds the
//! paths whose group membership changed (see `links`), and those are emitted whatever the
//! comparison says, each upper group whole, so that unpacking gives the upper tree's groups.

use super::emit::{join_path, Sink};
use super::filter::Filter;
use super::fsx;
use super::links::Relinks;
use super::meta::{is_whiteout_stat, read_meta_at, read_node, Handle, Meta, XattrPolicy};
use super::upper::{check_depth, same_file_content};
use super::{DiffError, Options, Stats};
use std::fs::File;
use std::io::Write;
use std::iter::Peekable;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

pub(crate) fn write<W: Write>(
    lower: Option<&Path>,
    upper: &Path,
    opts: &Options,
    out: W,
) -> Result<(W, Stats), DiffError> {
    let open = |p: &Path| fsx::open_root(p).map_err(DiffError::io_host("opening", p));
    let up = open(upper)?;
    let low = lower.map(open).transpose()?;
    let filter = Filter::new(&opts.exclude, &opts.include, &opts.skip_mount_stubs);
    let policy = XattrPolicy::new(opts.userxattr, &opts.keep_xattrs);
    // Without a parent everything is new: every group is emitted whole anyway.
    let relinks = match &low {
        Some(low) => Relinks::scan(low, &up, &filter, policy.private())?,
        None => Relinks::default(),
    };
    let mut walk = Walk {
        sink: Sink::new(out, opts, "walk"),
        filter,
        relinks,
        policy,
        buf: Vec::new(),
    };
    walk.run(Frame::open(low, up, Vec::new())?)?;
    walk.sink.finish()
}

struct Walk<'o, W: Write> {
    sink: Sink<'o, W>,
    filter: Filter,
    /// Paths whose hardlink group changed: emitted even when they look unchanged.
    relinks: Relinks,
    policy: XattrPolicy,
    buf: Vec<u8>,
}

/// One directory on both sides, its sorted listings being merged. The walk (and the hardlink
/// scan in `links`, which must see paths in the same order) keep these on an explicit stack: a
/// deep tree costs heap (one frame per level), never the thread's stack.
pub(super) struct Frame {
    pub(super) low: Option<OwnedFd>,
    pub(super) up: OwnedFd,
    pub(super) rel: Vec<u8>,
    pub(super) unames: std::vec::IntoIter<Vec<u8>>,
    pub(super) lnames: Peekable<std::vec::IntoIter<Vec<u8>>>,
}

impl Frame {
    pub(super) fn open(
        low: Option<OwnedFd>,
        up: OwnedFd,
        rel: Vec<u8>,
    ) -> Result<Frame, DiffError> {
        check_depth(&rel)?;
        let unames = fsx::list_names(up.as_fd()).map_err(DiffError::io("listing", &rel))?;
        let lnames = match &low {
            Some(fd) => {
                fsx::list_names(fd.as_fd()).map_err(DiffError::io("listing lower", &rel))?
            }
            None => Vec::new(),
        };
        Ok(Frame {
            low,
            up,
            rel,
            unames: unames.into_iter(),
            lnames: lnames.into_iter().peekable(),
        })
    }
}

impl<W: Write> Walk<'_, W> {
    /// Depth first, siblings in name order; lower names the upper side lacks are deletions.
    fn run(&mut self, root: Frame) -> Result<(), DiffError> {
        let mut stack = vec![root];
        while let Some(top) = stack.last_mut() {
            let low = top.low.as_ref().map(OwnedFd::as_fd);
            let Some(name) = top.unames.next() else {
                for gone in top.lnames.by_ref() {
                    self.deleted(low, &top.rel, &gone)?;
                }
                let done = stack.pop().expect("the stack is not empty");
                self.sink.end_dir(&done.rel);
                continue;
            };
            while let Some(gone) = top.lnames.next_if(|l| l < &name) {
                self.deleted(low, &top.rel, &gone)?;
            }
            let in_lower = top.lnames.next_if(|l| l == &name).is_some();
            let low = if in_lower { low } else { None };
            if let Some(child) = self.entry(low, top.up.as_fd(), &top.rel, &name)? {
                stack.push(child);
            }
        }
        Ok(())
    }

    /// A lower name the upper tree no longer has.
    fn deleted(
        &mut self,
        low: Option<BorrowedFd>,
        rel: &[u8],
        name: &[u8],
    ) -> Result<(), DiffError> {
        if self.filter.excluded(&join_path(rel, name)) || self.lower_meta(low, rel, name)?.is_none()
        {
            return Ok(());
        }
        self.sink.whiteout(rel, name)
    }

    /// The lower side of `name`, if there is one. An overlay whiteout (char 0:0, or an xattr
    /// whiteout) seen through a raw lowerdir is nothing.
    fn lower_meta(
        &mut self,
        low: Option<BorrowedFd>,
        rel: &[u8],
        name: &[u8],
    ) -> Result<Option<Meta>, DiffError> {
        let Some(low) = low else { return Ok(None) };
        let path = join_path(rel, name);
        let Some(st) = fsx::lstat_opt(low, name).map_err(DiffError::io("lstat lower", &path))?
        else {
            return Ok(None);
        };
        if is_whiteout_stat(&st) {
            return Ok(None);
        }
        let meta = read_meta_at(low, name, st, &path, &self.policy)?;
        Ok((!meta.is_whiteout()).then_some(meta))
    }

    /// Emits `name` if it changed; a subdirectory comes back as the frame to walk next.
    fn entry(
        &mut self,
        low: Option<BorrowedFd>,
        up: BorrowedFd,
        rel: &[u8],
        name: &[u8],
    ) -> Result<Option<Frame>, DiffError> {
        let path = join_path(rel, name);
        if self.filter.excluded(&path) {
            return Ok(None);
        }
        let mut lm = self.lower_meta(low, rel, name)?;
        let node = read_node(up, name, &path, &self.policy)?;
        let skip = node
            .as_ref()
            .is_none_or(|n| n.meta.st.ftype == rustix::fs::FileType::Socket);
        let kind_changed = match (&lm, &node) {
            (Some(l), Some(n)) => l.is_dir() != n.meta.is_dir(),
            _ => false,
        };
        if lm.is_some() && (skip || kind_changed) {
            self.sink.whiteout(rel, name)?; // gone (or now a socket), or dir <-> non-dir
            lm = None;
        }
        let Some(mut node) = node.filter(|_| !skip) else {
            return Ok(None);
        };
        if let Handle::Dir(sub) = node.handle {
            let low = low.filter(|_| lm.is_some());
            return self
                .subdir(low, name, path, &node.meta, lm.as_ref(), sub)
                .map(Some);
        }
        let m = &node.meta;
        if self.filter.is_stub(&path) && m.is_reg() && m.st.size == 0 {
            return Ok(None);
        }
        let mut file = match &mut node.handle {
            Handle::File(f) => Some(f),
            _ => None,
        };
        if let (Some(l), Some(low)) = (&lm, low) {
            if !self.relinks.must_emit(&path)
                && self.unchanged(l, m, file.as_deref_mut(), low, name, &path)?
            {
                return Ok(None);
            }
        }
        self.sink.node(&path, &node.meta, file).map(|()| None)
    }

    fn subdir(
        &mut self,
        low: Option<BorrowedFd>,
        name: &[u8],
        path: Vec<u8>,
        m: &Meta,
        lm: Option<&Meta>,
        sub: OwnedFd,
    ) -> Result<Frame, DiffError> {
        // An unchanged directory is still written before anything beneath it, as containerd's
        // differ does: unpackers replace a changed child by unlink + create, which touches the
        // parent's mtime, and only a directory entry in the layer puts it back.
        let changed = lm.is_none_or(|l| match self.sink.options().copied_dir_mtimes {
            true => !l.same_attrs_but_mtime(m),
            false => !l.same_attrs(m),
        });
        let stub = self.filter.is_stub(&path) || (lm.is_none() && self.filter.holds_stub(&path));
        if stub || !changed {
            self.sink.defer_dir(&path, m);
        } else {
            self.sink.dir(&path, m)?;
        }
        let lsub = match low {
            Some(low) => Some(
                fsx::open_dir_at(low, name)
                    .map_err(DiffError::io("opening lower directory", &path))?,
            ),
            None => None,
        };
        Frame::open(lsub, sub, path)
    }

    /// Same type, mode, owner, size, mtime (ns), xattrs, target and device — and for regular
    /// files, the same inode (ino, ctime) or the same bytes. (Hardlink groups are `relinks`'
    /// business: an unchanged-looking path whose group changed never gets here.)
    fn unchanged(
        &mut self,
        l: &Meta,
        m: &Meta,
        file: Option<&mut File>,
        low: BorrowedFd,
        name: &[u8],
        path: &[u8],
    ) -> Result<bool, DiffError> {
        if !l.same_attrs(m) {
            return Ok(false);
        }
        let Some(file) = file else { return Ok(true) };
        if (l.st.ino, l.st.ctime) == (m.st.ino, m.st.ctime) {
            return Ok(true);
        }
        same_file_content(low, name, &l.st, file, m.st.size, path, &mut self.buf)
    }
}
