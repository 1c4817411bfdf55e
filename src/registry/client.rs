//! `Client`: one registry repository as a push target (or pull source; made in `connect.rs`). Owns the
//! HTTP client, the authenticator and the request loop every operation goes through: attach
//! credentials, re-authenticate once on 401, retry transient failures with backoff and jitter, per-request
//! deadlines, and follow redirects by hand so that `Authorization` never leaves the registry's own
//! origin (blob GETs redirect to S3/GCS/CDN hosts) and HTTPS is never downgraded. Manifests are in
//! `manifest.rs`, blob reads in `source.rs`, uploads in `upload.rs` and `transfer.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, LOCATION};
use reqwest::{Method, Response, StatusCode};
use tokio::sync::Semaphore;
use url::Url;

use super::auth::{repo_scope, Authenticator};
use super::error::{error_from_response, host_port, redact_url, RegistryError};
use super::source::ByteStream;
pub(crate) use super::stall::Progress;
use super::upload::Session;
use crate::digest::Digest;

/// Media types asked for when reading a manifest.
pub(crate) const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

const MAX_REDIRECTS: usize = 10;

/// Backoff for transient failures: `base * 2^n`, capped, times a random factor in [0.5, 1).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Retry {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Retry {
    pub(crate) const DEFAULT: Retry = Retry {
        attempts: 6,
        base: Duration::from_millis(250),
        max: Duration::from_secs(15),
    };

    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        exp.mul_f64(0.5 + jitter() / 2.0)
    }
}

/// A number in [0, 1) without a `rand` dependency: `RandomState` is seeded randomly per instance.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// A request body that can be rebuilt for a retry, or a one-shot stream.
pub(crate) enum Body {
    Empty,
    Bytes(Bytes),
    Once(std::sync::Mutex<Option<reqwest::Body>>),
}

impl Body {
    fn replayable(&self) -> bool {
        !matches!(self, Body::Once(_))
    }

    pub(crate) fn once(stream: ByteStream) -> Body {
        Body::Once(std::sync::Mutex::new(Some(reqwest::Body::wrap_stream(
            stream,
        ))))
    }
}

/// One registry request, described so that it can be sent again.
pub(crate) struct Req {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Body,
    pub scopes: Vec<String>,
    /// Retry 408/429/5xx and connection failures here (off for PATCH: the upload loop resyncs instead).
    pub retry: bool,
    /// The whole request's deadline; `None` for blob bodies, watched for progress instead.
    pub timeout: Option<Duration>,
}

pub(crate) struct Inner {
    pub http: reqwest::Client,
    /// The registry API root, `https://host[:port]/v2/` (a mirror may have a longer path).
    pub base: Url,
    pub registry: String,
    pub repository: String,
    /// `pull,push` for a target, `pull` for a base registry.
    pub actions: &'static str,
    pub auth: Authenticator,
    pub timeout: Duration,
    /// Upload sessions a declined mount (202) opened, reused by the next upload of that digest.
    pub pending: std::sync::Mutex<HashMap<Digest, Session>>,
    /// Sessions `check_push` opened, used by the next uploads.
    pub spare: std::sync::Mutex<Vec<Session>>,
    /// Source repositories whose mount was refused once: not asked again.
    pub refused_mounts: std::sync::Mutex<HashSet<String>>,
    pub mount_turn: tokio::sync::Mutex<()>,
}

/// A registry repository to push to or pull from. Cheap to clone; clones share connections, tokens
/// and the transfer limit.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    pub(crate) chunk_size: Option<u64>,
    pub(crate) retry: Retry,
    pub(crate) transfers: Arc<Semaphore>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({}{})", self.inner.base, self.inner.repository)
    }
}

impl Client {
    /// Send uploads in ranged chunks of `bytes` (the registry's `OCI-Chunk-Min-Length` still wins when
    /// larger) instead of one streamed PATCH.
    pub fn with_chunk_size(mut self, bytes: u64) -> Client {
        self.chunk_size = Some(bytes.max(1));
        self
    }

    pub fn repository(&self) -> &str {
        &self.inner.repository
    }

    pub fn registry(&self) -> &str {
        &self.inner.registry
    }

    pub(crate) async fn ping(&self) -> Result<(), RegistryError> {
        let req = self.req(Method::GET, self.inner.base.clone());
        let resp = self.execute(&req).await?;
        match resp.status() {
            StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND => Err(RegistryError::protocol(
                "GET",
                &req.url,
                format!(
                    "{} does not serve the registry API at {} (is this a registry?)",
                    host_port(&req.url),
                    req.url.path()
                ),
            )),
            _ => Err(self.fail(&req, resp).await),
        }
    }

