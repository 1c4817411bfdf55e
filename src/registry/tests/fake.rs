//! An in-memory fake registry with fault knobs, for the behaviours a real registry cannot be made to
//! show on demand: 503s, a connection reset after part of a PATCH body (keeping those bytes, as a
//! resumable registry does), a PATCH whose data is silently lost (so the next one gets a 416), a 202
//! answer to a mount, a 307 to another host for blob GETs. It checks `_state` like distribution does, so
//! a client that drops the Location's query fails. Every request is logged for assertions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::BufReader;
use tokio::net::TcpListener;

use super::http::{read_body, read_exactly, read_head, write_resp, Conn, Head, Resp};
use crate::digest::Digest;

#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub target: String,
    pub content_range: Option<String>,
    pub authorization: bool,
    pub body_len: usize,
    /// Sent with `Transfer-Encoding: chunked` rather than a Content-Length.
    pub chunked: bool,
    pub status: u16,
}

#[derive(Default)]
pub struct Faults {
    /// Answer this many of the next requests with 503.
    pub status_503: u32,
    /// On PATCH number `.0` (1-based), read `.1` bytes of the body, keep them, and hang up.
    pub reset_patch: Option<(usize, usize)>,
    /// PATCH number `n` (1-based): read it, drop its data, answer 202 without a Range header.
    pub lose_patch: Option<usize>,
    /// Answer mounts with 202 (declined) even when the source has the blob.
    pub mount_declines: bool,
    pub chunk_min: Option<u64>,
    /// Demand this exact `Authorization` value (else 401 with a Basic challenge).
    pub require_auth: Option<String>,
    /// Answer blob GETs with a 307 to `<this>/<digest>`.
    pub blob_redirect: Option<String>,
    /// Demand `Bearer tok-<generation>` and serve `/token` (bump it to revoke the current token).
    pub bearer_generation: Option<u32>,
    /// Answer mounts with 401 insufficient_scope, as distribution does without pull on the source.
    pub mount_unauthorized: bool,
    /// Answer manifest PUTs with a wrong `Docker-Content-Digest`.
    pub lie_about_digest: bool,
    /// Answer a PATCH whose body is larger than this with 413 and an HTML page (a proxy's body cap).
    pub body_cap: Option<usize>,
    /// Answer a second PATCH in a session with 400 (GAR: no chunked uploads).
    pub one_patch_per_session: bool,
    /// Answer every blob PUT that carries bytes with 503.
    pub put_503: bool,
}

#[derive(Default)]
pub struct State {
    pub log: Vec<Logged>,
    pub faults: Faults,
    pub blobs: HashMap<String, Vec<u8>>,
    pub manifests: HashMap<String, (String, Vec<u8>)>,
    uploads: HashMap<String, (Vec<u8>, u64)>,
    patches: usize,
    next_id: u64,
    pub token_fetches: u32,
}

pub struct Fake {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
}

impl Fake {
    pub async fn start(faults: Faults) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            faults,
            ..Default::default()
        }));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let mut conn = BufReader::new(stream);
                    while let Ok(Some(head)) = read_head(&mut conn).await {
                        if !serve_one(&st, &mut conn, head).await {
                            return;
                        }
                    }
                });
            }
        });
        Fake { addr, state }
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn reference(&self, repo: &str) -> crate::registry::Reference {
        format!("{}/{repo}", self.addr).parse().unwrap()
    }
}

/// Handle one request; false to hang up.
async fn serve_one(st: &Arc<Mutex<State>>, conn: &mut Conn, head: Head) -> bool {
    let authorization = head.header("authorization").is_some();
    let log = |st: &Arc<Mutex<State>>, status: u16, body_len: usize| {
        st.lock().unwrap().log.push(Logged {
            method: head.method.clone(),
            target: head.target.clone(),
            content_range: head.header("content-range").map(str::to_string),
            authorization,
            body_len,
            chunked: head.header("transfer-encoding").is_some(),
            status,
        })
    };
    if head.method == "PATCH" {
        if let Some(kept) = reset_point(st) {
            // Take part of the body, keep it as received data, and hang up mid-request.
            let part = read_exactly(conn, kept).await.unwrap_or_default();
            if let Some(id) = upload_id(head.path()) {
                if let Some(u) = st.lock().unwrap().uploads.get_mut(&id) {
                    u.0.extend_from_slice(&part);
                }
            }
            log(st, 0, part.len());
            return false;
        }
    }
    let Ok(body) = read_body(conn, &head).await else {
        return false;
    };
    let resp = respond(st, &head, &body);
    log(st, resp.status, body.len());
    write_resp(conn, &resp, head.method == "HEAD").await.is_ok()
}

fn reset_point(st: &Arc<Mutex<State>>) -> Option<usize> {
    let mut s = st.lock().unwrap();
    s.patches += 1;
    match s.faults.reset_patch {
        Some((n, kept)) if n == s.patches => Some(kept),
        _ => None,
    }
}

