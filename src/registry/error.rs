//! `RegistryError`: every failure of the registry client, carrying the HTTP method, a redacted URL, the
//! status and the registry's own OCI error body, plus a hint a person can act on.
//!
//! Secrets never reach this type: URLs pass through [`redact_url`], transport errors are reduced to a
//! message built from the error chain *without* reqwest's URL, and credential values are never formatted.

use std::fmt;
use std::path::PathBuf;

use url::Url;

use super::reference::ParseReferenceError;
use crate::digest::Digest;

/// What went wrong, coarsely, so `main` can choose an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 401/403, or the token service refused the credentials.
    Auth,
    /// 404 for something the caller asked about (a manifest, a blob, a repository).
    NotFound,
    /// Connection refused/reset, DNS, timeouts, and 429/5xx still failing after the retries.
    Unreachable,
    /// The TLS handshake failed (untrusted certificate, a plain-HTTP peer, ...).
    Tls,
    /// The registry answered something the protocol does not allow (bad digest, missing Location, ...).
    Protocol,
    /// Bad input or local configuration: an image reference, a config.json, a CA file.
    Config,
    /// A local file could not be read.
    Io,
}

/// One entry of the OCI error body `{"errors":[{"code":…,"message":…,"detail":…}]}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct OciError {
    pub code: String,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry (or its token service) answered with an unexpected status.
    #[error(
        "{method} {url}: HTTP {status}{}{}",
        body_text(errors, body),
        hint_text(hint)
    )]
    Status {
        method: String,
        url: String,
        status: u16,
        errors: Vec<OciError>,
        /// The body when it was not an OCI error document (truncated).
        body: Option<String>,
        hint: Option<String>,
    },
    /// No HTTP answer: refused, reset, DNS, TLS, timeout.
    #[error("{method} {url}: {detail}{}", hint_text(hint))]
    Transport {
        method: String,
        url: String,
        kind: ErrorKind,
        detail: String,
        hint: Option<String>,
    },
    /// The registry's answer broke the protocol.
    #[error("{method} {url}: {message}")]
    Protocol {
        method: String,
        url: String,
        message: String,
    },
    /// What the registry stored or sent is not what was hashed.
    #[error("digest mismatch for {what}: expected {expected}, registry reported {found}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        found: String,
    },
    /// A docker config.json / dockerconfigjson file or a credential helper failed.
    #[error("registry credentials{}: {message}", path_text(path))]
    Credentials {
        path: Option<PathBuf>,
        message: String,
    },
    /// A CA file or other client setting is unusable.
    #[error("registry client configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Reference(#[from] ParseReferenceError),
    /// A local file (the spool) could not be read. The cause is in the message (like every
    /// variant here), so it is not also a `source`.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
}

fn body_text(errors: &[OciError], body: &Option<String>) -> String {
    if !errors.is_empty() {
        let parts: Vec<String> = errors
            .iter()
            .map(|e| {
                if e.message.is_empty() {
                    e.code.clone()
                } else {
                    format!("{}: {}", e.code, e.message)
                }
            })
            .collect();
        return format!(" ({})", parts.join("; "));
    }
    match body {
        Some(b) if !b.trim().is_empty() => format!(" ({})", b.trim()),
        _ => String::new(),
    }
}

fn hint_text(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!(" — {h}")).unwrap_or_default()
}

fn path_text(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

impl RegistryError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RegistryError::Status { status, .. } => match status {
                401 | 403 => ErrorKind::Auth,
                404 => ErrorKind::NotFound,
                408 | 429 | 500..=599 => ErrorKind::Unreachable,
                _ => ErrorKind::Protocol,
            },
            RegistryError::Transport { kind, .. } => *kind,
            RegistryError::Protocol { .. } | RegistryError::DigestMismatch { .. } => {
                ErrorKind::Protocol
            }
            RegistryError::Credentials { .. }
            | RegistryError::Config(_)
            | RegistryError::Reference(_) => ErrorKind::Config,
            RegistryError::Io { .. } => ErrorKind::Io,
        }
    }

    pub fn is_auth(&self) -> bool {
        self.kind() == ErrorKind::Auth
    }

    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrorKind::NotFound
    }

    /// The HTTP status, when the registry answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            RegistryError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth another try after a pause: 408, 416 (resync the upload offset), 429, 5xx, and transport
    /// failures other than TLS (a refused connection is retried: registries restart under load balancers).
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            RegistryError::Status { status, .. } => matches!(status, 408 | 416 | 429 | 500..=599),
            RegistryError::Transport { kind, .. } => *kind == ErrorKind::Unreachable,
            _ => false,
        }
    }

    /// The first OCI error code in the body, e.g. `BLOB_UPLOAD_UNKNOWN`.
    pub fn oci_code(&self) -> Option<&str> {
        match self {
            RegistryError::Status { errors, .. } => errors.first().map(|e| e.code.as_str()),
            _ => None,
        }
    }

    pub(crate) fn protocol(method: &str, url: &Url, message: impl Into<String>) -> RegistryError {
        RegistryError::Protocol {
            method: method.to_string(),
            url: redact_url(url),
            message: message.into(),
        }
    }

    /// A request whose body stopped moving, or whose answer did not come, for `limit`.
    pub(crate) fn stalled(method: &str, url: &Url, limit: std::time::Duration) -> RegistryError {
        let host = host_port(url);
        RegistryError::Transport {
            method: method.to_string(),
            url: redact_url(url),
            kind: ErrorKind::Unreachable,
            detail: format!("no progress for {}s", limit.as_secs()),
            hint: Some(format!(
                "{host} stopped answering (raise --request-timeout for a slow link)"
            )),
        }
    }

    /// Classify a reqwest failure (no HTTP answer) and attach a hint naming the host.
    pub(crate) fn transport(method: &str, url: &Url, err: reqwest::Error) -> RegistryError {
        let err = err.without_url();
        let host = host_port(url);
        let chain = error_chain(&err);
        let lower = chain.to_lowercase();
        let (kind, hint) = if lower.contains("certificate") || lower.contains("unknownissuer") {
            (ErrorKind::Tls, format!("TLS certificate for {host} not trusted: pass --registry-ca FILE or --plain-http for a test registry"))
        } else if lower.contains("corrupt message")
            || lower.contains("invalidcontenttype")
            || lower.contains("wrong version number")
        {
            (
                ErrorKind::Tls,
                format!(
                    "{host} does not speak TLS: pass --plain-http if it is a plain-HTTP registry"
                ),
            )
        } else if has_io_kind(&err, std::io::ErrorKind::ConnectionRefused) {
            (
                ErrorKind::Unreachable,
                format!("is the registry up? connection refused to {host}"),
            )
        } else if lower.contains("dns error") || lower.contains("failed to lookup") {
            (ErrorKind::Unreachable, format!("cannot resolve {host}"))
        } else if err.is_timeout() {
            (
                ErrorKind::Unreachable,
                format!("{host} did not answer in time (--request-timeout)"),
            )
        } else {
            (
                ErrorKind::Unreachable,
                format!("the connection to {host} failed"),
            )
        };
        RegistryError::Transport {
            method: method.to_string(),
            url: redact_url(url),
            kind,
            detail: chain,
            hint: Some(hint),
        }
    }
}

