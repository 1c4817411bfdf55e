//! Blob upload steps, each one request: cross-repository mount, open a session (`POST`), send bytes
//! (`PATCH`), ask where a session stands (`GET`), commit (`PUT ?digest=`). The loop that strings them
//! together, with retries and the upload shape, is in `transfer.rs`.
//!
//! Registries differ here, and each difference is handled where it shows:
//! - ECR answers a PATCH with 201, not 202 (rust-oci-client#33, regclient `blob.go`): any 2xx is taken.
//! - ECR echoes a stale `Range` on later chunks (aws/containers-roadmap#2831): after a 2xx PATCH the
//!   registry holds what was sent, as docker and go-containerregistry assume; `Range` is only believed
//!   when asking where a failed upload stands.
//! - Quay's `Range` is one past the last byte (`bytes=0-<count>`, quay `endpoints/v2/blob.py`): seen on
//!   the first PATCH answer, and remembered for the session.
//! - A mount answered with anything but 201 (404, 400, 405, 5xx: containerd#14086) only means "upload".

use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, RANGE};
use reqwest::{Method, Response, StatusCode};
use url::Url;

use super::auth::repo_scope;
use futures_util::StreamExt;

use super::client::{check_content_digest, header_str, location, Body, Client, Progress, Req};
use super::error::RegistryError;
use super::source::ByteStream;
use crate::digest::Digest;

/// An open upload: where to send the next request, and what the registry told about itself.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub location: Url,
    /// `OCI-Chunk-Min-Length`: the smallest non-final chunk the registry takes.
    pub min_chunk: Option<u64>,
    /// The registry's `Range` end is a byte count, not the last byte's index (Quay).
    pub range_is_count: bool,
}

