//! How a `Client` is made: its options, which host(s) it talks to (`certs.d`, loopback is plain HTTP),
//! its credentials, and the first contact (`/v2/` and authentication) that turns a wrong host, TLS
//! setting or credential into an early, clear error.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use url::Url;

use super::auth::Authenticator;
use super::client::{Client, Inner, Retry};
use super::credentials::{self, Lookup};
use super::error::RegistryError;
use super::hosts::{hosts_for, HostConfig};
use super::reference::Reference;
use super::tls::{build_http, HttpSettings};

/// How to reach and authenticate to a registry.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Speak `http://` instead of `https://` to the target (test registries only).
    pub plain_http: bool,
    /// PEM bundle of extra CAs for the target, trusted in addition to the bundled and system roots.
    pub ca_file: Option<PathBuf>,
    /// A docker `config.json` or a `kubernetes.io/dockerconfigjson` file; default `$DOCKER_CONFIG/config.json`,
    /// then `~/.docker/config.json`.
    pub registry_config: Option<PathBuf>,
    /// containerd's registry host directory (`certs.d`): mirrors, CAs, client certificates per host.
    pub certs_dir: Option<PathBuf>,
    pub user_agent: String,
    /// Deadline of a small request (ping, HEAD, POST, token), and the longest a blob transfer may go
    /// without moving a byte.
    pub request_timeout: Duration,
    /// Blob uploads in flight at once through one client (and its clones).
    pub max_transfers: usize,
    /// Send uploads as ranged chunks of this size instead of one streamed PATCH.
    pub chunk_size: Option<u64>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: false,
            ca_file: None,
            registry_config: None,
            certs_dir: None,
            user_agent: concat!("committer/", env!("CARGO_PKG_VERSION")).to_string(),
            request_timeout: Duration::from_secs(30),
            max_transfers: 4,
            chunk_size: None,
        }
    }
}

impl ClientOptions {
    /// The options for pulling from a base image's registry: the target's `--plain-http` and
    /// `--registry-ca` only when it is the same registry (they name the target); the rest (credentials,
    /// `certs.d`, deadlines) is shared.
    pub fn for_base(&self, target_registry: &str, base_registry: &str) -> ClientOptions {
        let same = target_registry == base_registry;
        ClientOptions {
            plain_http: self.plain_http && same,
            ca_file: self.ca_file.clone().filter(|_| same),
            ..self.clone()
        }
    }
}

/// Hosts that are plain HTTP unless configured otherwise, as containerd and docker treat them.
pub(crate) fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The hosts to pull a base image from (mirrors first): HTTPS unless the host is loopback, `hosts.toml`
/// says `http://`, or `opts` (already [`ClientOptions::for_base`]) carries the target's `--plain-http`
/// because the base lives on the target registry.
fn base_hosts(
    reference: &Reference,
    opts: &ClientOptions,
) -> Result<Vec<HostConfig>, RegistryError> {
    let default_https = !(opts.plain_http || is_loopback(&reference.registry));
    hosts_for(
        &reference.registry,
        reference.api_host(),
        opts.certs_dir.as_deref(),
        default_https,
    )
}

