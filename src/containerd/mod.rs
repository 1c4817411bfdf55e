//! The containerd side of a commit: a gRPC connection over the node's unix socket, with the
//! namespace (and, once taken, the lease) attached to every call as metadata, and a deadline on
//! connecting and on every call, so a containerd that accepts and never answers is named in an
//! error instead of hanging the commit (`deadline`).
//!
//! Sub-modules: `lookup` finds the container, `content` reads the base image from the content
//! store, `task` pauses and resumes the sandbox, `lease` keeps what we read from the GC.

pub mod content;
mod deadline;
pub mod differ;
pub mod lease;
pub mod lookup;
pub mod task;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use containerd_client::tonic::{self, metadata::MetadataValue, service::Interceptor};

/// Errors talking to containerd. Each names the thing asked for and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("containerd socket {path} does not exist: is containerd running on this node? pass --address or set CONTAINERD_ADDRESS")]
    SocketMissing { path: PathBuf },
    /// The path exists but is no usable socket: not a socket, connection refused, permission.
    #[error("cannot connect to containerd at {path}: {problem}")]
    SocketUnusable { path: PathBuf, problem: String },
    /// Connected, but containerd did not answer its first call in time.
    #[error("containerd at {path} did not answer within {secs} s: is it overloaded or stuck? check `ctr version` on the node")]
    NoAnswer { path: PathBuf, secs: u64 },
    /// A later call ran past its deadline (the message names the socket and the deadline).
    #[error("{what}: {message}")]
    CallTimedOut { what: String, message: String },
    #[error("{what}: containerd answered {code:?}: {message}")]
    Rpc {
        what: String,
        code: tonic::Code,
        message: String,
    },
    #[error("container {id:?} not found in containerd namespace {namespace:?}: check the ID with `ctr -n {namespace} containers ls` or pass --namespace")]
    ContainerNotFound { id: String, namespace: String },
    #[error("no container of pod {pod} {detail} in containerd namespace {namespace:?}")]
    PodNotFound {
        pod: String,
        detail: String,
        namespace: String,
    },
    #[error("no container of pod {pod} is running (instances: {instances}); start the pod again, or commit an instance by --container ID")]
    PodNotRunning { pod: String, instances: String },
    #[error("pod {pod} has {count} containers ({candidates}): pass --container-name to pick one")]
    AmbiguousPod {
        pod: String,
        count: usize,
        candidates: String,
    },
    #[error("container ID prefix {prefix:?} matches several containers ({candidates}): give more of the ID")]
    AmbiguousId { prefix: String, candidates: String },
    #[error("another commit of container {container:?} is in progress (it holds containerd lease {lease:?} until {until}); wait for it to finish, or delete the lease if that commit is dead: ctr leases rm {lease}")]
    Busy {
        container: String,
        lease: String,
        until: String,
    },
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },
    /// The base image's record, index, manifest or config cannot be built on: refused, as a
    /// malformed descriptor found later is (`ImageError`).
    #[error("base image {image:?}: {detail}")]
    MalformedBase { image: String, detail: String },
    #[error("container {container:?} was created from other layers than image {image:?} holds now: its snapshot's parent is {parent:?}, the image's layers chain to {image_chain}, and no image in containerd chains to the parent{config}; the tag was moved or the image removed — pull the image it was created from (by digest) and commit again")]
    BaseMismatch {
        container: String,
        image: String,
        image_chain: String,
        parent: String,
        /// "" or what else the base must match (the CRI's image ID).
        config: String,
    },
}

impl ContainerdError {
    pub fn rpc(what: impl Into<String>, status: tonic::Status) -> Self {
        if status.code() == tonic::Code::DeadlineExceeded {
            return ContainerdError::CallTimedOut {
                what: what.into(),
                message: status.message().to_string(),
            };
        }
        ContainerdError::Rpc {
            what: what.into(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// True when the thing asked for does not exist (maps to the "not found" exit code).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            ContainerdError::ContainerNotFound { .. }
                | ContainerdError::PodNotFound { .. }
                | ContainerdError::AmbiguousPod { .. }
                | ContainerdError::PodNotRunning { .. }
                | ContainerdError::AmbiguousId { .. }
                | ContainerdError::SocketMissing { .. }
                | ContainerdError::SocketUnusable { .. }
                | ContainerdError::NoAnswer { .. }
        ) || matches!(
            self,
            ContainerdError::Rpc {
                code: tonic::Code::NotFound,
                ..
            }
        )
    }
}

/// Adds `containerd-namespace` and, when set, `containerd-lease` to every request.
#[derive(Clone)]
pub struct Metadata {
    namespace: MetadataValue<tonic::metadata::Ascii>,
    lease: Arc<RwLock<Option<MetadataValue<tonic::metadata::Ascii>>>>,
}

impl Interceptor for Metadata {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let md = req.metadata_mut();
        md.insert("containerd-namespace", self.namespace.clone());
        if let Some(lease) = self.lease.read().expect("lease lock").clone() {
            md.insert("containerd-lease", lease);
        }
        Ok(req)
    }
}

