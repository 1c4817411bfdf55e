//! A registry-quirk proxy: in front of a real distribution registry, it answers as a named registry is
//! documented to answer, so the bytes are still stored and checked by the real registry. Each quirk
//! cites its evidence. What it cannot reproduce: the real services' auth flows beyond scopes, their
//! latencies and limits at full size (limits here are small so layers can be several times them).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;

/// A body cap / chunk limit small enough that a 3 MiB layer is several times it.
pub const LIMIT: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// PATCH → 201; a stale `Range` on later PATCHes; GET of an upload → 404
    /// (rust-oci-client#33, regclient `blob.go` "AWS ECR returns a 201", aws/containers-roadmap#2831).
    /// One later chunk (`Content-Range` past 0) is reset, so that the upload's status is asked for
    /// (ECR's 404) and a client believing the stale `Range` would send the wrong bytes next.
    Ecr,
    /// A ranged PATCH over the limit → 416 "exceeds the maximum permissible limit of …MiB"
    /// (rust-oci-client#35/#37, at 4 MiB there); the first manifest PUT → 400 MANIFEST_BLOB_UNKNOWN
    /// (rust-oci-client#37); DELETE of an upload → 405.
    Ghcr,
    /// No chunked uploads: a second PATCH in a session fails (GAR docs quoted in
    /// dotnet/sdk-container-builds#287).
    Gar,
    /// Upload status `Range: bytes=0-<count>`, one past the last byte (quay `endpoints/v2/blob.py`).
    /// One later chunk is reset, so that the status is asked for and must be read right.
    Quay,
    /// A request body over the cap → 413 with an HTML page (Cloudflare's 100 MB plan limit, nginx's
    /// `client_max_body_size`: distribution#2042). A streamed body (no length) is answered as soon
    /// as it passes the cap, the rest left unread, as such proxies do.
    Cloudflare,
    /// HEAD 200 without `Content-Length` (GCP front ends over HTTP/2, Cloud Run, tunnels:
    /// distribution#4895).
    H2NoLength,
    /// A mount answered with this status: 405 (registries without cross-repo mount), 404 (a
    /// registry that does not know the source repository's blob for this account): containerd#14086.
    NoMount(u16),
    /// Docker Hub's token service: scopes granted per account; a push with a token lacking `push`
    /// gets 401 `insufficient_scope` (ggcr `CheckPushPermission`). Accounts: `writer` may push,
    /// `reader` may only pull (both with password `pw`).
    DockerHub,
    /// A connection reset in the middle of the first upload of every blob (keyed by body size; the
    /// first streamed upload, of unknown size, after 64 KiB of its body) and of the first GET of
    /// every blob (half of its body, then the connection drops).
    Reset,
    /// Accepts the push-permission check (`POST`), then every blob body stops being read after
    /// 64 KiB and is never answered: a registry or link that stalls mid-upload.
    Stall,
    /// Every blob body is answered 300 ms late, so that concurrent uploads overlap and the most in
    /// flight at once shows ([`Proxy::max_in_flight`]).
    Slow,
}

pub struct Proxy {
    pub addr: String,
    state: Arc<State>,
}

