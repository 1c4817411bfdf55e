//! Where a blob's bytes come from, as something an upload can re-open at any offset: a retry after a
//! reset, or a resume from the offset the registry reports, reads again from there instead of failing.
//!
//! - [`FileSource`]: a spool file.
//! - [`BytesSource`]: bytes in memory (an image config).
//! - [`RegistryBlob`]: a blob in another registry (a base layer the node discarded), read with `Range`,
//!   bounded by the descriptor's size, checked against its digest when read from the start.
//!   (The node's content store is in `crate::push`, over containerd's offset reads.)

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use reqwest::header::RANGE;
use reqwest::{Method, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use url::Url;

use super::auth::repo_scope;
use super::client::Client;
use super::error::RegistryError;
use crate::digest::Digest;

/// A stream of a blob's bytes.
pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

/// A blob that can be read from any offset, as many times as an upload needs.
pub trait BlobSource: Send + Sync {
    /// The bytes from `offset` to the end of the blob.
    fn open_at(&self, offset: u64) -> BoxFuture<'_, io::Result<ByteStream>>;
}

const READ_BUF: usize = 256 * 1024;

/// A file on disk (the layer spool).
pub struct FileSource {
    pub path: PathBuf,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> FileSource {
        FileSource { path: path.into() }
    }
}

impl BlobSource for FileSource {
    fn open_at(&self, offset: u64) -> BoxFuture<'_, io::Result<ByteStream>> {
        Box::pin(async move { Ok(file_stream(&self.path, offset).await?.boxed()) })
    }
}

/// The file from `offset` to its end in 256 KiB pieces; never the whole file in memory.
async fn file_stream(
    path: &Path,
    offset: u64,
) -> io::Result<impl Stream<Item = io::Result<Bytes>> + Send + 'static> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(io::SeekFrom::Start(offset)).await?;
    Ok(futures_util::stream::try_unfold(
        file,
        |mut file| async move {
            let mut buf = vec![0u8; READ_BUF];
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.truncate(n);
            Ok(Some((Bytes::from(buf), file)))
        },
    ))
}

/// Bytes in memory.
pub struct BytesSource(pub Bytes);

impl BlobSource for BytesSource {
    fn open_at(&self, offset: u64) -> BoxFuture<'_, io::Result<ByteStream>> {
        let start = (offset as usize).min(self.0.len());
        let rest = self.0.slice(start..);
        Box::pin(async move { Ok(futures_util::stream::once(async move { Ok(rest) }).boxed()) })
    }
}

/// A blob of `size` bytes in the repository `client` reads from (pull scope only).
pub struct RegistryBlob {
    pub client: Client,
    pub digest: Digest,
    pub size: u64,
}

impl BlobSource for RegistryBlob {
    fn open_at(&self, offset: u64) -> BoxFuture<'_, io::Result<ByteStream>> {
        Box::pin(async move {
            let stream = self
                .client
                .fetch_blob_at(&self.digest, offset, Some(self.size))
                .await
                .map_err(io::Error::other)?;
            Ok(stream.boxed())
        })
    }
}

impl Client {
    /// GET a blob as a stream whose last item is an error if the bytes do not hash to `digest`. Redirects
    /// to other hosts are followed without credentials.
    pub async fn fetch_blob(&self, digest: &Digest) -> Result<BlobStream, RegistryError> {
        self.fetch_blob_at(digest, 0, None).await
    }

    /// GET a blob from `offset` (a `Range` request when not 0). With `size` known, more bytes than the
    /// descriptor says is an error (a registry cannot make us read without bound). Only a read from 0 can
    /// be checked against the digest; the target registry checks every upload at its `PUT ?digest=`.
    pub async fn fetch_blob_at(
        &self,
        digest: &Digest,
        offset: u64,
        size: Option<u64>,
    ) -> Result<BlobStream, RegistryError> {
        let mut req = self.req(Method::GET, self.repo_url(&format!("blobs/{digest}"))?);
        req.scopes = vec![repo_scope(&self.inner.repository, "pull")];
        if offset > 0 {
            let range = format!("bytes={offset}-");
            req.headers.insert(RANGE, range.parse().expect("digits"));
        }
        // The body has no overall deadline (it may be large); the answer does, and so does each read.
        req.timeout = None;
        let limit = self.inner.timeout;
        let resp = tokio::time::timeout(limit, self.execute(&req))
            .await
            .map_err(|_| RegistryError::stalled("GET", &req.url, limit))??;
        let status = resp.status();
        let ok = status == StatusCode::OK || (offset > 0 && status == StatusCode::PARTIAL_CONTENT);
        if !ok {
            return Err(self.fail(&req, resp).await);
        }
        // A 200 to a Range request is the whole blob: skip to the offset ourselves.
        let skip = if status == StatusCode::OK { offset } else { 0 };
        let check = (offset == 0).then(|| digest.clone());
        Ok(BlobStream::new(
            resp,
            check,
            skip,
            size.map(|s| s - offset.min(s)),
            limit,
        ))
    }
}