fn upload_id(path: &str) -> Option<String> {
    path.split_once("/blobs/uploads/")
        .map(|(_, id)| id.to_string())
        .filter(|id| !id.is_empty())
}

fn respond(st: &Arc<Mutex<State>>, head: &Head, body: &[u8]) -> Resp {
    let mut s = st.lock().unwrap();
    if s.faults.status_503 > 0 {
        s.faults.status_503 -= 1;
        return Resp::oci_error(503, "UNAVAILABLE");
    }
    if let Some(generation) = s.faults.bearer_generation {
        if let Some(resp) = bearer(&mut s, head, generation) {
            return resp;
        }
    }
    if let Some(want) = &s.faults.require_auth {
        if head.header("authorization") != Some(want.as_str()) {
            return Resp::oci_error(401, "UNAUTHORIZED")
                .header("WWW-Authenticate", "Basic realm=\"fake\"");
        }
    }
    let path = head.path().to_string();
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Resp::new(404);
    };
    if rest.is_empty() {
        return Resp::new(200).json(&serde_json::json!({}));
    }
    if let Some((repo, tail)) = rest.split_once("/blobs/") {
        return match tail.strip_prefix("uploads/") {
            Some(id) => uploads(&mut s, head, repo, id, body),
            None => blob(&s, head, tail),
        };
    }
    if let Some((_, reference)) = rest.split_once("/manifests/") {
        return manifest(&mut s, head, reference, body);
    }
    Resp::new(404)
}

/// A token endpoint at `/token` plus the registry-side check; `None` lets the request through.
fn bearer(s: &mut State, head: &Head, generation: u32) -> Option<Resp> {
    let token = format!("tok-{generation}");
    if head.path() == "/token" {
        s.token_fetches += 1;
        return Some(Resp::new(200).json(&serde_json::json!({"token": token, "expires_in": 300})));
    }
    if head.header("authorization") == Some(format!("Bearer {token}").as_str()) {
        return None;
    }
    let host = head.header("host").unwrap_or("").to_string();
    let challenge = format!("Bearer realm=\"http://{host}/token\",service=\"fake\"");
    Some(Resp::oci_error(401, "UNAUTHORIZED").header("WWW-Authenticate", challenge))
}

fn blob(s: &State, head: &Head, digest: &str) -> Resp {
    let Some(data) = s.blobs.get(digest) else {
        return Resp::oci_error(404, "BLOB_UNKNOWN");
    };
    if head.method == "GET" {
        if let Some(to) = &s.faults.blob_redirect {
            return Resp::new(307)
                .header("Location", format!("{to}/{digest}?X-Amz-Signature=SIGNED"));
        }
    }
    Resp::new(200)
        .header("Content-Length", data.len().to_string())
        .header("Docker-Content-Digest", digest)
        .body(data.clone())
}

fn uploads(s: &mut State, head: &Head, repo: &str, id: &str, body: &[u8]) -> Resp {
    if id.is_empty() {
        return start_or_mount(s, head, repo);
    }
    let Some((data, state)) = s.uploads.get(id).map(|(d, st)| (d.len() as u64, *st)) else {
        return Resp::oci_error(404, "BLOB_UPLOAD_UNKNOWN");
    };
    // distribution signs the offset into `_state`; a client that drops the query cannot continue.
    if head.query("_state") != Some(state.to_string()) {
        return Resp::oci_error(400, "BLOB_UPLOAD_INVALID");
    }
    match head.method.as_str() {
        "GET" => session_resp(s, repo, id, 204),
        "PATCH" => patch(s, head, repo, id, data, body),
        "PUT" if s.faults.put_503 && !body.is_empty() => Resp::oci_error(503, "UNAVAILABLE"),
        "PUT" => {
            let mut all = s.uploads.remove(id).unwrap().0;
            all.extend_from_slice(body);
            let digest = Digest::of(&all).to_string();
            if head.query("digest") != Some(digest.clone()) {
                return Resp::oci_error(400, "DIGEST_INVALID");
            }
            s.blobs.insert(digest.clone(), all);
            Resp::new(201).header("Docker-Content-Digest", digest)
        }
        _ => Resp::new(405),
    }
}

fn patch(s: &mut State, head: &Head, repo: &str, id: &str, size: u64, body: &[u8]) -> Resp {
    if s.faults.body_cap.is_some_and(|cap| body.len() > cap) {
        return Resp::new(413).body("<html><title>413 Request Entity Too Large</title></html>");
    }
    if s.faults.one_patch_per_session && size > 0 {
        return Resp::oci_error(400, "UNSUPPORTED");
    }
    if let Some(cr) = head.header("content-range") {
        let start: u64 = cr
            .split('-')
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(u64::MAX);
        if start != size {
            let last = size.saturating_sub(1);
            return Resp::oci_error(416, "BLOB_UPLOAD_INVALID")
                .header("Range", format!("0-{last}"));
        }
    }
    if s.faults.lose_patch == Some(s.patches) {
        // Pretend success but keep nothing, and say nothing about the offset.
        let state = bump(s, id);
        return Resp::new(202).header(
            "Location",
            format!("/v2/{repo}/blobs/uploads/{id}?_state={state}"),
        );
    }
    s.uploads.get_mut(id).unwrap().0.extend_from_slice(body);
    session_resp(s, repo, id, 202)
}

