//! A file read while it is written: the writer publishes how many bytes are in the file and
//! whether it finished or failed; a reader blocks for more, never reads past what was published,
//! and fails when the writer failed or started the file over (a rewind: the capture's
//! upperdir → walk fallback, or a compressor started again). This is how compression starts on
//! the raw tar while the paused capture still writes it, and how the upload starts on the
//! compressed layer while the compressor still writes it.
//!
//! A reader may also be held back (`hold`) until the writer's owner lets it go: the compressor
//! can wait for the sandbox's resume instead of starting during the pause.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Debug, Default)]
struct State {
    /// Bytes written and readable.
    len: u64,
    /// Bumped by every rewind: a reader of an older epoch reads bytes that are gone.
    epoch: u64,
    finished: bool,
    failed: Option<String>,
    /// Readers wait while this is set (and the file has not failed).
    held: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

/// The handle readers are opened from; cheap to clone.
#[derive(Debug, Clone)]
pub struct Growing {
    shared: Arc<Shared>,
    file: Arc<File>,
}

/// Writes to the file and publishes every byte written. Dropped before `finish`, it marks the
/// file failed, so no reader waits for bytes that will never come.
pub struct GrowingWriter {
    shared: Arc<Shared>,
    file: Arc<File>,
    pos: u64,
    done: bool,
}

/// Creates the pair over `file` (written from its start; the writer owns the writes).
pub fn growing(file: File, held: bool) -> (GrowingWriter, Growing) {
    let shared = Arc::new(Shared::default());
    shared.lock().held = held;
    let file = Arc::new(file);
    let writer = GrowingWriter {
        shared: shared.clone(),
        file: file.clone(),
        pos: 0,
        done: false,
    };
    (writer, Growing { shared, file })
}

impl GrowingWriter {
    /// Everything is written: readers get end-of-file after the last byte.
    pub fn finish(mut self) {
        self.done = true;
        self.shared.update(|s| s.finished = true);
    }

    /// The writer gave up: readers fail with `why`.
    pub fn fail(mut self, why: &str) {
        self.done = true;
        self.shared.update(|s| s.failed = Some(why.to_string()));
    }

    /// Starts the file over, empty; readers opened before fail ("rewound").
    pub fn rewind(&mut self) -> io::Result<()> {
        let mut st = self.shared.lock();
        st.epoch += 1;
        st.len = 0;
        // Under the lock: a reader punching holes behind itself checks the epoch under it too,
        // so no stale punch lands on the new bytes.
        let truncated = self.file.set_len(0);
        self.pos = 0;
        drop(st);
        self.shared.changed.notify_all();
        truncated
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Write for GrowingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = super::spool::observe(self.file.write_at(buf, self.pos))?;
        self.pos += n as u64;
        let pos = self.pos;
        self.shared.update(|s| s.len = pos);
        super::spool::wrote(n as u64)?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for GrowingWriter {
    fn drop(&mut self) {
        if !self.done {
            self.shared.update(|s| {
                s.failed
                    .get_or_insert_with(|| "the writer stopped before the end".into());
            });
        }
    }
}

impl Growing {
    /// A reader from byte 0 of the file as it is now (this epoch). With `release`, every `step`
    /// bytes read are punched out of the file behind the reader (the spool keeps one copy).
    pub fn reader(&self, release: Option<u64>) -> GrowingReader {
        let epoch = self.shared.lock().epoch;
        GrowingReader {
            growing: self.clone(),
            epoch,
            pos: 0,
            release,
            released: 0,
        }
    }

    /// The file's bytes as an async stream, read from byte 0 as they are written, on a thread of
    /// its own (dropping the stream stops it). Ends with an error if the writer fails or rewinds.
    pub fn stream(&self) -> futures_util::stream::BoxStream<'static, io::Result<bytes::Bytes>> {
        use futures_util::StreamExt;
        const PIECE: usize = 256 * 1024;
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<bytes::Bytes>>(8);
        let mut reader = self.reader(None);
        let spawned = std::thread::Builder::new()
            .name("layer-reader".into())
            .spawn(move || loop {
                let mut buf = vec![0u8; PIECE];
                let piece = match reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        Ok(bytes::Bytes::from(buf))
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => Err(e),
                };
                let failed = piece.is_err();
                if tx.blocking_send(piece).is_err() || failed {
                    return;
                }
            });
        if let Err(e) = spawned {
            return futures_util::stream::once(async move { Err(e) }).boxed();
        }
        futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|piece| (piece, rx))
        })
        .boxed()
    }

    /// Lets held readers go (idempotent).
    pub fn unhold(&self) {
        self.shared.update(|s| s.held = false);
    }

    /// Marks the file failed (readers stop with `why`), e.g. when its consumer is gone.
    pub fn fail(&self, why: &str) {
        self.shared.update(|s| {
            s.failed.get_or_insert_with(|| why.to_string());
        });
    }
}

pub struct GrowingReader {
    growing: Growing,
    epoch: u64,
    pos: u64,
    release: Option<u64>,
    released: u64,
}