    /// The scopes this client's requests need: push and pull on a target, pull on a base.
    pub(crate) fn scopes(&self) -> Vec<String> {
        vec![repo_scope(&self.inner.repository, self.inner.actions)]
    }

    /// The API root + `<repository>/` + `rest`.
    pub(crate) fn repo_url(&self, rest: &str) -> Result<Url, RegistryError> {
        let path = format!("{}/{rest}", self.inner.repository);
        self.inner
            .base
            .join(&path)
            .map_err(|e| RegistryError::Config(format!("bad registry path {path:?}: {e}")))
    }

    pub(crate) fn req(&self, method: Method, url: Url) -> Req {
        Req {
            method,
            url,
            headers: HeaderMap::new(),
            body: Body::Empty,
            scopes: self.scopes(),
            retry: true,
            timeout: Some(self.inner.timeout),
        }
    }

    /// Refuse a plain-HTTP URL handed out by an HTTPS registry (an upload Location, a redirect), or by
    /// a plain-HTTP registry for another host: only `--plain-http` (or loopback) allows plain HTTP, and
    /// only to the registry so named.
    pub(crate) fn refuse_downgrade(
        &self,
        method: &str,
        next: &Url,
        what: &str,
    ) -> Result<(), RegistryError> {
        downgrade_check(&self.inner.base, method, next, what)
    }

    /// [`Client::execute`] for a request with a streamed body and no overall deadline: it fails when
    /// neither a body byte went out nor an answer came for the client's timeout (a stalled registry).
    pub(crate) async fn execute_watched(
        &self,
        req: &Req,
        progress: &Progress,
    ) -> Result<Response, RegistryError> {
        let limit = self.inner.timeout;
        let send = self.execute(req);
        tokio::pin!(send);
        loop {
            tokio::select! {
                r = &mut send => return r,
                _ = tokio::time::sleep(limit / 4) => {
                    if progress.idle() > limit {
                        return Err(RegistryError::stalled(req.method.as_str(), &req.url, limit));
                    }
                }
            }
        }
    }

    /// Send `req`: credentials, one re-authentication on 401, retries, redirects. Any status is returned;
    /// callers turn unexpected ones into errors with [`Client::fail`].
    pub(crate) async fn execute(&self, req: &Req) -> Result<Response, RegistryError> {
        let mut attempt = 0;
        let mut reauthenticated = false;
        loop {
            let result = self.send_following_redirects(req).await;
            let can_repeat = req.body.replayable();
            if let Ok(resp) = &result {
                // Only the registry's own challenges teach the scheme (not a storage host's 401).
                let ours = resp.url().origin() == self.inner.base.origin();
                if resp.status() == StatusCode::UNAUTHORIZED && ours && !reauthenticated {
                    reauthenticated = true;
                    // A one-shot body cannot be sent again here; learning still drops the refused
                    // token, so the upload loop's next attempt gets a fresh one.
                    if self.inner.auth.learn(resp.headers(), &req.scopes).await? && can_repeat {
                        continue;
                    }
                }
            }
            let transient = match &result {
                Ok(resp) => matches!(resp.status().as_u16(), 408 | 429 | 500..=599),
                Err(e) => e.is_transient(),
            };
            if !(transient && req.retry && can_repeat && attempt + 1 < self.retry.attempts) {
                return result;
            }
            let wait = result
                .as_ref()
                .ok()
                .and_then(retry_after)
                .unwrap_or_else(|| self.retry.delay(attempt));
            // A transport error's text already names the method and URL.
            let why = match &result {
                Ok(resp) => format!(
                    "{} {}: HTTP {}",
                    req.method,
                    redact_url(&req.url),
                    resp.status().as_u16()
                ),
                Err(e) => e.to_string(),
            };
            crate::log::debug(&format!(
                "{why}; retrying in {wait:?} (attempt {} of {})",
                attempt + 2,
                self.retry.attempts
            ));
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    async fn send_following_redirects(&self, req: &Req) -> Result<Response, RegistryError> {
        let mut url = req.url.clone();
        for _ in 0..MAX_REDIRECTS {
            let mut rb = self
                .inner
                .http
                .request(req.method.clone(), url.clone())
                .headers(req.headers.clone());
            if let Some(t) = req.timeout {
                rb = rb.timeout(t);
            }
            // Credentials go only to the registry's own origin; a redirect to a storage host gets none.
            if url.origin() == self.inner.base.origin() {
                if let Some(auth) = self.inner.auth.authorization(&req.scopes).await? {
                    rb = rb.header(AUTHORIZATION, auth);
                }
            }
            rb = attach_body(rb, &req.body, &req.method, &url).await?;
            let resp = rb
                .send()
                .await
                .map_err(|e| RegistryError::transport(req.method.as_str(), &url, e))?;
            let follow = resp.status().is_redirection()
                && (req.method == Method::GET || req.method == Method::HEAD);
            match location(&resp, &url) {
                Some(next) if follow => {
                    self.refuse_downgrade(req.method.as_str(), &next, "redirect")?;
                    url = next
                }
                _ => return Ok(resp),
            }
        }
        Err(RegistryError::protocol(
            req.method.as_str(),
            &req.url,
            format!("more than {MAX_REDIRECTS} redirects"),
        ))
    }

    /// Turn an unexpected response into an error with the registry's error body and a hint.
    pub(crate) async fn fail(&self, req: &Req, resp: Response) -> RegistryError {
        let url = resp.url().clone();
        let host = host_port(&url);
        let insufficient_scope = resp
            .headers()
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains("insufficient_scope")));
        let hint = match resp.status().as_u16() {
            // Docker Hub: valid credentials, but no push right on this namespace (ggcr
            // CheckPushPermission tells the two apart the same way).
            401 | 403 if insufficient_scope && self.inner.actions.contains("push") => {
                Some(format!(
                    "these credentials ({}) cannot push to {}/{}",
                    self.inner.auth.source(),
                    self.inner.registry,
                    self.inner.repository
                ))
            }
            401 => Some(self.inner.auth.rejected_hint(&url)),
            403 => Some(format!(
                "{host} denied {} on {} to {}: the credentials lack permission",
                req.method,
                self.inner.repository,
                self.inner.auth.source()
            )),
            408 | 429 | 500..=599 => Some(format!(
                "{host} kept failing; gave up after {} attempts",
                self.retry.attempts
            )),
            // Harbor, GitLab and others answer a push to a project that does not exist this way.
            404 if req.method != Method::GET && req.method != Method::HEAD => Some(format!(
                "does the repository {} exist on {host}? some registries need it created first",
                self.inner.repository
            )),
            _ => None,
        };
        let mut err = error_from_response(req.method.as_str(), &url, resp, hint).await;
        if let RegistryError::Status {
            status: 400,
            body: Some(b),
            hint,
            ..
        } = &mut err
        {
            // Go's net/http answers a plain request on a TLS port with this text.
            if b.contains("HTTP request to an HTTPS server") {
                *hint = Some(format!("{host} speaks HTTPS: drop --plain-http"));
            }
        }
        err
    }

