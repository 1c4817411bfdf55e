//! Finding the sandbox container: by ID, or by the labels the Kubernetes CRI puts on containerd
//! containers; and what we need of it (image, snapshotter, snapshot key, runtime, mount stubs).

use super::{Containerd, ContainerdError};
use containerd_client::services::v1::snapshots::MountsRequest;
use containerd_client::services::v1::{Container, GetContainerRequest, ListContainersRequest};

pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";

/// Which container to commit.
#[derive(Debug, Clone)]
pub enum Selector {
    Id(String),
    Pod {
        namespace: String,
        name: String,
        container: Option<String>,
    },
}

/// The facts about the container the rest of the pipeline needs.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub id: String,
    pub image: String,
    pub snapshotter: String,
    pub snapshot_key: String,
    pub runtime: String,
    /// Mount destinations from the OCI runtime spec (e.g. /etc/hosts); their stubs are left out.
    pub mount_destinations: Vec<String>,
}

/// One mount of the container's snapshot, as containerd describes it.
#[derive(Debug, Clone)]
pub struct SnapshotMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

impl Containerd {
    pub async fn find_container(&self, sel: &Selector) -> Result<ContainerInfo, ContainerdError> {
        let container = match sel {
            Selector::Id(id) => self.get_container(id).await?,
            Selector::Pod {
                namespace,
                name,
                container,
            } => {
                self.find_pod_container(namespace, name, container.as_deref())
                    .await?
            }
        };
        container_info(container)
    }

    async fn get_container(&self, id: &str) -> Result<Container, ContainerdError> {
        let resp = self
            .containers()
            .get(GetContainerRequest { id: id.to_string() })
            .await;
        match resp {
            Ok(r) => r
                .into_inner()
                .container
                .ok_or_else(|| ContainerdError::ContainerNotFound {
                    id: id.to_string(),
                    namespace: self.namespace.clone(),
                }),
            Err(s) if s.code() == tonic::Code::NotFound => self.container_by_prefix(id).await,
            Err(s) => Err(ContainerdError::rpc(format!("getting container {id:?}"), s)),
        }
    }

