//! `Client`: one registry repository as a push target (or pull source). Owns the HTTP client, the
//! authenticator and the request loop every operation goes through: attach credentials, re-authenticate
//! once on 401, retry transient failures with backoff and jitter, and follow redirects by hand so that
//! `Authorization` never leaves the registry's own origin (blob GETs redirect to S3/GCS/CDN hosts).
//! Manifests and blob reads live here; blob uploads are in `upload.rs`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION,
};
use reqwest::{Method, Response, StatusCode};
use url::Url;

use super::auth::{repo_scope, Authenticator};
use super::credentials::{self, Lookup};
use super::error::{error_from_response, host_port, redact_url, RegistryError};
use super::reference::Reference;
use super::upload::Session;
use crate::digest::Digest;

/// How to reach and authenticate to a registry.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Speak `http://` instead of `https://` (test registries only).
    pub plain_http: bool,
    /// PEM bundle of extra CAs, trusted in addition to the bundled webpki roots.
    pub ca_file: Option<PathBuf>,
    /// A docker `config.json` or a `kubernetes.io/dockerconfigjson` file; default `$DOCKER_CONFIG/config.json`,
    /// then `~/.docker/config.json`.
    pub registry_config: Option<PathBuf>,
    pub user_agent: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: false,
            ca_file: None,
            registry_config: None,
            user_agent: concat!("committer/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// Media types asked for when reading a manifest.
pub(crate) const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

const MAX_REDIRECTS: usize = 10;
/// PATCH size for file uploads unless the registry demands more (`OCI-Chunk-Min-Length`).
pub(crate) const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024 * 1024;

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
    /// `len` bytes of `path` from `offset`, streamed.
    File {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
    Once(std::sync::Mutex<Option<reqwest::Body>>),
}

impl Body {
    fn replayable(&self) -> bool {
        !matches!(self, Body::Once(_))
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
}

pub(crate) struct Inner {
    pub http: reqwest::Client,
    /// `https://host[:port]/` of the registry API.
    pub base: Url,
    pub registry: String,
    pub repository: String,
    pub auth: Authenticator,
    /// Upload sessions a declined mount (202) opened, reused by the next upload of that digest.
    pub pending: std::sync::Mutex<HashMap<Digest, Session>>,
}

/// A registry repository to push to or pull from. Cheap to clone; clones share connections and tokens.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    pub(crate) chunk_size: u64,
    pub(crate) retry: Retry,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({}{})", self.inner.base, self.inner.repository)
    }
}

impl Client {
    /// Resolve credentials, then ping `/v2/` and authenticate once, so that an unreachable registry, an
    /// untrusted certificate or rejected credentials fail here with a clear message.
    pub async fn new(reference: &Reference, opts: &ClientOptions) -> Result<Client, RegistryError> {
        let lookup = Lookup {
            config: opts.registry_config.clone(),
            helper_path: None,
        };
        Client::with_lookup(reference, opts, lookup, Retry::DEFAULT).await
    }

    pub(crate) async fn with_lookup(
        reference: &Reference,
        opts: &ClientOptions,
        lookup: Lookup,
        retry: Retry,
    ) -> Result<Client, RegistryError> {
        let http = build_http(opts)?;
        let scheme = if opts.plain_http { "http" } else { "https" };
        let base = Url::parse(&format!("{scheme}://{}/", reference.api_host())).map_err(|e| {
            RegistryError::Config(format!("registry {:?}: {e}", reference.registry))
        })?;
        let resolved = credentials::resolve(&reference.registry, &lookup).await?;
        let inner = Inner {
            auth: Authenticator::new(http.clone(), resolved),
            http,
            base,
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            pending: Default::default(),
        };
        // The first contact retries less: a registry that is down should be reported in about a second.
        let ping_retry = Retry {
            attempts: retry.attempts.min(3),
            ..retry
        };
        let client = Client {
            inner: Arc::new(inner),
            chunk_size: DEFAULT_CHUNK_SIZE,
            retry: ping_retry,
        };
        client.ping().await?;
        Ok(Client { retry, ..client })
    }

    /// PATCH size for `upload_blob_file` (the registry's `OCI-Chunk-Min-Length` still wins when larger).
    pub fn with_chunk_size(mut self, bytes: u64) -> Client {
        self.chunk_size = bytes.max(1);
        self
    }

    pub fn repository(&self) -> &str {
        &self.inner.repository
    }

    pub fn registry(&self) -> &str {
        &self.inner.registry
    }

    async fn ping(&self) -> Result<(), RegistryError> {
        let req = self.req(Method::GET, self.url("v2/")?);
        let resp = self.execute(&req).await?;
        match resp.status() {
            StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND => Err(RegistryError::protocol(
                "GET",
                &req.url,
                format!(
                    "{} does not serve the registry API at /v2/ (is this a registry?)",
                    host_port(&req.url)
                ),
            )),
            _ => Err(self.fail(&req, resp).await),
        }
    }

    /// The scopes a push to this repository needs.
    pub(crate) fn push_scopes(&self) -> Vec<String> {
        vec![repo_scope(&self.inner.repository, "pull,push")]
    }

    /// `base` + path (relative to the registry root).
    pub(crate) fn url(&self, path: &str) -> Result<Url, RegistryError> {
        self.inner
            .base
            .join(path)
            .map_err(|e| RegistryError::Config(format!("bad registry path {path:?}: {e}")))
    }