    /// HEAD the blob: `Some(size)` when the repository has it. A 200 without `Content-Length` (HTTP/2
    /// front ends of GCP, Cloud Run, Cloudflare tunnels: distribution#4895) still means it exists; the
    /// digest names the content, so the size is then reported as 0.
    pub async fn blob_exists(&self, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        let req = self.req(Method::HEAD, self.repo_url(&format!("blobs/{digest}"))?);
        let resp = self.execute(&req).await?;
        match resp.status() {
            StatusCode::OK => {
                let size = header_str(&resp, CONTENT_LENGTH.as_str()).and_then(|s| s.parse().ok());
                Ok(Some(size.unwrap_or(0)))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.fail(&req, resp).await),
        }
    }
}

async fn attach_body(
    rb: reqwest::RequestBuilder,
    body: &Body,
    method: &Method,
    url: &Url,
) -> Result<reqwest::RequestBuilder, RegistryError> {
    Ok(match body {
        Body::Empty
            if *method == Method::PUT || *method == Method::POST || *method == Method::PATCH =>
        {
            rb.header(CONTENT_LENGTH, "0")
        }
        Body::Empty => rb,
        Body::Bytes(b) => rb
            .header(CONTENT_LENGTH, b.len().to_string())
            .body(b.clone()),
        Body::Once(cell) => match cell.lock().ok().and_then(|mut c| c.take()) {
            Some(b) => rb.body(b),
            None => {
                return Err(RegistryError::protocol(
                    method.as_str(),
                    url,
                    "a streamed body cannot be sent twice",
                ))
            }
        },
    })
}

/// The `Location` header resolved against the request URL (registries send relative ones, and their
/// query — distribution's `_state` — must be kept).
pub(crate) fn location(resp: &Response, base: &Url) -> Option<Url> {
    let loc = resp.headers().get(LOCATION)?.to_str().ok()?;
    base.join(loc).ok()
}

/// `Retry-After` in seconds or as an HTTP date (RFC 9110 allows both), capped at a minute.
fn retry_after(resp: &Response) -> Option<Duration> {
    retry_after_value(
        header_str(resp, "retry-after")?,
        time::OffsetDateTime::now_utc(),
    )
}

pub(crate) fn retry_after_value(v: &str, now: time::OffsetDateTime) -> Option<Duration> {
    let v = v.trim();
    let wait = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822)
                .ok()?;
            Duration::try_from(at - now).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(Duration::from_secs(60)))
}

