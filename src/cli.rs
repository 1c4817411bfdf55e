//! Command-line arguments, parsed once by clap into raw structs, then turned into a validated
//! `CommitPlan` (commit) or `SourcePlan` (diff) that the library runs. Nothing here touches the network or disk.

use crate::containerd::lookup::Selector;
use crate::image::Compression;
use crate::layer::CompressOptions;
use crate::registry::Reference;
use crate::source::DiffSourceChoice;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "committer",
    version,
    about = "Commit a running containerd container's filesystem to an OCI registry"
)]
pub struct Cli {
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
    Commit(CommitArgs),
    /// Write the container's diff as a layer blob to a local file and print its descriptor.
    Diff(DiffArgs),
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

#[derive(Args, Debug)]
pub struct Target {
    /// The containerd container ID to commit.
    #[arg(long, conflicts_with = "pod", required_unless_present = "pod")]
    pub container: Option<String>,
    /// The Kubernetes pod as NAMESPACE/NAME (found by its CRI labels).
    #[arg(long)]
    pub pod: Option<String>,
    /// With --pod: the container's name in the pod (needed when the pod has several).
    #[arg(long, requires = "pod")]
    pub container_name: Option<String>,
    /// containerd socket.
    #[arg(
        long,
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub address: PathBuf,
    /// containerd namespace (Kubernetes uses k8s.io).
    #[arg(long, env = "CONTAINERD_NAMESPACE", default_value = "k8s.io")]
    pub namespace: String,
}

#[derive(Args, Debug)]
pub struct LayerArgs {
    /// Layer compression.
    #[arg(long, value_enum, default_value = "gzip")]
    pub compression: CompressionArg,
    /// Compression level (gzip 0-9, default 6; zstd 1-19, default 3).
    #[arg(long)]
    pub compression_level: Option<i32>,
    /// Compression threads (default: all cores).
    #[arg(long)]
    pub threads: Option<u32>,
    /// Where the diff is read from: auto picks the overlay upperdir when it is exact, else a walk.
    #[arg(long, value_enum, default_value = "auto")]
    pub diff_source: DiffSourceArg,
    /// Leave this path out of the layer (repeatable); what the base has there stays as it was.
    #[arg(long = "exclude", value_name = "PATH")]
    pub exclude: Vec<String>,
    /// Clamp file mtimes newer than this Unix time (reproducible layers).
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    pub source_date_epoch: Option<i64>,
    /// Fail if the uncompressed layer would exceed this many bytes.
    #[arg(long)]
    pub max_layer_bytes: Option<u64>,
    /// Fail if the layer would hold more than this many entries.
    #[arg(long)]
    pub max_files: Option<u64>,
    /// Do not pause the container while its filesystem is read (the layer may be inconsistent).
    #[arg(long)]
    pub no_pause: bool,
}

#[derive(Args, Debug)]
pub struct CommitArgs {
    #[command(flatten)]
    pub target: Target,
    /// Where to push: REGISTRY/REPOSITORY[:TAG] (default tag: latest).
    #[arg(long)]
    pub image: String,
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
    /// Upload in ranged chunks of this many bytes instead of one streamed PATCH per blob.
    #[arg(long, value_parser = clap::value_parser!(u64).range(65536..))]
    pub chunk_size: Option<u64>,
    /// Seconds a registry request may take, and a transfer may go without progress.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub request_timeout: u64,
    /// Directory for the compressed layer while it uploads (default: the system temp dir).
    #[arg(long)]
    pub spool_dir: Option<PathBuf>,
    /// Comment recorded in the image history.
    #[arg(long, default_value = "committed by committer")]
    pub message: String,
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
    /// File to write the layer blob to.
    #[arg(long)]
    pub output: PathBuf,
}

/// A usage error: one line naming the flag and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// What to read and how to build the layer.
#[derive(Debug, Clone)]
pub struct SourcePlan {
    pub address: PathBuf,
    pub namespace: String,
    pub selector: Selector,
    pub compress: CompressOptions,
    pub diff_source: DiffSourceChoice,
    pub exclude: Vec<String>,
    pub source_date_epoch: Option<i64>,
    pub max_layer_bytes: Option<u64>,
    pub max_files: Option<u64>,
    pub pause: bool,
}

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
    pub result_file: Option<PathBuf>,
}

impl Target {
    fn selector(&self) -> Result<Selector, UsageError> {
        if let Some(id) = &self.container {
            if id.is_empty() {
                return Err(UsageError("--container: empty container ID".into()));
            }
            return Ok(Selector::Id(id.clone()));
        }
        let pod = self.pod.as_deref().unwrap_or_default();
        match pod.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Selector::Pod {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    container: self.container_name.clone(),
                })
            }
            _ => Err(UsageError(format!(
                "--pod {pod:?}: expected NAMESPACE/NAME, e.g. --pod default/my-sandbox"
            ))),
        }
    }
}

impl LayerArgs {
    fn source_plan(&self, target: &Target) -> Result<SourcePlan, UsageError> {
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
        let threads = match self.threads {
            Some(0) => return Err(UsageError("--threads 0: give at least 1".into())),
            Some(n) => n,
            None => std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
        };
        for e in &self.exclude {
            if !e.starts_with('/') {
                return Err(UsageError(format!(
                    "--exclude {e:?}: give an absolute path inside the container, like /tmp/cache"
                )));
            }
        }
        Ok(SourcePlan {
            address: target.address.clone(),
            namespace: target.namespace.clone(),
            selector: target.selector()?,
            compress: CompressOptions {
                compression,
                level: self.compression_level,
                threads,
            },
            diff_source: self.diff_source.into(),
            exclude: self.exclude.clone(),
            source_date_epoch: self.source_date_epoch,
            max_layer_bytes: self.max_layer_bytes,
            max_files: self.max_files,
            pause: !self.no_pause,
        })
    }
}

impl CommitArgs {
    pub fn plan(&self) -> Result<CommitPlan, UsageError> {
        let image: Reference = self
            .image
            .parse()
            .map_err(|e| UsageError(format!("--image: {e}")))?;
        if image.digest.is_some() {
            return Err(UsageError(format!(
                "--image {:?}: give a tag, not a digest — the digest of the new image is only known once it is built",
                self.image
            )));
        }
        for t in &self.tags {
            let valid = !t.is_empty()
                && t.len() <= 128
                && t.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !valid {
                return Err(UsageError(format!(
                    "--tag {t:?}: a tag is 1-128 of [A-Za-z0-9_.-], not starting with . or -"
                )));
            }
        }
        let result_file = self.result_file.clone().or_else(|| {
            let p = PathBuf::from("/dev/termination-log");
            p.exists().then_some(p)
        });
        Ok(CommitPlan {
            source: self.layer.source_plan(&self.target)?,
            image,
            extra_tags: self.tags.clone(),
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
            result_file,
        })
    }
}

impl DiffArgs {
    pub fn plan(&self) -> Result<SourcePlan, UsageError> {
        self.layer.source_plan(&self.target)
    }
}
