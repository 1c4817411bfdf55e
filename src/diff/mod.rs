//! The diff stage: a container's rootfs changes as an uncompressed OCI layer tar, written to any
//! `std::io::Write` (the caller wraps it with hashing and compression).
//!
//! # API
//! - [`write_layer`]`(source, opts, out) -> (out, Stats)` writes one complete tar (PAX format,
//!   end-of-archive blocks included) and hands the writer back.
//! - [`Source::Upperdir`] reads the overlay upperdir (cost ∝ the diff), looking into the lowerdirs
//!   only to skip whiteouts with nothing below and to drop no-op copy-ups. [`Source::Walk`]
//!   compares two mounted trees (cost ∝ the whole rootfs). [`Source::Uppers`] merges a stack
//!   of upperdirs against a squash's original base (cost ∝ the stack).
//! - [`upperdir_is_exact`]`(upper, mount_options)` says whether the upperdir alone tells the
//!   whole story. It checks the mount options against a whitelist, probes that this thread can
//!   read `trusted.*` xattrs, and scans the upperdir (metadata only) for
//!   `trusted.overlay.redirect` / `trusted.overlay.metacopy`. `write_layer` checks for those
//!   xattrs again as it walks and stops with [`DiffError::NotExact`]; the caller then discards
//!   what was written and falls back to the walk.
//!
//! # Output form
//! - Entries in depth-first order with siblings sorted by name bytes (= path-byte order with `/`
//!   sorting first); a whiteout `d/.wh.n` stands where `d/n` would, before any new entry `d/n`.
//!   An opaque marker `d/.wh..wh..opq` follows its directory entry.
//! - Every header field is set explicitly: ustar magic, mode = permission bits incl.
//!   setuid/setgid/sticky, uname/gname empty, mtime in whole seconds (clamped to
//!   `source_date_epoch`), no atime/ctime. A PAX header carries, in this order, `path`,
//!   `linkpath`, `uid`, `gid`, `size`, `mtime` (only when the ustar field cannot hold the
//!   value) then `SCHILY.xattr.*` sorted by name. Never GNU long names or GNU sparse entries.
//! - Only `user.*` (minus overlay's private `user.overlay.*`) and `security.*` xattrs are kept.
//! - Whiteouts and opaque markers: empty regular files, mode 0, owner 0:0, mtime
//!   `source_date_epoch` or 0, so that two runs over the same tree give the same bytes.
//! - Hardlinks (nlink > 1): the first path in output order is a regular entry, later ones are
//!   link entries repeating the first entry's metadata and xattrs. The walk also emits paths
//!   that look unchanged when their hardlink group changed (every member of the new group, and
//!   lower members that must leave the old inode), so that base + layer has exactly the
//!   container's groups.
//! - Mount stubs (`skip_mount_stubs`): an empty regular file or a directory with nothing emitted
//!   beneath it is left out; so is a new directory that only exists to hold such stubs.
//! - Exclusions leave a path exactly as the lower layers have it: no entry and no whiteout.
//!   Below an opaque directory that an exclusion reaches into, explicit whiteouts replace the
//!   opaque marker so the excluded lower paths survive.
//! - Every directory of the upperdir is written (it is there because something in it changed);
//!   the walk writes a directory whose metadata changed, and an unchanged one just before the
//!   first entry beneath it (unpackers touch a parent's mtime when they replace a child).
//! - A directory replaced by a non-directory (or the reverse) gets a whiteout first; a
//!   directory deleted and recreated is, from the upperdir, the directory plus an opaque marker
//!   (only when the lower layers have something in it to hide),
//!   from the walk, the directory plus a whiteout per vanished child (containerd's form).
//! - Sockets are not carried. Files that vanish between listing and reading are skipped; a file
//!   swapped for another object, or shorter than its header at EOF, is [`DiffError::FileChanged`];
//!   one that grew is cut at its header size.
//!
//! # Known limits
//! - mtimes are whole seconds (as docker and containerd write them).
//! - The upperdir source raises the soft RLIMIT_NOFILE to the hard limit (it holds a directory
//!   fd per lower layer per level).
//! - `index=on` is accepted by the option whitelist; with it, a copied-up lower hardlink is
//!   seen through its other lower names too, which the upperdir does not show.

mod double_walk;
mod emit;
mod exact;
mod filter;
mod fsx;
mod links;
mod lower;
mod meta;
mod tarw;
mod upper;