pub(crate) fn header_str<'a>(resp: &'a Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn header_value(s: &str) -> Result<HeaderValue, RegistryError> {
    HeaderValue::from_str(s)
        .map_err(|_| RegistryError::Config(format!("{s:?} is not a valid HTTP header value")))
}

/// Registries report what they stored in `Docker-Content-Digest`; a different value means corruption.
pub(crate) fn check_content_digest(
    resp: &Response,
    expected: &Digest,
    what: &str,
) -> Result<(), RegistryError> {
    match header_str(resp, "docker-content-digest") {
        Some(found) if found.trim() != expected.as_str() => Err(RegistryError::DigestMismatch {
            what: what.to_string(),
            expected: expected.clone(),
            found: found.trim().to_string(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = time::OffsetDateTime::parse(
            "Wed, 02 Dec 2026 04:00:00 GMT",
            &time::format_description::well_known::Rfc2822,
        )
        .unwrap();
        let wait = |v| retry_after_value(v, now);
        assert_eq!(wait("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            wait("Wed, 02 Dec 2026 04:00:12 GMT"),
            Some(Duration::from_secs(12))
        );
        assert_eq!(wait("Wed, 02 Dec 2026 03:59:00 GMT"), Some(Duration::ZERO));
        assert_eq!(wait("3600"), Some(Duration::from_secs(60)), "capped");
        assert_eq!(wait("soon"), None);
    }

    #[test]
    fn loopback_hosts_are_recognised() {
        use super::super::connect::is_loopback;
        for h in [
            "localhost:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "127.1.2.3",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["ghcr.io", "10.0.0.1:5000", "localhost.example.com"] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}

/// The registry's URL for the next request (`what`: an upload Location, a redirect) must not be plain
/// HTTP when the registry is HTTPS (layer data and credentials would travel unencrypted), nor lead a
/// plain-HTTP registry's traffic to another host in the clear: plain HTTP stays on the host named.
fn downgrade_check(base: &Url, method: &str, next: &Url, what: &str) -> Result<(), RegistryError> {
    if next.scheme() == "https" {
        return Ok(());
    }
    let why = if base.scheme() == "https" {
        format!("a plain-HTTP {what} from HTTPS")
    } else if next.host_str() != base.host_str() {
        format!("a plain-HTTP {what} to another host")
    } else {
        return Ok(());
    };
    Err(RegistryError::protocol(
        method,
        next,
        format!(
            "{} sent {why}; refusing to send data or credentials unencrypted",
            host_port(base)
        ),
    ))
}

#[cfg(test)]
mod downgrade_tests {
    use super::*;

    #[test]
    fn an_http_upload_location_or_redirect_from_an_https_registry_is_refused() {
        let base: Url = "https://reg.example:5000/v2/".parse().unwrap();
        for (method, next, what) in [
            (
                "PATCH",
                "http://reg.example:5000/v2/r/blobs/uploads/1",
                "upload Location",
            ),
            ("GET", "http://cdn.example/blob?sig=secret", "redirect"),
        ] {
            let next: Url = next.parse().unwrap();
            let e = downgrade_check(&base, method, &next, what)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!(
                    "reg.example:5000 sent a plain-HTTP {what} from HTTPS"
                )),
                "{e}"
            );
            assert!(!e.contains("sig=secret"), "the URL is redacted: {e}");
        }
    }

    #[test]
    fn https_to_https_and_a_plain_http_registry_pass() {
        let https: Url = "https://reg.example/v2/".parse().unwrap();
        let http: Url = "http://127.0.0.1:5000/v2/".parse().unwrap();
        let s3: Url = "https://bucket.s3.example/blob".parse().unwrap();
        assert!(downgrade_check(&https, "GET", &s3, "redirect").is_ok());
        assert!(downgrade_check(&http, "PATCH", &http, "upload Location").is_ok());
        let same_host: Url = "http://127.0.0.1:9000/bucket/blob".parse().unwrap();
        assert!(downgrade_check(&http, "GET", &same_host, "redirect").is_ok());
        assert!(downgrade_check(&http, "GET", &s3, "redirect").is_ok());
    }

    #[test]
    fn a_plain_http_registry_may_not_send_plain_http_elsewhere() {
        let http: Url = "http://127.0.0.1:5000/v2/".parse().unwrap();
        let elsewhere: Url = "http://cdn.example/blob?sig=secret".parse().unwrap();
        let e = downgrade_check(&http, "GET", &elsewhere, "redirect")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("127.0.0.1:5000 sent a plain-HTTP redirect to another host"),
            "{e}"
        );
        assert!(!e.contains("sig=secret"), "the URL is redacted: {e}");
    }
}