struct State {
    profile: Profile,
    upstream: String,
    addr: String,
    http: reqwest::Client,
    log: Mutex<Vec<String>>,
    /// PATCHes per upload session, and the first PATCH's Range (ECR's stale echo).
    sessions: Mutex<HashMap<String, (u32, Option<String>)>>,
    manifest_refused: Mutex<bool>,
    /// Reset already injected for these keys.
    reset: Mutex<HashSet<String>>,
    /// Faults are injected only while armed (a proxy is armed from the start).
    armed: AtomicBool,
    /// Blob bodies being received now, and the most at once.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

type Body = BoxBody<Bytes, io::Error>;

impl Proxy {
    pub async fn start(profile: Profile, upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(State {
            profile,
            upstream: upstream.to_string(),
            addr: addr.clone(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            log: Default::default(),
            sessions: Default::default(),
            manifest_refused: Default::default(),
            reset: Default::default(),
            armed: AtomicBool::new(true),
            in_flight: Default::default(),
            max_in_flight: Default::default(),
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        Proxy { addr, state }
    }

    /// "METHOD path?query -> status" for every request. A cut one is "METHOD path?query len=N -> 0"
    /// (N: its Content-Length, or `streamed`); a blob GET cut half-way is logged so (N: the blob's
    /// length) once the client has read that far, besides its "-> 200"; a stalled upload is
    /// "… stalled -> 0".
    pub fn log(&self) -> Vec<String> {
        self.state.log.lock().unwrap().clone()
    }

    /// Stop injecting faults (e.g. while containerd pulls through the proxy).
    pub fn disarm(&self) {
        self.state.armed.store(false, Ordering::SeqCst);
    }

    /// Inject every fault again, once per key, as a fresh proxy would.
    pub fn rearm(&self) {
        self.state.reset.lock().unwrap().clear();
        self.state.armed.store(true, Ordering::SeqCst);
    }

    /// Leave the first upload of a body of `len` bytes whole after [`Proxy::rearm`].
    pub fn spare_upload(&self, len: usize) {
        let key = format!("up-{:?}", Some(len));
        self.state.reset.lock().unwrap().insert(key);
    }

    /// The most blob bodies that were being received at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

/// Counts a blob body in flight while it lives.
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn enter(st: &'a State) -> InFlight<'a> {
        let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        st.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(st)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A listener that accepts connections and never answers.
pub async fn stalled() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    (addr, task)
}

fn full(status: u16, headers: &[(&str, String)], body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::builder().status(status);
    for (k, v) in headers {
        r = r.header(*k, v);
    }
    let body = Full::new(body.into()).map_err(|e: Infallible| match e {});
    r.body(BodyExt::boxed(body)).unwrap()
}

fn oci_error(status: u16, code: &str, message: &str) -> Response<Body> {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"{message}"}}]}}"#);
    full(status, &[("content-type", "application/json".into())], body)
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    let (parts, body) = req.into_parts();
    let method = parts.method.as_str().to_string();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let len: Option<usize> = parts
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let upload = path.contains("/blobs/uploads/");
    let with_body = method == "PATCH" || method == "PUT" && len.unwrap_or(0) > 0;
    let _in_flight = (upload && with_body).then(|| InFlight::enter(&st));
    let body_upload = upload && len.unwrap_or(0) > 0 && (method == "PATCH" || method == "PUT");
    if st.profile == Profile::Reset && body_upload && st.first(&format!("up-{len:?}")) {
        // Read part of the body, then drop the connection.
        let mut body = body;
        let _ = body.frame().await;
        st.record_cut(&method, &target, len);
        return Err(io::Error::other("injected reset"));
    }
    if st.profile == Profile::Stall && upload && with_body && st.armed() {
        return stall(&st, &method, &target, body).await;
    }
    if st.profile == Profile::Slow && upload && with_body {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let resumed = parts
        .headers
        .get("content-range")
        .and_then(|v| v.to_str().ok()?.split('-').next()?.parse::<u64>().ok())
        .is_some_and(|start| start > 0);
    let later_chunk = method == "PATCH" && resumed;
    if later_chunk && matches!(st.profile, Profile::Quay | Profile::Ecr) && st.first("chunk") {
        // A later chunk breaks once, so the client must ask the upload's status: Quay answers
        // with its one-past Range, ECR with 404.
        st.record_cut(&method, &target, len);
        return Err(io::Error::other("injected reset"));
    }
    // A streamed PATCH (chunked, no length): the profiles that cut bodies meet it mid-body.
    let streamed = method == "PATCH" && upload && len.is_none();
    let cut_at = match st.profile {
        Profile::Reset if streamed => Some(64 * 1024),
        Profile::Cloudflare if streamed => Some(LIMIT),
        _ => None,
    };
    let mut body = body;
    let mut head = bytes::BytesMut::new();
    if let Some(cap) = cut_at {
        while head.len() <= cap {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        head.extend_from_slice(&d);
                    }
                }
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => break,
            }
        }
        if head.len() > cap {
            if st.profile == Profile::Reset && st.first("up-streamed") {
                st.record_cut(&method, &target, None);
                return Err(io::Error::other("injected reset"));
            }
            if st.profile == Profile::Cloudflare {
                st.record(&method, &target, 413);
                let html = "<html><head><title>413 Request Entity Too Large</title></head><body>cloudflare</body></html>";
                return Ok(full(413, &[("content-type", "text/html".into())], html));
            }
        }
    }
    let rest = body.collect().await.map_err(io::Error::other)?.to_bytes();
    head.extend_from_slice(&rest);
    let bytes = head.freeze();
    let resp = match before(&st, &method, &path, &target, &parts.headers, bytes.len()) {
        Some(r) => r,
        None => forward(&st, &parts, &target, bytes).await?,
    };
    st.record(&method, &target, resp.status().as_u16());
    Ok(resp)
}

