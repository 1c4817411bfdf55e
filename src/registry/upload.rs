//! Blob transfer steps: open an upload session (or mount from another repository), stream chunks with
//! `PATCH`, resynchronise after a failure from the offset the registry reports, commit with
//! `PUT ?digest=`; and read a blob back as a digest-checked stream.
//!
//! Resumption: after a dropped connection, a 5xx or a 416 the session is asked where it stands
//! (`GET <location>` → `204`, `Range: 0-<last byte>`) and the upload goes on from there. distribution 2.x
//! cannot resume after a PATCH that broke half way (its `_state` offset no longer matches the data it
//! kept, so it cancels the session and answers 404 `BLOB_UPLOAD_INVALID`); then a new session starts at 0.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, RANGE};
use reqwest::{Method, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use url::Url;

use super::auth::repo_scope;
use super::client::{check_content_digest, header_str, location, Body, Client, Req};
use super::error::RegistryError;
use crate::digest::Digest;

/// An open upload: where to send the next request, and the registry's minimum chunk size.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub location: Url,
    pub min_chunk: Option<u64>,
}

/// The answer to a cross-repository mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOutcome {
    /// 201: the blob now exists in this repository; nothing to upload.
    Mounted,
    /// 202: the registry declined (source missing, or mounting unsupported) and opened an upload
    /// session instead. The client keeps that session and the next upload of the same digest through
    /// this client (or a clone) continues it, saving a POST. Also 401/403: the credentials do not
    /// reach the source repository (no session then).
    NotMounted,
}

/// Outcome of one PATCH: the session to use next and the registry's offset.
struct Progress {
    session: Session,
    offset: u64,
}

const READ_BUF: usize = 256 * 1024;
/// Sessions a single upload may start over (from byte 0) before giving up.
const MAX_RESTARTS: u32 = 3;
const OCTET_STREAM: &str = "application/octet-stream";

impl Client {
    /// Cross-repository mount: `POST /v2/<repo>/blobs/uploads/?mount=<digest>&from=<repo>`. The token
    /// must cover `pull` on the source repository as well.
    pub async fn mount_blob(
        &self,
        digest: &Digest,
        from_repository: &str,
    ) -> Result<MountOutcome, RegistryError> {
        let mut url = self.repo_url("blobs/uploads/")?;
        url.query_pairs_mut()
            .append_pair("mount", digest.as_str())
            .append_pair("from", from_repository);
        let mut req = self.req(Method::POST, url);
        req.scopes.push(repo_scope(from_repository, "pull"));
        let resp = match self.execute(&req).await {
            // A token service may refuse the source scope outright instead of narrowing the grant.
            Err(e) if e.is_auth() => return Ok(MountOutcome::NotMounted),
            other => other?,
        };
        match resp.status() {
            StatusCode::CREATED => Ok(MountOutcome::Mounted),
            StatusCode::ACCEPTED => {
                let session = self.session_from(&req, &resp)?;
                self.inner
                    .pending
                    .lock()
                    .expect("pending lock")
                    .insert(digest.clone(), session);
                Ok(MountOutcome::NotMounted)
            }
            // distribution asks for `pull` on the source in the same token; when the credentials do not
            // reach the source repository it answers 401/403 (insufficient_scope). The target's own
            // access was proven by `Client::new`, so this only means "upload it instead".
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Ok(MountOutcome::NotMounted),
            _ => Err(self.fail(&req, resp).await),
        }
    }

