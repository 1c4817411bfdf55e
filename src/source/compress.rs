//! The compressor: any reader of the uncompressed tar in (`Box<dyn Read + Send>`: the raw spool
//! tailed while the paused capture writes it, or another source's assembler), the compressed
//! layer out into a [`growing`](super::growing) file that the upload can tail while it grows.
//! It runs on a thread of its own. When it is let run during the pause (`Priority::low`), that
//! thread and the workers it spawns (which inherit it) run at the lowest CPU priority, so that
//! the capture keeps the CPU it needs; after the resume they are put back.
//!
//! When its input was started over (the capture's upperdir → walk fallback), it starts over too,
//! rewinding its own output (an upload tailing it fails and falls back to the finished file).

use super::growing::{growing, is_rewound, Growing, GrowingWriter};
use crate::digest::Digest;
use crate::error::CommitError;
use crate::layer::{CompressOptions, LayerDescriptor, LayerWriter};
use crate::log;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

const BUF: usize = 1 << 20;
/// The nice value of a compressor that must not take CPU from the paused capture.
const LOWEST: i32 = 19;

/// A compression under way.
pub struct Compressing {
    /// The compressed bytes as they are written (readers fail if the compressor fails).
    pub output: Growing,
    done: oneshot::Receiver<Result<LayerDescriptor, CommitError>>,
}

impl Compressing {
    /// The compressed layer's descriptor once every byte is in the output file.
    pub async fn finished(self) -> Result<LayerDescriptor, CommitError> {
        match self.done.await {
            Ok(result) => result,
            Err(_) => Err(CommitError::Task {
                what: "the compressor",
                detail: "it stopped without an answer".into(),
            }),
        }
    }

    /// As `finished`, and the tar it read must hash to `diff_id` when the capture hashed it
    /// while writing it: a full or failing spool disk shows here rather than in the image.
    pub async fn checked(self, diff_id: Option<&Digest>) -> Result<LayerDescriptor, CommitError> {
        let desc = self.finished().await?;
        if let Some(written) = diff_id.filter(|d| **d != desc.diff_id) {
            return Err(CommitError::SpoolCorrupt {
                written: written.clone(),
                read: desc.diff_id,
            });
        }
        log::info(&format!(
            "compressed the layer into {} bytes ({})",
            desc.size, desc.digest
        ));
        Ok(desc)
    }
}

/// Whether the compressor's threads run at the lowest priority: shared between the compressor
/// (which lowers itself when it starts, if still wanted) and the pipeline (which puts every
/// lowered thread back after the resume). One lock orders the two, so a compressor that starts
/// late never lowers itself after the restore.
#[derive(Clone, Default)]
pub struct Priority {
    low: Arc<Mutex<Option<i32>>>,
}

impl Priority {
    /// Compressors started from here run at the lowest priority until `restore`.
    pub fn low() -> Priority {
        Priority {
            low: Arc::new(Mutex::new(Some(LOWEST))),
        }
    }

    /// Called on the compressor's thread before it spawns its workers.
    fn apply(&self) {
        let low = self.low.lock().unwrap_or_else(|e| e.into_inner());
        if low.is_some() {
            nice::lower_this_thread(LOWEST);
        }
    }

    /// Every lowered thread back to the process's priority (idempotent).
    pub fn restore(&self) {
        let mut low = self.low.lock().unwrap_or_else(|e| e.into_inner());
        if low.take().is_some() {
            nice::restore_lowered(LOWEST);
        }
    }
}

/// Starts compressing what `input` yields into `out` on a thread of its own. `input` is called
/// again when its reader reports that the tar was started over. With `hold`, readers of the
/// output wait for `output.unhold()` (an upload should not compete with a paused capture).
pub fn start(
    mut input: impl FnMut() -> Box<dyn Read + Send> + Send + 'static,
    out: File,
    opts: CompressOptions,
    media_type: String,
    priority: Priority,
    sync: bool,
    hold: bool,
) -> io::Result<Compressing> {
    let (mut writer, output) = growing(out, hold);
    let (tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name("compressor".into())
        .spawn(move || {
            let result = loop {
                priority.apply();
                match compress(input(), &mut writer, &opts, &media_type, sync) {
                    Err(Failure::Rewound) => {
                        log::debug("the tar was started over; so is its compression");
                        if let Err(e) = writer.rewind() {
                            break Err(CommitError::io("rewinding the layer spool")(e));
                        }
                    }
                    Err(Failure::Io(e)) => break Err(CommitError::io(WHAT)(e)),
                    Ok(desc) => break Ok(desc),
                }
            };
            match &result {
                Ok(_) => writer.finish(),
                Err(e) => writer.fail(&e.to_string()),
            }
            let _ = tx.send(result);
        })?;
    Ok(Compressing { output, done })
}

enum Failure {
    Rewound,
    Io(io::Error),
}

const WHAT: &str = "compressing the layer from the tar spool";

fn compress(
    mut input: Box<dyn Read + Send>,
    out: &mut GrowingWriter,
    opts: &CompressOptions,
    media_type: &str,
    sync: bool,
) -> Result<LayerDescriptor, Failure> {
    let io = |e: io::Error| match is_rewound(&e) {
        true => Failure::Rewound,
        false => Failure::Io(e),
    };
    let sink = BufWriter::with_capacity(BUF, &mut *out);
    let mut w = LayerWriter::new(sink, opts, media_type).map_err(io)?;
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        w.write_all(&buf[..n]).map_err(io)?;
    }
    let finished = w.finish().map_err(io)?;
    let out = finished.sink.into_inner().map_err(|e| io(e.into_error()))?;
    if sync {
        out.file().sync_data().map_err(io)?;
    }
    Ok(finished.descriptor)
}

