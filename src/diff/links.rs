//! Hardlink groups for the double walk. Unpacking a layer over the parent keeps every path the
//! layer does not name on its parent inode, so a path's lower link group survives unless the
//! layer replaces (or whiteouts) its members; and an emitted group is exactly the emitted paths
//! sharing an upper inode. Comparing files one by one cannot see a group change whose members
//! all look unchanged (`ln a c` over a lower pair {a, b} under overlay: `a` is copied up and
//! joins `c`, `b` stays alone on the old inode, and neither `a` nor `b` changed in content or
//! metadata). So before the walk, a metadata-only pass over both trees collects, for every
//! non-directory with more than one link on either side, its upper inode and its lower inode,
//! and decides which paths must be emitted whatever their content says.
//!
//! Groups are compared as sets of paths. `U(p)`: the upper paths sharing `p`'s upper inode.
//! `H(p)`: the lower paths sharing `p`'s lower inode that still exist in the upper tree as a
//! non-directory (the others get a whiteout or a directory, which takes them off the inode).
//! When `H` is exactly one upper group, nothing needs doing: the members all share one upper
//! inode and one lower inode, so the walk takes all or none of them. Otherwise at most one upper
//! group `K ⊆ H` may stay on the lower inode — the one that is still the lower inode (same inode
//! number and ctime: overlay shows a file never copied up that way), else the one holding the
//! first path — and every other member of `H` is emitted. Every upper group is then emitted
//! whole or not at all, so the sink's hardlink entries rebuild it exactly, and every lower inode
//! keeps exactly the upper group that stayed on it.
//!
//! Memory is ∝ the multi-link files; the pass reads no content and no xattrs (except the
//! `overlay.whiteout` probe on empty multi-link lower files). Like the walk it only opens
//! directories, relative to their parent and without following symlinks.

use super::double_walk::Frame;
use super::emit::join_path;
use super::filter::Filter;
use super::fsx::{self, St};
use super::meta::{is_whiteout_at, is_whiteout_stat};
use super::DiffError;
use rustix::fs::FileType;
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// The paths the walk must emit because their hardlink group changed.
#[derive(Debug, Default)]
pub(crate) struct Relinks {
    emit: HashSet<Vec<u8>>,
}

impl Relinks {
    /// Scans `up` against `low` (metadata only) and settles which paths must be emitted.
    pub fn scan(
        low: &OwnedFd,
        up: &OwnedFd,
        filter: &Filter,
        private: &'static [u8],
    ) -> Result<Relinks, DiffError> {
        let mut scan = Scan {
            filter,
            private,
            entries: Vec::new(),
            bytes: 0,
        };
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(DiffError::io("duplicating", b""));
        scan.run(Frame::open(Some(dup(low)?), dup(up)?, Vec::new())?)?;
        Ok(Relinks {
            emit: settle(scan.entries),
        })
    }

    /// `path` must be emitted even if it looks unchanged.
    pub fn must_emit(&self, path: &[u8]) -> bool {
        !self.emit.is_empty() && self.emit.contains(path)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Inode {
    dev: u64,
    ino: u64,
    ctime: (i64, u32),
    nlink: u64,
}

impl Inode {
    fn of(st: &St) -> Inode {
        Inode {
            dev: st.dev,
            ino: st.ino,
            ctime: st.ctime,
            nlink: st.nlink,
        }
    }

    /// The key of its group, when it has more than one link.
    fn key(&self) -> Option<(u64, u64)> {
        (self.nlink > 1).then_some((self.dev, self.ino))
    }

    /// The same inode seen through two mounts (overlay changes st_dev, not ino or ctime).
    fn same(&self, o: &Inode) -> bool {
        (self.ino, self.ctime) == (o.ino, o.ctime)
    }
}

/// A path that exists in the upper tree as a non-directory and has more than one link on at
/// least one side.
struct Entry {
    path: Vec<u8>,
    up: Inode,
    /// Its lower non-directory, when there is one with more than one link.
    low: Option<Inode>,
    /// The lower tree has a non-directory here (else the walk emits the path anyway).
    in_lower: bool,
}

struct Scan<'f> {
    filter: &'f Filter,
    /// Overlay's private xattr prefix on this mount.
    private: &'static [u8],
    /// In walk order.
    entries: Vec<Entry>,
    /// What `entries` holds, roughly.
    bytes: usize,
}

/// The scan keeps every multi-link path of the upper tree (about 120 bytes each plus the path);
/// past this it gives up rather than grow further.
const MAX_SCAN_BYTES: usize = 512 << 20;

/// A non-directory the layer can carry (sockets are dropped, as the walk drops them).
fn linkable(st: &St) -> bool {
    !matches!(st.ftype, FileType::Directory | FileType::Socket)
}

impl Scan<'_> {
    /// Depth first in the walk's order, so "first path" means the same to both.
    fn run(&mut self, root: Frame) -> Result<(), DiffError> {
        let mut stack = vec![root];
        while let Some(top) = stack.last_mut() {
            let Some(name) = top.unames.next() else {
                stack.pop();
                continue;
            };
            while top.lnames.next_if(|l| l < &name).is_some() {}
            let in_lower = top.lnames.next_if(|l| l == &name).is_some();
            let low = top.low.as_ref().map(OwnedFd::as_fd).filter(|_| in_lower);
            if let Some(child) = self.entry(low, top.up.as_fd(), &top.rel, &name)? {
                stack.push(child);
            }
        }
        Ok(())
    }

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
        let Some(st) = fsx::lstat_opt(up, name).map_err(DiffError::io("lstat", &path))? else {
            return Ok(None); // gone since the listing: the walk sees what is there then
        };
        if st.ftype == FileType::Directory {
            let Some(sub) = open_dir_opt(up, name).map_err(DiffError::io("opening", &path))? else {
                return Ok(None);
            };
            let lsub = match low {
                Some(low) => open_dir_opt(low, name)
                    .map_err(DiffError::io("opening lower directory", &path))?,
                None => None,
            };
            return Frame::open(lsub, sub, path).map(Some);
        }
        if linkable(&st) {
            let (in_lower, low) = match low {
                Some(low) => self.lower(low, name, &path)?,
                None => (false, None),
            };
            if st.nlink > 1 || low.is_some() {
                self.track(Entry {
                    path,
                    up: Inode::of(&st),
                    low,
                    in_lower,
                })?;
            }
        }
        Ok(None)
    }

    /// Keeps one more multi-link path, within `MAX_SCAN_BYTES`.
    fn track(&mut self, e: Entry) -> Result<(), DiffError> {
        self.bytes += e.path.len() + std::mem::size_of::<Entry>();
        if self.bytes > MAX_SCAN_BYTES {
            return Err(DiffError::LimitExceeded {
                what: "bytes of hardlinked paths held in memory",
                limit: MAX_SCAN_BYTES as u64,
            });
        }
        self.entries.push(e);
        Ok(())
    }

    /// The lower side of `name` when it is a multi-link non-directory (overlay whiteouts, which
    /// overlay itself hardlinks to one another, are nothing).
    /// Whether the lower tree has a non-directory at `name`, and its inode when that has more
    /// than one link.
    fn lower(
        &self,
        low: BorrowedFd,
        name: &[u8],
        path: &[u8],
    ) -> Result<(bool, Option<Inode>), DiffError> {
        let Some(st) = fsx::lstat_opt(low, name).map_err(DiffError::io("lstat lower", path))?
        else {
            return Ok((false, None));
        };
        if !linkable(&st) || is_whiteout_stat(&st) {
            return Ok((false, None));
        }
        if is_whiteout_at(low, name, &st, path, self.private)? {
            return Ok((false, None));
        }
        Ok((true, (st.nlink > 1).then(|| Inode::of(&st))))
    }
}

