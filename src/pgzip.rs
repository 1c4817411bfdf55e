//! Parallel gzip (pigz-style): the input is cut into fixed 1 MiB blocks, each deflated on a
//! worker thread and ended with a sync flush (byte-aligned, not final); the last block ends the
//! stream. The blocks are written in order as one ordinary gzip member, so every gunzip reads
//! it (some readers, e.g. flate2's `GzDecoder`, stop after a first member). The output depends
//! only on the input and the level — never on the thread count — so the same tree always gives
//! the same layer digest.
//!
//! Two things keep it fast at the ratio of a single-stream deflate:
//! - each block is primed with the last 32 KiB of the block before it as the deflate dictionary
//!   (as pigz does), so matches reach back across the block boundary;
//! - a block that deflate could not shrink (random or already-compressed data: its byte entropy
//!   is near 8 bits and a level-1 trial of its first 64 KiB saves < 2%) is written as stored
//!   blocks, without running the matcher over it. The decision reads the block's bytes only.
//!
//! Memory is bounded: at most `2 × threads` blocks are in flight.

use flate2::{Compress, Compression, Crc, FlushCompress};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

const BLOCK: usize = 1 << 20;
/// Deflate's window: how much of the previous block primes the next one.
const DICT: usize = 32 * 1024;
/// gzip header: magic, deflate, no flags, mtime 0, no extra flags, OS "unknown" — fixed bytes
/// so that the digest depends on content only.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

struct Job {
    data: Vec<u8>,
    /// The end of the previous block (empty for the first).
    dict: Vec<u8>,
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
    /// The dictionary of the next block: the last 32 KiB submitted so far.
    dict: Vec<u8>,
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
            dict: Vec::new(),
            max_in_flight: 2 * threads,
            workers,
        })
    }

    fn submit(&mut self, last: bool) -> io::Result<()> {
        let data = std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(if last { 0 } else { BLOCK }),
        );
        let dict = self.dict_for_next(&data);
        let dict = std::mem::replace(&mut self.dict, dict);
        let (done, rx) = sync_channel(1);
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("gzip encoder already finished"))?;
        jobs.send(Job {
            data,
            dict,
            last,
            done,
        })
        .map_err(|_| io::Error::other("gzip workers stopped"))?;
        self.in_flight.push_back(rx);
        while self.in_flight.len() > if last { 0 } else { self.max_in_flight } {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn dict_for_next(&self, data: &[u8]) -> Vec<u8> {
        data[data.len().saturating_sub(DICT)..].to_vec()
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
    let mut block = BlockDeflater::new(level);
    loop {
        let job = match jobs.lock().expect("job queue lock").recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let _ = job.done.send(block.deflate(&job.data, &job.dict, job.last));
    }
}

/// Deflates blocks one at a time, reusing one compressor (a reset gives the same bytes as a new
/// one: the output of a block depends on its bytes, its dictionary and the level only).
pub(crate) struct BlockDeflater {
    c: Compress,
    level: u32,
    /// Prime each block with the previous one's end (off only to measure what it is worth).
    pub(crate) prime: bool,
    /// Store incompressible blocks without deflating them (off only to measure).
    pub(crate) detect: bool,
}

impl BlockDeflater {
    pub(crate) fn new(level: u32) -> Self {
        BlockDeflater {
            c: Compress::new(Compression::new(level), false),
            level,
            prime: true,
            detect: true,
        }
    }

    /// Raw deflate of one block: sync-flushed (byte-aligned, not final) unless it is the last.
    pub(crate) fn deflate(&mut self, data: &[u8], dict: &[u8], last: bool) -> io::Result<Vec<u8>> {
        if self.level > 0 && self.detect && incompressible(data) {
            return Ok(stored(data, last));
        }
        self.c.reset();
        if self.level > 0 && self.prime && !dict.is_empty() {
            self.c.set_dictionary(dict).map_err(io::Error::other)?;
        }
        run(&mut self.c, data, last)
    }
}

fn run(c: &mut Compress, data: &[u8], last: bool) -> io::Result<Vec<u8>> {
    let start = c.total_in();
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        let consumed = (c.total_in() - start) as usize;
        out.reserve(64 * 1024);
        let status = c
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let all_in = (c.total_in() - start) as usize == data.len();
        match status {
            flate2::Status::StreamEnd => return Ok(out),
            // A sync flush is complete when all input is consumed and output space was left over.
            _ if !last && all_in && out.len() < out.capacity() => return Ok(out),
            _ => {}
        }
    }
}