type Intercepted = tonic::service::interceptor::InterceptedService<deadline::Deadlined, Metadata>;

/// One connection to containerd in one namespace. Cheap to clone.
#[derive(Clone)]
pub struct Containerd {
    channel: deadline::Deadlined,
    metadata: Metadata,
    pub namespace: String,
    pub address: PathBuf,
}

/// The socket path of a containerd address: a plain path or `unix://PATH` (the form containerd's
/// own tools print). Other schemes are refused: containerd's API is served on a unix socket.
pub fn socket_path(address: &str) -> Result<PathBuf, ContainerdError> {
    let path = match address.split_once("://") {
        None => address,
        Some(("unix", rest)) => rest,
        Some((scheme, _)) => {
            return Err(ContainerdError::Invalid {
                what: format!("--address {address:?}"),
                detail: format!("{scheme}:// is not supported: give the unix socket's path, like /run/containerd/containerd.sock"),
            })
        }
    };
    if path.is_empty() {
        return Err(ContainerdError::Invalid {
            what: format!("--address {address:?}"),
            detail: "no socket path".into(),
        });
    }
    Ok(PathBuf::from(path))
}

/// Refuses a path that is missing or no socket before connecting, with what to do.
fn check_socket(path: &Path) -> Result<(), ContainerdError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ContainerdError::SocketMissing {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(ContainerdError::SocketUnusable {
            path: path.to_path_buf(),
            problem: deadline::socket_problem(&e),
        }),
        Ok(m) if !m.file_type().is_socket() => Err(ContainerdError::SocketUnusable {
            path: path.to_path_buf(),
            problem: "it is not a socket: pass containerd's socket with --address (see `grpc.address` in its config)".into(),
        }),
        Ok(_) => Ok(()),
    }
}

impl Containerd {
    /// Connects to the socket at `address` (a path, or `unix://PATH` as containerd's tools print
    /// it) and checks that containerd answers, each within `deadline::CONNECT`.
    pub async fn connect(address: &Path, namespace: &str) -> Result<Self, ContainerdError> {
        check_socket(address)?;
        let ns = namespace.parse().map_err(|_| ContainerdError::Invalid {
            what: format!("namespace {namespace:?}"),
            detail: "not a valid gRPC metadata value".into(),
        })?;
        let channel = deadline::connect(address).await?;
        let ctr = Containerd {
            channel,
            metadata: Metadata {
                namespace: ns,
                lease: Arc::new(RwLock::new(None)),
            },
            namespace: namespace.to_string(),
            address: address.to_path_buf(),
        };
        ctr.probe().await?;
        Ok(ctr)
    }

    /// One cheap call (`Version`), so a socket that accepts but never answers fails here, named,
    /// rather than at the first real call.
    async fn probe(&self) -> Result<(), ContainerdError> {
        let mut client =
            containerd_client::services::v1::version_client::VersionClient::new(self.intercepted());
        match client.version(()).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::DeadlineExceeded => Err(ContainerdError::NoAnswer {
                path: self.address.clone(),
                secs: deadline::CONNECT.as_secs(),
            }),
            Err(s) => Err(ContainerdError::SocketUnusable {
                path: self.address.clone(),
                problem: format!("it does not speak containerd's API ({})", s.message()),
            }),
        }
    }

    /// From now on every call carries this lease, so what it creates or reads is protected.
    pub(crate) fn set_lease(&self, lease: Option<&str>) {
        *self.metadata.lease.write().expect("lease lock") = lease.and_then(|l| l.parse().ok());
    }

    fn intercepted(&self) -> Intercepted {
        tonic::service::interceptor::InterceptedService::new(
            self.channel.clone(),
            self.metadata.clone(),
        )
    }

    pub(crate) fn containers(
        &self,
    ) -> containerd_client::services::v1::containers_client::ContainersClient<Intercepted> {
        containerd_client::services::v1::containers_client::ContainersClient::new(
            self.intercepted(),
        )
    }
    pub(crate) fn images(
        &self,
    ) -> containerd_client::services::v1::images_client::ImagesClient<Intercepted> {
        containerd_client::services::v1::images_client::ImagesClient::new(self.intercepted())
    }
    pub(crate) fn content(
        &self,
    ) -> containerd_client::services::v1::content_client::ContentClient<Intercepted> {
        containerd_client::services::v1::content_client::ContentClient::new(self.intercepted())
            .max_decoding_message_size(16 << 20)
    }
    pub(crate) fn snapshots(
        &self,
    ) -> containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient<Intercepted>
    {
        containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient::new(
            self.intercepted(),
        )
    }
    pub(crate) fn tasks(
        &self,
    ) -> containerd_client::services::v1::tasks_client::TasksClient<Intercepted> {
        containerd_client::services::v1::tasks_client::TasksClient::new(self.intercepted())
    }
    pub(crate) fn leases(
        &self,
    ) -> containerd_client::services::v1::leases_client::LeasesClient<Intercepted> {
        containerd_client::services::v1::leases_client::LeasesClient::new(self.intercepted())
    }
}