impl Client {
    /// A push target. Resolve credentials, then ping `/v2/` and authenticate once, so that an
    /// unreachable registry, an untrusted certificate or rejected credentials fail here with a clear
    /// message.
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
        let hosts = hosts_for(
            &reference.registry,
            reference.api_host(),
            opts.certs_dir.as_deref(),
            !opts.plain_http,
        )?;
        let mut host = hosts
            .last()
            .cloned()
            .expect("the upstream is always listed");
        if opts.plain_http {
            host.origin = format!("http://{}", reference.api_host());
        }
        let ca = opts.ca_file.as_deref();
        Client::connect(reference, opts, &host, ca, "pull,push", lookup, retry).await
    }

    /// Pull-only clients for a base image's registry, one per host to try (containerd `certs.d`
    /// mirrors first, the registry itself last). Plain HTTP only for loopback hosts, as containerd
    /// does, and where `hosts.toml` says `http://`; `--plain-http`/`--registry-ca` are the target's.
    /// Hosts that cannot be reached are skipped with a warning; the upstream's failure is the error.
    pub async fn pull_hosts(
        reference: &Reference,
        opts: &ClientOptions,
    ) -> Result<Vec<Client>, RegistryError> {
        let hosts = base_hosts(reference, opts)?;
        let lookup = Lookup {
            config: opts.registry_config.clone(),
            helper_path: None,
        };
        let mut out = Vec::new();
        let last = hosts.len() - 1;
        for (i, host) in hosts.iter().enumerate() {
            let ca = opts.ca_file.as_deref();
            let connected = Client::connect(
                reference,
                opts,
                host,
                ca,
                "pull",
                lookup.clone(),
                Retry::DEFAULT,
            )
            .await;
            match connected {
                Ok(c) => out.push(c),
                Err(e) if i == last && out.is_empty() => return Err(e),
                Err(e) => crate::log::warn(&format!("skipping {}: {e}", host.origin)),
            }
        }
        Ok(out)
    }

    async fn connect(
        reference: &Reference,
        opts: &ClientOptions,
        host: &HostConfig,
        ca_file: Option<&std::path::Path>,
        actions: &'static str,
        lookup: Lookup,
        retry: Retry,
    ) -> Result<Client, RegistryError> {
        let http = build_http(&HttpSettings {
            user_agent: &opts.user_agent,
            ca_file,
            host,
        })?;
        let base = Url::parse(&host.api_root()).map_err(|e| {
            RegistryError::Config(format!("registry {:?}: {e}", reference.registry))
        })?;
        // Credentials are looked up by the host contacted: a mirror has its own.
        let cred_host = if host.origin.ends_with(reference.api_host()) {
            reference.registry.clone()
        } else {
            // As written in config.json: the port only when not the scheme's default.
            let host = base.host_str().unwrap_or_default();
            base.port()
                .map_or(host.to_string(), |p| format!("{host}:{p}"))
        };
        let resolved = credentials::resolve(&cred_host, &lookup).await?;
        let inner = Inner {
            auth: Authenticator::new(http.clone(), resolved, opts.request_timeout, base.clone()),
            http,
            base,
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            actions,
            timeout: opts.request_timeout,
            pending: Default::default(),
            spare: Default::default(),
            refused_mounts: Default::default(),
            mount_turn: Default::default(),
        };
        // The first contact retries less: a registry that is down should be reported in about a second.
        let ping_retry = Retry {
            attempts: retry.attempts.min(3),
            ..retry
        };
        let client = Client {
            inner: Arc::new(inner),
            chunk_size: opts.chunk_size,
            retry: ping_retry,
            transfers: Arc::new(Semaphore::new(opts.max_transfers.max(1))),
        };
        client.ping().await?;
        Ok(Client { retry, ..client })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_origin(target: &str, base: &str, opts: &ClientOptions) -> String {
        let reference: Reference = format!("{base}/library/busybox:1").parse().unwrap();
        let base_opts = opts.for_base(target, &reference.registry);
        let hosts = base_hosts(&reference, &base_opts).unwrap();
        hosts.last().unwrap().origin.clone()
    }

    #[test]
    fn the_targets_plain_http_and_ca_never_reach_another_base_registry() {
        let opts = ClientOptions {
            plain_http: true,
            ca_file: Some("/target/ca.pem".into()),
            ..ClientOptions::default()
        };
        let target = "127.0.0.1:5000";
        for base in [
            "docker.io",
            "ghcr.io",
            "registry.example:5000",
            "10.0.0.1:5000",
        ] {
            let reference: Reference = format!("{base}/a/b:1").parse().unwrap();
            let base_opts = opts.for_base(target, &reference.registry);
            assert!(!base_opts.plain_http, "{base}");
            assert_eq!(base_opts.ca_file, None, "{base}");
            assert!(
                base_origin(target, base, &opts).starts_with("https://"),
                "{base}"
            );
        }
        assert_eq!(
            base_origin(target, "docker.io", &opts),
            "https://registry-1.docker.io"
        );
    }

    #[test]
    fn a_base_on_the_target_or_on_loopback_keeps_plain_http() {
        let opts = ClientOptions {
            plain_http: true,
            ca_file: Some("/target/ca.pem".into()),
            ..ClientOptions::default()
        };
        let same = opts.for_base("registry.example:5000", "registry.example:5000");
        assert!(same.plain_http);
        assert_eq!(same.ca_file, opts.ca_file);
        assert_eq!(
            base_origin("registry.example:5000", "registry.example:5000", &opts),
            "http://registry.example:5000"
        );
        // Loopback is plain HTTP without any flag, as containerd treats it.
        let none = ClientOptions::default();
        assert_eq!(
            base_origin("ghcr.io", "localhost:5000", &none),
            "http://localhost:5000"
        );
    }
}
