//! Command-line arguments, parsed once by clap into raw structs, then turned into a validated
//! `CommitPlan` (commit) or `SourcePlan` (diff) that the library runs. Nothing here touches the network or disk.

use crate::containerd::lookup::Selector;
use crate::layer::{CompressOptions, Compression};
use crate::registry::Reference;
use crate::source::{DiffSourceChoice, SourcePlan};
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "committer",
    version,
    about = "Commit a running containerd container's filesystem to an OCI registry"
)]
pub struct Cli {
    /// No progress on stderr; errors and warnings still go there, the result to stdout.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
    /// Log verbosity on stderr (error, warn, info, debug). Secrets are never logged at any level.
    #[arg(long, global = true, default_value = "info", env = "COMMITTER_LOG")]
    pub log_level: LogLevel,
    /// Log format on stderr; `auto` is text on a terminal and JSON lines otherwise.
    #[arg(long, global = true, default_value = "auto")]
    pub log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Commit the container's filesystem changes as a new image and push it.
    #[command(
        override_usage = "committer commit [OPTIONS] CONTAINER [REPOSITORY[:TAG]]\n       committer commit [OPTIONS] (--container ID | --pod NAMESPACE/NAME [--container-name NAME]) --image REPOSITORY[:TAG]"
    )]
    Commit(Box<CommitArgs>),
    /// Write the container's diff as a layer blob to a local file (or stdout) and print its descriptor.
    #[command(
        override_usage = "committer diff [OPTIONS] (CONTAINER | --container ID | --pod NAMESPACE/NAME [--container-name NAME]) --output FILE|-"
    )]
    Diff(Box<DiffArgs>),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionArg {
    Gzip,
    Zstd,
    None,
}

/// `--diff-source`, as typed (the library's `DiffSourceChoice` knows nothing of clap).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffSourceArg {
    /// The fastest exact source available.
    Auto,
    /// The overlay upperdir only (fails when it is not exact).
    Upperdir,
    /// Double walk of the parent and the container's tree.
    Walk,
    /// containerd's Diff service builds the layer (no snapshotter mount or CAP_SYS_ADMIN needed).
    Containerd,
}

