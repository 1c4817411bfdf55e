//! How to reach a registry host: the scheme, the hosts to try (containerd's `certs.d` mirrors) and what
//! TLS trusts there.
//!
//! containerd's registry configuration (`config_path`, `/etc/containerd/certs.d` on kind and EKS nodes:
//! kind's containerd config, amazon-eks-ami `config.template.toml`) is a directory per registry host,
//! `certs.d/<host[:port]>/`, holding `hosts.toml` and/or docker-style certificate files (`*.crt` CAs,
//! `*.cert` + `*.key` client pairs). `hosts.toml` names `server` (the upstream), `[host."<url>"]` mirrors
//! tried first for the capabilities they list, and `ca`, `client`, `skip_verify` for each. Only the
//! subset of TOML those files use is read (strings, string arrays, arrays of string pairs, booleans).
//!
//! Trust everywhere: the bundled webpki roots, the system's bundle (`SSL_CERT_FILE`, `SSL_CERT_DIR`, the
//! usual distribution paths — a TLS-inspecting proxy's CA lives there), plus the CAs named here.

use std::path::{Path, PathBuf};

use super::error::RegistryError;

/// One host to send requests to, with its TLS material.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// `scheme://host[:port]`.
    pub origin: String,
    /// The path of a mirror's URL (`/some/path/`), empty for none.
    pub path: String,
    /// `override_path`: `path` is the API root itself; otherwise `v2/` is added to it.
    pub override_path: bool,
    /// May serve pulls (`pull` capability; the upstream server always may).
    pub pull: bool,
    pub push: bool,
    pub ca: Vec<PathBuf>,
    /// (certificate, key) PEM files.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    pub skip_verify: bool,
}

/// Bundles of the system's CAs, in the order OpenSSL-based tools look for them.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/ssl/cert.pem",
];

/// The system's CA bundle files: `SSL_CERT_FILE`, the `*.pem`/`*.crt` files of `SSL_CERT_DIR`, and the
/// first of the usual bundle paths that exists.
pub(crate) fn system_ca_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(f) = std::env::var_os("SSL_CERT_FILE") {
        out.push(PathBuf::from(f));
    }
    if let Some(dirs) = std::env::var_os("SSL_CERT_DIR") {
        for dir in std::env::split_paths(&dirs) {
            out.extend(pem_files(&dir, &["pem", "crt"]));
        }
    }
    if let Some(b) = SYSTEM_BUNDLES.iter().map(Path::new).find(|p| p.is_file()) {
        out.push(b.to_path_buf());
    }
    out
}

fn pem_files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
        })
        .collect();
    files.sort();
    files
}

/// The hosts to try for `registry` (as written in image names: `host[:port]`), mirrors first, the
/// upstream last. `default_https`: the scheme without configuration saying otherwise.
pub(crate) fn hosts_for(
    registry: &str,
    api_host: &str,
    certs_dir: Option<&Path>,
    default_https: bool,
) -> Result<Vec<HostConfig>, RegistryError> {
    let scheme = if default_https { "https" } else { "http" };
    let mut upstream = HostConfig {
        origin: format!("{scheme}://{api_host}"),
        pull: true,
        push: true,
        ..Default::default()
    };
    let Some(dir) = certs_dir.map(|d| d.join(registry)).filter(|d| d.is_dir()) else {
        return Ok(vec![upstream]);
    };
    // Docker-style files: a CA there means the host speaks TLS.
    upstream.ca = pem_files(&dir, &["crt"]);
    for cert in pem_files(&dir, &["cert"]) {
        let key = cert.with_extension("key");
        upstream.client.push((cert, key.is_file().then_some(key)));
    }
    if !upstream.ca.is_empty() {
        upstream.origin = format!("https://{api_host}");
    }
    let toml = dir.join("hosts.toml");
    if !toml.is_file() {
        return Ok(vec![upstream]);
    }
    let text = std::fs::read_to_string(&toml)
        .map_err(|e| RegistryError::Config(format!("cannot read {}: {e}", toml.display())))?;
    parse_hosts_toml(&text, &dir, upstream)
        .map_err(|msg| RegistryError::Config(format!("{}: {msg}", toml.display())))
}

/// `hosts.toml` → mirrors (in file order) then the server.
fn parse_hosts_toml(
    text: &str,
    dir: &Path,
    mut upstream: HostConfig,
) -> Result<Vec<HostConfig>, String> {
    let mut mirrors: Vec<HostConfig> = Vec::new();
    let mut in_mirror = false;
    for (n, raw) in text.lines().enumerate() {
        let line = strip_comment(raw).trim();
        if line.is_empty() {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            let name = header.trim_end_matches(']').trim();
            let url = name
                .strip_prefix("host.")
                .map(|u| u.trim().trim_matches('"'))
                .ok_or_else(|| format!("line {}: unknown table [{name}]", n + 1))?;
            mirrors.push(mirror(url).map_err(|m| format!("line {}: {m}", n + 1))?);
            in_mirror = true;
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected key = value", n + 1))?;
        let target = if in_mirror {
            mirrors.last_mut().expect("a mirror table was opened")
        } else {
            &mut upstream
        };
        set_key(target, key.trim(), value.trim(), dir)
            .map_err(|m| format!("line {}: {m}", n + 1))?;
    }
    mirrors.retain(|m| m.pull);
    mirrors.push(upstream);
    Ok(mirrors)
}

fn mirror(url: &str) -> Result<HostConfig, String> {
    let (origin, path) = split_url(url)?;
    Ok(HostConfig {
        origin,
        path,
        pull: true,
        push: true,
        ..Default::default()
    })
}

/// `https://host:port/some/path` → (`https://host:port`, `/some/path/`); no path → empty.
fn split_url(url: &str) -> Result<(String, String), String> {
    let u = url::Url::parse(url).map_err(|e| format!("{url:?}: {e}"))?;
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err(format!("{url:?}: not an http(s) URL"));
    }
    let origin = u.origin().ascii_serialization();
    let path = u.path().trim_end_matches('/');
    let path = if path.is_empty() {
        String::new()
    } else {
        format!("{path}/")
    };
    Ok((origin, path))
}