    /// Upload `size` bytes of `path` as blob `digest` in PATCH chunks streamed from the file, resuming
    /// after failures (see the module doc). Does not HEAD first: callers check `blob_exists`.
    pub async fn upload_blob_file(
        &self,
        digest: &Digest,
        path: &Path,
        size: u64,
    ) -> Result<(), RegistryError> {
        check_file_size(path, size).await?;
        crate::progress::begin_upload(size);
        let mut session = self.open_session(digest).await?;
        let (mut offset, mut failures, mut restarts) = (0u64, 0u32, 0u32);
        while offset < size {
            let chunk = self.chunk_size.max(session.min_chunk.unwrap_or(0));
            let len = chunk.min(size - offset);
            let body = Body::File {
                path: path.to_path_buf(),
                offset,
                len,
            };
            match self.patch(&session, offset, Some(len), body).await {
                Ok(p) => (session, offset, failures) = (p.session, p.offset, 0),
                Err(e)
                    if e.is_transient()
                        && failures + 1 < self.retry.attempts
                        && restarts < MAX_RESTARTS =>
                {
                    crate::log::debug(&format!(
                        "uploading {digest} at byte {offset}: {e}; asking the registry where it stands"
                    ));
                    tokio::time::sleep(self.retry.delay(failures)).await;
                    failures += 1;
                    let (s, o, restarted) = self.resync(session).await?;
                    if restarted {
                        crate::log::debug(&format!(
                            "the registry dropped the upload session of {digest}; starting again at byte 0"
                        ));
                    }
                    (session, offset) = (s, o);
                    crate::progress::set_sent(o);
                    restarts += u32::from(restarted);
                }
                Err(e) => return Err(e),
            }
            if offset > size {
                let msg = format!("the registry reports {offset} bytes of a {size}-byte blob");
                return Err(RegistryError::protocol("PATCH", &session.location, msg));
            }
        }
        self.commit(session, digest, None).await
    }

    /// Upload a small blob (an image config) in one request: POST, then `PUT ?digest=` with the bytes.
    pub async fn upload_blob_bytes(
        &self,
        digest: &Digest,
        bytes: Bytes,
    ) -> Result<(), RegistryError> {
        let session = self.open_session(digest).await?;
        self.commit(session, digest, Some(bytes)).await
    }

    /// Upload a blob from a stream (a content store, another registry). One PATCH carries the whole
    /// stream (sized when `size` is known, chunked encoding otherwise), then `PUT ?digest=`. A stream
    /// cannot be replayed, so a failure is returned to the caller, who can open a new stream.
    pub async fn upload_blob_stream<S>(
        &self,
        digest: &Digest,
        size: Option<u64>,
        body: S,
    ) -> Result<(), RegistryError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send + 'static,
    {
        let session = self.open_session(digest).await?;
        let once = Body::Once(std::sync::Mutex::new(Some(reqwest::Body::wrap_stream(
            body,
        ))));
        let session = match size {
            Some(0) => session,
            _ => self.patch(&session, 0, size, once).await?.session,
        };
        self.commit(session, digest, None).await
    }

    /// GET a blob as a stream whose last item is an error if the bytes do not hash to `digest`. Redirects
    /// to other hosts are followed without credentials.
    pub async fn fetch_blob(&self, digest: &Digest) -> Result<BlobStream, RegistryError> {
        let mut req = self.req(Method::GET, self.repo_url(&format!("blobs/{digest}"))?);
        req.scopes = vec![repo_scope(&self.inner.repository, "pull")];
        let resp = self.execute(&req).await?;
        if resp.status() != StatusCode::OK {
            return Err(self.fail(&req, resp).await);
        }
        Ok(BlobStream::new(resp, digest.clone()))
    }

    /// A session a declined mount left for this digest, else a new one.
    async fn open_session(&self, digest: &Digest) -> Result<Session, RegistryError> {
        let pending = self
            .inner
            .pending
            .lock()
            .expect("pending lock")
            .remove(digest);
        match pending {
            Some(s) => Ok(s),
            None => self.start_session().await,
        }
    }

