//! Credentials for one registry, from a docker `config.json` or a Kubernetes `kubernetes.io/dockerconfigjson`
//! Secret file (same `{"auths":{…}}` shape; the legacy `.dockercfg` shape without `auths` is accepted too).
//!
//! Order, as the docker CLI does it: `credHelpers[host]`, then `credsStore`, then `auths[host]`, then
//! anonymous. (The `docker_credential` crate checks `auths` before `credsStore`, cannot read a file at an
//! arbitrary path, and puts helper stdout into its errors — so this module reads the file itself.)
//! `auths` keys are normalised: `https://index.docker.io/v1/`, `http://host:5000/v2/` and `HOST` all match.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine as _;
use serde::Deserialize;
use std::io::Write as _;

use super::error::{RegistryError, Secret};
use super::reference::DOCKER_HUB;

/// What the registry should be shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Credential {
    Anonymous,
    Basic {
        username: String,
        password: Secret,
    },
    /// An OAuth2 refresh token (`identitytoken`, or a helper's `<token>` user): exchanged at the realm.
    IdentityToken {
        username: String,
        token: Secret,
    },
    /// A ready bearer token (`registrytoken`): sent as is.
    RegistryToken(Secret),
}

/// A credential and where it came from (for hints: "credentials for HOST from FILE were rejected").
#[derive(Clone, Debug)]
pub(crate) struct Resolved {
    pub credential: Credential,
    pub source: String,
}

/// Where to look. `helper_path` replaces `PATH` for credential helpers (tests set it; the process
/// environment is shared by parallel tests so it cannot be changed there).
#[derive(Clone, Debug, Default)]
pub(crate) struct Lookup {
    pub config: Option<PathBuf>,
    pub helper_path: Option<OsString>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

/// The docker CLI's default: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
fn default_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(Path::new(&dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker/config.json"))
}

/// Resolve credentials for `registry` (a reference's registry, e.g. `docker.io`, `localhost:5000`).
pub(crate) async fn resolve(registry: &str, lookup: &Lookup) -> Result<Resolved, RegistryError> {
    let Some((path, config)) = load(lookup).await? else {
        return Ok(anonymous("no docker config found"));
    };
    let host = normalize_host(registry);
    let helper = config
        .cred_helpers
        .iter()
        .find(|(k, _)| normalize_host(k) == host)
        .map(|(_, v)| v.clone());
    let mut note = String::new();
    for (which, name) in [
        ("credHelpers", helper),
        ("credsStore", config.creds_store.clone()),
    ] {
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            continue;
        };
        match run_helper(&name, &helper_server(&host), lookup).await {
            Ok(Some(credential)) => {
                let source = format!("{which} helper docker-credential-{name}");
                return Ok(Resolved { credential, source });
            }
            Ok(None) => {}
            // A config copied from a desktop names a store that is not installed here; docker itself would
            // fail, but the `auths` entry may still be good, so note it for the hint and go on.
            Err(HelperError::NotInstalled) => {
                note = format!(" (docker-credential-{name} is not on PATH)")
            }
            Err(HelperError::Failed(message)) => {
                return Err(RegistryError::Credentials {
                    path: Some(path),
                    message,
                })
            }
        }
    }
    from_auths(&config, &host, &path, &note)
}

/// The config file named by `lookup`, or the default one; `None` when there is none by default.
async fn load(lookup: &Lookup) -> Result<Option<(PathBuf, ConfigFile)>, RegistryError> {
    let (path, explicit) = match &lookup.config {
        Some(p) => (Some(p.clone()), true),
        None => (default_config_path(), false),
    };
    let Some(path) = path else { return Ok(None) };
    match read_config(&path).await {
        Ok(c) => Ok(Some((path, c))),
        Err(None) if !explicit => Ok(None),
        Err(None) => Err(RegistryError::Credentials {
            path: Some(path),
            message: "the file does not exist".into(),
        }),
        Err(Some(e)) => Err(e),
    }
}

fn from_auths(
    config: &ConfigFile,
    host: &str,
    path: &Path,
    note: &str,
) -> Result<Resolved, RegistryError> {
    let entry = config.auths.iter().find(|(k, _)| normalize_host(k) == host);
    let Some((_, entry)) = entry else {
        return Ok(anonymous(&format!(
            "no entry for {host} in {}{note}",
            path.display()
        )));
    };
    match entry_credential(entry) {
        Ok(Some(credential)) => {
            let source = format!("auths[{host}] in {}", path.display());
            Ok(Resolved { credential, source })
        }
        Ok(None) => Ok(anonymous(&format!(
            "auths[{host}] in {} has no credential{note}",
            path.display()
        ))),
        Err(message) => Err(RegistryError::Credentials {
            path: Some(path.to_path_buf()),
            message: format!("auths[{host}]: {message}"),
        }),
    }
}

fn anonymous(why: &str) -> Resolved {
    Resolved {
        credential: Credential::Anonymous,
        source: format!("anonymous: {why}"),
    }
}

/// `Err(None)`: the file does not exist. Parse errors name line and column only: serde_json's messages
/// can quote the offending value, which may be a password.
async fn read_config(path: &Path) -> Result<ConfigFile, Option<RegistryError>> {
    let bytes = match tokio::fs::read(path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(None),
        Err(e) => {
            return Err(Some(RegistryError::Credentials {
                path: Some(path.into()),
                message: format!("cannot read it: {e}"),
            }))
        }
    };
    let bad = |e: serde_json::Error| {
        Some(RegistryError::Credentials {
            path: Some(path.into()),
            message: format!(
                "not a docker config.json / dockerconfigjson (JSON error at line {} column {})",
                e.line(),
                e.column()
            ),
        })
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(bad)?;
    let is_modern = ["auths", "credHelpers", "credsStore"]
        .iter()
        .any(|k| value.get(k).is_some());
    if is_modern || !value.is_object() {
        serde_json::from_value(value).map_err(bad)
    } else {
        // Legacy `.dockercfg` (kubernetes.io/dockercfg): the top level *is* the auths map.
        let auths = serde_json::from_value(value).map_err(bad)?;
        Ok(ConfigFile {
            auths,
            ..Default::default()
        })
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://Host:5000/x` → `host:5000`.
pub(crate) fn normalize_host(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let host = k.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => DOCKER_HUB.to_string(),
        _ => host,
    }
}

/// The server string helpers are keyed by: docker stores Hub credentials under its v1 URL.
fn helper_server(host: &str) -> String {
    if host == DOCKER_HUB {
        "https://index.docker.io/v1/".to_string()
    } else {
        host.to_string()
    }
}

fn entry_credential(e: &AuthEntry) -> Result<Option<Credential>, String> {
    let mut user = e.username.clone().filter(|u| !u.is_empty());
    let mut pass = e.password.clone().filter(|p| !p.is_empty());
    if let Some(auth) = e.auth.as_deref().filter(|a| !a.is_empty()) {
        let (u, p) = decode_auth(auth)?;
        user = Some(u);
        pass = Some(p);
    }
    if let Some(t) = e.registrytoken.as_deref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credential::RegistryToken(Secret::new(t))));
    }
    if let Some(t) = e.identitytoken.as_deref().filter(|t| !t.is_empty()) {
        let username = user.unwrap_or_else(|| "<token>".to_string());
        return Ok(Some(Credential::IdentityToken {
            username,
            token: Secret::new(t),
        }));
    }
    match (user, pass) {
        (Some(username), Some(p)) => Ok(Some(Credential::Basic {
            username,
            password: Secret::new(p),
        })),
        (Some(_), None) => Err("has a username but no password".into()),
        _ => Ok(None),
    }
}

