//! Tests of the registry client against the real distribution registry (`scripts/registry.sh`) and, for
//! what a real registry cannot do on demand (a 416, a reset mid-PATCH, a 202 to a mount, a cross-host
//! redirect), against an in-process fake. Shared fixtures live here.

mod fake;
mod fake_tests;
mod http;
mod push_order;
// Against the real distribution registry (scripts/registry.sh): `cargo test --features lab`.
#[cfg(feature = "lab")]
mod proxy;
#[cfg(feature = "lab")]
mod real;
#[cfg(feature = "lab")]
mod token;

#[cfg(feature = "lab")]
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::client::Retry;
use super::credentials::Lookup;
use super::{Client, ClientOptions, Reference, RegistryError};
use crate::digest::Digest;

#[cfg(feature = "lab")]
/// A registry started by `scripts/registry.sh start DIR ARGS…`, stopped on drop.
pub(super) struct Registry {
    pub dir: tempfile::TempDir,
    pub env: HashMap<String, String>,
}

#[cfg(feature = "lab")]
impl Registry {
    pub fn start(args: &[&str]) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/registry.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(dir.path())
            .args(args)
            .output()
            .expect("run registry.sh");
        assert!(
            out.status.success(),
            "registry.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join("env")).expect("DIR/env");
        let env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Registry { dir, env }
    }

    pub fn addr(&self) -> &str {
        &self.env["REGISTRY_ADDR"]
    }

    pub fn reference(&self, repo: &str) -> Reference {
        format!("{}/{repo}", self.addr())
            .parse()
            .expect("reference")
    }
}

#[cfg(feature = "lab")]
impl Drop for Registry {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/registry.sh");
        let _ = Command::new("bash")
            .arg(&script)
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// Client options for a plain-HTTP test registry with credentials from `config` (if any).
pub(super) fn plain(config: Option<PathBuf>) -> ClientOptions {
    ClientOptions {
        plain_http: true,
        registry_config: config.or_else(|| Some(no_config())),
        ..Default::default()
    }
}

/// A config path that does not exist is an error when explicit, so "no credentials" is an empty file.
fn no_config() -> PathBuf {
    let path = std::env::temp_dir().join("committer-registry-tests-empty-config.json");
    if !path.exists() {
        std::fs::write(&path, "{}").expect("write empty config");
    }
    path
}

/// Connect with helpers looked up only in `helper_path` (tests must not touch the shared PATH).
pub(super) async fn connect(
    reference: &Reference,
    opts: &ClientOptions,
    helper_path: Option<&Path>,
) -> Result<Client, RegistryError> {
    let lookup = Lookup {
        config: opts.registry_config.clone(),
        helper_path: helper_path.map(|p| p.as_os_str().to_owned()),
    };
    // Millisecond backoff so fault tests do not sleep.
    let fast = Retry {
        base: std::time::Duration::from_millis(5),
        max: std::time::Duration::from_millis(20),
        ..Retry::DEFAULT
    };
    Client::with_lookup(reference, opts, lookup, fast).await
}

/// A docker config.json with `auths[host] = {auth: base64(user:pass)}`, written into `dir`.
pub(super) fn config_with_auth(dir: &Path, key: &str, user: &str, pass: &str) -> PathBuf {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    write_json(
        dir,
        "config.json",
        &serde_json::json!({ "auths": { key: { "auth": auth } } }),
    )
}

pub(super) fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
    path
}

/// Deterministic incompressible bytes (xorshift), without a `rand` dependency.
pub(super) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A file of `len` pseudo-random bytes and its digest (by `sha256sum`: the sha2 crate is slow in the
/// unoptimised test build, seconds for 20 MiB).
pub(super) fn random_file(dir: &Path, len: usize, seed: u64) -> (PathBuf, Digest) {
    let data = pseudo_random(len, seed);
    let path = dir.join(format!("blob-{seed}"));
    std::fs::write(&path, &data).unwrap();
    let out = Command::new("sha256sum")
        .arg(&path)
        .output()
        .expect("sha256sum");
    let hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    (
        path,
        format!("sha256:{hex}").parse().expect("sha256sum output"),
    )
}

pub(super) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A minimal image config and an OCI manifest naming it and one layer.
pub(super) fn image(layer: &Digest, layer_size: u64) -> (bytes::Bytes, Digest, bytes::Bytes) {
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {}, "rootfs": { "type": "layers", "diff_ids": [layer.to_string()] },
    });
    let config = bytes::Bytes::from(serde_json::to_vec(&config).unwrap());
    let config_digest = Digest::of(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.to_string(), "size": layer_size }],
    });
    (
        config,
        config_digest,
        bytes::Bytes::from(serde_json::to_vec(&manifest).unwrap()),
    )
}

/// The whole error chain as text, Display and Debug, for "no secret anywhere" checks.
pub(super) fn everything(e: &RegistryError) -> String {
    let mut s = format!("{e} | {e:?}");
    let mut cur = std::error::Error::source(e);
    while let Some(inner) = cur {
        s.push_str(&format!(" | {inner} | {inner:?}"));
        cur = inner.source();
    }
    s
}

/// Every client future must be `Send`: the pipeline runs uploads on spawned tasks. (Compile-time check;
/// the closures are never called.)
#[test]
fn client_futures_are_send() {
    fn send<T: Send>(_: T) {}
    let _ = |c: Client, d: Digest, p: PathBuf, r: Reference, o: ClientOptions| {
        send(async move {
            let _ = Client::new(&r, &o).await;
            let _ = c.blob_exists(&d).await;
            let _ = c.mount_blob(&d, "a").await;
            let _ = c.upload_blob_file(&d, &p, 1).await;
            let _ = c.upload_blob_bytes(&d, bytes::Bytes::new()).await;
            let src = super::BytesSource(bytes::Bytes::new());
            let _ = c.push_blob(&d, 0, &src, Some("a")).await;
            let _ = c.check_push().await;
            let _ = c.fetch_blob(&d).await;
            let _ = c.put_manifest("t", "m", bytes::Bytes::new()).await;
            let _ = c.get_manifest("t").await;
        })
    };
}
