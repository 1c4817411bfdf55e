//! One way to put a blob into the target repository, whatever its source: already there (HEAD) →
//! mounted from the base's repository → uploaded, with bounded retries that re-read the source.
//!
//! The upload shape is docker's and go-containerregistry's: `POST`, one streamed `PATCH` without
//! `Content-Range` (with `Content-Length`), `PUT ?digest=`. Every registry in the field takes it, and GAR
//! and gcr.io take nothing else (no chunked uploads: dotnet/sdk-container-builds#287). Ranged chunks are
//! a fallback: when a body was refused as too large (413 from Cloudflare or nginx in front of a registry,
//! distribution#2042; GHCR's 416 "exceeds the maximum permissible limit of 4.00MiB", rust-oci-client#35)
//! with a size that fits, or on request (`--chunk-size`); `OCI-Chunk-Min-Length` bounds a chunk from below.
//!
//! After a failed PATCH the session is asked where it stands and the upload resumes from there when
//! the answer is plausible (not past what was sent, and past where the last resume began); otherwise — ECR's 404,
//! distribution's cancelled session after a broken PATCH — a new session starts at byte 0. Attempts are
//! bounded per blob and a restart without progress counts against a separate bound.

use std::io;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use super::client::Client;
use super::error::RegistryError;
use super::source::{BlobSource, ByteStream, BytesSource, FileSource};
use super::upload::{MountOutcome, Session};
use crate::digest::Digest;

/// What `push_blob` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPushed {
    Existed,
    Mounted,
    Uploaded,
}

/// Blobs up to this size go in one monolithic `PUT` (after the POST): one request fewer.
const MONOLITHIC_MAX: u64 = 1 << 20;
/// Sessions one upload may start over from byte 0 (restarts after a failure, not shape changes).
const MAX_RESTARTS: u32 = 3;
/// The smallest chunk a 413 may shrink the upload to; below it, the registry's cap is unworkable.
const MIN_FALLBACK_CHUNK: u64 = 256 * 1024;
/// The first chunk size after a 413 that said nothing about the limit.
const FIRST_FALLBACK_CHUNK: u64 = 64 << 20;

impl Client {
    /// Make `digest` (`size` bytes, read from `source`) exist in this repository: HEAD, then a mount from
    /// `mount_from` (a repository of the same registry) unless it refused before, then an upload.
    pub async fn push_blob(
        &self,
        digest: &Digest,
        size: u64,
        source: &dyn BlobSource,
        mount_from: Option<&str>,
    ) -> Result<BlobPushed, RegistryError> {
        if self.blob_exists(digest).await?.is_some() {
            return Ok(BlobPushed::Existed);
        }
        if let Some(from) = mount_from {
            // Mounts take turns, so that a refusal is known before the next blob asks.
            let _turn = self.inner.mount_turn.lock().await;
            if !self.mount_refused(from) {
                if self.mount_blob(digest, from).await? == MountOutcome::Mounted {
                    return Ok(BlobPushed::Mounted);
                }
                // A 202 keeps a session for this digest; the source is not asked again this commit.
                self.inner
                    .refused_mounts
                    .lock()
                    .expect("mounts lock")
                    .insert(from.to_string());
            }
        }
        self.upload_blob(digest, size, source).await?;
        Ok(BlobPushed::Uploaded)
    }

    fn mount_refused(&self, from: &str) -> bool {
        let refused = self.inner.refused_mounts.lock().expect("mounts lock");
        refused.contains(from)
    }

    /// Upload `size` bytes of `path` (without a HEAD first).
    pub async fn upload_blob_file(
        &self,
        digest: &Digest,
        path: &std::path::Path,
        size: u64,
    ) -> Result<(), RegistryError> {
        check_file_size(path, size).await?;
        self.upload_blob(digest, size, &FileSource::new(path)).await
    }

    /// Upload a blob held in memory (without a HEAD first).
    pub async fn upload_blob_bytes(
        &self,
        digest: &Digest,
        bytes: Bytes,
    ) -> Result<(), RegistryError> {
        let size = bytes.len() as u64;
        self.upload_blob(digest, size, &BytesSource(bytes)).await
    }

