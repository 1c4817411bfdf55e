//! The reflink capture: a pause that costs metadata, not bytes. While the sandbox is paused, each
//! regular file the diff emits is cloned (`FICLONE`, or `copy_file_range`, which the kernel
//! turns into a clone on the same XFS/btrfs filesystem) into a spool directory, and the tar is
//! written without those contents: the *recipe* (headers, PAX records, link targets, whiteouts,
//! small files inline). A clone shares the file's blocks at the moment it is taken, so a write
//! after the resume does not reach it: the capture is as point-in-time as a copy. After the
//! resume, [`Assembler`] rebuilds the exact tar from the recipe and the clones, as a `Read` for
//! the compressor (which computes the diff_id), deleting each clone as it is consumed.
//!
//! Reported as `reflink` when the spool directory is on the filesystem that holds the snapshot
//! (same `st_dev`) and that filesystem clones (a probe `FICLONE` between two spool files
//! succeeds). Elsewhere the same per-file capture copies: a file whose clone is refused (`EXDEV`,
//! `EOPNOTSUPP`, `EINVAL`) is copied by `copy_file_range` (in the kernel, no user-space copy), then
//! by read/write, so the capture never fails for the lack of a clone.
//! `COMMITTER_CAPTURE=tar` forces the raw-tar capture of before (`--squash` always uses it).

use super::spool;
use crate::containerd::lookup::SnapshotMount;
use crate::diff::{ContentHook, ContentStore, Kept};
use crate::freeze::CaptureKind;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Files smaller than this go into the recipe inline: reading them costs less than a clone's
/// create, ioctl and later unlink, and a clone shares whole blocks only.
const INLINE: u64 = 64 << 10;

/// The capture forced by the environment: `tar` (the raw tar copied and hashed while paused);
/// anything else is the per-file capture.
fn tar_forced() -> bool {
    std::env::var("COMMITTER_CAPTURE").as_deref() == Ok("tar")
}

/// Decides, before the pause, how this capture keeps contents: per file, as clones when the
/// spool's filesystem is the snapshot's and it clones, else as kernel copies (`copy_file_range`:
/// measured with scripts/bench.sh's scaling workload on ext4, 1.4-4.3x shorter pauses than writing
/// and hashing the raw tar). None: the raw-tar capture. `data` is where the snapshot's files live
/// on the host (the upperdir, or the native snapshot's directory).
pub(super) fn choose(spool_dir: &Path, data: Option<&Path>) -> Option<(Clones, CaptureKind)> {
    if tar_forced() {
        return None;
    }
    let reflink = data.is_some_and(|d| same_filesystem(spool_dir, d)) && probe(spool_dir);
    let kind = if reflink {
        CaptureKind::Reflink
    } else {
        CaptureKind::Copy
    };
    match Clones::new(spool_dir) {
        Ok(c) => Some((c, kind)),
        Err(e) => {
            crate::log::debug(&format!(
                "no capture directory in the spool ({e}): the raw tar is copied"
            ));
            None
        }
    }
}

fn same_filesystem(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    }
}

/// Whether the spool's filesystem clones: one `FICLONE` of a one-block file.
fn probe(dir: &Path) -> bool {
    let run = || -> io::Result<()> {
        let mut src = tempfile::tempfile_in(dir)?;
        io::Write::write_all(&mut src, &[0u8; 4096])?;
        let dst = tempfile::tempfile_in(dir)?;
        rustix::fs::ioctl_ficlone(&dst, &src)?;
        Ok(())
    };
    run().is_ok()
}

/// The clones of one capture: a directory in the spool, one file per kept content, named by
/// its index; and where each goes in the tar.
pub(super) struct Clones {
    store: Arc<Mutex<Store>>,
}

struct Store {
    dir: tempfile::TempDir,
    /// (tar offset, size) of each kept content, in tar order; file `dir/INDEX`.
    kept: Vec<(u64, u64)>,
    /// `FICLONE` has not been refused yet in this capture.
    clone: bool,
    /// `copy_file_range` has not been refused yet.
    kernel_copy: bool,
    cloned: u64,
    copied: u64,
}