impl From<DiffSourceArg> for DiffSourceChoice {
    fn from(a: DiffSourceArg) -> Self {
        match a {
            DiffSourceArg::Auto => DiffSourceChoice::Auto,
            DiffSourceArg::Upperdir => DiffSourceChoice::Upperdir,
            DiffSourceArg::Walk => DiffSourceChoice::Walk,
            DiffSourceArg::Containerd => DiffSourceChoice::Containerd,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The container: its containerd ID, or a unique prefix of it (as `crictl ps` shows).
    #[arg(value_name = "CONTAINER")]
    pub container_arg: Option<String>,
    /// The container, as a flag: its containerd ID or a unique prefix of it.
    #[arg(long, value_name = "ID")]
    pub container: Option<String>,
    /// The Kubernetes pod as NAMESPACE/NAME (found by its CRI labels).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub pod: Option<String>,
    /// With --pod: the container's name in the pod (needed when the pod has several).
    #[arg(long, value_name = "NAME")]
    pub container_name: Option<String>,
    /// containerd socket: a path, or unix://PATH.
    #[arg(
        long,
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub address: String,
    /// containerd namespace (Kubernetes uses k8s.io).
    #[arg(long, env = "CONTAINERD_NAMESPACE", default_value = "k8s.io")]
    pub namespace: String,
}

#[derive(Args, Debug)]
pub struct LayerArgs {
    /// Layer compression.
    #[arg(long, value_enum, default_value = "gzip")]
    pub compression: CompressionArg,
    /// Compression level (gzip 0-9, default 4; zstd 1-19, default 3).
    #[arg(long)]
    pub compression_level: Option<i32>,
    /// Compression threads, gzip and zstd (default and upper bound: the cores this process may use).
    #[arg(long)]
    pub threads: Option<u32>,
    /// Where the diff is read from: auto picks the overlay upperdir when it is exact, else a walk.
    #[arg(long, value_enum, default_value = "auto")]
    pub diff_source: DiffSourceArg,
    /// Leave this path out of the layer (repeatable); what the base has there stays as it was.
    #[arg(long = "exclude", value_name = "PATH")]
    pub exclude: Vec<String>,
    /// Commit only the changes under this path (repeatable); everything else keeps the base's
    /// version.
    #[arg(long = "include", value_name = "PATH")]
    pub include: Vec<String>,
    /// Clamp file mtimes newer than this Unix time (reproducible layers); empty means unset.
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    pub source_date_epoch: Option<i64>,
    /// Fail (nothing pushed) if the layer, uncompressed, would exceed this many bytes.
    #[arg(long)]
    pub max_layer_bytes: Option<u64>,
    /// Fail (nothing pushed) if the layer would hold more than this many entries.
    #[arg(long)]
    pub max_files: Option<u64>,
    /// Also keep these xattrs (repeatable; an exact name, or a prefix ending in `*`), beyond
    /// security.capability and user.*.
    #[arg(long = "keep-xattrs", value_name = "PATTERN")]
    pub keep_xattrs: Vec<String>,
    /// Bytes of holes in sparse files (summed over the layer) that may be written as zeros
    /// before such a file is refused.
    #[arg(long, value_name = "BYTES")]
    pub max_hole_bytes: Option<u64>,
    /// Pause the container while its filesystem is read (docker commit's -p; -p=false, --pause=false).
    #[arg(
        short = 'p',
        long,
        value_name = "BOOL",
        default_value_t = true,
        action = ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub pause: bool,
    /// Do not pause the container while its filesystem is read (the layer may be inconsistent).
    #[arg(long)]
    pub no_pause: bool,
}

#[derive(Args, Debug)]
pub struct CommitArgs {
    #[command(flatten)]
    pub target: Target,
    /// Where to push, after the container (as docker commit takes it).
    #[arg(value_name = "REPOSITORY[:TAG]")]
    pub image_arg: Option<String>,
    /// Where to push: REGISTRY/REPOSITORY[:TAG] (default tag: latest).
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// More tags to point at the pushed manifest (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    #[command(flatten)]
    pub layer: LayerArgs,
    /// Talk plain HTTP to the registry (loopback or test registries only).
    #[arg(long)]
    pub plain_http: bool,
    /// Docker config.json or a mounted kubernetes.io/dockerconfigjson file with push credentials.
    #[arg(long)]
    pub registry_config: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust for the registry.
    #[arg(long)]
    pub registry_ca: Option<PathBuf>,
    /// containerd's registry host directory (hosts.toml mirrors, CAs, client certificates), used for
    /// the base image's registry and the target's CAs (default: /etc/containerd/certs.d when present).
    #[arg(long)]
    pub certs_dir: Option<PathBuf>,
    /// Blob uploads in flight at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub max_transfers: u64,
    /// Upload in ranged chunks of this many bytes instead of one streamed PATCH per blob (the new
    /// layer then goes up once it is compressed, not while).
    #[arg(long, value_parser = clap::value_parser!(u64).range(65536..))]
    pub chunk_size: Option<u64>,
    /// Seconds a registry request may take, and a transfer may go without progress.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub request_timeout: u64,
    /// Directory for the uncompressed tar and the compressed layer (default: the system temp dir).
    #[arg(long)]
    pub spool_dir: Option<PathBuf>,
    /// Comment recorded in the image history.
    #[arg(short, long, default_value = "committed by committer")]
    pub message: String,
    /// Author recorded in the image config and history.
    #[arg(short, long)]
    pub author: Option<String>,
    /// Apply a Dockerfile instruction to the image config (repeatable), as docker commit's -c.
    #[arg(short = 'c', long = "change", value_name = "INSTRUCTION")]
    pub changes: Vec<String>,
    /// Record the sandbox's own process (args, env without Kubernetes' injected variables,
    /// working dir, user) as the image's Cmd/Entrypoint, Env, WorkingDir and User.
    #[arg(long)]
    pub process_config: bool,
    /// One layer with every change since the original base, replacing earlier snapshot layers.
    #[arg(long, conflicts_with = "max_layers")]
    pub squash: bool,
    /// Append snapshot layers until the chain would exceed N, then squash.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100))]
    pub max_layers: Option<u64>,
    /// Also write the result JSON to this file (default: /dev/termination-log when it exists).
    #[arg(long)]
    pub result_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub layer: LayerArgs,
    /// File to write the layer blob to; - writes it to stdout (the descriptor then goes to stderr).
    #[arg(long)]
    pub output: PathBuf,
}

/// A usage error: one line naming the flag and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A validated `committer commit`.
#[derive(Debug, Clone)]
pub struct CommitPlan {
    pub source: SourcePlan,
    pub image: Reference,
    pub extra_tags: Vec<String>,
    pub plain_http: bool,
    pub registry_config: Option<PathBuf>,
    pub registry_ca: Option<PathBuf>,
    pub certs_dir: Option<PathBuf>,
    pub max_transfers: usize,
    pub chunk_size: Option<u64>,
    pub request_timeout: std::time::Duration,
    pub spool_dir: Option<PathBuf>,
    pub message: String,
    pub author: Option<String>,
    /// `--change` instructions, parsed (a bad one is a usage error before anything runs).
    pub changes: crate::image::Changes,
    pub process_config: bool,
    /// Append, squash, or append up to a chain length.
    pub chain: crate::image::chain::Mode,
    pub result_file: Option<PathBuf>,
}

impl Target {
    /// The container ID given positionally or by --container (not both).
    fn container_id(&self) -> Result<Option<&str>, UsageError> {
        match (&self.container_arg, &self.container) {
            (Some(a), Some(b)) if a != b => Err(UsageError(format!(
                "the container is given twice ({a:?} and --container {b:?}): give one"
            ))),
            (Some(id), _) | (None, Some(id)) => Ok(Some(id)),
            (None, None) => Ok(None),
        }
    }

    fn selector(&self) -> Result<Selector, UsageError> {
        if self.container_name.is_some() && self.pod.is_none() {
            return Err(UsageError(
                "--container-name picks a container in a pod: give --pod NAMESPACE/NAME with it"
                    .into(),
            ));
        }
        match (self.container_id()?, &self.pod) {
            (Some(_), Some(_)) => Err(UsageError(
                "give the container or --pod, not both".into(),
            )),
            (None, None) => Err(UsageError(
                "which container? give its ID (CONTAINER or --container ID) or --pod NAMESPACE/NAME"
                    .into(),
            )),
            (Some(""), None) => Err(UsageError("--container: empty container ID".into())),
            (Some(id), None) => Ok(Selector::Id(id.to_string())),
            (None, Some(pod)) => pod_selector(pod, self.container_name.clone()),
        }
    }
}

fn pod_selector(pod: &str, container: Option<String>) -> Result<Selector, UsageError> {
    let parsed = pod
        .split_once('/')
        .filter(|(ns, name)| dns_name(ns, 63) && dns_name(name, 253));
    let Some((ns, name)) = parsed else {
        return Err(UsageError(format!(
            "--pod {pod:?}: expected NAMESPACE/NAME as Kubernetes names them (lowercase letters, digits, - and .), e.g. --pod default/my-sandbox"
        )));
    };
    if let Some(c) = container
        .as_deref()
        .filter(|c| !dns_name(c, 63) || c.contains('.'))
    {
        return Err(UsageError(format!(
            "--container-name {c:?}: a Kubernetes container name is lowercase letters, digits and -"
        )));
    }
    Ok(Selector::Pod {
        namespace: ns.to_string(),
        name: name.to_string(),
        container,
    })
}

/// A Kubernetes object name (DNS-1123): what the CRI labels can hold, and nothing that could
/// break containerd's filter syntax or a log line.
fn dns_name(s: &str, max: usize) -> bool {
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    s.len() <= max
        && edge_ok(s.chars().next())
        && edge_ok(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// `--exclude` as the absolute, normalised path the diff compares against (`/a/./b/../c/` →
/// `/a/c`); a path that climbs above `/` is refused rather than silently matching nothing.
pub fn normalise_exclude(path: &str) -> Result<String, UsageError> {
    normalise_container_path("--exclude", path)
}

/// A container path given to `flag` (`--exclude`, `--include`), normalised the same way.
fn normalise_container_path(flag: &str, path: &str) -> Result<String, UsageError> {
    if !path.starts_with('/') {
        return Err(UsageError(format!(
            "{flag} {path:?}: give an absolute path inside the container, like /tmp/cache"
        )));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(UsageError(format!(
                        "{flag} {path:?}: climbs above / of the container"
                    )));
                }
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(UsageError(format!(
            "{flag} {path:?}: that is the whole filesystem; leave the flag out"
        )));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// The cores this process may use (its CPU affinity and cgroup quota, as the standard library
/// reads them).
fn cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

impl LayerArgs {
    fn compression(&self) -> Result<Compression, UsageError> {
        let compression = match self.compression {
            CompressionArg::Gzip => Compression::Gzip,
            CompressionArg::Zstd => Compression::Zstd,
            CompressionArg::None => Compression::None,
        };
        if let Some(level) = self.compression_level {
            let ok = match compression {
                Compression::Gzip => (0..=9).contains(&level),
                Compression::Zstd => (1..=19).contains(&level),
                Compression::None => false,
            };
            if !ok {
                return Err(UsageError(format!(
                    "--compression-level {level}: gzip takes 0-9, zstd 1-19, none takes no level"
                )));
            }
        }
        Ok(compression)
    }

    /// `--threads`, bounded by the cores this process may use: more threads than cores only
    /// cost memory (and 100000 of them exhausted the process).
    fn threads(&self) -> Result<u32, UsageError> {
        match self.threads {
            Some(0) => Err(UsageError("--threads 0: give at least 1".into())),
            Some(n) => Ok(n.min(cores())),
            None => Ok(cores()),
        }
    }

    fn source_plan(&self, target: &Target) -> Result<SourcePlan, UsageError> {
        let address = crate::containerd::socket_path(&target.address)
            .map_err(|e| UsageError(e.to_string()))?;
        let exclude = self
            .exclude
            .iter()
            .map(|e| normalise_exclude(e))
            .collect::<Result<Vec<_>, _>>()?;
        let include = self
            .include
            .iter()
            .map(|p| normalise_container_path("--include", p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SourcePlan {
            address,
            namespace: target.namespace.clone(),
            selector: target.selector()?,
            compress: CompressOptions {
                compression: self.compression()?,
                level: self.compression_level,
                threads: self.threads()?,
            },
            diff_source: self.diff_source.into(),
            exclude,
            include,
            source_date_epoch: self.source_date_epoch,
            max_layer_bytes: self.max_layer_bytes,
            max_files: self.max_files,
            keep_xattrs: self.keep_xattrs.clone(),
            max_hole_bytes: self.max_hole_bytes,
            pause: self.pause && !self.no_pause,
        })
    }
}

fn check_tag(t: &str) -> Result<(), UsageError> {
    let valid = !t.is_empty()
        && t.len() <= 128
        && t.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(UsageError(format!(
            "--tag {t:?}: a tag is 1-128 of [A-Za-z0-9_.-], not starting with . or -"
        )))
    }
}

impl CommitArgs {
    /// The target image: `--image`, or the positional after the container. With --container or
    /// --pod a lone positional is the image (`commit --pod ns/p REPO:TAG`).
    fn image_and_target(&self) -> Result<(String, Target), UsageError> {
        let mut target = self.target.clone();
        let mut positional = self.image_arg.clone();
        if positional.is_none() && (target.container.is_some() || target.pod.is_some()) {
            positional = target.container_arg.take();
        }
        let image = match (positional.as_ref(), self.image.as_ref()) {
            (Some(a), Some(b)) if a != b => {
                return Err(UsageError(format!(
                    "the image is given twice ({a:?} and --image {b:?}): give one"
                )))
            }
            (Some(i), _) | (None, Some(i)) => i.clone(),
            (None, None) => {
                return Err(UsageError(
                    "where to push? give REPOSITORY[:TAG] after the container, or --image".into(),
                ))
            }
        };
        Ok((image, target))
    }

    pub fn plan(&self) -> Result<CommitPlan, UsageError> {
        let (image_arg, target) = self.image_and_target()?;
        let image: Reference = image_arg
            .parse()
            .map_err(|e| UsageError(format!("--image: {e}")))?;
        if image.digest.is_some() {
            return Err(UsageError(format!(
                "--image {image_arg:?}: give a tag, not a digest — the digest of the new image is only known once it is built"
            )));
        }
        let main_tag = image.tag_or_latest().to_string();
        let mut extra_tags: Vec<String> = Vec::new();
        for t in &self.tags {
            check_tag(t)?;
            if *t != main_tag && !extra_tags.contains(t) {
                extra_tags.push(t.clone());
            }
        }
        let result_file = self.result_file.clone().or_else(|| {
            let p = PathBuf::from("/dev/termination-log");
            p.exists().then_some(p)
        });
        Ok(CommitPlan {
            source: self.layer.source_plan(&target)?,
            image,
            extra_tags,
            plain_http: self.plain_http,
            registry_config: self.registry_config.clone(),
            registry_ca: self.registry_ca.clone(),
            certs_dir: self.certs_dir.clone().or_else(|| {
                let p = PathBuf::from("/etc/containerd/certs.d");
                p.is_dir().then_some(p)
            }),
            max_transfers: self.max_transfers as usize,
            chunk_size: self.chunk_size,
            request_timeout: std::time::Duration::from_secs(self.request_timeout),
            spool_dir: self.spool_dir.clone(),
            message: self.message.clone(),
            author: self.author.clone(),
            changes: crate::image::Changes::parse(&self.changes)
                .map_err(|e| UsageError(e.to_string()))?,
            process_config: self.process_config,
            chain: match (self.squash, self.max_layers) {
                (true, _) => crate::image::chain::Mode::Squash,
                (false, Some(n)) => crate::image::chain::Mode::MaxLayers(n as usize),
                (false, None) => crate::image::chain::Mode::Append,
            },
            result_file,
        })
    }
}

impl DiffArgs {
    pub fn plan(&self) -> Result<SourcePlan, UsageError> {
        self.layer.source_plan(&self.target)
    }
}

#[cfg(test)]
mod tests;