    /// Upload without a HEAD first; at most `max_transfers` of these run at once per client.
    pub async fn upload_blob(
        &self,
        digest: &Digest,
        size: u64,
        source: &dyn BlobSource,
    ) -> Result<(), RegistryError> {
        let _permit = self.transfers.acquire().await.expect("never closed");
        if size <= MONOLITHIC_MAX {
            return self.upload_small(digest, size, source).await;
        }
        let mut up = Upload {
            digest,
            size,
            chunk: self.chunk_size,
            session: self.open_session(digest).await?,
            offset: 0,
            failures: 0,
            restarts: 0,
            resumed_at: None,
            shrunk: false,
            no_chunks: false,
        };
        while up.offset < size {
            let (offset, len) = (up.offset, up.next_len());
            let ranged = up.chunk.is_some() || offset > 0;
            let sent = match source.open_at(offset).await {
                Ok(body) => {
                    let body = exactly(body, len);
                    self.patch(&up.session, offset, len, ranged, body).await
                }
                Err(e) => Err(source_error(digest, offset, e)),
            };
            match sent {
                Ok(next) => (up.session, up.offset, up.failures) = (next, offset + len, 0),
                Err(e) => self.recover(&mut up, e, offset + len).await?,
            }
        }
        self.commit(up.session, digest, None).await
    }

    /// A small blob (a config): read it whole, `PUT ?digest=` with the bytes; a new session per try.
    /// The POST retries by itself; the read and the PUT are retried here, once each per try (the
    /// PUT does not retry inside), so that the tries do not multiply.
    async fn upload_small(
        &self,
        digest: &Digest,
        size: u64,
        source: &dyn BlobSource,
    ) -> Result<(), RegistryError> {
        let mut failures = 0;
        loop {
            let result = match read_all(source, size).await {
                Ok(bytes) => {
                    let session = self.open_session(digest).await?;
                    self.commit(session, digest, Some(bytes)).await
                }
                Err(e) => Err(source_error(digest, 0, e)),
            };
            match result {
                Err(e) if retryable(&e, 0) && failures + 1 < self.retry.attempts => {
                    crate::log::debug(&format!("uploading {digest}: {e}; trying again"));
                    tokio::time::sleep(self.retry.delay(failures)).await;
                    failures += 1;
                }
                other => return other,
            }
        }
    }

    /// After a failed PATCH: shrink the chunk when the body was too large, else resume where the
    /// registry plausibly stands or start a new session; `Err` when the attempts are spent. Each
    /// shape change happens at most once per direction (chunks strictly shrink; "no chunks" is
    /// final), so a registry that caps bodies *and* refuses a second chunk ends in an error.
    async fn recover(
        &self,
        up: &mut Upload<'_>,
        e: RegistryError,
        sent_end: u64,
    ) -> Result<(), RegistryError> {
        let len = sent_end - up.offset;
        if let Some(smaller) = fitting_chunk(&e, len).filter(|c| *c < len) {
            if up.no_chunks {
                return Err(e);
            }
            crate::log::debug(&format!(
                "uploading {}: {e}; sending it in chunks of {smaller} bytes",
                up.digest
            ));
            (up.chunk, up.shrunk) = (Some(smaller), true);
            return self.restart(up).await;
        }
        // GAR and gcr.io refuse a second PATCH in a session: the rest goes as one PATCH, from 0 —
        // unless a body that size was already refused as too large.
        if e.status() == Some(400) && up.offset > 0 && up.chunk.is_some() {
            if up.shrunk {
                return Err(e);
            }
            crate::log::debug(&format!(
                "uploading {}: {e}; the registry takes no chunks, sending it in one request",
                up.digest
            ));
            (up.chunk, up.no_chunks) = (None, true);
            return self.restart(up).await;
        }
        if !retryable(&e, up.offset) || up.failures + 1 >= self.retry.attempts {
            return Err(e);
        }
        crate::log::debug(&format!(
            "uploading {} at byte {}: {e}; asking the registry where it stands",
            up.digest, up.offset
        ));
        tokio::time::sleep(self.retry.delay(up.failures)).await;
        up.failures += 1;
        match self.upload_status(&up.session).await {
            Ok(Some((session, held))) if up.plausible(held, sent_end) => {
                (up.session, up.offset, up.resumed_at) = (session, held, Some(held));
                Ok(())
            }
            _ if up.restarts < MAX_RESTARTS => {
                up.restarts += 1;
                crate::log::debug(&format!(
                    "the registry cannot continue the upload of {}; starting again at byte 0",
                    up.digest
                ));
                self.restart(up).await
            }
            _ => Err(e),
        }
    }

    async fn restart(&self, up: &mut Upload<'_>) -> Result<(), RegistryError> {
        up.session = self.start_session().await?;
        (up.offset, up.resumed_at) = (0, None);
        Ok(())
    }
}