fn bump(s: &mut State, id: &str) -> u64 {
    let u = s.uploads.get_mut(id).unwrap();
    u.1 += 1;
    u.1
}

/// 202/204 with a relative Location carrying a new `_state`, and `Range: 0-<last>`.
fn session_resp(s: &mut State, repo: &str, id: &str, status: u16) -> Resp {
    let state = bump(s, id);
    let size = s.uploads[id].0.len() as u64;
    let mut r = Resp::new(status)
        .header(
            "Location",
            format!("/v2/{repo}/blobs/uploads/{id}?_state={state}"),
        )
        .header("Range", format!("0-{}", size.saturating_sub(1)));
    if let Some(min) = s.faults.chunk_min {
        r = r.header("OCI-Chunk-Min-Length", min.to_string());
    }
    r
}

fn start_or_mount(s: &mut State, head: &Head, repo: &str) -> Resp {
    if head.method != "POST" {
        return Resp::new(405);
    }
    if let (Some(d), Some(_from)) = (head.query("mount"), head.query("from")) {
        if s.faults.mount_unauthorized {
            let host = head.header("host").unwrap_or("").to_string();
            let challenge =
                format!("Bearer realm=\"http://{host}/token\",error=\"insufficient_scope\"");
            return Resp::oci_error(401, "UNAUTHORIZED").header("WWW-Authenticate", challenge);
        }
        if s.blobs.contains_key(&d) && !s.faults.mount_declines {
            return Resp::new(201)
                .header("Location", format!("/v2/{repo}/blobs/{d}"))
                .header("Docker-Content-Digest", d);
        }
    }
    s.next_id += 1;
    let id = format!("u{}", s.next_id);
    s.uploads.insert(id.clone(), (Vec::new(), 0));
    session_resp(s, repo, &id, 202)
}

fn manifest(s: &mut State, head: &Head, reference: &str, body: &[u8]) -> Resp {
    match head.method.as_str() {
        "PUT" => {
            // As distribution: every blob a manifest names must be in the registry.
            if names_a_missing_blob(s, body) {
                return Resp::oci_error(400, "MANIFEST_BLOB_UNKNOWN");
            }
            let digest = Digest::of(body).to_string();
            let ct = head.header("content-type").unwrap_or("").to_string();
            s.manifests
                .insert(reference.to_string(), (ct.clone(), body.to_vec()));
            s.manifests.insert(digest.clone(), (ct, body.to_vec()));
            let reported = if s.faults.lie_about_digest {
                Digest::of(b"lie").to_string()
            } else {
                digest
            };
            Resp::new(201).header("Docker-Content-Digest", reported)
        }
        "GET" | "HEAD" => match s.manifests.get(reference) {
            Some((ct, b)) => Resp::new(200)
                .header("Content-Type", ct.clone())
                .body(b.clone()),
            None => Resp::oci_error(404, "MANIFEST_UNKNOWN"),
        },
        _ => Resp::new(405),
    }
}

/// The manifest's config or one of its layers is not among the blobs.
fn names_a_missing_blob(s: &State, body: &[u8]) -> bool {
    let Ok(m) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let layers = m["layers"].as_array().cloned().unwrap_or_default();
    std::iter::once(&m["config"])
        .chain(layers.iter())
        .filter_map(|d| d["digest"].as_str())
        .any(|d| !s.blobs.contains_key(d))
}

/// A "storage host" for redirected blob GETs: serves fixed bytes and records whether requests
/// carried `Authorization`.
pub struct Storage {
    pub addr: SocketAddr,
    pub saw_authorization: Arc<Mutex<Vec<bool>>>,
}

impl Storage {
    pub async fn start(data: Vec<u8>) -> Storage {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let saw = Arc::new(Mutex::new(Vec::new()));
        let (saw2, data) = (saw.clone(), Arc::new(data));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (saw, data) = (saw2.clone(), data.clone());
                tokio::spawn(async move {
                    let mut conn = BufReader::new(stream);
                    while let Ok(Some(head)) = read_head(&mut conn).await {
                        saw.lock()
                            .unwrap()
                            .push(head.header("authorization").is_some());
                        let _ =
                            write_resp(&mut conn, &Resp::new(200).body(data.to_vec()), false).await;
                    }
                });
            }
        });
        Storage {
            addr,
            saw_authorization: saw,
        }
    }
}
