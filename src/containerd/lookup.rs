//! Finding the sandbox container: by ID, or by the labels the Kubernetes CRI puts on containerd
//! containers; and what we need of it (image, snapshotter, snapshot key, runtime, mount stubs).

use super::task::TaskStatus;
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
    /// The runtime options' type URL and, for the runc shim, its `BinaryName` ("" = runc).
    pub runtime_options: Option<(String, String)>,
    /// Mount destinations from the OCI runtime spec (e.g. /etc/hosts); their stubs are left out.
    pub mount_destinations: Vec<String>,
    /// The container's labels (the CRI's io.kubernetes.* ones name its pod).
    pub labels: std::collections::HashMap<String, String>,
    /// The OCI runtime spec as containerd holds it (JSON), for recording the process config.
    pub spec: Vec<u8>,
    /// The config digest of the image the CRI created it from (its `ImageRef`, the image ID),
    /// when the CRI recorded one: the base's config must be that one, not only its layers.
    pub image_config: Option<crate::digest::Digest>,
}

/// A pod's container is kept by the kubelet after it exits, and a restart adds a new one with
/// the same name: the instance to commit is the one whose task runs (or is paused), and of
/// those the latest attempt (restart count), then the newest. An error when none runs, or when
/// the running ones have different names (pass --container-name).
fn pick_instance(
    pod: String,
    instances: Vec<(Container, TaskStatus)>,
) -> Result<Container, ContainerdError> {
    let live = |s: &TaskStatus| {
        matches!(
            s,
            TaskStatus::Running | TaskStatus::Paused | TaskStatus::Pausing
        )
    };
    let describe = |list: &[(Container, TaskStatus)]| {
        let mut v: Vec<String> = list
            .iter()
            .map(|(c, s)| {
                format!(
                    "{} (id {}, attempt {}, task {s:?})",
                    c.labels[LABEL_CONTAINER_NAME],
                    c.id,
                    attempt(c)
                )
            })
            .collect();
        v.sort();
        v.join(", ")
    };
    let (running, stopped): (Vec<_>, Vec<_>) = instances.into_iter().partition(|(_, s)| live(s));
    if running.is_empty() {
        return Err(ContainerdError::PodNotRunning {
            pod,
            instances: describe(&stopped),
        });
    }
    let first = &running[0].0.labels[LABEL_CONTAINER_NAME];
    if running
        .iter()
        .any(|(c, _)| &c.labels[LABEL_CONTAINER_NAME] != first)
    {
        return Err(ContainerdError::AmbiguousPod {
            pod,
            count: running.len(),
            candidates: describe(&running),
        });
    }
    let (chosen, _) = running
        .into_iter()
        .max_by_key(|(c, _)| {
            let created = c.created_at.as_ref().map(|t| (t.seconds, t.nanos));
            (attempt(c), created)
        })
        .expect("not empty");
    if !stopped.is_empty() {
        crate::log::info(&format!(
            "pod {pod}: committing the running instance {} (attempt {}); exited: {}",
            chosen.id,
            attempt(&chosen),
            describe(&stopped)
        ));
    }
    Ok(chosen)
}

/// The kubelet's restart count of a CRI container: the CRI plugin keeps it as the `attempt` of
/// its container metadata extension; the kubelet also sets it as an annotation (in the spec when
/// the runtime passes annotations through) — and a label of that name is honoured too.
fn attempt(c: &Container) -> u64 {
    const RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
    let from_metadata = c
        .extensions
        .get("io.cri-containerd.container.metadata")
        .and_then(|any| serde_json::from_slice::<serde_json::Value>(&any.value).ok())
        .and_then(|v| v.pointer("/Metadata/Config/metadata/attempt")?.as_u64());
    let from_spec = c
        .spec
        .as_ref()
        .and_then(|any| serde_json::from_slice::<serde_json::Value>(&any.value).ok())
        .and_then(|v| {
            v.pointer("/annotations")?
                .get(RESTART_COUNT)?
                .as_str()?
                .parse()
                .ok()
        });
    let from_label = c.labels.get(RESTART_COUNT).and_then(|v| v.parse().ok());
    from_metadata.or(from_spec).or(from_label).unwrap_or(0)
}