/// `auth` is base64("user:password"); docker writes it padded, some tools do not.
fn decode_auth(auth: &str) -> Result<(String, String), String> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let raw = engine
        .decode(auth.trim())
        .map_err(|_| "the \"auth\" value is not base64".to_string())?;
    let text = String::from_utf8(raw).map_err(|_| "the \"auth\" value is not UTF-8".to_string())?;
    let (u, p) = text
        .split_once(':')
        .ok_or("the \"auth\" value is not base64 of user:password")?;
    Ok((u.to_string(), p.to_string()))
}

enum HelperError {
    NotInstalled,
    Failed(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperReply {
    username: String,
    secret: String,
}

/// `docker-credential-NAME get` with the server on stdin; `{"Username","Secret"}` on stdout. A
/// "credentials not found" failure means no credential (the docker-credential-helpers convention).
async fn run_helper(
    name: &str,
    server: &str,
    lookup: &Lookup,
) -> Result<Option<Credential>, HelperError> {
    let program = format!("docker-credential-{name}");
    let (prog, srv, path) = (
        program.clone(),
        server.to_string(),
        lookup.helper_path.clone(),
    );
    // std::process in a blocking task: the crate's tokio has no `process` feature, and a helper is quick.
    let out = tokio::task::spawn_blocking(move || helper_output(&prog, &srv, path.as_ref()))
        .await
        .map_err(|e| HelperError::Failed(format!("{program}: {e}")))??;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase()
            + &String::from_utf8_lossy(&out.stderr).to_lowercase();
        if text.contains("credentials not found") {
            return Ok(None);
        }
        // stdout is deliberately not shown: a broken helper could print the secret there.
        let stderr: String = String::from_utf8_lossy(&out.stderr)
            .trim()
            .chars()
            .take(200)
            .collect();
        return Err(HelperError::Failed(format!(
            "{program} get for {server} failed ({}): {stderr}",
            out.status
        )));
    }
    let reply: HelperReply = serde_json::from_slice(&out.stdout).map_err(|_| {
        HelperError::Failed(format!(
            "{program} get for {server} printed no {{\"Username\",\"Secret\"}} JSON"
        ))
    })?;
    if reply.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(if reply.username == "<token>" {
        Credential::IdentityToken {
            username: reply.username,
            token: Secret::new(reply.secret),
        }
    } else {
        Credential::Basic {
            username: reply.username,
            password: Secret::new(reply.secret),
        }
    }))
}

