//! The overlay upperdir source: walks only the upperdir (cost ∝ the diff) and translates overlay's
//! on-disk form into OCI changeset form — char 0:0 (or xattr) whiteouts become `.wh.<name>`,
//! `overlay.opaque=y` becomes `.wh..wh..opq`. The lowerdirs are consulted, in step, to skip
//! whiteouts with nothing below them and to drop copy-ups that changed nothing (a `chown` to the
//! same owner, an open for writing that wrote nothing). A redirect or metacopy xattr means the
//! upperdir is not the whole story: we stop with `NotExact` and the caller walks instead.
//!
//! A squash reads a *stack* of upperdirs (the container's upperdir over the snapshot layers
//! committed since the original base, topmost first) against the original base's lowerdirs. The
//! stack is merged as overlay merges it: at each name the topmost layer that has it wins; a
//! directory continues into the layers below until one is opaque or holds a whiteout or a
//! non-directory there, which then hides the base's directory too. A whiteout is written only
//! where the base has the name, an opaque marker only where the base has the directory with
//! something in it. Cost ∝ the stack, never the base (the base is only looked up by name).

use super::emit::{join_path, Sink};
use super::filter::Filter;
use super::fsx::{self, St};
use super::lower::{Below, LowerView};
use super::meta::{read_meta_at, read_meta_fd, read_node, Handle, Meta, Node, XattrPolicy};
use super::{display, DiffError, NotExact, Options, Stats};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::iter::Peekable;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

/// `uppers`: topmost first (one for a plain commit); `lowers`: as in `lowerdir=`.
pub(crate) fn write<W: Write>(
    uppers: &[PathBuf],
    lowers: &[PathBuf],
    opts: &Options,
    out: W,
) -> Result<(W, Stats), DiffError> {
    let mut root = Vec::with_capacity(uppers.len());
    for upper in uppers {
        root.push(fsx::open_root(upper).map_err(DiffError::io_host("opening upperdir", upper))?);
    }
    raise_fd_limit();
    let policy = XattrPolicy::new(opts.userxattr, &opts.keep_xattrs);
    let lower = LowerView::root(lowers, &policy)?;
    let mut walk = UpperWalk {
        sink: Sink::new(out, opts, "upperdir"),
        filter: Filter::new(&opts.exclude, &opts.include, &opts.skip_mount_stubs),
        policy,
        buf: Vec::new(),
    };
    walk.run(Frame::open(root, Vec::new(), lower, false)?)?;
    walk.sink.finish()
}

/// The walk holds one directory fd per lower layer per level (an image with 120 layers and a
/// path 20 deep holds 2400), past the usual soft limit of 1024; the hard limit is much higher.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    // None is unlimited.
    if let Some(cur) = lim.current {
        if lim.maximum.is_none_or(|max| max > cur) {
            lim.current = lim.maximum;
            let _ = setrlimit(Resource::Nofile, lim); // best effort: the walk may still fit
        }
    }
}

/// What the upper layers below the winning one add to a directory.
struct Stack {
    below_layers: Vec<OwnedFd>,
    /// The stack hides the base's directory (opaque, or stopped by a whiteout or a file).
    hides: bool,
}

struct UpperWalk<'o, W: Write> {
    sink: Sink<'o, W>,
    filter: Filter,
    policy: XattrPolicy,
    buf: Vec<u8>,
}

/// One upper directory being walked, over its lower view. The walk keeps these on an explicit
/// stack, so a tree as deep as the path limit allows costs heap, never the thread's stack.
/// `explicit` holds below an opaque directory that an exclusion reaches into: instead of an
/// opaque marker, every lower name missing from the upperdir gets its own whiteout (`hidden`),
/// so excluded lower paths survive.
struct Frame {
    /// This directory in each upper layer where it is visible, topmost first.
    layers: Vec<OwnedFd>,
    rel: Vec<u8>,
    /// The merged names, each with the topmost layer that has it.
    names: std::vec::IntoIter<(Vec<u8>, usize)>,
    hidden: Peekable<std::vec::IntoIter<Vec<u8>>>,
    lower: LowerView,
    explicit: bool,
}

impl Frame {
    fn open(
        layers: Vec<OwnedFd>,
        rel: Vec<u8>,
        lower: LowerView,
        explicit: bool,
    ) -> Result<Frame, DiffError> {
        check_depth(&rel)?;
        let mut names = Vec::new();
        for (i, fd) in layers.iter().enumerate() {
            let listed = fsx::list_names(fd.as_fd()).map_err(DiffError::io("listing", &rel))?;
            names.extend(listed.into_iter().map(|n| (n, i)));
        }
        if layers.len() > 1 {
            names.sort_unstable(); // by name, then topmost layer first
            names.dedup_by(|b, a| a.0 == b.0);
        }
        let hidden = if explicit {
            lower.names(&rel)?
        } else {
            Vec::new()
        };
        Ok(Frame {
            layers,
            rel,
            names: names.into_iter(),
            hidden: hidden.into_iter().peekable(),
            lower,
            explicit,
        })
    }
}