/// The state of one upload.
struct Upload<'a> {
    digest: &'a Digest,
    size: u64,
    /// `None`: the rest in one PATCH.
    chunk: Option<u64>,
    session: Session,
    offset: u64,
    failures: u32,
    restarts: u32,
    /// Where the last resume started: a registry reporting the same offset again made no progress.
    resumed_at: Option<u64>,
    /// A body was refused as too large: going back to one PATCH would be refused again.
    shrunk: bool,
    /// A second chunk was refused: the registry takes one PATCH per session only.
    no_chunks: bool,
}

impl Upload<'_> {
    /// A reported offset worth resuming from: not past what was sent, short of the end (a registry
    /// may hold less than it acknowledged — a lost chunk — but not more), and past the last resume.
    fn plausible(&self, held: u64, sent_end: u64) -> bool {
        held <= sent_end && held < self.size && self.resumed_at.is_none_or(|r| held > r)
    }

    fn next_len(&self) -> u64 {
        let left = self.size - self.offset;
        match self.chunk {
            None => left,
            Some(c) => c.max(self.session.min_chunk.unwrap_or(0)).min(left),
        }
    }
}

/// Worth another PATCH after asking where the session stands: transient failures, a 416 (the registry
/// holds something else than we think), a lost session (404), a refused token (401, refetched), and a
/// 400 to a PATCH past byte 0 (registries without chunked uploads refuse a second PATCH).
fn retryable(e: &RegistryError, offset: u64) -> bool {
    e.is_transient()
        || matches!(e, RegistryError::Io { .. })
        || match e.status() {
            Some(401 | 404 | 416) => true,
            Some(400) => offset > 0,
            _ => false,
        }
}

/// The chunk size a "too large" answer allows: GHCR names its limit ("… 4.00MiB"); a plain 413 gets
/// a first guess, then halves.
fn fitting_chunk(e: &RegistryError, sent: u64) -> Option<u64> {
    let text = e.to_string();
    let named = match e.status()? {
        416 if text.contains("exceeds") => mib_limit(&text),
        413 => None,
        _ => return None,
    };
    let guess = named.unwrap_or_else(|| (sent / 2).min(FIRST_FALLBACK_CHUNK));
    (guess >= MIN_FALLBACK_CHUNK).then_some(guess)
}

/// `…limit of 4.00MiB` → 4 MiB.
fn mib_limit(text: &str) -> Option<u64> {
    let before = text.split("MiB").next()?;
    let number: String = before
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let mib: f64 = number.parse().ok()?;
    Some((mib * 1024.0 * 1024.0) as u64)
}

/// `len` bytes of `body`: an error if it ends early, and no more than `len` sent. Counts progress.
fn exactly(body: ByteStream, len: u64) -> ByteStream {
    futures_util::stream::try_unfold((body, len), |(mut body, left)| async move {
        if left == 0 {
            return Ok(None);
        }
        match body.next().await {
            Some(Ok(mut chunk)) => {
                if chunk.len() as u64 > left {
                    chunk.truncate(left as usize);
                }
                crate::progress::add_sent(chunk.len() as u64);
                let left = left - chunk.len() as u64;
                Ok(Some((chunk, (body, left))))
            }
            Some(Err(e)) => Err(e),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the blob's source ended {left} bytes early"),
            )),
        }
    })
    .boxed()
}

async fn read_all(source: &dyn BlobSource, size: u64) -> io::Result<Bytes> {
    let mut body = exactly(source.open_at(0).await?, size);
    let mut out = BytesMut::with_capacity(size as usize);
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out.freeze())
}

fn source_error(digest: &Digest, offset: u64, source: io::Error) -> RegistryError {
    RegistryError::Io {
        context: format!("reading blob {digest} at byte {offset}"),
        cause: source,
    }
}

/// A short file would otherwise surface as a broken request body, retried as if the network failed.
async fn check_file_size(path: &std::path::Path, size: u64) -> Result<(), RegistryError> {
    let io_err = |cause| RegistryError::Io {
        context: format!("reading {}", path.display()),
        cause,
    };
    let len = tokio::fs::metadata(path).await.map_err(io_err)?.len();
    if len < size {
        let msg = format!("the file has {len} bytes, fewer than the {size} to upload");
        return Err(io_err(io::Error::new(io::ErrorKind::UnexpectedEof, msg)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ghcr_limit_is_read_from_its_message() {
        let text = "PATCH x: HTTP 416 (exceeds the maximum permissible limit of 4.00MiB)";
        assert_eq!(mib_limit(text), Some(4 << 20));
    }
}
