//! The reqwest client for one registry host: no automatic redirects (the request loop follows them so
//! credentials stay on the registry's origin), a connect timeout (request deadlines are set per request:
//! reqwest's read timeout also runs while a long PATCH body is still being sent), and trust = the bundled webpki
//! roots + the system's CA bundle + `--registry-ca` (target only) + the host's `certs.d` CAs and client
//! certificates.

use std::path::Path;
use std::time::Duration;

use super::error::RegistryError;
use super::hosts::{system_ca_files, HostConfig};

/// What a client for one host trusts and how long it waits.
pub(crate) struct HttpSettings<'a> {
    pub user_agent: &'a str,
    /// `--registry-ca`: an error when unreadable (the user named it).
    pub ca_file: Option<&'a Path>,
    pub host: &'a HostConfig,
}

pub(crate) fn build_http(s: &HttpSettings<'_>) -> Result<reqwest::Client, RegistryError> {
    let mut b = reqwest::Client::builder()
        .user_agent(s.user_agent)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(30))
        .tcp_keepalive(Duration::from_secs(30));
    // The system bundle is best effort: one unparsable file must not stop a push that needs none of it.
    for file in system_ca_files() {
        if let Ok(certs) =
            std::fs::read(&file).map(|pem| reqwest::Certificate::from_pem_bundle(&pem))
        {
            for c in certs.into_iter().flatten() {
                b = b.add_root_certificate(c);
            }
        }
    }
    let named = s.ca_file.map(|p| (p, "--registry-ca"));
    let certs_d = s.host.ca.iter().map(|p| (p.as_path(), "certs.d CA"));
    for (path, what) in named.into_iter().chain(certs_d) {
        for c in read_ca(path, what)? {
            b = b.add_root_certificate(c);
        }
    }
    if let Some((cert, key)) = s.host.client.first() {
        b = b.identity(read_identity(cert, key.as_deref())?);
    }
    if s.host.skip_verify {
        crate::log::warn(&format!(
            "not verifying the TLS certificate of {} (skip_verify in its hosts.toml)",
            s.host.origin
        ));
        b = b.danger_accept_invalid_certs(true);
    }
    b.build()
        .map_err(|e| RegistryError::Config(format!("cannot build the HTTP client: {e}")))
}

fn read_ca(path: &Path, what: &str) -> Result<Vec<reqwest::Certificate>, RegistryError> {
    let pem = std::fs::read(path).map_err(|e| {
        RegistryError::Config(format!("cannot read {what} {}: {e}", path.display()))
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        RegistryError::Config(format!(
            "{what} {}: not a PEM certificate bundle: {e}",
            path.display()
        ))
    })?;
    if certs.is_empty() {
        return Err(RegistryError::Config(format!(
            "{what} {}: no certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

/// A client certificate and its key (PEM; the key may be in the certificate file).
fn read_identity(cert: &Path, key: Option<&Path>) -> Result<reqwest::Identity, RegistryError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| {
            RegistryError::Config(format!(
                "cannot read certs.d client certificate {}: {e}",
                p.display()
            ))
        })
    };
    let mut pem = read(cert)?;
    if let Some(k) = key {
        pem.push(b'\n');
        pem.extend(read(k)?);
    }
    reqwest::Identity::from_pem(&pem).map_err(|e| {
        RegistryError::Config(format!(
            "certs.d client certificate {}: {e}",
            cert.display()
        ))
    })
}
