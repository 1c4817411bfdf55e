//! Pods made the way the kubelet makes them: through containerd's CRI plugin (RunPodSandbox → CreateContainer →
//! StartContainer, a restart being a second container with attempt 1 after the first exited), on a lab configured
//! like a kind node (and like EKS AL2023: `discard_unpacked_layers`, certs.d `config_path`), then committed with
//! `--pod` and compared with the sandbox.
//!
//! The CRI client is `k8s-cri`'s generated tonic client over the lab's containerd socket.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use serde_json::Value;
use tonic::transport::Channel;

use crate::lab::{check, describe, Lab};
use crate::tree::{self, CompareOpts};

/// The namespace the CRI plugin keeps Kubernetes' containers and images in.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// A CRI client on one lab, with the pods it made.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    cgroup_parent: String,
}

/// A pod sandbox made by `Cri::run_pod`: its ID and the config every CreateContainer of the pod repeats.
pub struct Pod {
    pub id: String,
    pub config: cri::PodSandboxConfig,
}

impl Cri {
    pub fn connect(lab: &Lab) -> Cri {
        Cri::connect_socket(&lab.address, &lab.cgroup_parent)
    }

    /// A CRI client on any containerd socket; pods get cgroups below `cgroup_parent`.
    pub fn connect_socket(address: &Path, cgroup_parent: &str) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let channel = rt
            .block_on(containerd_client::connect(address))
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", address.display()));
        Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            cgroup_parent: cgroup_parent.to_string(),
            rt,
        }
    }

    /// PullImage, as the kubelet does before CreateContainer; returns the image ID (config digest).
    pub fn pull(&mut self, image: &str) -> String {
        let req = cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let resp = self.rt.block_on(self.images.pull_image(req));
        resp.unwrap_or_else(|e| panic!("CRI PullImage {image}: {e}"))
            .into_inner()
            .image_ref
    }

    /// RunPodSandbox with the node's network (no CNI here) and no hostname (the CRI refuses a hostname with
    /// the host network), in a cgroup below the lab's so that `lab.sh stop` finds its processes.
    pub fn run_pod(&mut self, namespace: &str, name: &str) -> Pod {
        let uid = format!("uid-{namespace}-{name}");
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                namespace: namespace.into(),
                uid: uid.clone(),
                attempt: 0,
            }),
            // The kubelet's pod labels (pkg/kubelet/kuberuntime/labels.go, newPodLabels): the pod's own
            // labels plus these three. containerd adds only io.cri-containerd.kind.
            labels: HashMap::from([
                ("app".to_string(), name.to_string()),
                ("io.kubernetes.pod.name".to_string(), name.to_string()),
                (
                    "io.kubernetes.pod.namespace".to_string(),
                    namespace.to_string(),
                ),
                ("io.kubernetes.pod.uid".to_string(), uid.clone()),
            ]),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: format!("{}/pod-{uid}", self.cgroup_parent),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let resp = self.rt.block_on(self.runtime.run_pod_sandbox(req));
        let id = resp
            .unwrap_or_else(|e| panic!("CRI RunPodSandbox {namespace}/{name}: {e}"))
            .into_inner()
            .pod_sandbox_id;
        Pod { id, config }
    }

    /// CreateContainer + StartContainer of `image` running `command` as container `name` (restart `attempt`).
    pub fn start_container(
        &mut self,
        pod: &Pod,
        name: &str,
        attempt: u32,
        image: &str,
        command: &[&str],
    ) -> String {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt,
            }),
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            labels: kubelet_container_labels(&pod.config, name),
            // newContainerAnnotations: the restart count is an annotation, the attempt is in the metadata.
            annotations: HashMap::from([
                (
                    "io.kubernetes.container.restartCount".to_string(),
                    attempt.to_string(),
                ),
                (
                    "io.kubernetes.container.terminationMessagePolicy".to_string(),
                    "File".to_string(),
                ),
            ]),
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        };
        self.create_and_start(pod, config)
    }

    /// CreateContainer + StartContainer of a container made as the kubelet makes `config`.
    pub fn create_and_start(&mut self, pod: &Pod, config: cri::ContainerConfig) -> String {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        let resp = self.rt.block_on(self.runtime.create_container(req));
        let id = resp
            .unwrap_or_else(|e| panic!("CRI CreateContainer {name}: {e}"))
            .into_inner()
            .container_id;
        let req = cri::StartContainerRequest {
            container_id: id.clone(),
        };
        let resp = self.rt.block_on(self.runtime.start_container(req));
        resp.unwrap_or_else(|e| panic!("CRI StartContainer {name} ({id}): {e}"));
        id
    }

    /// ExecSync of `sh -c script` (as `kubectl exec` would run it); panics unless it exits 0; returns stdout.
    pub fn exec_sync(&mut self, id: &str, script: &str) -> String {
        let req = cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 60,
        };
        let resp = self.rt.block_on(self.runtime.exec_sync(req));
        let r = resp
            .unwrap_or_else(|e| panic!("CRI ExecSync in {id}: {e}"))
            .into_inner();
        assert_eq!(
            r.exit_code,
            0,
            "{script:?} in {id}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        String::from_utf8_lossy(&r.stdout).into_owned()
    }

    /// The container's CRI state (CONTAINER_RUNNING, CONTAINER_EXITED…).
    pub fn state(&mut self, id: &str) -> cri::ContainerState {
        let req = cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let resp = self.rt.block_on(self.runtime.container_status(req));
        let status = resp
            .unwrap_or_else(|e| panic!("CRI ContainerStatus {id}: {e}"))
            .into_inner()
            .status
            .expect("ContainerStatus without a status");
        cri::ContainerState::try_from(status.state).unwrap()
    }

    pub fn wait_state(&mut self, id: &str, want: cri::ContainerState) {
        let start = Instant::now();
        while self.state(id) != want {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "container {id} is {:?}, not {want:?} after 30 s",
                self.state(id)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The kubelet's container labels (labels.go, newContainerLabels): the pod's identity and the container's name.
pub fn kubelet_container_labels(
    pod: &cri::PodSandboxConfig,
    name: &str,
) -> HashMap<String, String> {
    let m = pod.metadata.as_ref().expect("pod metadata");
    HashMap::from([
        ("io.kubernetes.container.name".to_string(), name.to_string()),
        ("io.kubernetes.pod.name".to_string(), m.name.clone()),
        (
            "io.kubernetes.pod.namespace".to_string(),
            m.namespace.clone(),
        ),
        ("io.kubernetes.pod.uid".to_string(), m.uid.clone()),
    ])
}

/// A lab whose containerd runs the CRI plugin (`mode`: "default" or "kind"), working in namespace k8s.io.
pub fn cri_lab(mode: &str) -> Lab {
    let mut lab = Lab::start_with(&["--cri", mode]);
    lab.namespace = CRI_NAMESPACE.to_string();
    lab
}

/// The lab's base image pushed to its registry but not pulled by containerd: the CRI pulls it itself.
pub fn push_base(lab: &Lab, name: &str) -> String {
    lab.base_image_push_only(name)
}

fn run_json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "committer failed ({}):\n{}",
        out.status,
        describe(out)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("result is not JSON ({e}):\n{}", describe(out)))
}

