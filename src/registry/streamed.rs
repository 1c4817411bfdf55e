//! A blob uploaded while it is still being produced: `POST`, one `PATCH` whose body is sent as it
//! comes (chunked transfer encoding, no `Content-Length` or `Content-Range`: the shape docker sends
//! and distribution, ECR, GHCR and GAR accept), then `PUT ?digest=` once the digest is known.
//! There are no retries here: a failure of any kind (a body cap's 413, a reset, a 5xx, a registry
//! that refuses the shape) is the caller's cue to upload the finished blob by the robust path
//! (`upload_blob`: chunks, quirks, retries), from the file it was written to.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use reqwest::header::CONTENT_TYPE;
use reqwest::Method;

use super::client::{Body, Client, Progress};
use super::error::RegistryError;
use super::source::ByteStream;
use super::upload::Session;
use crate::digest::Digest;

/// The PATCH is done; the blob is committed with its digest.
pub struct StreamedUpload {
    session: Session,
    client: Client,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Client {
    /// Opens a session (a spare one from `check_push` when there is one) and sends all of `body` in
    /// one PATCH of unknown length. Counts one transfer against the client's limit until the blob is
    /// committed.
    pub async fn stream_blob(&self, body: ByteStream) -> Result<StreamedUpload, RegistryError> {
        let permit = self
            .transfers
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let spare = self.inner.spare.lock().expect("spare lock").pop();
        let session = match spare {
            Some(s) => s,
            None => self.start_session().await?,
        };
        let mut req = self.req(Method::PATCH, session.location.clone());
        req.retry = false;
        req.timeout = None;
        req.headers.insert(
            CONTENT_TYPE,
            "application/octet-stream".parse().expect("static header"),
        );
        // The body idles while its producer works: the stall watch must not take that for the
        // network. Time counts as stalled only while the body has handed over bytes that the
        // connection has not asked past.
        let progress = Progress::new();
        req.body = Body::once(
            Watched {
                inner: body,
                progress: progress.clone(),
            }
            .boxed(),
        );
        let resp = self.execute_watched(&req, &progress).await?;
        if !resp.status().is_success() {
            return Err(self.fail(&req, resp).await);
        }
        let location = self.next_location(&req, &resp)?;
        Ok(StreamedUpload {
            session: Session {
                location: location.unwrap_or(session.location),
                ..session
            },
            client: self.clone(),
            _permit: permit,
        })
    }
}

impl StreamedUpload {
    /// `PUT ?digest=`: the registry checks the bytes it got against `digest`.
    pub async fn commit(self, digest: &Digest) -> Result<(), RegistryError> {
        self.client.commit(self.session, digest, None).await
    }
}

/// The body, telling the stall watch whether it waits for its producer, counting each piece sent.
struct Watched {
    inner: ByteStream,
    progress: Progress,
}

impl Stream for Watched {
    type Item = std::io::Result<bytes::Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.inner.poll_next_unpin(cx);
        self.progress.producing(next.is_pending());
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            crate::progress::add_sent(chunk.len() as u64);
        }
        next
    }
}