/// Opens a subdirectory; None when it is gone or is not a directory (any more).
fn open_dir_opt(dir: BorrowedFd, name: &[u8]) -> io::Result<Option<OwnedFd>> {
    match fsx::open_dir_at(dir, name) {
        Ok(fd) => Ok(Some(fd)),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// No lower group: the path's lower side has a single link, or there is none.
const NONE: usize = usize::MAX;

/// Group numbers for one side, by inode key, and each group's members in walk order. A path
/// without a key is a group of its own with `singletons`, else in no group (`NONE`).
fn number(
    keys: impl Iterator<Item = Option<(u64, u64)>>,
    singletons: bool,
) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut of = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut by_key = HashMap::new();
    for (i, key) in keys.enumerate() {
        let g = match key {
            Some(k) => *by_key.entry(k).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            }),
            None if singletons => {
                groups.push(Vec::new());
                groups.len() - 1
            }
            None => {
                of.push(NONE);
                continue;
            }
        };
        groups[g].push(i);
        of.push(g);
    }
    (of, groups)
}

/// The paths to emit (see the module comment). Linear in the number of entries.
fn settle(entries: Vec<Entry>) -> HashSet<Vec<u8>> {
    let (u_of, ugroups) = number(entries.iter().map(|e| e.up.key()), true);
    let (l_of, lgroups) = number(
        entries.iter().map(|e| e.low.as_ref().and_then(Inode::key)),
        false,
    );
    // A multi-link upper path over a single-link (or no) lower file: H is that path alone and
    // no upper group of more than one fits in it, so it is emitted, which only needs saying
    // when the lower tree has it (a new path is emitted anyway).
    let mut emit: Vec<usize> = (0..entries.len())
        .filter(|&i| l_of[i] == NONE && entries[i].in_lower)
        .collect();
    for (g, h) in lgroups.iter().enumerate() {
        let inside = |u: usize| ugroups[u].iter().all(|&m| l_of[m] == g);
        let first = u_of[h[0]];
        if ugroups[first].len() == h.len() && inside(first) {
            continue; // H is exactly one upper group
        }
        let lower_inode = entries[h[0]].low;
        let still_lower =
            |u: usize| lower_inode.is_some_and(|l| entries[ugroups[u][0]].up.same(&l));
        // Each upper group once, at its first member; only those entirely inside H can stay.
        let candidates = h
            .iter()
            .filter(|&&j| ugroups[u_of[j]][0] == j)
            .map(|&j| u_of[j])
            .filter(|&u| inside(u));
        let mut keep = None;
        for u in candidates {
            if keep.is_none() || still_lower(u) {
                keep = Some(u);
                if still_lower(u) {
                    break;
                }
            }
        }
        emit.extend(h.iter().copied().filter(|&j| Some(u_of[j]) != keep));
    }
    let mut entries = entries;
    emit.into_iter()
        .map(|i| std::mem::take(&mut entries[i].path))
        .collect()
}