/// No directory below the path limit can hold an entry a layer may carry: stop there, before
/// the walk holds a frame per level of an arbitrarily deep tree.
pub(crate) fn check_depth(rel: &[u8]) -> Result<(), DiffError> {
    if rel.len() > super::MAX_PATH_BYTES {
        return Err(DiffError::PathTooLong {
            path: display(rel),
            len: rel.len(),
            limit: super::MAX_PATH_BYTES,
        });
    }
    Ok(())
}

impl<W: Write> UpperWalk<'_, W> {
    /// Depth first, siblings in name order, directories left after their last entry.
    fn run(&mut self, root: Frame) -> Result<(), DiffError> {
        let mut stack = vec![root];
        while let Some(top) = stack.last_mut() {
            let Some((name, layer)) = top.names.next() else {
                let done = stack.pop().expect("the stack is not empty");
                for h in done.hidden {
                    self.explicit_whiteout(&done.rel, &h)?;
                }
                self.sink.end_dir(&done.rel);
                continue;
            };
            while let Some(h) = top.hidden.next_if(|h| h < &name) {
                self.explicit_whiteout(&top.rel, &h)?;
            }
            top.hidden.next_if(|h| h == &name);
            if let Some(child) = self.entry(top, &name, layer)? {
                stack.push(child);
            }
        }
        Ok(())
    }

    fn explicit_whiteout(&mut self, rel: &[u8], name: &[u8]) -> Result<(), DiffError> {
        if self.filter.excluded(&join_path(rel, name)) {
            return Ok(());
        }
        self.sink.whiteout(rel, name)
    }

    /// Emits `name` of directory `at` (topmost in upper layer `layer`); a subdirectory comes
    /// back as the frame to walk next.
    fn entry(&mut self, at: &Frame, name: &[u8], layer: usize) -> Result<Option<Frame>, DiffError> {
        let (rel, lower) = (&at.rel[..], &at.lower);
        let path = join_path(rel, name);
        if self.filter.excluded(&path) {
            return Ok(None);
        }
        let Some(mut node) = read_node(at.layers[layer].as_fd(), name, &path, &self.policy)? else {
            return Ok(None);
        };
        let m = &node.meta;
        if m.marks.redirect {
            return Err(NotExact::Redirect(display(&path)).into());
        }
        if m.marks.metacopy {
            return Err(NotExact::Metacopy(display(&path)).into());
        }
        let below = lower.lookup(name, &path)?;
        if m.is_whiteout() {
            return match below {
                Below::Absent => Ok(None), // nothing to delete
                _ => self.sink.whiteout(rel, name).map(|()| None),
            };
        }
        if let Below::Present { st, .. } = &below {
            let is_socket = m.st.ftype == rustix::fs::FileType::Socket;
            if is_socket || (st.ftype == rustix::fs::FileType::Directory) != m.is_dir() {
                // A directory replaced by a non-directory or the reverse: delete first. A
                // socket cannot be carried, but what it replaced is gone all the same.
                self.sink.whiteout(rel, name)?;
            }
        }
        if m.is_dir() {
            let (below_layers, hides) =
                self.dir_below(&at.layers[layer + 1..], name, &path, m.marks.opaque)?;
            let stack = Stack {
                below_layers,
                hides,
            };
            return self
                .subdir(name, path, node, stack, &below, lower, at.explicit)
                .map(Some);
        }
        if self.filter.is_stub(&path) && m.is_reg() && m.st.size == 0 {
            return Ok(None);
        }
        let mut file = match &mut node.handle {
            Handle::File(f) => Some(f),
            _ => None,
        };
        if self.is_noop_copy_up(&node.meta, file.as_deref_mut(), &below, lower, &path)? {
            return Ok(None);
        }
        self.sink.node(&path, &node.meta, file).map(|()| None)
    }

    /// The directory `name` in the upper layers below the one where it was found (`rest`),
    /// as overlay merges them: down to the first opaque one, or up to a layer holding a
    /// whiteout or a non-directory there. Also says whether the stack hides the base's
    /// directory (it does when it stopped at such a layer or on an opaque directory).
    fn dir_below(
        &self,
        rest: &[OwnedFd],
        name: &[u8],
        path: &[u8],
        opaque: bool,
    ) -> Result<(Vec<OwnedFd>, bool), DiffError> {
        let mut found = Vec::new();
        if opaque {
            return Ok((found, true));
        }
        for fd in rest {
            let Some(st) =
                fsx::lstat_opt(fd.as_fd(), name).map_err(DiffError::io("lstat in upper", path))?
            else {
                continue;
            };
            if st.ftype != rustix::fs::FileType::Directory {
                return Ok((found, true)); // a whiteout or a file hides every layer below
            }
            let sub = fsx::open_dir_at(fd.as_fd(), name)
                .map_err(DiffError::io("opening upper directory", path))?;
            let st = fsx::fstat(sub.as_fd()).map_err(DiffError::io("fstat", path))?;
            let marks = read_meta_fd(sub.as_fd(), st, path, &self.policy.markers())?.marks;
            if marks.redirect {
                return Err(NotExact::Redirect(display(path)).into());
            }
            found.push(sub);
            if marks.opaque {
                return Ok((found, true));
            }
        }
        Ok((found, false))
    }

    /// Whether the base has something in directory `path` for an opaque marker to hide.
    fn base_has_content(
        &self,
        below: &Below,
        lower: &LowerView,
        name: &[u8],
        path: &[u8],
    ) -> Result<bool, DiffError> {
        Ok(match below {
            Below::Absent => false,
            Below::Unknown => true,
            Below::Present { st, .. } if st.ftype != rustix::fs::FileType::Directory => false,
            Below::Present { .. } => match lower.child(name, path)?.names(path) {
                Ok(names) => !names.is_empty(),
                Err(DiffError::NotExact(_)) => true,
                Err(e) => return Err(e),
            },
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn subdir(
        &mut self,
        name: &[u8],
        path: Vec<u8>,
        node: Node,
        stack: Stack,
        below: &Below,
        lower: &LowerView,
        explicit: bool,
    ) -> Result<Frame, DiffError> {
        let Handle::Dir(sub) = node.handle else {
            unreachable!("read_node opens directories")
        };
        let m = node.meta;
        let mut layers = vec![sub];
        layers.extend(stack.below_layers);
        let lower_is_dir = matches!(below, Below::Present { st, .. } if st.ftype == rustix::fs::FileType::Directory)
            || matches!(below, Below::Unknown);
        let new = !lower_is_dir;
        let child_view;
        let mut child_explicit = explicit;
        if stack.hides && !self.filter.excludes_below(&path) {
            self.sink.dir(&path, &m)?;
            if self.base_has_content(below, lower, name, &path)? {
                self.sink.opaque(&path)?;
            }
            child_view = LowerView::empty(&self.policy);
            child_explicit = false;
        } else {
            if stack.hides {
                child_explicit = true; // an exclusion reaches in: spell out the deletions
            }
            if self.filter.is_stub(&path) || (new && self.filter.holds_stub(&path)) {
                self.sink.defer_dir(&path, &m);
            } else {
                self.sink.dir(&path, &m)?;
            }
            child_view = if lower_is_dir {
                lower.child(name, &path)?
            } else {
                LowerView::empty(&self.policy)
            };
        }
        Frame::open(layers, path, child_view, child_explicit)
    }

    /// An upper non-directory identical to what it shadows: same type, mode, owner, size, mtime,
    /// xattrs, target, device, and (compared last, only then) content. A multi-link inode is
    /// never dropped: its other names in the diff need it as their link target.
    fn is_noop_copy_up(
        &mut self,
        m: &Meta,
        file: Option<&mut File>,
        below: &Below,
        lower: &LowerView,
        path: &[u8],
    ) -> Result<bool, DiffError> {
        let Below::Present { layer, st } = below else {
            return Ok(false);
        };
        if m.st.nlink > 1
            || st.ftype != m.st.ftype
            || st.size != m.st.size
            || st.mtime != m.st.mtime
        {
            return Ok(false);
        }
        let name = path.rsplit(|&c| c == b'/').next().unwrap_or(path);
        let dir = lower.layer(*layer);
        let lm = read_meta_at(dir, name, *st, path, &self.policy)?;
        if lm.marks.metacopy || !m.same_attrs(&lm) {
            return Ok(false);
        }
        let Some(file) = file else { return Ok(true) };
        same_file_content(dir, name, st, file, m.st.size, path, &mut self.buf)
    }
}

/// Compares an open upper file with `name` in lower `dir`, then rewinds the upper file.
pub(crate) fn same_file_content(
    dir: BorrowedFd,
    name: &[u8],
    st: &St,
    file: &mut File,
    size: u64,
    path: &[u8],
    buf: &mut Vec<u8>,
) -> Result<bool, DiffError> {
    fsx::hook::fire(fsx::hook::Stage::Compare, name);
    let mut lf = fsx::open_file_at(dir, name).map_err(DiffError::io("opening lower file", path))?;
    let lst = fsx::fstat(lf.as_fd()).map_err(DiffError::io("fstat lower file", path))?;
    if !lst.same_object(st) {
        return Ok(false);
    }
    let same =
        fsx::same_content(file, &mut lf, size, buf).map_err(DiffError::io("comparing", path))?;
    file.seek(SeekFrom::Start(0))
        .map_err(DiffError::io("rewinding", path))?;
    Ok(same)
}