impl GrowingReader {
    /// Waits until bytes past `pos` are published (their count, at most `want`), or the end (0).
    fn wait(&mut self, want: usize) -> io::Result<usize> {
        let shared = self.growing.shared.clone();
        let mut st = shared.lock();
        loop {
            if let Some(why) = &st.failed {
                return Err(io::Error::other(why.clone()));
            }
            if st.epoch != self.epoch {
                return Err(io::Error::other(Rewound));
            }
            if !st.held {
                if st.len > self.pos {
                    let n = (st.len - self.pos).min(want as u64) as usize;
                    self.punch(&st);
                    return Ok(n);
                }
                if st.finished {
                    return Ok(0);
                }
            }
            st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Punches out what was read, under the state lock (see `rewind`), once the writer is done:
    /// a hole punch takes the file's lock and waits for its dirty pages to be written back, which
    /// would stall the writer (the paused capture) behind it.
    fn punch(&mut self, st: &State) {
        let Some(step) = self.release else { return };
        if st.finished && st.epoch == self.epoch && self.pos - self.released >= step {
            super::spool::release(&self.growing.file, self.released, self.pos);
            self.released = self.pos;
        }
    }
}

impl Read for GrowingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.wait(buf.len())?;
        if n == 0 {
            return Ok(0);
        }
        let got = self.growing.file.read_at(&mut buf[..n], self.pos)?;
        if got == 0 {
            let msg = format!(
                "the spool file ended at byte {} before its writer",
                self.pos
            );
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, msg));
        }
        self.pos += got as u64;
        Ok(got)
    }
}

/// The error a reader gets when the file was started over under it.
#[derive(Debug, Clone, Copy)]
pub struct Rewound;

impl std::fmt::Display for Rewound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the spool file was started over while being read")
    }
}

impl std::error::Error for Rewound {}

/// Whether `e` (or what it wraps) says the file was started over.
pub fn is_rewound(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Rewound>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pair(held: bool) -> (GrowingWriter, Growing) {
        growing(tempfile::tempfile().unwrap(), held)
    }

    #[test]
    fn a_reader_follows_the_writer_and_ends_only_when_it_finishes() {
        let (mut w, g) = pair(false);
        let reader = std::thread::spawn({
            let g = g.clone();
            move || {
                let mut out = Vec::new();
                g.reader(None).read_to_end(&mut out).map(|_| out)
            }
        });
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        for part in data.chunks(7_000) {
            w.write_all(part).unwrap();
            if part[0] == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(!reader.is_finished(), "no end-of-file before finish");
        w.finish();
        assert!(reader.join().unwrap().unwrap() == data);
    }

    #[test]
    fn a_failed_or_dropped_writer_fails_its_readers() {
        let (mut w, g) = pair(false);
        w.write_all(b"partial").unwrap();
        w.fail("disk full");
        let e = g.reader(None).read_to_end(&mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");

        let (mut w, g) = pair(false);
        w.write_all(b"partial").unwrap();
        drop(w);
        let e = g.reader(None).read_to_end(&mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("stopped before the end"), "{e}");
    }

    #[test]
    fn a_rewind_fails_old_readers_and_new_readers_see_only_the_new_bytes() {
        let (mut w, g) = pair(false);
        w.write_all(&[1u8; 4096]).unwrap();
        let mut old = g.reader(None);
        let mut first = [0u8; 16];
        old.read_exact(&mut first).unwrap();
        w.rewind().unwrap();
        assert!(is_rewound(&old.read(&mut first).unwrap_err()));
        let fresh = g.reader(None);
        w.write_all(b"second").unwrap();
        w.finish();
        let mut out = Vec::new();
        { fresh }.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"second");
    }

    #[test]
    fn a_held_reader_waits_for_unhold() {
        let (mut w, g) = pair(true);
        w.write_all(b"abc").unwrap();
        w.finish();
        let reader = std::thread::spawn({
            let g = g.clone();
            move || {
                let mut out = Vec::new();
                g.reader(None).read_to_end(&mut out).unwrap();
                out
            }
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(!reader.is_finished(), "held");
        g.unhold();
        assert_eq!(reader.join().unwrap(), b"abc");
    }

    #[test]
    fn nothing_is_released_while_the_writer_writes() {
        use std::os::unix::fs::MetadataExt;
        let (mut w, g) = pair(false);
        w.write_all(&vec![9u8; 4 << 20]).unwrap();
        let mut r = g.reader(Some(1 << 20));
        let mut buf = vec![0u8; 3 << 20];
        r.read_exact(&mut buf).unwrap();
        r.read_exact(&mut buf[..1]).unwrap();
        let blocks = g.file.metadata().unwrap().blocks() * 512;
        assert!(blocks >= 4 << 20, "{blocks} bytes allocated");
    }

    #[test]
    fn released_bytes_are_only_those_already_read() {
        use std::os::unix::fs::MetadataExt;
        let (mut w, g) = pair(false);
        w.write_all(&vec![9u8; 6 << 20]).unwrap();
        w.finish();
        let mut r = g.reader(Some(1 << 20));
        let mut buf = vec![0u8; 3 << 20];
        r.read_exact(&mut buf).unwrap();
        // The next read punches what was read so far.
        r.read_exact(&mut buf[..1]).unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert!(rest.iter().all(|b| *b == 9), "unread bytes are intact");
        assert_eq!(rest.len(), (3 << 20) - 1);
        let blocks = g.file.metadata().unwrap().blocks() * 512;
        assert!(blocks < 6 << 20, "{blocks} bytes still allocated");
    }
}