impl Clones {
    fn new(spool_dir: &Path) -> io::Result<Clones> {
        let dir = tempfile::Builder::new()
            .prefix(".committer-clones-")
            .tempdir_in(spool_dir)?;
        crate::guard::tell_owned_path(dir.path());
        let store = Store {
            dir,
            kept: Vec::new(),
            clone: true,
            kernel_copy: true,
            cloned: 0,
            copied: 0,
        };
        Ok(Clones {
            store: Arc::new(Mutex::new(store)),
        })
    }

    /// What the diff's sink is given.
    pub(super) fn hook(&self) -> ContentHook {
        ContentHook(self.store.clone())
    }

    /// Bytes the kept contents take in the tar (content and padding).
    pub(super) fn stored_bytes(&self) -> u64 {
        let s = self.lock();
        s.kept
            .iter()
            .map(|&(_, size)| size.div_ceil(512) * 512)
            .sum()
    }

    /// The layer's tar, rebuilt from `recipe` (read from its start) and the clones.
    pub(super) fn assemble(self, mut recipe: File) -> io::Result<Assembler> {
        io::Seek::seek(&mut recipe, io::SeekFrom::Start(0))?;
        let store = Arc::try_unwrap(self.store)
            .map_err(|_| io::Error::other("the clone store is still shared"))?
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        crate::log::debug(&format!(
            "capture: {} contents cloned, {} copied",
            store.cloned, store.copied
        ));
        Ok(Assembler {
            recipe,
            recipe_read: 0,
            recipe_released: 0,
            pos: 0,
            kept: store.kept.into_iter(),
            next: None,
            index: 0,
            dir: store.dir,
            state: State::Recipe,
        }
        .advance())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ContentStore for Store {
    fn reset(&mut self) {
        for i in 0..self.kept.len() {
            let _ = std::fs::remove_file(self.dir.path().join(i.to_string()));
        }
        self.kept.clear();
    }

    fn keep(&mut self, file: &File, size: u64, at: u64) -> io::Result<Kept> {
        if size < INLINE {
            return Ok(Kept::Inline);
        }
        let path = self.dir.path().join(self.kept.len().to_string());
        let dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let got = self.capture(file, &dst, size)?;
        if got < size {
            drop(dst);
            let _ = std::fs::remove_file(&path);
            return Ok(Kept::Short(got));
        }
        self.kept.push((at, size));
        // The tar the compressor will read holds these bytes (and their padding): the progress
        // counts them as read, as it counts what a copying capture writes.
        crate::progress::add_tar(size.div_ceil(512) * 512);
        Ok(Kept::Stored)
    }
}

/// `FICLONE` fails with these when this pair of files cannot share blocks (another mount or
/// filesystem, a filesystem without clones, an unaligned or special file).
fn refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EXDEV
                | libc::EOPNOTSUPP
                | libc::EINVAL
                | libc::ENOTTY
                | libc::ENOSYS
                | libc::EPERM
        )
    )
}

impl Store {
    /// Puts `size` bytes of `src` into `dst`; returns how many `src` had (less means short).
    fn capture(&mut self, src: &File, dst: &File, size: u64) -> io::Result<u64> {
        if self.clone {
            match rustix::fs::ioctl_ficlone(dst, src) {
                Ok(()) => {
                    self.cloned += 1;
                    return Ok(dst.metadata()?.len().min(size));
                }
                Err(e) if refused(&e.into()) => self.clone = false,
                Err(e) => return Err(e.into()),
            }
        }
        self.copied += 1;
        let mut done = 0u64;
        while self.kernel_copy && done < size {
            let want = usize::try_from(size - done)
                .unwrap_or(usize::MAX)
                .min(spool::CHECK_CHUNK);
            let (mut off_in, mut off_out) = (done, done);
            match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want)
            {
                Ok(0) => return Ok(done),
                Ok(n) => {
                    done += n as u64;
                    spool::wrote(n as u64)?;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) if done == 0 && refused(&e.into()) => self.kernel_copy = false,
                Err(e) => return spool::observe(Err(e.into())),
            }
        }
        if done < size {
            done += copy_rest(src, dst, done, size)?;
        }
        Ok(done)
    }
}

