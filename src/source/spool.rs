//! The spool: where a local source's capture and the compressed layer wait for the upload.
//!
//! Three rules keep it from filling a node's disk. A reserve of the spool's filesystem is never
//! used: by default 5% of its size, at most 1 GiB (`COMMITTER_SPOOL_RESERVE`: bytes, or a
//! percentage of the filesystem). Before the sandbox is paused, the spool's free space less the
//! reserve is checked against the size of the diff, as containerd's snapshotter reports it for
//! an overlay snapshot (the upperdir *is* the diff): a commit that cannot fit is refused with the
//! numbers, before anything is frozen. While writing, every spool write is counted and the free
//! space read again every few MiB: a spool that reaches the reserve (or ENOSPC) fails the commit
//! with exit 4 naming the spool ([`SourceError::SpoolFull`]), the sandbox resumed and the spool
//! files removed as on any failure. And the disk holds one copy of the diff, not two: as the
//! compressor consumes the uncompressed capture, the consumed range is punched out of it, so the
//! capture shrinks while the compressed layer grows (spool peak ≈ the diff plus what was
//! compressed during the pause, not diff + layer). Punching waits for the capture's end: a punch
//! takes the file's lock and flushes its range, which would stall the paused capture's writes.

use super::SourceError;
use crate::containerd::lookup::{ContainerInfo, SnapshotMount};
use crate::containerd::Containerd;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;

/// Tar overhead per entry we allow for: a 512-byte header, a PAX header, padding.
const PER_ENTRY: u64 = 1536;
/// Punch the consumed capture out in steps of this many bytes: one fallocate per 8 MiB costs
/// nothing next to compressing them, and bounds the spool's overshoot to about this much.
pub(super) const PUNCH_STEP: u64 = 8 << 20;
/// A kernel copy into the spool goes in steps of at most this many bytes, so that the free space
/// is looked at between them.
pub(super) const CHECK_CHUNK: usize = 8 << 20;
/// Overrides the reserve: bytes (`0` for none) or a percentage of the filesystem (`10%`).
pub const RESERVE_ENV: &str = "COMMITTER_SPOOL_RESERVE";
/// The default reserve: this share of the spool's filesystem, capped at `RESERVE_CAP`.
const RESERVE_PERCENT: u64 = 5;
const RESERVE_CAP: u64 = 1 << 30;

/// The spool being watched: its directory and reserve, the bytes written since the last look at
/// its free space, and whether it ran out (the first failure of a commit that ran out of spool is
/// this, whatever error reached the caller: an upload tailing the layer fails too).
struct Watch {
    dir: PathBuf,
    reserve: u64,
    step: u64,
    unchecked: AtomicU64,
    full: AtomicBool,
    /// The free space when it ran out.
    free_then: AtomicU64,
}

impl Watch {
    fn ran_out(&self, free: u64) {
        self.free_then.store(free, Ordering::SeqCst);
        self.full.store(true, Ordering::SeqCst);
    }
}

/// One commit runs per process: its spool's watch is process-wide, so that every writer (the
/// capture, the clones, the compressor) is counted without being handed it.
static WATCH: RwLock<Option<Watch>> = RwLock::new(None);

/// Starts watching `dir`: the reserve read from the environment or the default. Returns it.
pub(super) fn watch(dir: &Path) -> Result<u64, SourceError> {
    let unusable = |source| SourceError::SpoolUnusable {
        dir: dir.to_path_buf(),
        source,
    };
    let st = rustix::fs::statvfs(dir).map_err(|e| unusable(e.into()))?;
    let size = st.f_blocks.saturating_mul(st.f_frsize);
    let reserve = reserve_for(size, std::env::var(RESERVE_ENV).ok().as_deref())
        .map_err(|why| unusable(std::io::Error::other(why)))?;
    *WATCH.write().unwrap_or_else(|e| e.into_inner()) = Some(Watch {
        dir: dir.to_path_buf(),
        reserve,
        // Checked often enough that the reserve absorbs what is written between two looks.
        step: (reserve / 2).clamp(1 << 20, 8 << 20),
        unchecked: AtomicU64::new(0),
        full: AtomicBool::new(false),
        free_then: AtomicU64::new(0),
    });
    Ok(reserve)
}

/// The reserve for a filesystem of `size` bytes: `spec` (bytes or `N%`), else the default.
/// `COMMITTER_SPOOL_RESERVE` as set, checked before any work (a usage error, not a refusal after
/// the container was found).
pub fn check_reserve_setting() -> Result<(), String> {
    reserve_for(0, std::env::var(RESERVE_ENV).ok().as_deref()).map(|_| ())
}

fn reserve_for(size: u64, spec: Option<&str>) -> Result<u64, String> {
    let bad = || {
        let spec = spec.unwrap_or_default();
        format!("{RESERVE_ENV}={spec:?}: give bytes (0 for none) or a percentage like 10%")
    };
    match spec.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok((size / 100 * RESERVE_PERCENT).min(RESERVE_CAP)),
        Some(s) => match s.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u64>() {
                Ok(p) if p <= 100 => Ok(size / 100 * p),
                _ => Err(bad()),
            },
            None => s.parse::<u64>().map_err(|_| bad()),
        },
    }
}