fn set_key(h: &mut HostConfig, key: &str, value: &str, dir: &Path) -> Result<(), String> {
    let rel = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        }
    };
    match key {
        "server" => {
            let (origin, path) = split_url(&string(value)?)?;
            h.origin = origin;
            h.path = path;
        }
        "capabilities" => {
            let caps = strings(value)?;
            h.pull = caps.iter().any(|c| c == "pull");
            h.push = caps.iter().any(|c| c == "push");
        }
        "ca" => h.ca = strings(value)?.iter().map(|p| rel(p)).collect(),
        "client" => {
            h.client = client_pairs(value)?
                .into_iter()
                .map(|(c, k)| (rel(&c), k.map(|k| rel(&k))))
                .collect()
        }
        "skip_verify" => h.skip_verify = value == "true",
        "override_path" => h.override_path = value == "true",
        _ => {}
    }
    Ok(())
}

impl HostConfig {
    /// The registry API root: `origin` + `path` + `v2/` (containerd adds `/v2` unless the path ends
    /// with it or `override_path` is set).
    pub fn api_root(&self) -> String {
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        if self.override_path || path.ends_with("/v2/") {
            format!("{}{path}", self.origin)
        } else {
            format!("{}{path}v2/", self.origin)
        }
    }
}

fn strip_comment(line: &str) -> &str {
    let mut in_str = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '#' if !in_str => return &line[..i],
            _ => {}
        }
    }
    line
}

fn string(v: &str) -> Result<String, String> {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .map(str::to_string)
        .ok_or_else(|| format!("{v}: expected a quoted string"))
}

/// A string or an array of strings.
fn strings(v: &str) -> Result<Vec<String>, String> {
    let v = v.trim();
    match v.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        Some(inner) => inner
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(string)
            .collect(),
        None => Ok(vec![string(v)?]),
    }
}

/// `"cert"`, `["cert", "key"]`, or `[["cert", "key"], …]`.
fn client_pairs(v: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let flat: String = v.chars().filter(|c| !c.is_whitespace()).collect();
    if let Some(inner) = flat.strip_prefix("[[").and_then(|s| s.strip_suffix("]]")) {
        return inner
            .split("],[")
            .map(|pair| {
                let p = strings(&format!("[{pair}]"))?;
                Ok((p.first().cloned().unwrap_or_default(), p.get(1).cloned()))
            })
            .collect();
    }
    let p = strings(&flat)?;
    Ok(match p.as_slice() {
        [cert, key] => vec![(cert.clone(), Some(key.clone()))],
        [cert] => vec![(cert.clone(), None)],
        _ => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_toml_mirrors_come_first_and_paths_are_relative_to_the_host_dir() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("docker.io");
        std::fs::create_dir(&host).unwrap();
        std::fs::write(
            host.join("hosts.toml"),
            r#"server = "https://registry-1.docker.io"  # upstream
[host."https://mirror.local:5000"]
  capabilities = ["pull", "resolve"]
  ca = "mirror-ca.pem"
  client = [["/abs/c.pem", "k.pem"]]
[host."http://push-only.local"]
  capabilities = ["push"]
"#,
        )
        .unwrap();
        let hosts = hosts_for("docker.io", "registry-1.docker.io", Some(dir.path()), true).unwrap();
        assert_eq!(hosts.len(), 2, "{hosts:?}");
        assert_eq!(hosts[0].origin, "https://mirror.local:5000");
        assert_eq!(hosts[0].ca, vec![host.join("mirror-ca.pem")]);
        assert_eq!(
            hosts[0].client,
            vec![(PathBuf::from("/abs/c.pem"), Some(host.join("k.pem")))]
        );
        assert_eq!(hosts[1].origin, "https://registry-1.docker.io");
        assert_eq!(hosts[1].api_root(), "https://registry-1.docker.io/v2/");
    }

    #[test]
    fn a_ca_file_in_the_host_dir_means_https_even_on_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("127.0.0.1:5000");
        std::fs::create_dir(&host).unwrap();
        std::fs::write(host.join("ca.crt"), "x").unwrap();
        let hosts = hosts_for("127.0.0.1:5000", "127.0.0.1:5000", Some(dir.path()), false).unwrap();
        assert_eq!(hosts[0].origin, "https://127.0.0.1:5000");
        assert_eq!(hosts[0].ca, vec![host.join("ca.crt")]);
    }
}