/// The image ID (config digest) the CRI plugin recorded in its container metadata extension.
fn cri_image_ref(c: &Container) -> Option<crate::digest::Digest> {
    c.extensions
        .get("io.cri-containerd.container.metadata")
        .and_then(|any| serde_json::from_slice::<serde_json::Value>(&any.value).ok())
        .and_then(|v| v.pointer("/Metadata/ImageRef")?.as_str()?.parse().ok())
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
        let candidates: Vec<Container> = list
            .into_iter()
            .filter(|c| c.labels.contains_key(LABEL_CONTAINER_NAME))
            .collect();
        if candidates.is_empty() {
            return Err(ContainerdError::PodNotFound {
                pod,
                detail: match container_name {
                    Some(c) => format!("named {c:?}"),
                    None => "(no container with the io.kubernetes.* labels)".into(),
                },
                namespace: self.namespace.clone(),
            });
        }
        let mut instances = Vec::with_capacity(candidates.len());
        for c in candidates {
            let status = self.task_status(&c.id).await?;
            instances.push((c, status));
        }
        pick_instance(pod, instances)
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
    let image_config = cri_image_ref(&c);
    Ok(ContainerInfo {
        image_config,
        id: c.id,
        image: c.image,
        snapshotter: c.snapshotter,
        snapshot_key: c.snapshot_key,
        runtime_options: c
            .runtime
            .as_ref()
            .and_then(|r| r.options.as_ref())
            .map(|o| {
                (
                    o.type_url.clone(),
                    runc_binary_name(&o.value).unwrap_or_default(),
                )
            }),
        runtime: c.runtime.map(|r| r.name).unwrap_or_default(),
        mount_destinations,
        labels: c.labels.into_iter().collect(),
        spec: c.spec.map(|any| any.value).unwrap_or_default(),
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

/// Shims whose containers' root filesystem is the host snapshot we read.
const HOST_ROOTFS_SHIMS: &[&str] = &["io.containerd.runc.v2", "io.containerd.runc.v1"];
/// OCI runtimes the runc shim may run (`BinaryName`) that use the rootfs it is given, as is.
const HOST_ROOTFS_BINARIES: &[&str] = &["runc", "crun", "youki"];
/// The runc shim's options type (containerd/api/types/runc/options/oci.proto).
const RUNC_OPTIONS: &str = "containerd.runc.v1.Options";

/// A runtime we cannot commit truthfully: its writes may live off the host snapshot.
#[derive(Debug, thiserror::Error)]
#[error("container {id:?} runs on {what}, which is not known to keep the container's writes in the host snapshot (allowed: the runc shim running {allowed}); committing it could silently miss them — commit it from inside the sandbox instead")]
pub struct RuntimeRefused {
    pub id: String,
    pub what: String,
    pub allowed: String,
}

/// Allows only runtimes whose rootfs is the host snapshot: the runc shim (v1/v2) running runc,
/// crun or youki. A deny-list of names misses the runc shim told to run `runsc` by its options
/// (`BinaryName`), and every VM runtime not on it.
pub fn check_runtime(info: &ContainerInfo) -> Result<(), RuntimeRefused> {
    let refuse = |what: String| RuntimeRefused {
        id: info.id.clone(),
        what,
        allowed: HOST_ROOTFS_BINARIES.join(", "),
    };
    if !HOST_ROOTFS_SHIMS.contains(&info.runtime.as_str()) {
        return Err(refuse(format!("runtime {:?}", info.runtime)));
    }
    let Some((type_url, binary)) = &info.runtime_options else {
        return Ok(());
    };
    if type_url.rsplit('/').next() != Some(RUNC_OPTIONS) {
        return Err(refuse(format!(
            "runtime {:?} with options of type {type_url:?}",
            info.runtime
        )));
    }
    let base = binary.rsplit('/').next().unwrap_or_default();
    if binary.is_empty() || HOST_ROOTFS_BINARIES.contains(&base) {
        return Ok(());
    }
    Err(refuse(format!(
        "runtime {:?} with BinaryName {binary:?}",
        info.runtime
    )))
}

/// `binary_name` (field 6, a string) of an encoded runc `Options` message; None when the
/// bytes are not a well-formed message.
fn runc_binary_name(mut b: &[u8]) -> Option<String> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut name = String::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let skip = match key & 7 {
            0 => {
                varint(&mut b)?;
                0
            }
            1 => 8,
            2 => {
                let len = usize::try_from(varint(&mut b)?).ok()?;
                if key >> 3 == 6 {
                    name = String::from_utf8(b.get(..len)?.to_vec()).ok()?;
                }
                len
            }
            5 => 4,
            _ => return None,
        };
        b = b.get(skip..)?;
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(runtime: &str, options: Option<(&str, &str)>) -> ContainerInfo {
        ContainerInfo {
            id: "c".into(),
            image: "i".into(),
            snapshotter: "overlayfs".into(),
            snapshot_key: "c".into(),
            runtime: runtime.into(),
            runtime_options: options.map(|(t, b)| (t.into(), b.into())),
            mount_destinations: vec![],
            labels: Default::default(),
            spec: vec![],
            image_config: None,
        }
    }

    #[test]
    fn only_the_runc_shim_running_a_host_rootfs_runtime_is_allowed() {
        let opts = "containerd.runc.v1.Options";
        assert!(check_runtime(&info("io.containerd.runc.v2", None)).is_ok());
        assert!(check_runtime(&info("io.containerd.runc.v2", Some((opts, "")))).is_ok());
        assert!(check_runtime(&info(
            "io.containerd.runc.v2",
            Some((opts, "/usr/bin/crun"))
        ))
        .is_ok());
        assert!(check_runtime(&info("io.containerd.runc.v2", Some((opts, "youki")))).is_ok());
        let e = check_runtime(&info(
            "io.containerd.runc.v2",
            Some((opts, "/usr/bin/runsc")),
        ));
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("BinaryName \"/usr/bin/runsc\""));
        assert!(check_runtime(&info("io.containerd.runsc.v1", None)).is_err());
        assert!(check_runtime(&info("io.containerd.kata.v2", None)).is_err());
        assert!(
            check_runtime(&info("io.containerd.runc.v2", Some(("other.Options", "")))).is_err()
        );
    }

    #[test]
    fn binary_name_is_read_from_encoded_runc_options() {
        // no_pivot_root=true (1: varint), binary_name="crun" (6), root="/r" (7)
        let bytes = [
            0x08, 0x01, 0x32, 4, b'c', b'r', b'u', b'n', 0x3a, 2, b'/', b'r',
        ];
        assert_eq!(runc_binary_name(&bytes).as_deref(), Some("crun"));
        assert_eq!(runc_binary_name(&[]).as_deref(), Some(""));
        assert_eq!(runc_binary_name(&[0x32, 9, b'x']), None);
    }
}