    async fn start_session(&self) -> Result<Session, RegistryError> {
        let req = self.req(Method::POST, self.repo_url("blobs/uploads/")?);
        let resp = self.execute(&req).await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self.fail(&req, resp).await);
        }
        self.session_from(&req, &resp)
    }

    fn session_from(&self, req: &Req, resp: &Response) -> Result<Session, RegistryError> {
        let location = location(resp, resp.url()).ok_or_else(|| {
            RegistryError::protocol(
                req.method.as_str(),
                &req.url,
                "the upload answer has no Location header",
            )
        })?;
        let min_chunk =
            header_str(resp, "oci-chunk-min-length").and_then(|s| s.trim().parse().ok());
        Ok(Session {
            location,
            min_chunk,
        })
    }

    /// One PATCH of `len` bytes at `offset` (`len` None: unsized stream). Returns the next session URL
    /// (distribution's `_state` changes on every answer) and the registry's offset.
    async fn patch(
        &self,
        session: &Session,
        offset: u64,
        len: Option<u64>,
        body: Body,
    ) -> Result<Progress, RegistryError> {
        let mut req = self.req(Method::PATCH, session.location.clone());
        req.retry = false;
        req.headers
            .insert(CONTENT_TYPE, OCTET_STREAM.parse().expect("static header"));
        if let Some(len) = len.filter(|l| *l > 0) {
            let range = format!("{offset}-{}", offset + len - 1);
            req.headers
                .insert("content-range", range.parse().expect("digits and a dash"));
            if matches!(body, Body::Once(_)) {
                // Sized, not chunked: some registries refuse chunked PATCHes, and distribution only
                // checks Content-Range against the body when Content-Length is present.
                req.headers.insert(CONTENT_LENGTH, len.into());
            }
        }
        req.body = body;
        let resp = self.execute(&req).await?;
        if resp.status() != StatusCode::ACCEPTED && resp.status() != StatusCode::NO_CONTENT {
            return Err(self.fail(&req, resp).await);
        }
        let next = location(&resp, resp.url()).unwrap_or_else(|| session.location.clone());
        // No Range header, or the ambiguous `0-0`: assume the registry took what was sent.
        let reported = range_end(&resp).flatten();
        let offset = reported.or(len.map(|l| offset + l)).unwrap_or(offset);
        Ok(Progress {
            session: Session {
                location: next,
                min_chunk: session.min_chunk,
            },
            offset,
        })
    }

    /// Ask the registry where the upload stands; start over when it no longer knows the session.
    async fn resync(&self, session: Session) -> Result<(Session, u64, bool), RegistryError> {
        let req = self.req(Method::GET, session.location.clone());
        let resp = self.execute(&req).await?;
        match resp.status() {
            StatusCode::NO_CONTENT | StatusCode::OK => {
                let next = location(&resp, resp.url()).unwrap_or_else(|| session.location.clone());
                let offset = range_end(&resp).flatten().unwrap_or(0);
                Ok((
                    Session {
                        location: next,
                        min_chunk: session.min_chunk,
                    },
                    offset,
                    false,
                ))
            }
            StatusCode::NOT_FOUND => Ok((self.start_session().await?, 0, true)),
            _ => Err(self.fail(&req, resp).await),
        }
    }

    /// `PUT <location>&digest=<digest>`, with the final bytes if any. A PUT whose answer was lost may
    /// have landed: a 404 for the session is then checked with a HEAD.
    async fn commit(
        &self,
        session: Session,
        digest: &Digest,
        last: Option<Bytes>,
    ) -> Result<(), RegistryError> {
        let mut url = session.location;
        url.query_pairs_mut().append_pair("digest", digest.as_str());
        let mut req = self.req(Method::PUT, url);
        req.headers
            .insert(CONTENT_TYPE, OCTET_STREAM.parse().expect("static header"));
        req.body = last.map(Body::Bytes).unwrap_or(Body::Empty);
        let resp = self.execute(&req).await?;
        match resp.status() {
            StatusCode::CREATED | StatusCode::NO_CONTENT | StatusCode::OK => {
                check_content_digest(&resp, digest, &format!("blob {digest}"))
            }
            StatusCode::NOT_FOUND if self.blob_exists(digest).await?.is_some() => Ok(()),
            _ => Err(self.fail(&req, resp).await),
        }
    }
}