/// Whether deflate would not shrink `data` by a useful amount: its byte histogram is nearly flat
/// (order-0 entropy above ~7.9 bits per byte, so Huffman coding saves < ~1.3%) and a fast trial
/// deflate of its first 64 KiB finds no repeats either (saves < 2%). Integer arithmetic only, so
/// the verdict — and the layer digest — is the same on every machine.
pub(crate) fn incompressible(data: &[u8]) -> bool {
    const TRIAL: usize = 64 * 1024;
    if data.len() < TRIAL {
        return false;
    }
    let mut hist = [[0u32; 256]; 4];
    let mut quads = data.chunks_exact(4);
    for q in &mut quads {
        hist[0][q[0] as usize] += 1;
        hist[1][q[1] as usize] += 1;
        hist[2][q[2] as usize] += 1;
        hist[3][q[3] as usize] += 1;
    }
    for &b in quads.remainder() {
        hist[0][b as usize] += 1;
    }
    // With p_i = c_i / n: 8 - H ≈ D / (2 ln 2), D = 256 Σ (p_i - 1/256)² = Σ e_i² / (256 n²)
    // where e_i = 256 c_i - n. H ≥ 7.9 ⇔ D ≤ 0.1386 ⇔ 10000 Σ e_i² ≤ 1386 · 256 · n².
    let n = data.len() as i128;
    let dev: i128 = (0..256)
        .map(|i| {
            let c: i128 = hist.iter().map(|h| h[i] as i128).sum();
            let e = 256 * c - n;
            e * e
        })
        .sum();
    if 10_000 * dev > 1386 * 256 * n * n {
        return false;
    }
    let sample = &data[..TRIAL];
    let mut c = Compress::new(Compression::new(2), false);
    match run(&mut c, sample, true) {
        Ok(out) => out.len() * 50 > sample.len() * 49,
        Err(_) => false,
    }
}

/// `data` as stored deflate blocks (≤ 65535 bytes each); the final-block bit on the last one
/// only when this is the stream's last block.
pub(crate) fn stored(data: &[u8], last: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 5 * (data.len() / 65_535 + 1));
    let mut chunks = data.chunks(65_535).peekable();
    if data.is_empty() && last {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let fin = last && chunks.peek().is_none();
        let len = chunk.len() as u16;
        out.push(u8::from(fin));
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out
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

    /// Bytes no deflate can shrink (xorshift noise).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    /// Text, then noise, then text that repeats the first: blocks of both kinds, and matches
    /// that reach back across a block boundary.
    fn mixed() -> Vec<u8> {
        let text = sample(BLOCK + 300_000);
        let mut data = text.clone();
        data.extend(noise(2 * BLOCK + 4321, 9));
        data.extend_from_slice(&text[..BLOCK / 2]);
        data
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut back)
            .unwrap();
        back
    }

    #[test]
    fn thread_count_does_not_change_the_bytes() {
        let data = sample(3 * BLOCK + 99);
        assert!(compress(&data, 1) == compress(&data, 4));
        let data = mixed();
        assert!(compress(&data, 1) == compress(&data, 3));
    }

    #[test]
    fn noise_is_stored_and_text_is_deflated() {
        assert!(incompressible(&noise(BLOCK, 1)));
        assert!(!incompressible(&sample(BLOCK)));
        // Flat byte histogram, but 16 KiB of noise repeated: the trial deflate finds the repeats.
        let repeated: Vec<u8> = noise(16 * 1024, 3).repeat(64);
        assert!(!incompressible(&repeated));
        // Noise is stored: 5 bytes of header per 64 KiB, far less than deflate's own overhead
        // would add, and the matcher never runs.
        let data = noise(3 * BLOCK, 5);
        let gz = compress(&data, 2);
        assert!(gz.len() <= data.len() + 5 * (data.len() / 65_535 + 4) + 18);
        assert!(gunzip(&gz) == data);
    }

    #[test]
    fn blocks_of_both_kinds_gunzip_to_the_input() {
        let data = mixed();
        let gz = compress(&data, 2);
        assert!(gunzip(&gz) == data);
        // The repeat of the first text half a block long is found through the primed dictionary
        // only where it crosses into the window; overall the text still compresses well.
        assert!(
            gz.len() < data.len() * 4 / 5,
            "{} of {}",
            gz.len(),
            data.len()
        );
        // Stored blocks alone are a raw deflate stream: 5 bytes of header per 65535 bytes, and
        // an empty last block is the 5-byte final stored block.
        for len in [0, 1, 65_535, 65_536, 200_000] {
            let data = noise(len, 4);
            let raw = stored(&data, true);
            assert_eq!(raw.len(), len + 5 * len.div_ceil(65_535).max(1));
            let mut back = Vec::new();
            flate2::read::DeflateDecoder::new(&raw[..])
                .read_to_end(&mut back)
                .unwrap();
            assert!(back == data, "stored round trip of {len} bytes");
        }
    }

    #[test]
    fn system_gzip_reads_it() {
        let data = mixed();
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

#[cfg(test)]
#[path = "pgzip_probe.rs"]
mod probe;