/// Per-thread CPU priority (Linux: every thread is a task with its own nice value, inherited by
/// the threads it creates).
mod nice {
    /// The calling thread (and the threads it creates from now on) at `nice`.
    pub fn lower_this_thread(nice: i32) {
        // SAFETY: plain syscalls on the calling thread's id.
        unsafe {
            let tid = libc::gettid();
            if libc::setpriority(libc::PRIO_PROCESS as _, tid as _, nice) != 0 {
                crate::log::debug("could not lower the compressor's priority");
            }
        }
    }

    /// Threads of this process at `lowered` back to the main thread's nice value. Raising a
    /// priority needs CAP_SYS_NICE (root has it); without it they stay low, which only costs time
    /// when the node is busy.
    pub fn restore_lowered(lowered: i32) {
        // SAFETY: getpriority/setpriority on this process's own task ids.
        let base = unsafe { libc::getpriority(libc::PRIO_PROCESS as _, libc::getpid() as _) };
        if base >= lowered {
            return;
        }
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return;
        };
        for tid in tasks
            .flatten()
            .filter_map(|t| t.file_name().to_str()?.parse::<u32>().ok())
        {
            // SAFETY: as above; a task that ended meanwhile just fails.
            unsafe {
                if libc::getpriority(libc::PRIO_PROCESS as _, tid as _) == lowered
                    && libc::setpriority(libc::PRIO_PROCESS as _, tid as _, base) != 0
                {
                    crate::log::debug(
                        "could not restore the compressor's priority (no CAP_SYS_NICE)",
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Compression;

    #[tokio::test]
    async fn a_started_over_input_is_compressed_again_from_its_new_start() {
        let (mut raw, tar) = growing(tempfile::tempfile().unwrap(), false);
        let opts = CompressOptions {
            compression: Compression::Gzip,
            level: Some(1),
            threads: 2,
        };
        let input = {
            let tar = tar.clone();
            move || Box::new(tar.reader(None)) as Box<dyn Read + Send>
        };
        let out = tempfile::tempfile().unwrap();
        let c = start(input, out, opts, "mt".into(), Priority::low(), false, false).unwrap();
        raw.write_all(&vec![1u8; 3 << 20]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        raw.rewind().unwrap();
        let second: Vec<u8> = (0..2_000_000u32).map(|i| (i % 13) as u8).collect();
        raw.write_all(&second).unwrap();
        raw.finish();
        let output = c.output.clone();
        let desc = c.checked(Some(&Digest::of(&second))).await.unwrap();
        let mut blob = Vec::new();
        output.reader(None).read_to_end(&mut blob).unwrap();
        assert_eq!(desc.digest, Digest::of(&blob));
        assert_eq!(desc.size, blob.len() as u64);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&blob[..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == second);
    }

    #[tokio::test]
    async fn a_wrong_diff_id_is_refused() {
        let (mut raw, tar) = growing(tempfile::tempfile().unwrap(), false);
        let opts = CompressOptions {
            compression: Compression::Zstd,
            level: None,
            threads: 1,
        };
        let input = move || Box::new(tar.reader(None)) as Box<dyn Read + Send>;
        let c = start(
            input,
            tempfile::tempfile().unwrap(),
            opts,
            "mt".into(),
            Priority::default(),
            false,
            false,
        )
        .unwrap();
        raw.write_all(b"tar bytes").unwrap();
        raw.finish();
        let e = c
            .checked(Some(&Digest::of(b"other bytes")))
            .await
            .unwrap_err();
        assert!(matches!(e, CommitError::SpoolCorrupt { .. }), "{e}");
    }
}