/// `Range: 0-N` → `Some(Some(N + 1))` bytes received. distribution answers `0-0` both for an empty
/// session and for one byte, so that is `Some(None)`: known to be at most one byte.
fn range_end(resp: &Response) -> Option<Option<u64>> {
    let r = resp.headers().get(RANGE)?.to_str().ok()?;
    let r = r.trim().trim_start_matches("bytes=");
    let (start, end) = r.split_once('-')?;
    let (start, end): (u64, u64) = (start.trim().parse().ok()?, end.trim().parse().ok()?);
    if start != 0 {
        return None;
    }
    Some(if end == 0 { None } else { Some(end + 1) })
}

/// A short file would otherwise surface as a broken request body, retried as if the network failed.
async fn check_file_size(path: &Path, size: u64) -> Result<(), RegistryError> {
    let io_err = |source| RegistryError::Io {
        context: format!("reading {}", path.display()),
        source,
    };
    let len = tokio::fs::metadata(path).await.map_err(io_err)?.len();
    if len < size {
        let msg = format!("the file has {len} bytes, fewer than the {size} to upload");
        return Err(io_err(io::Error::new(io::ErrorKind::UnexpectedEof, msg)));
    }
    Ok(())
}

/// `len` bytes of a file from `offset`, as a stream of 256 KiB pieces; never the whole file in memory.
pub(crate) async fn file_range_stream(
    path: &Path,
    offset: u64,
    len: u64,
) -> io::Result<impl Stream<Item = io::Result<Bytes>> + Send + 'static> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(io::SeekFrom::Start(offset)).await?;
    let reader = file.take(len);
    Ok(futures_util::stream::try_unfold(
        (reader, len),
        |(mut reader, left)| async move {
            if left == 0 {
                return Ok(None);
            }
            let mut buf = vec![0u8; READ_BUF.min(left as usize)];
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ended {left} bytes early"),
                ));
            }
            buf.truncate(n);
            crate::progress::add_sent(n as u64);
            Ok(Some((Bytes::from(buf), (reader, left - n as u64))))
        },
    ))
}

/// A blob being read from a registry; yields `io::Error` (wrapping a `RegistryError`) on a transport
/// failure or when the bytes do not match the digest, so it can feed `upload_blob_stream` directly.
pub struct BlobStream {
    size: Option<u64>,
    inner: Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>,
}

impl BlobStream {
    fn new(resp: Response, digest: Digest) -> BlobStream {
        let size = resp.content_length();
        let url = resp.url().clone();
        let body = resp.bytes_stream();
        let state = (body, Sha256::new(), Some(digest), url);
        let inner = futures_util::stream::try_unfold(
            state,
            |(mut body, mut hasher, digest, url)| async move {
                let Some(expected) = digest else {
                    return Ok(None);
                };
                match body.next().await {
                    Some(Ok(chunk)) => {
                        hasher.update(&chunk);
                        Ok(Some((chunk, (body, hasher, Some(expected), url))))
                    }
                    Some(Err(e)) => Err(io::Error::other(RegistryError::transport("GET", &url, e))),
                    None => {
                        let found = Digest::from_sha256(hasher.finalize().into());
                        if found == expected {
                            Ok(None)
                        } else {
                            let what = format!("blob read from {}", super::error::redact_url(&url));
                            Err(io::Error::other(RegistryError::DigestMismatch {
                                what,
                                expected,
                                found: found.to_string(),
                            }))
                        }
                    }
                }
            },
        );
        BlobStream {
            size,
            inner: Box::pin(inner),
        }
    }

    /// The blob size from `Content-Length`, when sent.
    pub fn size(&self) -> Option<u64> {
        self.size
    }
}

impl Stream for BlobStream {
    type Item = io::Result<Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
