//! The Kubernetes side of the field: the commit Job template's filler (deploy/fill-commit-job.sh) accepts only
//! values its grammar allows, so a user-influenced value cannot add YAML to the privileged Job; and
//! scripts/kind-commit.sh run for real against a kind-style node, its result pulled back and run by Docker.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cri::Cri;
use crate::docker::Docker;
use crate::lab::{check, describe, run, Lab};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Valid values for every placeholder, as a controller would pass them.
fn good_values() -> Vec<(&'static str, String)> {
    vec![
        ("JOB_NAME", "commit-web-0-1".into()),
        ("JOB_NAMESPACE", "committer".into()),
        ("NODE", "ip-10-0-1-2.eu-west-1.compute.internal".into()),
        ("POD_NAMESPACE", "shop".into()),
        ("POD_NAME", "web-0".into()),
        ("CONTAINER_NAME", "app".into()),
        ("TARGET", "registry.example:5000/snaps/web-0:snap-1".into()),
        (
            "COMMITTER_IMAGE",
            "registry.example/platform/committer".into(),
        ),
        ("IMAGE_DIGEST", format!("sha256:{}", "ab".repeat(32))),
        ("PUSH_SECRET", "push-creds".into()),
    ]
}

fn fill(values: &[(&str, String)]) -> std::process::Output {
    let mut cmd = Command::new(repo_root().join("deploy/fill-commit-job.sh"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap());
    for (k, v) in values {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

fn with(key: &str, value: &str) -> Vec<(&'static str, String)> {
    let mut v = good_values();
    v.iter_mut().find(|(k, _)| *k == key).unwrap().1 = value.to_string();
    v
}

#[test]
fn job_filler_puts_each_valid_value_in_its_place() {
    let out = fill(&good_values());
    assert!(out.status.success(), "{}", describe(&out));
    let job = String::from_utf8(out.stdout).unwrap();
    for line in [
        "  name: commit-web-0-1\n",
        "      nodeName: ip-10-0-1-2.eu-west-1.compute.internal\n",
        "            - shop/web-0\n",
        "            - registry.example:5000/snaps/web-0:snap-1\n",
        "          image: registry.example/platform/committer@sha256:abab",
        "            secretName: push-creds\n",
    ] {
        assert!(job.contains(line), "{line:?} not in the filled Job:\n{job}");
    }
    let yaml: Vec<&str> = job
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(
        yaml.iter().all(|l| !l.contains("${")),
        "a placeholder was left:\n{job}"
    );
}

#[test]
fn job_filler_rejects_a_newline_that_would_inject_yaml() {
    // Each would add a `command:` (or another key) to the privileged container if pasted textually.
    let cases = [
        (
            "TARGET",
            "registry.example/snaps/x:1\n          command: [\"/bin/sh\"]",
        ),
        ("POD_NAME", "web-0\n          command: [\"/bin/sh\"]"),
        ("NODE", "node-1\n      hostPID: true"),
        ("CONTAINER_NAME", "app\r\n            - --x"),
        ("TARGET", "registry.example/snaps/x:1 # comment"),
        ("POD_NAME", "web: 0"),
        ("JOB_NAME", "Commit"),
        ("TARGET", "snaps/x:1"),
        ("TARGET", "registry.example/snaps/x@sha256:00"),
        ("IMAGE_DIGEST", "latest"),
        ("COMMITTER_IMAGE", "registry.example/platform/committer:1"),
        ("PUSH_SECRET", ""),
    ];
    for (key, value) in cases {
        let out = fill(&with(key, value));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{key}={value:?}: {}",
            describe(&out)
        );
        assert!(out.stdout.is_empty(), "{key}={value:?} printed a Job");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{key}={value:?}: not one line: {stderr}"
        );
        assert!(stderr.contains(key), "{key}={value:?}: {stderr}");
    }
    let mut missing = good_values();
    missing.retain(|(k, _)| *k != "NODE");
    let out = fill(&missing);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NODE is not set"));
}

/// A kind-style node: a privileged container of a private Docker Engine running containerd with kind's CRI settings
/// (discard_unpacked_layers, certs.d config_path, overlayfs on a volume at /var/lib/containerd as kind mounts
/// /var). It has no kubelet and no API server: pods are made through its CRI socket, which is bind-mounted out.
/// Its filesystem is the host's /usr (read-only; Debian 12's runc), and it runs containerd 2.x, as kind's current node
/// images do, from COMMITTER_CONTAINERD_2_BIN_DIR (scripts/test.sh fetches Debian unstable's), mounted at
/// /opt/containerd/bin; without it, Debian 12's 1.6 from /usr. It shares the host's network so that the lab registry
/// on 127.0.0.1 is reachable from it (kind's nodes sit on a docker network).
struct KindNode {
    dir: PathBuf,
}

const NODE_CONTAINERD_CONFIG: &str = r#"version = 2
disabled_plugins = ["io.containerd.nri.v1.nri"]
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "REGISTRY/pause:1"
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    discard_unpacked_layers = true
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "/etc/containerd/certs.d"
"#;

impl KindNode {
    fn start(docker: &Docker, lab: &Lab, name: &str) -> KindNode {
        let dir = lab.dir.join(name);
        let etc = dir.join("etc-containerd");
        let certs = etc.join("certs.d").join(&lab.registry);
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(
            etc.join("config.toml"),
            NODE_CONTAINERD_CONFIG.replace("REGISTRY", &lab.registry),
        )
        .unwrap();
        let reg = &lab.registry;
        std::fs::write(
            certs.join("hosts.toml"),
            format!("server = \"http://{reg}\"\n[host.\"http://{reg}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n"),
        )
        .unwrap();
        // The node image: the merged-/usr skeleton of Debian 12, whose /usr comes from the host at run time.
        let root = dir.join("image-root");
        for d in [
            "usr", "etc", "tmp", "run", "var/lib", "proc", "sys", "dev", "root",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for l in ["bin", "sbin", "lib", "lib64"] {
            std::os::unix::fs::symlink(format!("usr/{l}"), root.join(l)).unwrap();
        }
        std::fs::set_permissions(
            root.join("tmp"),
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .unwrap();
        let tar = dir.join("node-image.tar");
        check(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        );
        docker.cli(&["import", tar.to_str().unwrap(), "kind-node:lab"]);
        for d in ["var-lib-containerd", "run-containerd"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let v = |host: &str, node: &str| format!("{}/{host}:{node}", dir.display());
        let (containerd, extra) = match std::env::var("COMMITTER_CONTAINERD_2_BIN_DIR") {
            Ok(bin) => (
                "/opt/containerd/bin/containerd",
                vec![
                    "-v".to_string(),
                    format!("{bin}:/opt/containerd/bin:ro"),
                    "-e".to_string(),
                    "PATH=/opt/containerd/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                        .to_string(),
                ],
            ),
            Err(_) => {
                eprintln!("the kind-style node runs Debian 12's containerd 1.6: COMMITTER_CONTAINERD_2_BIN_DIR is not set");
                ("containerd", vec![])
            }
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        docker.cli(
            &[
                &[
                    "run",
                    "-d",
                    "--privileged",
                    "--network",
                    "host",
                    "--name",
                    name,
                    "--label",
                    "io.x-k8s.kind.cluster=lab",
                    "-v",
                    "/usr:/usr:ro",
                    "-v",
                    &v("etc-containerd", "/etc/containerd"),
                    "-v",
                    &v("var-lib-containerd", "/var/lib/containerd"),
                    "-v",
                    &v("run-containerd", "/run/containerd"),
                ][..],
                &extra,
                &[
                    "kind-node:lab",
                    containerd,
                    "--config",
                    "/etc/containerd/config.toml",
                ],
            ]
            .concat(),
        );
        let node = KindNode { dir };
        let sock = node.socket();
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the node's containerd did not make {}:\n{}",
                sock.display(),
                docker.cli(&["logs", name])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "the kind-style node runs {}",
            docker.cli(&["exec", name, containerd, "--version"]).trim()
        );
        node
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run-containerd/containerd.sock")
    }
}

/// A listing of paths, types, modes, owners, sizes, mtimes and content hashes under `dirs`, made inside a
/// container by its own busybox, so that the sandbox on the node and Docker's copy can be compared.
const LISTING: &str = "for f in $(find /data /home /bin /usr /etc/passwd /etc/group | sort); do \
    stat -c '%n %F %a %u %g %s %Y %N' \"$f\"; [ -f \"$f\" ] && [ ! -L \"$f\" ] && md5sum \"$f\"; done; true";

#[test]
fn kind_commit_script_commits_a_cri_pod_on_a_kind_style_node_and_docker_runs_it() {
    let Some(bin) = std::env::var_os("COMMITTER_DOCKER_28_BIN_DIR").map(PathBuf::from) else {
        eprintln!("SKIP: COMMITTER_DOCKER_28_BIN_DIR is not set (scripts/test.sh fetches Debian's docker.io)");
        return;
    };
    // (--cri: the lab registry then serves the pause image the node's CRI needs)
    let lab = Lab::start_with(&["--cri", "kind"]);
    let base = lab.base_image_push_only("sandbox/base");
    let docker = Docker::start(&bin, &lab.dir.join("d"), &lab.cgroup_parent);
    let node = KindNode::start(&docker, &lab, "lab-control-plane");
    let mut cri = Cri::connect_socket(&node.socket(), "/kubepods");
    cri.pull(&base);
    let pod = cri.run_pod("default", "agent");
    let app = cri.start_container(&pod, "agent", 0, &base, &["sleep", "1000000"]);
    cri.exec_sync(
        &app,
        "echo hello > /hello; echo changed > /data/modify.txt; rm /data/delete.txt",
    );
    let sandbox_listing = cri.exec_sync(&app, LISTING);
    assert!(
        sandbox_listing.contains("/data/modify.txt regular file 644 0 0 8 "),
        "{sandbox_listing}"
    );

    let target = format!("{}/snaps/agent:1", lab.registry);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run(Command::new(repo_root().join("scripts/kind-commit.sh"))
        .args([
            "default/agent",
            "--image",
            &target,
            "--plain-http",
            "--node",
            "lab-control-plane",
        ])
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_committer"))
        .env("PATH", path)
        .env("DOCKER_HOST", docker.host()));
    assert!(
        out.status.success(),
        "kind-commit.sh failed: {}",
        describe(&out)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("result JSON");
    assert_eq!(result["container"], app.as_str(), "{result}");
    let left = docker.cli(&["exec", "lab-control-plane", "sh", "-c", "ls -A /tmp"]);
    assert_eq!(left, "", "kind-commit.sh left files in the node's /tmp");

    docker.cli(&["pull", "-q", &target]);
    let copy = docker.cli(&[
        "run",
        "--rm",
        "--network",
        "none",
        &target,
        "sh",
        "-c",
        LISTING,
    ]);
    assert_eq!(
        copy, sandbox_listing,
        "docker run of the committed pod differs from the sandbox"
    );
    assert_eq!(
        docker.cli(&["run", "--rm", "--network", "none", &target, "cat", "/hello"]),
        "hello\n"
    );
    docker.cli(&["rm", "-f", "lab-control-plane"]);
}