/// Error bodies are read up to this size; registries send small JSON, proxies sometimes whole pages.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Read an error response (bounded) into a `Status` error, keeping the OCI `errors[]` when present.
pub(crate) async fn error_from_response(
    method: &str,
    url: &Url,
    resp: reqwest::Response,
    hint: Option<String>,
) -> RegistryError {
    let status = resp.status().as_u16();
    let mut raw = Vec::new();
    let mut resp = resp;
    while let Ok(Some(chunk)) = resp.chunk().await {
        raw.extend_from_slice(&chunk);
        if raw.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        errors: Vec<OciError>,
    }
    let (errors, body) = match serde_json::from_slice::<Doc>(&raw) {
        Ok(d) => (d.errors, None),
        Err(_) => {
            let text: String = String::from_utf8_lossy(&raw)
                .chars()
                .filter(|c| !c.is_control() || *c == ' ')
                .take(300)
                .collect();
            (Vec::new(), Some(text))
        }
    };
    RegistryError::Status {
        method: method.to_string(),
        url: redact_url(url),
        status,
        errors,
        body,
        hint,
    }
}

fn has_io_kind(err: &(dyn std::error::Error + 'static), kind: std::io::ErrorKind) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == kind {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// "a: b: c" from an error and its sources, skipping repeats (hyper and reqwest often repeat a message).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    parts.join(": ")
}

/// `host:port` of a URL, for hints.
pub(crate) fn host_port(url: &Url) -> String {
    let host = url.host_str().unwrap_or("?");
    match url.port_or_known_default() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// Query parameters that carry no secret and help a reader (the rest — `_state`, S3/GCS signatures,
/// tokens — are replaced by `REDACTED`).
const HARMLESS_QUERY_KEYS: &[&str] = &[
    "digest", "mount", "from", "n", "last", "service", "scope", "account",
];

/// The URL without user info and with every query value outside [`HARMLESS_QUERY_KEYS`] replaced.
pub fn redact_url(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    if u.query().is_some() {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let keep = HARMLESS_QUERY_KEYS.contains(&k.as_ref());
                (
                    k.into_owned(),
                    if keep {
                        v.into_owned()
                    } else {
                        "REDACTED".to_string()
                    },
                )
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// A secret string (password, token). Debug prints `<redacted>`; there is no Display, so it cannot be
/// formatted into an error or a log line by accident. `expose()` is the only way to the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_state_and_signatures_but_keeps_digest() {
        let u = Url::parse("https://u:pw@r.example/v2/a/blobs/uploads/x?_state=SECRET&digest=sha256%3Aab&X-Amz-Signature=SIG")
            .unwrap();
        let r = redact_url(&u);
        assert!(
            !r.contains("SECRET") && !r.contains("SIG") && !r.contains("pw"),
            "{r}"
        );
        assert!(r.contains("digest=sha256%3Aab"), "{r}");
    }

    #[test]
    fn secret_debug_is_redacted() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "<redacted>");
    }

    #[test]
    fn status_error_shows_oci_codes_and_hint() {
        let e = RegistryError::Status {
            method: "PUT".into(),
            url: "http://h/v2/a/manifests/t".into(),
            status: 400,
            errors: vec![OciError {
                code: "MANIFEST_INVALID".into(),
                message: "manifest invalid".into(),
            }],
            body: None,
            hint: Some("look".into()),
        };
        assert_eq!(
            e.to_string(),
            "PUT http://h/v2/a/manifests/t: HTTP 400 (MANIFEST_INVALID: manifest invalid) — look"
        );
        assert_eq!(e.kind(), ErrorKind::Protocol);
    }
}