/// Digests of the blobs in containerd's content store (namespace k8s.io).
fn content_digests(lab: &Lab) -> Vec<String> {
    lab.ctr(&["content", "ls", "-q"])
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The layer digests of `image`'s manifest in `registry`.
fn registry_layers(registry: &str, repo: &str, tag: &str) -> Vec<String> {
    let url = format!("http://{registry}/v2/{repo}/manifests/{tag}");
    let accept = "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let body = check(Command::new("curl").args(["-sf", "-H", accept, &url]));
    let m: Value = serde_json::from_str(&body).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// What every CRI test does to the app container: the same changes as the lab's other e2e tests.
const CHANGES: &str = "echo changed > /data/modify.txt; rm /data/delete.txt; rm -r /data/dir-to-delete; \
                       mkdir -p /data/new/sub; echo hi > /data/new/sub/f; ln -s ../keep.txt /data/new/link; \
                       chmod 0600 /data/keep.txt";

fn assert_image_equals_sandbox(lab: &Lab, container: &str, image: &str) {
    let unpacked = lab.pull_unpack(image);
    let opts = CompareOpts {
        hardlinks: true,
        ..CompareOpts::container_rootfs()
    };
    tree::assert_same_trees(&lab.rootfs(container), &unpacked, &opts);
}

/// A kind/EKS node: the base layers were discarded after unpacking, so the commit must fetch them from the base's
/// registry to push them to another one; found by `--pod`, read from the upperdir, equal to the sandbox.
#[test]
fn cri_pod_on_a_kind_node_commits_by_pod_to_another_registry_equal_to_the_sandbox() {
    // It asserts the upperdir source: no other test may flip redirect_dir/metacopy meanwhile.
    let _defaults = crate::lab::overlay_defaults();
    let lab = cri_lab("kind");
    let base = push_base(&lab, "sandbox/base");
    let mut cri = Cri::connect(&lab);
    cri.pull(&base);
    let base_layers = registry_layers(&lab.registry, "sandbox/base", "1");
    // The discarded blobs lose their GC references at the pull; a node's scheduled garbage collection removes
    // them later. A lease deleted with --sync runs that collection now.
    let lease = lab.ctr(&["leases", "create"]);
    let lease = lease
        .split_whitespace()
        .next()
        .expect("ctr leases create prints the ID");
    lab.ctr(&["leases", "delete", "--sync", lease]);
    let held = content_digests(&lab);
    for l in &base_layers {
        assert!(
            !held.contains(l),
            "discard_unpacked_layers kept layer {l}: {held:?}"
        );
    }

    let pod = cri.run_pod("shop", "web-0");
    let app = cri.start_container(&pod, "app", 0, &base, &["sleep", "1000000"]);
    lab.exec(&app, CHANGES);

    let other = crate::lab::Registry::start(&lab.dir.join("registry-2"));
    let target = format!("{}/snaps/web-0:1", other.address);
    let t = Instant::now();
    let result = run_json(&lab.committer(&[
        "commit",
        "--pod",
        "shop/web-0",
        "--image",
        &target,
        "--plain-http",
    ]));
    eprintln!("commit of a CRI pod on a kind-like node: {:?}", t.elapsed());
    assert_eq!(result["container"], app.as_str(), "{result}");
    assert_eq!(result["diffSource"], "upperdir", "{result}");
    let pushed = registry_layers(&other.address, "snaps/web-0", "1");
    assert_eq!(pushed[..base_layers.len()], base_layers[..], "{result}");
    assert_image_equals_sandbox(&lab, &app, &target);
}

/// containerd's own CRI defaults (layers kept), a pod with two containers: `--pod` alone is refused naming both,
/// `--container-name` picks one (never the pause sandbox), read from its upperdir, and the image equals it.
#[test]
fn cri_pod_with_two_containers_commits_the_named_one_equal_to_the_sandbox() {
    // It asserts the upperdir source: no other test may flip redirect_dir/metacopy meanwhile.
    let _defaults = crate::lab::overlay_defaults();
    let lab = cri_lab("default");
    let base = push_base(&lab, "sandbox/base");
    let mut cri = Cri::connect(&lab);
    cri.pull(&base);
    let pod = cri.run_pod("shop", "api-0");
    let app = cri.start_container(&pod, "app", 0, &base, &["sleep", "1000000"]);
    let sidecar = cri.start_container(&pod, "sidecar", 0, &base, &["sleep", "1000000"]);
    cri.exec_sync(&app, CHANGES);
    cri.exec_sync(&sidecar, "echo sidecar > /data/sidecar-only");

    let target = format!("{}/snaps/api-0:1", lab.registry);
    let alone = lab.committer(&[
        "commit",
        "--pod",
        "shop/api-0",
        "--image",
        &target,
        "--plain-http",
    ]);
    let stderr = String::from_utf8_lossy(&alone.stderr);
    assert_eq!(alone.status.code(), Some(3), "{}", describe(&alone));
    assert!(
        stderr.contains("app") && stderr.contains("sidecar"),
        "{stderr}"
    );

    let result = run_json(&lab.committer(&[
        "commit",
        "--pod",
        "shop/api-0",
        "--container-name",
        "app",
        "--image",
        &target,
        "--plain-http",
    ]));
    assert_eq!(result["container"], app.as_str(), "{result}");
    assert_eq!(result["diffSource"], "upperdir", "{result}");
    assert_image_equals_sandbox(&lab, &app, &target);
}

/// containerd's own CRI defaults (layers kept): a restarted container leaves its exited first instance behind, and
/// `--pod` commits the running second one.
#[test]
fn cri_restarted_container_commits_the_running_instance_not_the_exited_one() {
    let lab = cri_lab("default");
    let base = push_base(&lab, "sandbox/base");
    let mut cri = Cri::connect(&lab);
    cri.pull(&base);
    let pod = cri.run_pod("shop", "worker-0");
    let first = cri.start_container(
        &pod,
        "app",
        0,
        &base,
        &["sh", "-c", "echo first > /data/first-run; exit 3"],
    );
    cri.wait_state(&first, cri::ContainerState::ContainerExited);
    let second = cri.start_container(&pod, "app", 1, &base, &["sleep", "1000000"]);
    lab.exec(&second, CHANGES);

    let target = format!("{}/snaps/worker-0:1", lab.registry);
    let result = run_json(&lab.committer(&[
        "commit",
        "--pod",
        "shop/worker-0",
        "--image",
        &target,
        "--plain-http",
    ]));
    assert_eq!(result["container"], second.as_str(), "{result}");
    assert_image_equals_sandbox(&lab, &second, &target);
    let unpacked = lab.pull_unpack(&target);
    assert!(
        !unpacked.join("data/first-run").exists(),
        "the exited first instance's file is in the image"
    );
}