/// Real overlay mounts: root only (`cargo test --features lab`).
#[cfg(all(test, feature = "lab"))]
mod tests;

use std::io::Write;
use std::path::{Path, PathBuf};

pub use exact::{upperdir_is_exact, NotExact};

/// What to leave out of the layer and when to give up.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Absolute paths (`/tmp/cache`) left out together with everything below them; `*` and `?`
    /// glob within one component (`/var/log/*.log`). What they match keeps its lower content.
    pub exclude: Vec<String>,
    /// When not empty, only changes under these absolute paths go in; everything else keeps its
    /// lower version (the paths above them are walked and written as they are).
    pub include: Vec<String>,
    /// Mount destinations of the container's OCI spec: left out when the diff holds only an empty
    /// stub there (empty regular file, or a directory with nothing else to emit beneath it).
    pub skip_mount_stubs: Vec<String>,
    /// Clamp every mtime newer than this (seconds since the epoch).
    pub source_date_epoch: Option<i64>,
    /// Give up with [`DiffError::LimitExceeded`] past this many tar entries (whiteouts included).
    pub max_files: Option<u64>,
    /// Give up with [`DiffError::LimitExceeded`] past this many bytes of file content.
    pub max_bytes: Option<u64>,
    /// The overlay mount has the `userxattr` option: `user.overlay.*` are overlay's markers.
    /// Without it they are the sandbox's own xattrs (it can set them), kept like any `user.*`.
    pub userxattr: bool,
    /// xattr names kept on top of `security.capability` and `user.*` (exact, or a prefix
    /// ending in `*`: `security.selinux`, `security.*`).
    pub keep_xattrs: Vec<String>,
    /// The walk's trees come from a snapshotter that copies them (native): a directory's mtime
    /// says when it was copied, so directories are compared without it (containerd's differ
    /// never compares directory mtimes). A directory with nothing else changed is then written
    /// only before a changed entry beneath it.
    pub copied_dir_mtimes: bool,
    /// How many bytes of holes (apparent size minus allocated bytes, summed over the layer) may
    /// be written out as zeros before a sparse file is refused with [`DiffError::Sparse`].
    /// `None` is [`DEFAULT_MAX_HOLE_BYTES`].
    pub max_hole_bytes: Option<u64>,
    /// Where regular files' content goes instead of the tar (the reflink capture); None writes
    /// every byte into the tar.
    pub content: Option<ContentHook>,
}

/// What a [`ContentStore`] did with one file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Not kept: the tar carries it as usual.
    Inline,
    /// Kept by the store; the tar written is missing these bytes and their padding.
    Stored,
    /// The file held only this many bytes of the size its header promised.
    Short(u64),
}

/// Keeps regular files' content outside the tar (a reflink capture). The tar then written is a
/// recipe: every byte of the layer except the stored contents, each of which the store can put
/// back later at the tar offset it was given.
pub trait ContentStore: Send {
    /// A new tar begins: whatever was kept for an earlier one is dropped.
    fn reset(&mut self);
    /// The first `size` bytes of `file` would start at byte `at` of the tar.
    fn keep(&mut self, file: &std::fs::File, size: u64, at: u64) -> std::io::Result<Kept>;
}

/// A shared [`ContentStore`], as [`Options`] carries it.
#[derive(Clone)]
pub struct ContentHook(pub std::sync::Arc<std::sync::Mutex<dyn ContentStore>>);

impl std::fmt::Debug for ContentHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentHook")
    }
}

/// 1 GiB: a 50 GB `truncate -s` file costs the sandbox nothing, but containerd's and Docker's
/// unpackers (Go's archive/tar, then a plain copy) write every hole back as zeros, and a layer
/// carries it as zeros too, so it is refused rather than spooled, pushed and restored densely.
pub const DEFAULT_MAX_HOLE_BYTES: u64 = 1 << 30;

/// The longest path a layer entry may have. Unpackers create entries by path: containerd and
/// Docker join the name to their snapshot directory (`/var/lib/containerd/io.containerd.
/// snapshotter.v1.overlayfs/snapshots/N/fs/…`, ~75 bytes) and Linux refuses a path of 4096 bytes
/// or more, so 256 bytes are left for that root.
pub const MAX_PATH_BYTES: usize = 4095 - 256;