    /// A unique ID prefix, as nerdctl and crictl accept (`crictl ps` shows 13 characters).
    async fn container_by_prefix(&self, prefix: &str) -> Result<Container, ContainerdError> {
        let all = self
            .containers()
            .list(ListContainersRequest { filters: vec![] })
            .await
            .map_err(|s| ContainerdError::rpc("listing containers", s))?
            .into_inner()
            .containers;
        let mut hits: Vec<Container> = all
            .into_iter()
            .filter(|c| c.id.starts_with(prefix))
            .collect();
        match hits.len() {
            1 => Ok(hits.remove(0)),
            0 => Err(ContainerdError::ContainerNotFound {
                id: prefix.to_string(),
                namespace: self.namespace.clone(),
            }),
            _ => Err(ContainerdError::AmbiguousId {
                prefix: prefix.to_string(),
                candidates: hits
                    .iter()
                    .map(|c| c.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    async fn find_pod_container(
        &self,
        pod_ns: &str,
        pod_name: &str,
        container_name: Option<&str>,
    ) -> Result<Container, ContainerdError> {
        // containerd filter syntax: quoted values so names with dots or dashes match exactly.
        let mut filter = format!(
            "labels.\"{LABEL_POD_NAMESPACE}\"=={pod_ns},labels.\"{LABEL_POD_NAME}\"=={pod_name}"
        );
        if let Some(c) = container_name {
            filter.push_str(&format!(",labels.\"{LABEL_CONTAINER_NAME}\"=={c}"));
        }
        let pod = format!("{pod_ns}/{pod_name}");
        let list = self
            .containers()
            .list(ListContainersRequest {
                filters: vec![filter],
            })
            .await
            .map_err(|s| ContainerdError::rpc(format!("listing containers of pod {pod}"), s))?
            .into_inner()
            .containers;
        // The CRI also creates a sandbox ("pause") container per pod; it carries the pod labels
        // but no container name, and is never what a user wants to commit.
        let mut candidates: Vec<Container> = list
            .into_iter()
            .filter(|c| c.labels.contains_key(LABEL_CONTAINER_NAME))
            .collect();
        match candidates.len() {
            0 => Err(ContainerdError::PodNotFound {
                pod,
                detail: match container_name {
                    Some(c) => format!("named {c:?}"),
                    None => "(no container with the io.kubernetes.* labels)".into(),
                },
                namespace: self.namespace.clone(),
            }),
            1 => Ok(candidates.remove(0)),
            n => {
                let mut names: Vec<String> = candidates
                    .iter()
                    .map(|c| format!("{} (id {})", c.labels[LABEL_CONTAINER_NAME], c.id))
                    .collect();
                names.sort();
                Err(ContainerdError::AmbiguousPod {
                    pod,
                    count: n,
                    candidates: names.join(", "),
                })
            }
        }
    }

    /// The mounts containerd would use for the container's rootfs.
    pub async fn snapshot_mounts(
        &self,
        info: &ContainerInfo,
    ) -> Result<Vec<SnapshotMount>, ContainerdError> {
        let resp = self
            .snapshots()
            .mounts(MountsRequest {
                snapshotter: info.snapshotter.clone(),
                key: info.snapshot_key.clone(),
            })
            .await
            .map_err(|s| {
                ContainerdError::rpc(
                    format!("reading mounts of snapshot {:?}", info.snapshot_key),
                    s,
                )
            })?;
        Ok(resp
            .into_inner()
            .mounts
            .into_iter()
            .map(SnapshotMount::from)
            .collect())
    }
}

impl From<containerd_client::types::Mount> for SnapshotMount {
    fn from(m: containerd_client::types::Mount) -> Self {
        SnapshotMount {
            kind: m.r#type,
            source: m.source,
            options: m.options,
        }
    }
}

fn container_info(c: Container) -> Result<ContainerInfo, ContainerdError> {
    if c.snapshot_key.is_empty() || c.snapshotter.is_empty() {
        return Err(ContainerdError::Invalid {
            what: format!("container {:?}", c.id),
            detail: "has no snapshot (created without a rootfs snapshot); nothing to commit".into(),
        });
    }
    let mount_destinations = c
        .spec
        .as_ref()
        .and_then(|any| serde_json::from_slice::<serde_json::Value>(&any.value).ok())
        .and_then(|spec| {
            spec.get("mounts")?.as_array().map(|ms| {
                ms.iter()
                    .filter_map(|m| m.get("destination")?.as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default();
    Ok(ContainerInfo {
        id: c.id,
        image: c.image,
        snapshotter: c.snapshotter,
        snapshot_key: c.snapshot_key,
        runtime: c.runtime.map(|r| r.name).unwrap_or_default(),
        mount_destinations,
    })
}

impl Containerd {
    /// The parent snapshot's key, or None for a snapshot with no parent.
    pub async fn snapshot_parent(
        &self,
        snapshotter: &str,
        key: &str,
    ) -> Result<Option<String>, ContainerdError> {
        use containerd_client::services::v1::snapshots::StatSnapshotRequest;
        let info = self
            .snapshots()
            .stat(StatSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            })
            .await
            .map_err(|s| ContainerdError::rpc(format!("reading snapshot {key:?}"), s))?
            .into_inner()
            .info;
        Ok(info.map(|i| i.parent).filter(|p| !p.is_empty()))
    }

    /// A read-only view of a committed snapshot.
    pub async fn view_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
    ) -> Result<Vec<SnapshotMount>, ContainerdError> {
        use containerd_client::services::v1::snapshots::ViewSnapshotRequest;
        let resp = self
            .snapshots()
            .view(ViewSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
                parent: parent.to_string(),
                labels: Default::default(),
            })
            .await
            .map_err(|s| {
                ContainerdError::rpc(format!("creating a view of snapshot {parent:?}"), s)
            })?;
        Ok(resp
            .into_inner()
            .mounts
            .into_iter()
            .map(SnapshotMount::from)
            .collect())
    }

    pub async fn remove_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
    ) -> Result<(), ContainerdError> {
        use containerd_client::services::v1::snapshots::RemoveSnapshotRequest;
        self.snapshots()
            .remove(RemoveSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            })
            .await
            .map(|_| ())
            .map_err(|s| ContainerdError::rpc(format!("removing snapshot view {key:?}"), s))
    }
}
