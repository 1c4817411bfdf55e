//! The layer blob: tar bytes in, one streaming pass computes the diff_id (sha256 of the tar),
//! compresses, and computes the blob digest and size (sha256 of the compressed bytes) on the
//! way to the sink. A descriptor exists only once `finish` has flushed every byte.
//!
//! Writers nest: `LayerWriter { diff_id: Sha256, enc: Encoder<Counted<W>> }`.

use crate::digest::Digest;
use sha2::{Digest as _, Sha256};
use std::io::{self, Write};

/// How the new layer is compressed; decides its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

/// The new layer, as the manifest and the config name it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerDescriptor {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
    pub media_type: String,
}

/// gzip's default level, chosen by measurement (README "Performance"; `pgzip_probe.rs`): with
/// incompressible blocks stored, level 4 makes a layer no larger than buildah's (Go pgzip's
/// default) on both a mixed tree (-0.8%) and a text-heavy one (-1.9%; level 3 was +0.1% there)
/// for 0.57× the CPU of level 6, which is 0.75% smaller.
pub const GZIP_DEFAULT_LEVEL: i32 = 4;

/// Compression settings.
#[derive(Debug, Clone, Copy)]
pub struct CompressOptions {
    pub compression: Compression,
    /// gzip 0-9 (default `GZIP_DEFAULT_LEVEL`), zstd 1-19 (default 3).
    pub level: Option<i32>,
    /// Compression threads (gzip workers; zstd: 1 = the plain single-threaded encoder).
    pub threads: u32,
}

/// Hashes and counts what passes through to the sink. No hasher for an uncompressed layer:
/// its digest is its diff_id, and hashing the same bytes twice cost a third of the pause.
struct Counted<W: Write> {
    inner: W,
    hasher: Option<Sha256>,
    bytes: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.bytes += n as u64;
        crate::progress::add_layer(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Encoder<W: Write> {
    Gzip(crate::pgzip::ParGzEncoder<W>),
    Zstd(zstd::Encoder<'static, W>),
    Plain(W),
}

/// What `LayerWriter::finish` hands back: the flushed sink and the layer it now holds.
#[derive(Debug)]
pub struct FinishedLayerWrite<W> {
    pub sink: W,
    pub descriptor: LayerDescriptor,
    /// Uncompressed tar bytes written (the diff_id's input).
    pub tar_bytes: u64,
}

/// Write tar bytes in; `finish` returns the sink and the descriptor.
pub struct LayerWriter<W: Write> {
    diff_id: Sha256,
    tar_bytes: u64,
    enc: Encoder<Counted<W>>,
    media_type: String,
}

impl<W: Write> LayerWriter<W> {
    pub fn new(sink: W, opts: &CompressOptions, media_type: &str) -> io::Result<Self> {
        crate::progress::begin_pass(opts.compression != Compression::None);
        let counted = Counted {
            inner: sink,
            hasher: (opts.compression != Compression::None).then(Sha256::new),
            bytes: 0,
        };
        let enc = match opts.compression {
            Compression::Gzip => {
                let level = opts.level.unwrap_or(GZIP_DEFAULT_LEVEL).clamp(0, 9) as u32;
                Encoder::Gzip(crate::pgzip::ParGzEncoder::new(
                    counted,
                    level,
                    opts.threads,
                )?)
            }
            Compression::Zstd => {
                let mut z = zstd::Encoder::new(counted, opts.level.unwrap_or(3))?;
                // Workers beyond the calling thread; one thread means the plain encoder (5 MiB
                // instead of ~80). 1 MiB jobs keep libzstd's buffers near 15 MiB instead of
                // ~100 MiB with its default job size, for ~2% larger layers (scripts/bench.sh).
                if opts.threads > 1 {
                    z.multithread(opts.threads)?;
                    z.set_parameter(zstd::stream::raw::CParameter::JobSize(1 << 20))?;
                }
                // Content size unknown up front; a checksum lets readers detect corruption.
                z.include_checksum(true)?;
                Encoder::Zstd(z)
            }
            Compression::None => Encoder::Plain(counted),
        };
        Ok(LayerWriter {
            diff_id: Sha256::new(),
            tar_bytes: 0,
            enc,
            media_type: media_type.to_string(),
        })
    }

    /// Flushes the compressor and returns the sink with the layer's descriptor.
    pub fn finish(self) -> io::Result<FinishedLayerWrite<W>> {
        let counted = match self.enc {
            Encoder::Gzip(g) => g.finish()?,
            Encoder::Zstd(z) => z.finish()?,
            Encoder::Plain(c) => c,
        };
        let Counted {
            mut inner,
            hasher,
            bytes,
        } = counted;
        inner.flush()?;
        let diff_id = Digest::from_sha256(self.diff_id.finalize().into());
        let desc = LayerDescriptor {
            digest: hasher.map_or_else(
                || diff_id.clone(),
                |h| Digest::from_sha256(h.finalize().into()),
            ),
            diff_id,
            size: bytes,
            media_type: self.media_type,
        };
        Ok(FinishedLayerWrite {
            sink: inner,
            descriptor: desc,
            tar_bytes: self.tar_bytes,
        })
    }
}

impl<W: Write> Write for LayerWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &mut self.enc {
            Encoder::Gzip(g) => g.write(buf)?,
            Encoder::Zstd(z) => z.write(buf)?,
            Encoder::Plain(p) => p.write(buf)?,
        };
        self.diff_id.update(&buf[..n]);
        self.tar_bytes += n as u64;
        crate::progress::add_tar(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.enc {
            Encoder::Gzip(g) => g.flush(),
            Encoder::Zstd(z) => z.flush(),
            Encoder::Plain(p) => p.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn roundtrip(c: Compression) {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let opts = CompressOptions {
            compression: c,
            level: None,
            threads: 2,
        };
        let mut w = LayerWriter::new(Vec::new(), &opts, "mt").unwrap();
        for chunk in data.chunks(70_000) {
            w.write_all(chunk).unwrap();
        }
        let FinishedLayerWrite {
            sink: blob,
            descriptor: desc,
            tar_bytes,
        } = w.finish().unwrap();
        assert_eq!(tar_bytes, data.len() as u64);
        assert_eq!(desc.diff_id, Digest::of(&data));
        assert_eq!(desc.digest, Digest::of(&blob));
        assert_eq!(desc.size, blob.len() as u64);
        let mut back = Vec::new();
        match c {
            Compression::Gzip => flate2::read::GzDecoder::new(&blob[..])
                .read_to_end(&mut back)
                .unwrap(),
            Compression::Zstd => zstd::Decoder::new(&blob[..])
                .unwrap()
                .read_to_end(&mut back)
                .unwrap(),
            Compression::None => (&blob[..]).read_to_end(&mut back).unwrap(),
        };
        assert!(back == data, "decompressed bytes differ");
    }

    #[test]
    fn gzip_digests_match_the_bytes() {
        roundtrip(Compression::Gzip)
    }
    #[test]
    fn zstd_digests_match_the_bytes() {
        roundtrip(Compression::Zstd)
    }
    #[test]
    fn uncompressed_digest_equals_diff_id() {
        roundtrip(Compression::None)
    }

    #[test]
    fn same_input_gives_same_gzip_digest() {
        let opts = CompressOptions {
            compression: Compression::Gzip,
            level: None,
            threads: 0,
        };
        let one = |_| {
            let mut w = LayerWriter::new(Vec::new(), &opts, "mt").unwrap();
            w.write_all(b"hello world").unwrap();
            w.finish().unwrap().descriptor.digest
        };
        assert_eq!(one(1), one(2));
    }
}