/// Counts `n` bytes just written to the spool; every few MiB, fails once the spool's free space
/// is below the reserve. A no-op when no spool is watched.
pub fn wrote(n: u64) -> std::io::Result<()> {
    let guard = WATCH.read().unwrap_or_else(|e| e.into_inner());
    let Some(w) = guard.as_ref() else {
        return Ok(());
    };
    if w.unchecked.fetch_add(n, Ordering::Relaxed) + n < w.step {
        return Ok(());
    }
    w.unchecked.store(0, Ordering::Relaxed);
    match free_bytes(&w.dir) {
        Ok(free) if free < w.reserve => {
            w.ran_out(free);
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "the spool's free space fell below its reserve of {} bytes",
                    w.reserve
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// Notes a spool write that failed for want of room (ENOSPC, EDQUOT); passes the result on.
pub fn observe<T>(r: std::io::Result<T>) -> std::io::Result<T> {
    if let Err(e) = &r {
        if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
            if let Some(w) = WATCH.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
                w.ran_out(free_bytes(&w.dir).unwrap_or(0));
            }
        }
    }
    r
}

/// A commit that failed after its spool ran out of room fails for that reason, whatever error
/// the first stage to notice passed on (the capture's write, the compressor's, an upload that
/// was tailing the layer): exit 4, the spool named, what to do.
pub fn classify(e: crate::error::CommitError) -> crate::error::CommitError {
    let guard = WATCH.read().unwrap_or_else(|e| e.into_inner());
    match guard.as_ref() {
        Some(w) if w.full.load(Ordering::SeqCst) => SourceError::SpoolFull {
            dir: w.dir.clone(),
            free: w.free_then.load(Ordering::SeqCst),
            reserve: w.reserve,
        }
        .into(),
        _ => e,
    }
}

/// Refuses a commit whose diff cannot fit in the spool above its reserve, before the pause. The
/// diff's size is known for overlay snapshots only: there the snapshot's usage is the diff; a
/// native snapshot's usage is the whole tree, which says nothing about the diff (then only a
/// spool already below its reserve is refused here).
pub(super) async fn check_room(
    ctr: &Containerd,
    info: &ContainerInfo,
    mounts: &[SnapshotMount],
    dir: &Path,
) -> Result<(), SourceError> {
    let reserve = watch(dir)?;
    let free = free_bytes(dir).map_err(|source| SourceError::SpoolUnusable {
        dir: dir.to_path_buf(),
        source,
    })?;
    let too_small = |need: u64| SourceError::SpoolTooSmall {
        dir: dir.to_path_buf(),
        free,
        need,
        reserve,
    };
    // Without a size estimate, a spool already inside its reserve is all that can be refused.
    let at_reserve = || match free < reserve {
        true => Err(SourceError::SpoolFull {
            dir: dir.to_path_buf(),
            free,
            reserve,
        }),
        false => Ok(()),
    };
    if !mounts.iter().any(|m| m.kind == "overlay") {
        return at_reserve();
    }
    use containerd_client::services::v1::snapshots::UsageRequest;
    let asked = ctr
        .snapshots()
        .usage(UsageRequest {
            snapshotter: info.snapshotter.clone(),
            key: info.snapshot_key.clone(),
        })
        .await;
    // containerd walks the upperdir to answer; a sandbox that deletes files meanwhile makes that
    // walk fail ("lstat …: no such file"). The check is an estimate: without it the commit goes
    // on, and a full spool still fails cleanly while writing.
    let usage = match asked {
        Ok(r) => r.into_inner(),
        Err(s) => {
            crate::log::debug(&format!(
                "no size estimate for snapshot {:?} ({}); the spool's room is not checked",
                info.snapshot_key,
                s.message()
            ));
            return at_reserve();
        }
    };
    let need = (usage.size.max(0) as u64).saturating_add(usage.inodes.max(0) as u64 * PER_ENTRY);
    if need.saturating_add(reserve) > free {
        return Err(too_small(need));
    }
    Ok(())
}

fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Gives the disk blocks of `file` in `[from, to)` back to the filesystem (the bytes read as
/// zeros afterwards; the size stays). Filesystems without hole punching keep the blocks: the
/// spool then peaks at diff + layer, as it did before, and nothing else changes.
pub(super) fn release(file: &File, from: u64, to: u64) {
    use rustix::fs::FallocateFlags;
    if to > from {
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        let _ = rustix::fs::fallocate(file, flags, from, to - from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn released_ranges_free_their_blocks_and_read_back_as_zeros() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; 8 << 20]).unwrap();
        f.sync_all().unwrap();
        let before = f.metadata().unwrap().blocks();
        release(&f, 0, 4 << 20);
        let meta = f.metadata().unwrap();
        assert_eq!(meta.len(), 8 << 20, "the size stays");
        // ext4, xfs, btrfs and tmpfs punch holes; the temp dir is on one of them here.
        assert!(before * 512 >= 8 << 20, "{before} blocks before");
        assert!(
            meta.blocks() * 512 <= (4 << 20) + (1 << 20),
            "{} blocks",
            meta.blocks()
        );
        let mut head = vec![1u8; 16];
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut head).unwrap();
        assert_eq!(head, vec![0u8; 16]);
        let mut tail = vec![0u8; 16];
        f.seek(SeekFrom::Start(6 << 20)).unwrap();
        f.read_exact(&mut tail).unwrap();
        assert_eq!(tail, vec![7u8; 16], "the rest is untouched");
    }

    #[test]
    fn the_reserve_is_five_percent_capped_at_a_gib_unless_set() {
        assert_eq!(reserve_for(64 << 20, None), Ok((64 << 20) / 100 * 5));
        assert_eq!(reserve_for(100 << 30, None), Ok(1 << 30));
        assert_eq!(reserve_for(100 << 30, Some("0")), Ok(0));
        assert_eq!(reserve_for(1000, Some("12345")), Ok(12345));
        assert_eq!(reserve_for(1000, Some("10%")), Ok(100));
        for bad in ["101%", "-1", "1GiB", "x%"] {
            let e = reserve_for(1000, Some(bad)).unwrap_err();
            assert!(e.contains(RESERVE_ENV) && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn free_space_is_read_from_the_directorys_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }
}