/// Read 64 KiB of the body, then neither read on nor answer, until the client gives up.
async fn stall(
    st: &State,
    method: &str,
    target: &str,
    mut body: Incoming,
) -> Result<Response<Body>, io::Error> {
    let mut read = 0;
    while read < 64 * 1024 {
        match body.frame().await {
            Some(Ok(f)) => read += f.into_data().map(|d| d.len()).unwrap_or(0),
            _ => break,
        }
    }
    st.record(method, &format!("{target} stalled"), 0);
    std::future::pending::<()>().await;
    unreachable!()
}

impl State {
    /// Whether to inject the fault named `key`: armed, and not yet injected for it.
    fn first(&self, key: &str) -> bool {
        self.armed() && self.reset.lock().unwrap().insert(key.to_string())
    }

    fn armed(&self) -> bool {
        self.armed.load(Ordering::SeqCst)
    }

    fn record_cut(&self, method: &str, target: &str, len: Option<usize>) {
        let len = len.map_or("streamed".to_string(), |n| n.to_string());
        self.record(method, &format!("{target} len={len}"), 0);
    }

    fn record(&self, method: &str, target: &str, status: u16) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{method} {target} -> {status}"));
    }
}

/// Answers the profile gives without asking the registry.
fn before(
    st: &State,
    method: &str,
    path: &str,
    target: &str,
    headers: &hyper::HeaderMap,
    body_len: usize,
) -> Option<Response<Body>> {
    let upload = path.contains("/blobs/uploads/");
    let session = || path.rsplit('/').next().unwrap_or("").to_string();
    match st.profile {
        Profile::DockerHub => return docker_hub(st, method, path, headers),
        Profile::Ecr if upload && method == "GET" => {
            return Some(oci_error(404, "BLOB_UPLOAD_UNKNOWN", "upload unknown"))
        }
        Profile::Ghcr if upload && method == "DELETE" => return Some(full(405, &[], "")),
        Profile::Ghcr
            if method == "PATCH" && headers.contains_key("content-range") && body_len > LIMIT =>
        {
            let msg = format!(
                "the chunk size {body_len} exceeds the maximum permissible limit of {:.2}MiB",
                LIMIT as f64 / (1 << 20) as f64
            );
            return Some(oci_error(416, "SIZE_INVALID", &msg));
        }
        Profile::Ghcr if method == "PUT" && path.contains("/manifests/") => {
            let mut refused = st.manifest_refused.lock().unwrap();
            if !*refused {
                *refused = true;
                return Some(oci_error(
                    400,
                    "MANIFEST_BLOB_UNKNOWN",
                    "blob unknown to registry",
                ));
            }
        }
        Profile::Gar if method == "PATCH" => {
            let mut s = st.sessions.lock().unwrap();
            let e = s.entry(session()).or_default();
            e.0 += 1;
            if e.0 > 1 {
                return Some(oci_error(
                    400,
                    "UNSUPPORTED",
                    "chunked uploads are not supported",
                ));
            }
        }
        Profile::Cloudflare if body_len > LIMIT => {
            let html = "<html><head><title>413 Request Entity Too Large</title></head><body>cloudflare</body></html>";
            return Some(full(413, &[("content-type", "text/html".into())], html));
        }
        Profile::NoMount(status) if method == "POST" && target.contains("mount=") => {
            return Some(oci_error(status, "UNSUPPORTED", "mount not supported"))
        }
        _ => {}
    }
    None
}