/// A blob being read from a registry; yields `io::Error` (wrapping a `RegistryError`) on a transport
/// failure, on more bytes than expected, or when the bytes do not match the digest.
pub struct BlobStream {
    size: Option<u64>,
    inner: Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>,
}

struct Reading {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    hasher: Option<(Sha256, Digest)>,
    skip: u64,
    left: Option<u64>,
    url: Url,
    done: bool,
    /// The longest wait for the next piece of the body.
    idle: std::time::Duration,
}

impl BlobStream {
    fn new(
        resp: Response,
        check: Option<Digest>,
        skip: u64,
        limit: Option<u64>,
        idle: std::time::Duration,
    ) -> BlobStream {
        let size = limit.or(resp.content_length().map(|l| l - skip.min(l)));
        let state = Reading {
            url: resp.url().clone(),
            body: resp.bytes_stream().boxed(),
            hasher: check.map(|d| (Sha256::new(), d)),
            skip,
            left: limit,
            done: false,
            idle,
        };
        let inner = futures_util::stream::try_unfold(state, |mut st| async move {
            loop {
                if st.done {
                    return Ok(None);
                }
                let next = tokio::time::timeout(st.idle, st.body.next()).await;
                let Ok(next) = next else {
                    let e = RegistryError::stalled("GET", &st.url, st.idle);
                    return Err(io::Error::other(e));
                };
                match next {
                    Some(Ok(chunk)) => {
                        if let Some(chunk) = st.take(chunk)? {
                            return Ok(Some((chunk, st)));
                        }
                    }
                    Some(Err(e)) => {
                        return Err(io::Error::other(RegistryError::transport(
                            "GET", &st.url, e,
                        )))
                    }
                    None => {
                        st.finish()?;
                        st.done = true;
                    }
                }
            }
        });
        BlobStream {
            size,
            inner: Box::pin(inner),
        }
    }

    /// The number of bytes this stream yields, when known.
    pub fn size(&self) -> Option<u64> {
        self.size
    }
}

impl Reading {
    /// Skip, bound and hash one piece; `None` when it was all skipped.
    fn take(&mut self, mut chunk: Bytes) -> io::Result<Option<Bytes>> {
        if self.skip > 0 {
            let n = self.skip.min(chunk.len() as u64) as usize;
            self.skip -= n as u64;
            chunk = chunk.slice(n..);
        }
        if chunk.is_empty() {
            return Ok(None);
        }
        if let Some(left) = &mut self.left {
            if chunk.len() as u64 > *left {
                let msg = "the blob is longer than its descriptor's size".to_string();
                return Err(io::Error::other(RegistryError::protocol(
                    "GET", &self.url, msg,
                )));
            }
            *left -= chunk.len() as u64;
        }
        if let Some((h, _)) = &mut self.hasher {
            h.update(&chunk);
        }
        Ok(Some(chunk))
    }

    fn finish(&mut self) -> io::Result<()> {
        if let Some(left) = self.left.filter(|l| *l > 0) {
            let msg = format!("the blob ended {left} bytes short of its descriptor's size");
            return Err(io::Error::other(RegistryError::protocol(
                "GET", &self.url, msg,
            )));
        }
        if let Some((h, expected)) = self.hasher.take() {
            let found = Digest::from_sha256(h.finalize().into());
            if found != expected {
                let what = format!("blob read from {}", super::error::redact_url(&self.url));
                return Err(io::Error::other(RegistryError::DigestMismatch {
                    what,
                    expected,
                    found: found.to_string(),
                }));
            }
        }
        Ok(())
    }
}

impl Stream for BlobStream {
    type Item = io::Result<Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