/// Where the changes are read from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// Overlay upperdir + the lowerdirs (immediate parent first, as in the mount's `lowerdir=`).
    Upperdir {
        upper: &'a Path,
        lowers: &'a [PathBuf],
    },
    /// A stack of upperdirs (topmost first: a container's upperdir over the snapshot layers
    /// above `lowers`) merged as overlay merges them, against `lowers` (a squash's original
    /// base, immediate parent first). Cost ∝ the stack.
    Uppers {
        uppers: &'a [PathBuf],
        lowers: &'a [PathBuf],
    },
    /// Double walk: the lower view (read-only tree of the parent snapshot) vs the container's
    /// full current tree. `lower: None` means everything in `upper` is new.
    Walk {
        lower: Option<&'a Path>,
        upper: &'a Path,
    },
}

/// What went into the layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Tar entries, not counting PAX extended headers.
    pub entries: u64,
    /// Regular-file entries with content (hardlink entries not included).
    pub files: u64,
    /// Bytes of file content.
    pub content_bytes: u64,
    /// Whiteouts and opaque markers.
    pub whiteouts: u64,
    /// `"upperdir"` or `"walk"`.
    pub source: &'static str,
}

/// Why the layer could not be written. Paths are displayed lossily.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("{op} {path}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} changed while it was read: expected {expected}, found {found}")]
    FileChanged {
        path: String,
        expected: String,
        found: String,
    },
    #[error("the layer exceeds the limit of {limit} {what}")]
    LimitExceeded { what: &'static str, limit: u64 },
    #[error("{path} cannot be put in a layer: {why}")]
    Unrepresentable { path: String, why: String },
    #[error("writing the layer")]
    Write(#[source] std::io::Error),
    #[error("the upperdir is not exact")]
    NotExact(#[from] NotExact),
    #[error("{path}: a name starting with .wh. is a whiteout in an image layer (it would delete a file on restore); rename it or --exclude it")]
    ReservedName { path: String },
    #[error("{path} is sparse ({size} bytes long, {allocated} allocated): a layer would carry its holes as zeros, past the limit of {limit} bytes of holes; --exclude it or raise --max-hole-bytes")]
    Sparse {
        path: String,
        size: u64,
        allocated: u64,
        limit: u64,
    },
    #[error("{path}: {bytes} bytes of {what}, over the {limit} a layer entry may carry (Go's tar reader rejects larger PAX headers)")]
    HeaderTooLarge {
        path: String,
        what: &'static str,
        bytes: u64,
        limit: u64,
    },
    #[error("{path}: the extended attribute name {name:?} contains '=', which a PAX record cannot carry")]
    XattrName { path: String, name: String },
    #[error("{path}: the path is {len} bytes long, over the {limit} a layer may hold (an unpacker adds its root directory and Linux stops at 4095)")]
    PathTooLong {
        path: String,
        len: usize,
        limit: usize,
    },
}

impl DiffError {
    pub(crate) fn io(
        op: &'static str,
        path: impl AsRef<[u8]>,
    ) -> impl FnOnce(std::io::Error) -> DiffError {
        let path = display(path.as_ref());
        move |source| DiffError::Io { path, op, source }
    }

    /// For the host paths the caller gave (roots), shown as they are.
    pub(crate) fn io_host(
        op: &'static str,
        path: &Path,
    ) -> impl FnOnce(std::io::Error) -> DiffError {
        let path = path.display().to_string();
        move |source| DiffError::Io { path, op, source }
    }
}

/// A relative path (as bytes) for messages: absolute-looking and lossy; a path longer than
/// 512 bytes keeps its first and last 200 (a sandbox's path must not flood a one-line error).
pub(crate) fn display(path: &[u8]) -> String {
    if path.len() > 512 {
        let (head, tail) = (&path[..200], &path[path.len() - 200..]);
        return format!(
            "/{}…({} bytes)…{}",
            String::from_utf8_lossy(head),
            path.len() - 400,
            String::from_utf8_lossy(tail)
        );
    }
    format!("/{}", String::from_utf8_lossy(path))
}

/// Writes the layer for `source` to `out` as an uncompressed tar and returns `out`.
pub fn write_layer<W: Write>(
    source: &Source,
    opts: &Options,
    out: W,
) -> Result<(W, Stats), DiffError> {
    match *source {
        Source::Upperdir { upper, lowers } => {
            upper::write(&[upper.to_path_buf()], lowers, opts, out)
        }
        Source::Uppers { uppers, lowers } => upper::write(uppers, lowers, opts, out),
        Source::Walk { lower, upper } => double_walk::write(lower, upper, opts, out),
    }
}