    pub(crate) fn repo_url(&self, rest: &str) -> Result<Url, RegistryError> {
        self.url(&format!("v2/{}/{rest}", self.inner.repository))
    }

    pub(crate) fn req(&self, method: Method, url: Url) -> Req {
        Req {
            method,
            url,
            headers: HeaderMap::new(),
            body: Body::Empty,
            scopes: self.push_scopes(),
            retry: true,
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
                if resp.status() == StatusCode::UNAUTHORIZED
                    && ours
                    && !reauthenticated
                    && can_repeat
                {
                    reauthenticated = true;
                    if self.inner.auth.learn(resp.headers(), &req.scopes).await {
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
                Some(next) if follow => url = next,
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
        let hint = match resp.status().as_u16() {
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

    /// HEAD the blob: `Some(size)` when the repository has it.
    pub async fn blob_exists(&self, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        let req = self.req(Method::HEAD, self.repo_url(&format!("blobs/{digest}"))?);
        let resp = self.execute(&req).await?;
        match resp.status() {
            StatusCode::OK => {
                let size = header_str(&resp, CONTENT_LENGTH.as_str()).and_then(|s| s.parse().ok());
                size.map(Some).ok_or_else(|| {
                    RegistryError::protocol("HEAD", &req.url, "the answer has no Content-Length")
                })
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.fail(&req, resp).await),
        }
    }

    /// PUT a manifest under a tag or digest. Returns the sha256 of `body`, after checking it against the
    /// registry's `Docker-Content-Digest` when the registry sends one.
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&body);
        let mut req = self.req(
            Method::PUT,
            self.repo_url(&format!("manifests/{reference}"))?,
        );
        req.headers.insert(CONTENT_TYPE, header_value(media_type)?);
        req.body = Body::Bytes(body);
        let resp = self.execute(&req).await?;
        if resp.status() != StatusCode::CREATED && resp.status() != StatusCode::OK {
            return Err(self.fail(&req, resp).await);
        }
        check_content_digest(
            &resp,
            &digest,
            &format!("manifest {}:{reference}", self.inner.repository),
        )?;
        Ok(digest)
    }

    /// GET a manifest (tag or digest): `(media type, exact bytes)`, or `None` on 404. When `reference` is a
    /// digest the bytes are checked against it.
    pub async fn get_manifest(
        &self,
        reference: &str,
    ) -> Result<Option<(String, Bytes)>, RegistryError> {
        let mut req = self.req(
            Method::GET,
            self.repo_url(&format!("manifests/{reference}"))?,
        );
        req.scopes = vec![repo_scope(&self.inner.repository, "pull")];
        req.headers
            .insert(ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        let resp = self.execute(&req).await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(self.fail(&req, resp).await),
        }
        let content_type = header_str(&resp, CONTENT_TYPE.as_str())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string());
        let body = resp
            .bytes()
            .await
            .map_err(|e| RegistryError::transport("GET", &req.url, e))?;
        if let Ok(expected) = reference.parse::<Digest>() {
            let found = Digest::of(&body);
            if found != expected {
                return Err(RegistryError::DigestMismatch {
                    what: format!("manifest {reference}"),
                    expected,
                    found: found.to_string(),
                });
            }
        }
        // Some registries answer `application/json` or nothing; the manifest's own mediaType is then the truth.
        let media_type = match content_type {
            Some(ct) if ct.starts_with("application/vnd.") => ct,
            other => media_type_field(&body).or(other).unwrap_or_default(),
        };
        Ok(Some((media_type, body)))
    }
}

fn media_type_field(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("mediaType")?.as_str().map(str::to_string)
}

/// The reqwest client: no automatic redirects (see module doc), bundled roots plus `ca_file`.
fn build_http(opts: &ClientOptions) -> Result<reqwest::Client, RegistryError> {
    let mut b = reqwest::Client::builder()
        .user_agent(opts.user_agent.clone())
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(30))
        .tcp_keepalive(Duration::from_secs(30));
    if let Some(path) = &opts.ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            RegistryError::Config(format!("cannot read --registry-ca {}: {e}", path.display()))
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            RegistryError::Config(format!(
                "--registry-ca {}: not a PEM certificate bundle: {e}",
                path.display()
            ))
        })?;
        if certs.is_empty() {
            return Err(RegistryError::Config(format!(
                "--registry-ca {}: no certificate in the file",
                path.display()
            )));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build()
        .map_err(|e| RegistryError::Config(format!("cannot build the HTTP client: {e}")))
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
        Body::File { path, offset, len } => {
            let stream = super::upload::file_range_stream(path, *offset, *len)
                .await
                .map_err(|e| RegistryError::Io {
                    context: format!(
                        "reading {} for {method} {}",
                        path.display(),
                        redact_url(url)
                    ),
                    source: e,
                })?;
            // An explicit Content-Length makes hyper send a sized body instead of chunked encoding;
            // distribution only checks Content-Range against the body when Content-Length is present.
            rb.header(CONTENT_LENGTH, len.to_string())
                .body(reqwest::Body::wrap_stream(stream))
        }
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

fn retry_after(resp: &Response) -> Option<Duration> {
    let secs: u64 = header_str(resp, "retry-after")?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(60)))
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