fn helper_output(
    program: &str,
    server: &str,
    path: Option<&OsString>,
) -> Result<std::process::Output, HelperError> {
    let mut cmd = std::process::Command::new(find_program(program, path));
    cmd.arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(HelperError::NotInstalled)
        }
        Err(e) => return Err(HelperError::Failed(format!("cannot run {program}: {e}"))),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    // A helper that hangs (a login prompt, a dead metadata endpoint) must not hang the commit.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(HELPER_DEADLINE) {
        Ok(out) => out.map_err(|e| HelperError::Failed(format!("{program}: {e}"))),
        Err(_) => {
            // Our own child, not yet reaped (the waiting thread holds it): the pid is still its.
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid as i32).expect("a child's pid is positive"),
                rustix::process::Signal::KILL,
            );
            Err(HelperError::Failed(format!(
                "{program} get did not finish within {}s",
                HELPER_DEADLINE.as_secs()
            )))
        }
    }
}

/// How long a credential helper may take.
const HELPER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// The program path: searched in `path` when given (Command's own search uses the parent's PATH).
fn find_program(program: &str, path: Option<&OsString>) -> PathBuf {
    if let Some(path) = path {
        for dir in std::env::split_paths(path) {
            let candidate = dir.join(program);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(program)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn resolve_json(json: &str, registry: &str) -> Result<Resolved, RegistryError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        resolve(
            registry,
            &Lookup {
                config: Some(path),
                helper_path: Some(OsString::from("/nonexistent")),
            },
        )
        .await
    }

    #[test]
    fn normalises_auth_keys() {
        assert_eq!(normalize_host("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(
            normalize_host("http://Reg.Example:5000/v2/"),
            "reg.example:5000"
        );
        assert_eq!(normalize_host("127.0.0.1:5000"), "127.0.0.1:5000");
    }

    #[tokio::test]
    async fn auth_field_url_key_and_identity_token() {
        let json = r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpwdw=="},
                       "reg.example":{"identitytoken":"tok"}}}"#;
        let r = resolve_json(json, "docker.io").await.unwrap();
        assert_eq!(
            r.credential,
            Credential::Basic {
                username: "u".into(),
                password: Secret::new("pw")
            }
        );
        let r = resolve_json(json, "reg.example").await.unwrap();
        assert!(matches!(r.credential, Credential::IdentityToken { .. }));
        let r = resolve_json(json, "other.example").await.unwrap();
        assert_eq!(r.credential, Credential::Anonymous);
    }

    #[tokio::test]
    async fn legacy_dockercfg_and_unpadded_auth() {
        let r = resolve_json(r#"{"h:1":{"auth":"dTpwdw"}}"#, "h:1")
            .await
            .unwrap();
        assert_eq!(
            r.credential,
            Credential::Basic {
                username: "u".into(),
                password: Secret::new("pw")
            }
        );
    }

    #[tokio::test]
    async fn parse_errors_do_not_quote_the_file() {
        let e = resolve_json(
            r#"{"auths":{"h":{"auth": 12345678, "password":"hunter2"}}"#,
            "h",
        )
        .await
        .unwrap_err();
        let text = format!("{e} {e:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("12345678"),
            "{text}"
        );
        assert!(text.contains("line"), "{text}");
    }

    #[tokio::test]
    async fn missing_explicit_file_is_an_error_and_missing_store_falls_back() {
        let e = resolve(
            "h",
            &Lookup {
                config: Some("/nonexistent/config.json".into()),
                helper_path: None,
            },
        )
        .await;
        assert!(e.unwrap_err().to_string().contains("does not exist"));
        let r = resolve_json(
            r#"{"credsStore":"nope","auths":{"h":{"username":"a","password":"b"}}}"#,
            "h",
        )
        .await
        .unwrap();
        assert!(matches!(r.credential, Credential::Basic { .. }), "{:?}", r);
    }
}
