//! `Reference`: a docker-style image reference (`busybox`, `localhost:5000/a/b:t`, `host/a@sha256:…`)
//! parsed with the rules of distribution's `reference` package, normalised the way the docker CLI does
//! (`busybox` → `docker.io/library/busybox`, `index.docker.io` → `docker.io`).

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// The registry that unqualified names belong to.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API actually lives (`docker.io` itself does not serve `/v2/`).
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// distribution limits the whole name (domain + path) to 255 characters.
const NAME_TOTAL_MAX: usize = 255;
const TAG_MAX: usize = 128;

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io`, `localhost:5000`, `ghcr.io`, … (as written, lower-cased; Docker Hub canonicalised).
    pub registry: String,
    /// `library/busybox`, `a/b`.
    pub repository: String,
    /// `None` when the input named no tag; callers default to `latest`.
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ParseReferenceError {
    pub input: String,
    pub reason: String,
}

impl Reference {
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or("latest")
    }

    /// `registry/repository`, e.g. `docker.io/library/busybox`.
    pub fn repo_url_name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The host[:port] that serves `/v2/` for this registry.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to put after `/manifests/`: the digest when there is one (it pins content), else the tag.
    pub fn manifest_reference(&self) -> String {
        match &self.digest {
            Some(d) => d.to_string(),
            None => self.tag_or_latest().to_string(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

impl FromStr for Reference {
    type Err = ParseReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| ParseReferenceError {
            input: input.to_string(),
            reason,
        };
        if input.is_empty() {
            return Err(fail("it is empty".into()));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => {
                let digest = d.parse::<Digest>().map_err(|_| {
                    fail(format!(
                        "digest {d:?} is not sha256:<64 lowercase hex digits>"
                    ))
                })?;
                (r, Some(digest))
            }
            None => (input, None),
        };
        // A ':' after the last '/' starts the tag; one before it is a registry port.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].find(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            check_tag(t).map_err(fail)?;
        }
        let (registry, repository) = split_registry(name).map_err(fail)?;
        check_repository(&repository).map_err(fail)?;
        if registry.len() + 1 + repository.len() > NAME_TOTAL_MAX {
            return Err(fail(format!(
                "the name is longer than {NAME_TOTAL_MAX} characters"
            )));
        }
        Ok(Reference {
            registry,
            repository,
            tag: tag.map(str::to_string),
            digest,
        })
    }
}

/// distribution's `splitDockerDomain`: the first component is a registry when it has a '.' or ':', is
/// `localhost`, or has upper-case letters (which a repository path may not have); otherwise Docker Hub.
fn split_registry(name: &str) -> Result<(String, String), String> {
    let (first, rest) = match name.split_once('/') {
        Some((f, r)) => (f, Some(r)),
        None => (name, None),
    };
    let is_registry = |s: &str| {
        s.contains(['.', ':']) || s == "localhost" || s.chars().any(|c| c.is_ascii_uppercase())
    };
    match rest {
        Some(rest) if is_registry(first) => {
            check_registry(first)?;
            let registry = first.to_ascii_lowercase();
            let registry = if registry == "index.docker.io" {
                DOCKER_HUB.to_string()
            } else {
                registry
            };
            let repository = if registry == DOCKER_HUB && !rest.contains('/') {
                format!("library/{rest}")
            } else {
                rest.to_string()
            };
            Ok((registry, repository))
        }
        Some(_) => Ok((DOCKER_HUB.to_string(), name.to_string())),
        None => Ok((DOCKER_HUB.to_string(), format!("library/{name}"))),
    }
}

fn check_registry(host: &str) -> Result<(), String> {
    let (h, port) = if let Some(stripped) = host.strip_prefix('[') {
        // [ipv6]:port
        let (v6, after) = stripped
            .split_once(']')
            .ok_or("unterminated '[' in the registry host")?;
        if !v6.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return Err(format!(
                "registry host {host:?} is not a valid IPv6 address"
            ));
        }
        ("x", after.strip_prefix(':'))
    } else {
        match host.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, None),
        }
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !h.split('.').all(label_ok) {
        return Err(format!("registry host {host:?} is not a valid host name"));
    }
    if let Some(p) = port {
        if p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()) || p.parse::<u16>().is_err() {
            return Err(format!(
                "registry port in {host:?} is not a number between 0 and 65535"
            ));
        }
    }
    Ok(())
}

/// Path components: `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`, joined by '/'.
fn check_repository(repo: &str) -> Result<(), String> {
    if repo.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("repository name {repo:?} must be lowercase"));
    }
    for comp in repo.split('/') {
        if !component_ok(comp) {
            return Err(format!(
                "repository path component {comp:?} must be lowercase letters and digits, separated by '.', '_', '__' or dashes"
            ));
        }
    }
    Ok(())
}

fn component_ok(comp: &str) -> bool {
    let b = comp.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &comp[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`
fn check_tag(tag: &str) -> Result<(), String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    let ok = match chars.next() {
        Some(c) => {
            word(c) && chars.all(|c| word(c) || c == '.' || c == '-') && tag.len() <= TAG_MAX
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} must be 1-{TAG_MAX} of [A-Za-z0-9_.-], not starting with '.' or '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn bare_name_is_docker_hub_library_without_tag() {
        let r = parse("busybox");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/busybox", None)
        );
        assert_eq!(r.tag_or_latest(), "latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.repo_url_name(), "docker.io/library/busybox");
    }

    #[test]
    fn user_repo_on_hub_and_index_alias() {
        assert_eq!(parse("user/app:1").repository, "user/app");
        let r = parse("index.docker.io/busybox:1.36");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "library/busybox")
        );
    }

    #[test]
    fn registry_with_port_and_tag() {
        let r = parse("localhost:5000/a/b:t");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000", "a/b", Some("t"))
        );
        assert_eq!(r.api_host(), "localhost:5000");
        let r = parse("localhost/a");
        assert_eq!(r.registry, "localhost");
    }

    #[test]
    fn digest_reference() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = parse(&format!("host.example/a@{d}"));
        assert_eq!(r.digest.as_ref().unwrap().as_str(), d);
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_reference(), d);
        let r = parse(&format!("host.example:443/a:v1@{d}"));
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.to_string(), format!("host.example:443/a:v1@{d}"));
    }

    #[test]
    fn errors_name_the_input_and_the_problem() {
        let e = "localhost:5000/My/App"
            .parse::<Reference>()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"localhost:5000/My/App\"") && e.contains("lowercase"),
            "{e}"
        );
        let e = "a/b:-x".parse::<Reference>().unwrap_err().to_string();
        assert!(e.contains("tag"), "{e}");
        let e = "a@sha256:12".parse::<Reference>().unwrap_err().to_string();
        assert!(e.contains("digest"), "{e}");
        let e = "host:99999/a".parse::<Reference>().unwrap_err().to_string();
        assert!(e.contains("port"), "{e}");
        assert!("a//b".parse::<Reference>().is_err());
        assert!("a_-b".parse::<Reference>().is_err());
        assert!("".parse::<Reference>().is_err());
    }

    #[test]
    fn separators_allowed_in_components() {
        for ok in ["a.b", "a_b", "a__b", "a---b", "a-b.c_d"] {
            assert!(component_ok(ok), "{ok}");
        }
        for bad in ["a...b", "a___b", ".a", "a-", "a._b"] {
            assert!(!component_ok(bad), "{bad}");
        }
    }
}