/// Hub grants what the account may have of the scopes asked for, silently narrowing them.
fn issue_token(headers: &hyper::HeaderMap) -> Response<Body> {
    use base64::Engine;
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok()?.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
    let account = match basic.as_deref() {
        Some(b"writer:pw") => "writer",
        Some(b"reader:pw") => "reader",
        _ => return full(401, &[], r#"{"details":"incorrect username or password"}"#),
    };
    let body = format!(r#"{{"token":"tok-{account}","expires_in":300}}"#);
    full(200, &[("content-type", "application/json".into())], body)
}

/// Docker Hub-like token auth in front of an anonymous registry: tokens are `tok-<account>`.
fn docker_hub(
    st: &State,
    method: &str,
    path: &str,
    headers: &hyper::HeaderMap,
) -> Option<Response<Body>> {
    if path == "/token" {
        return Some(issue_token(headers));
    }
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let push = matches!(method, "POST" | "PATCH" | "PUT" | "DELETE");
    let challenge = |err: &str| {
        let repo = path
            .trim_start_matches("/v2/")
            .split("/blobs/")
            .next()
            .unwrap_or("");
        let repo = repo.split("/manifests/").next().unwrap_or("");
        let scope = if push { "pull,push" } else { "pull" };
        format!(
            r#"Bearer realm="http://{}/token",service="registry.docker.io",scope="repository:{repo}:{scope}"{err}"#,
            st.addr
        )
    };
    match token {
        Some("tok-writer") => None,
        Some("tok-reader") if !push => None,
        Some("tok-reader") => {
            let h = challenge(r#",error="insufficient_scope""#);
            Some(full(
                401,
                &[("www-authenticate", h)],
                r#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#,
            ))
        }
        _ => Some(full(
            401,
            &[("www-authenticate", challenge(""))],
            r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
        )),
    }
}

async fn forward(
    st: &Arc<State>,
    parts: &hyper::http::request::Parts,
    target: &str,
    body: Bytes,
) -> Result<Response<Body>, io::Error> {
    let url = format!("http://{}{target}", st.upstream);
    let mut rb = st.http.request(parts.method.clone(), &url);
    for (k, v) in &parts.headers {
        if k != "host" && k != "authorization" {
            rb = rb.header(k, v);
        }
    }
    let up = rb.body(body).send().await.map_err(io::Error::other)?;
    let status = up.status().as_u16();
    let mut headers: Vec<(String, String)> = Vec::new();
    for (k, v) in up.headers() {
        let v = v.to_str().unwrap_or("").replace(&st.upstream, &st.addr);
        headers.push((k.as_str().to_string(), v));
    }
    after(st, parts, &mut headers, status);
    let status = rewrite_status(st, parts, status);
    let head = parts.method == "HEAD";
    let blob_get = parts.method == "GET" && parts.uri.path().contains("/blobs/sha256:");
    let mut r = Response::builder().status(status);
    for (k, v) in &headers {
        if head && st.profile == Profile::H2NoLength && k == "content-length" {
            continue;
        }
        r = r.header(k.as_str(), v.as_str());
    }
    let reset_get = st.profile == Profile::Reset && blob_get && st.first(parts.uri.path());
    let length: Option<usize> = up
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let stream = up.bytes_stream().map(|c| c.map_err(io::Error::other));
    let body: Body = if head && st.profile == Profile::H2NoLength {
        // No length known to hyper: it sends none (no Content-Length on a HEAD).
        BodyExt::boxed(StreamBody::new(futures_util::stream::empty::<
            Result<Frame<Bytes>, io::Error>,
        >()))
    } else if reset_get {
        // Half of the body, then the connection drops (logged once the client has read that far).
        let (st, line) = (st.clone(), format!("{target} len={}", length.unwrap_or(0)));
        let half = truncated(stream, length.unwrap_or(0) / 2)
            .map(|c| c.map(Frame::data))
            .chain(futures_util::stream::once(async move {
                st.record("GET", &line, 0);
                Err(io::Error::other("injected reset"))
            }));
        BodyExt::boxed(StreamBody::new(half))
    } else {
        BodyExt::boxed(StreamBody::new(stream.map(|c| c.map(Frame::data))))
    };
    Ok(r.body(body).unwrap())
}

/// Header changes on the registry's answer.
fn after(
    st: &State,
    parts: &hyper::http::request::Parts,
    headers: &mut [(String, String)],
    status: u16,
) {
    let patch = parts.method == "PATCH" && (200..300).contains(&status);
    let session = parts
        .uri
        .path()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    for (k, v) in headers.iter_mut() {
        if k != "range" {
            continue;
        }
        match st.profile {
            Profile::Ecr if patch => {
                let mut s = st.sessions.lock().unwrap();
                let e = s.entry(session.clone()).or_default();
                e.0 += 1;
                match &e.1 {
                    Some(first) => *v = first.clone(),
                    None => e.1 = Some(v.clone()),
                }
            }
            Profile::Quay => {
                if let Some(end) = v.rsplit('-').next().and_then(|e| e.parse::<u64>().ok()) {
                    *v = format!("bytes=0-{}", end + 1);
                }
            }
            _ => {}
        }
    }
}

fn rewrite_status(st: &State, parts: &hyper::http::request::Parts, status: u16) -> u16 {
    match st.profile {
        Profile::Ecr if parts.method == "PATCH" && status == 202 => 201,
        _ => status,
    }
}

/// The first `keep` bytes of `stream`.
fn truncated(
    stream: impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static,
    keep: usize,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
    stream
        .scan(keep, |left, chunk| {
            let out = match chunk {
                Ok(_) if *left == 0 => None,
                Ok(mut c) => {
                    c.truncate((*left).min(c.len()));
                    *left -= c.len();
                    Some(Ok(c))
                }
                Err(e) => Some(Err(e)),
            };
            futures_util::future::ready(out)
        })
        .fuse()
}
