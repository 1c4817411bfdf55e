//! The spool: where a local source's capture and the compressed layer wait for the upload.
//!
//! Two rules keep it from filling a node's disk. Before the sandbox is paused, the spool's free
//! space is checked against the size of the diff, as containerd's snapshotter reports it for an
//! overlay snapshot (the upperdir *is* the diff): a commit that cannot fit is refused with the
//! numbers, before anything is frozen. And the disk holds one copy of the diff, not two: as the
//! compressor consumes the uncompressed capture, the consumed range is punched out of it, so the
//! capture shrinks while the compressed layer grows (spool peak ≈ the diff plus what was
//! compressed during the pause, not diff + layer). Punching waits for the capture's end: a punch
//! takes the file's lock and flushes its range, which would stall the paused capture's writes.

use super::SourceError;
use crate::containerd::lookup::{ContainerInfo, SnapshotMount};
use crate::containerd::Containerd;
use std::fs::File;
use std::path::Path;

/// Tar overhead per entry we allow for: a 512-byte header, a PAX header, padding.
const PER_ENTRY: u64 = 1536;
/// Punch the consumed capture out in steps of this many bytes: one fallocate per 8 MiB costs
/// nothing next to compressing them, and bounds the spool's overshoot to about this much.
pub(super) const PUNCH_STEP: u64 = 8 << 20;

/// Refuses a commit whose diff cannot fit in the spool, before the pause. Only overlay snapshots
/// are checked: there the snapshot's usage is the diff; a native snapshot's usage is the whole
/// tree, which says nothing about the diff.
pub(super) async fn check_room(
    ctr: &Containerd,
    info: &ContainerInfo,
    mounts: &[SnapshotMount],
    dir: &Path,
) -> Result<(), SourceError> {
    if !mounts.iter().any(|m| m.kind == "overlay") {
        return Ok(());
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
            return Ok(());
        }
    };
    let need = (usage.size.max(0) as u64).saturating_add(usage.inodes.max(0) as u64 * PER_ENTRY);
    let free = free_bytes(dir).map_err(|source| SourceError::SpoolUnusable {
        dir: dir.to_path_buf(),
        source,
    })?;
    if need > free {
        return Err(SourceError::SpoolTooSmall {
            dir: dir.to_path_buf(),
            free,
            need,
        });
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
    fn free_space_is_read_from_the_directorys_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }
}