/// The answer to a cross-repository mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOutcome {
    /// 201: the blob now exists in this repository; nothing to upload.
    Mounted,
    /// Anything else. A 202 opened an upload session, kept for the next upload of the same digest
    /// through this client (or a clone).
    NotMounted,
}

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
            Ok(resp) => resp,
            // A token service may refuse the source scope outright; a registry may reset a mount it
            // does not implement. Neither says anything about uploading.
            Err(e) if !matches!(e, RegistryError::Config(_)) => {
                crate::log::debug(&format!("mount of {digest} from {from_repository}: {e}"));
                return Ok(MountOutcome::NotMounted);
            }
            Err(e) => return Err(e),
        };
        match resp.status() {
            StatusCode::CREATED => Ok(MountOutcome::Mounted),
            StatusCode::ACCEPTED => {
                if let Ok(session) = self.session_from(&req, &resp) {
                    self.inner
                        .pending
                        .lock()
                        .expect("pending lock")
                        .insert(digest.clone(), session);
                }
                Ok(MountOutcome::NotMounted)
            }
            other => {
                crate::log::debug(&format!(
                    "mount of {digest} from {from_repository}: HTTP {}; uploading instead",
                    other.as_u16()
                ));
                Ok(MountOutcome::NotMounted)
            }
        }
    }

    /// Prove that these credentials may push here, before anything irreversible: open an upload
    /// session (the POST a push starts with) and keep it for the first upload. GHCR answers the
    /// DELETE of an unused session with 405, so it is used rather than cancelled.
    pub async fn check_push(&self) -> Result<(), RegistryError> {
        let session = self.start_session().await?;
        self.inner.spare.lock().expect("spare lock").push(session);
        Ok(())
    }

    /// A session a declined mount left for this digest, a spare one from `check_push`, else a new one.
    pub(crate) async fn open_session(&self, digest: &Digest) -> Result<Session, RegistryError> {
        let pending = self
            .inner
            .pending
            .lock()
            .expect("pending lock")
            .remove(digest);
        let spare = || self.inner.spare.lock().expect("spare lock").pop();
        match pending.or_else(spare) {
            Some(s) => Ok(s),
            None => self.start_session().await,
        }
    }

    pub(crate) async fn start_session(&self) -> Result<Session, RegistryError> {
        let req = self.req(Method::POST, self.repo_url("blobs/uploads/")?);
        let resp = self.execute(&req).await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self.fail(&req, resp).await);
        }
        self.session_from(&req, &resp)
    }

    fn session_from(&self, req: &Req, resp: &Response) -> Result<Session, RegistryError> {
        let location = self.next_location(req, resp)?.ok_or_else(|| {
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
            range_is_count: false,
        })
    }

    /// The answer's `Location`, refused when it would move an HTTPS upload to plain HTTP.
    pub(crate) fn next_location(
        &self,
        req: &Req,
        resp: &Response,
    ) -> Result<Option<Url>, RegistryError> {
        let Some(next) = location(resp, resp.url()) else {
            return Ok(None);
        };
        self.refuse_downgrade(req.method.as_str(), &next, "upload Location")?;
        Ok(Some(next))
    }

    /// One PATCH of `len` bytes at `offset`, streamed from `body`. `ranged` sends `Content-Range`
    /// (chunked uploads, resumes); without it this is the one streamed PATCH docker and
    /// go-containerregistry send. Returns the session to use next.
    pub(crate) async fn patch(
        &self,
        session: &Session,
        offset: u64,
        len: u64,
        ranged: bool,
        body: ByteStream,
    ) -> Result<Session, RegistryError> {
        let mut req = self.req(Method::PATCH, session.location.clone());
        req.retry = false;
        req.headers
            .insert(CONTENT_TYPE, OCTET_STREAM.parse().expect("static header"));
        // Sized, not chunked encoding: some registries refuse chunked PATCHes, and distribution only
        // checks Content-Range against the body when Content-Length is present.
        req.headers.insert(CONTENT_LENGTH, len.into());
        if ranged && len > 0 {
            let range = format!("{offset}-{}", offset + len - 1);
            req.headers
                .insert("content-range", range.parse().expect("digits and a dash"));
        }
        let progress = Progress::new();
        let watch = progress.clone();
        req.body = Body::once(body.inspect(move |_| watch.touch()).boxed());
        req.timeout = None;
        let resp = self.execute_watched(&req, &progress).await?;
        if !resp.status().is_success() {
            return Err(self.fail(&req, resp).await);
        }
        let next = self
            .next_location(&req, &resp)?
            .unwrap_or_else(|| session.location.clone());
        // Quay: `0-<count>` where the spec says `0-<count - 1>`.
        let quay = len > 0 && range_end(&resp) == Some(offset + len);
        Ok(Session {
            location: next,
            min_chunk: session.min_chunk,
            range_is_count: session.range_is_count || quay,
        })
    }

    /// Ask the registry how many bytes a session holds: `None` when it no longer knows the session (404;
    /// ECR answers every such GET with 404) or does not say.
    pub(crate) async fn upload_status(
        &self,
        session: &Session,
    ) -> Result<Option<(Session, u64)>, RegistryError> {
        let req = self.req(Method::GET, session.location.clone());
        let resp = self.execute(&req).await?;
        if !matches!(resp.status(), StatusCode::NO_CONTENT | StatusCode::OK) {
            return Ok(None);
        }
        let next = self
            .next_location(&req, &resp)?
            .unwrap_or_else(|| session.location.clone());
        let Some(end) = range_end(&resp) else {
            return Ok(None);
        };
        // distribution answers `0-0` both for nothing and for one byte: take it as nothing.
        let held = match (session.range_is_count, end) {
            (true, n) => n,
            (false, 0) => 0,
            (false, n) => n + 1,
        };
        let session = Session {
            location: next,
            ..session.clone()
        };
        Ok(Some((session, held)))
    }

    /// `PUT <location>&digest=<digest>`, with the final bytes if any. A PUT whose answer was lost may
    /// have landed: a 404 for the session is then checked with a HEAD.
    pub(crate) async fn commit(
        &self,
        session: Session,
        digest: &Digest,
        last: Option<bytes::Bytes>,
    ) -> Result<(), RegistryError> {
        let mut url = session.location;
        url.query_pairs_mut().append_pair("digest", digest.as_str());
        let mut req = self.req(Method::PUT, url);
        req.headers
            .insert(CONTENT_TYPE, OCTET_STREAM.parse().expect("static header"));
        // A PUT carrying the blob is tried again by its caller, in a new session.
        req.retry = last.is_none();
        req.body = last.map(Body::Bytes).unwrap_or(Body::Empty);
        let resp = self.execute(&req).await?;
        match resp.status() {
            s if s.is_success() => check_content_digest(&resp, digest, &format!("blob {digest}")),
            StatusCode::NOT_FOUND if self.blob_exists(digest).await?.is_some() => Ok(()),
            _ => Err(self.fail(&req, resp).await),
        }
    }
}

/// The last number of `Range: [bytes=]0-N`; `None` without one or when it does not start at 0.
fn range_end(resp: &Response) -> Option<u64> {
    let r = resp.headers().get(RANGE)?.to_str().ok()?;
    let r = r.trim().trim_start_matches("bytes=");
    let (start, end) = r.split_once('-')?;
    let (start, end): (u64, u64) = (start.trim().parse().ok()?, end.trim().parse().ok()?);
    (start == 0).then_some(end)
}
