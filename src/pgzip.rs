//! Parallel gzip (pigz-style): the input is cut into fixed 1 MiB blocks, each deflated on a
//! worker thread and ended with a sync flush (byte-aligned, not final); the last block ends the
//! stream. The blocks are written in order as one ordinary gzip member, so every gunzip reads
//! it. The output depends only on the input and the level — never on the thread count — so the
//! same tree always gives the same layer digest.
//!
//! Memory is bounded: at most `2 × threads` blocks are in flight.

use flate2::{Compress, Compression, Crc, FlushCompress};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

const BLOCK: usize = 1 << 20;
/// gzip header: magic, deflate, no flags, mtime 0, no extra flags, OS "unknown" — fixed bytes
/// so that the digest depends on content only.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

struct Job {
    data: Vec<u8>,
    last: bool,
    done: SyncSender<io::Result<Vec<u8>>>,
}

pub struct ParGzEncoder<W: Write> {
    sink: Option<W>,
    level: u32,
    crc: Crc,
    buf: Vec<u8>,
    jobs: Option<SyncSender<Job>>,
    in_flight: VecDeque<Receiver<io::Result<Vec<u8>>>>,
    max_in_flight: usize,
    workers: Vec<JoinHandle<()>>,
}

impl<W: Write> ParGzEncoder<W> {
    pub fn new(mut sink: W, level: u32, threads: u32) -> io::Result<Self> {
        sink.write_all(&HEADER)?;
        let threads = threads.max(1) as usize;
        let (tx, rx) = sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .map(|i| {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("gzip-{i}"))
                    .spawn(move || worker(rx, level))
                    .expect("spawning a gzip worker")
            })
            .collect();
        Ok(ParGzEncoder {
            sink: Some(sink),
            level,
            crc: Crc::new(),
            buf: Vec::with_capacity(BLOCK),
            jobs: Some(tx),
            in_flight: VecDeque::new(),
            max_in_flight: 2 * threads,
            workers,
        })
    }

    fn submit(&mut self, last: bool) -> io::Result<()> {
        let data = std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(if last { 0 } else { BLOCK }),
        );
        let (done, rx) = sync_channel(1);
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("gzip encoder already finished"))?;
        jobs.send(Job { data, last, done })
            .map_err(|_| io::Error::other("gzip workers stopped"))?;
        self.in_flight.push_back(rx);
        while self.in_flight.len() > if last { 0 } else { self.max_in_flight } {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        let rx = self.in_flight.pop_front().expect("a block in flight");
        let block = rx
            .recv()
            .map_err(|_| io::Error::other("a gzip worker died"))??;
        self.sink
            .as_mut()
            .expect("sink present until finish")
            .write_all(&block)
    }

    /// Compresses what is left, writes the trailer and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.submit(true)?;
        let mut sink = self.sink.take().expect("sink present until finish");
        sink.write_all(&self.crc.sum().to_le_bytes())?;
        sink.write_all(&self.crc.amount().to_le_bytes())?;
        Ok(sink)
    }
}

impl<W: Write> Write for ParGzEncoder<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(BLOCK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.crc.update(&data[..n]);
        if self.buf.len() == BLOCK {
            self.submit(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Blocks are only cut at fixed offsets (determinism), so flush only pushes out what is done.
        self.sink.as_mut().map_or(Ok(()), |s| s.flush())
    }
}

impl<W: Write> Drop for ParGzEncoder<W> {
    fn drop(&mut self) {
        self.jobs.take();
        self.in_flight.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let _ = self.level;
    }
}

fn worker(jobs: Arc<Mutex<Receiver<Job>>>, level: u32) {
    loop {
        let job = match jobs.lock().expect("job queue lock").recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let _ = job.done.send(deflate_block(&job.data, level, job.last));
    }
}

/// Raw deflate of one block: sync-flushed (byte-aligned, not final) unless it is the last.
fn deflate_block(data: &[u8], level: u32, last: bool) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        let consumed = c.total_in() as usize;
        out.reserve(64 * 1024);
        let status = c
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let all_in = c.total_in() as usize == data.len();
        match status {
            flate2::Status::StreamEnd => return Ok(out),
            // A sync flush is complete when all input is consumed and output space was left over.
            _ if !last && all_in && out.len() < out.capacity() => return Ok(out),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn compress(data: &[u8], threads: u32) -> Vec<u8> {
        let mut e = ParGzEncoder::new(Vec::new(), 6, threads).unwrap();
        for chunk in data.chunks(300_001) {
            e.write_all(chunk).unwrap();
        }
        e.finish().unwrap()
    }

    fn sample(len: usize) -> Vec<u8> {
        let mut x: u32 = 7;
        (0..len)
            .map(|i| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                if i % 3 == 0 {
                    (x >> 24) as u8
                } else {
                    b"abcdefgh"[i % 8]
                }
            })
            .collect()
    }

    #[test]
    fn output_is_one_gzip_stream_that_gunzips_to_the_input() {
        for len in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 12_345] {
            let data = sample(len);
            let gz = compress(&data, 3);
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_end(&mut back)
                .unwrap();
            assert!(back == data, "round trip of {len} bytes");
            // A single member: MultiGzDecoder would hide a second one; GzDecoder stops at the first.
            assert_eq!(&gz[..10], &HEADER);
        }
    }

    #[test]
    fn thread_count_does_not_change_the_bytes() {
        let data = sample(3 * BLOCK + 99);
        assert!(compress(&data, 1) == compress(&data, 4));
    }

    #[test]
    fn system_gzip_reads_it() {
        let data = sample(2 * BLOCK + 5);
        let gz = compress(&data, 2);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gz");
        std::fs::write(&p, &gz).unwrap();
        let out = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gzip -t: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == data);
    }
}