/// Read/write from `from` up to `size` bytes, for filesystems without `copy_file_range`.
fn copy_rest(src: &File, dst: &File, from: u64, size: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = from;
    while at < size {
        let want = buf
            .len()
            .min(usize::try_from(size - at).unwrap_or(usize::MAX));
        let n = match src.read_at(&mut buf[..want], at) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        spool::observe(dst.write_all_at(&buf[..n], at))?;
        spool::wrote(n as u64)?;
        at += n as u64;
    }
    Ok(at - from)
}

enum State {
    /// Recipe bytes up to the next kept content (or the end).
    Recipe,
    /// A clone's bytes: the file, bytes left, bytes read, bytes released.
    Content(File, u64, u64, u64),
    /// Zeros padding a content to its block.
    Pad(u64),
}

/// The layer's tar, read back from the recipe and the clones (see the module doc). Consumed
/// recipe ranges are punched out and each clone is deleted when opened, so the spool shrinks
/// while the compressor reads.
pub(super) struct Assembler {
    recipe: File,
    recipe_read: u64,
    recipe_released: u64,
    /// Position in the tar.
    pos: u64,
    kept: std::vec::IntoIter<(u64, u64)>,
    next: Option<(u64, u64)>,
    /// Index of `next`.
    index: usize,
    dir: tempfile::TempDir,
    state: State,
}

impl Assembler {
    fn advance(mut self) -> Self {
        self.next = self.kept.next();
        self
    }

    fn clone_path(&self) -> PathBuf {
        self.dir.path().join(self.index.to_string())
    }

    /// Recipe bytes (0 at its end), or None when a clone starts here.
    fn read_recipe(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let limit = match self.next {
            Some((at, size)) if at == self.pos => {
                let path = self.clone_path();
                // Writable: consumed ranges are punched out of it (fallocate needs that).
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))
                    })?;
                // Its blocks go back when this handle closes.
                std::fs::remove_file(&path)?;
                self.state = State::Content(file, size, 0, 0);
                return Ok(None);
            }
            Some((at, _)) => usize::try_from(at - self.pos).unwrap_or(usize::MAX),
            None => usize::MAX,
        };
        let want = buf.len().min(limit);
        let n = self.recipe.read(&mut buf[..want])?;
        if n == 0 && self.next.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the capture's recipe ended before its last clone",
            ));
        }
        self.pos += n as u64;
        self.recipe_read += n as u64;
        if self.recipe_read - self.recipe_released >= spool::PUNCH_STEP {
            spool::release(&self.recipe, self.recipe_released, self.recipe_read);
            self.recipe_released = self.recipe_read;
        }
        Ok(Some(n))
    }
}

impl Read for Assembler {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let n = match &mut self.state {
                State::Recipe => match self.read_recipe(buf)? {
                    Some(n) => return Ok(n),
                    None => continue,
                },
                State::Content(file, left, done, released) => {
                    let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let n = file.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "a clone in the spool is shorter than when it was captured",
                        ));
                    }
                    (*left, *done) = (*left - n as u64, *done + n as u64);
                    if *done - *released >= spool::PUNCH_STEP {
                        spool::release(file, *released, *done);
                        *released = *done;
                    }
                    if *left == 0 {
                        let size = *done;
                        self.state = State::Pad(size.div_ceil(512) * 512 - size);
                        self.index += 1;
                        self.next = self.kept.next();
                    }
                    self.pos += n as u64;
                    n
                }
                State::Pad(0) => {
                    self.state = State::Recipe;
                    0
                }
                State::Pad(left) => {
                    let n = buf.len().min(*left as usize);
                    buf[..n].fill(0);
                    *left -= n as u64;
                    self.pos += n as u64;
                    n
                }
            };
            if n > 0 {
                return Ok(n);
            }
        }
    }
}

/// Where the snapshot's files live on the host: the upperdir of an overlay snapshot, the
/// directory of a native one.
pub(super) fn data_dir(mounts: &[SnapshotMount]) -> Option<PathBuf> {
    let [m] = mounts else { return None };
    match m.kind.as_str() {
        "overlay" => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from),
        "bind" | "rbind" => Some(PathBuf::from(&m.source)),
        _ => None,
    }
}

#[cfg(test)]
#[path = "reflink_tests.rs"]
mod tests;
