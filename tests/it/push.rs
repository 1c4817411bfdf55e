//! Pushing, end to end: to an authenticated TLS registry with credentials from a file, and
//! base layers that the node no longer has.

use crate::lab::{check, Lab, RunOpts};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A second registry, stopped on drop.
pub(crate) struct Registry {
    pub dir: PathBuf,
    pub addr: String,
    pub ca: Option<PathBuf>,
}

impl Registry {
    pub fn start(dir: &Path, args: &[&str]) -> Registry {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/registry.sh");
        check(Command::new(&script).arg("start").arg(dir).args(args));
        let env = std::fs::read_to_string(dir.join("env")).unwrap();
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")).map(str::to_string))
        };
        Registry {
            dir: dir.to_path_buf(),
            addr: get("REGISTRY_ADDR").unwrap(),
            ca: get("REGISTRY_CA").map(PathBuf::from),
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/registry.sh");
        let _ = Command::new(script).arg("stop").arg(&self.dir).status();
    }
}

const USER: &str = "pusher";
const PASSWORD: &str = "s3cret-Pa55-never-shown";

#[test]
fn pushes_to_a_tls_htpasswd_registry_with_a_config_file_and_never_shows_the_password() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("p1", &base, &RunOpts::default());
    lab.exec("p1", "echo secretless > /data/pushed");
    let reg = Registry::start(
        &lab.dir.join("tls-registry"),
        &["--tls", "--htpasswd", &format!("{USER}:{PASSWORD}")],
    );
    let auth = base64_encode(format!("{USER}:{PASSWORD}").as_bytes());
    let config = lab.dir.join("docker-config.json");
    std::fs::write(
        &config,
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr),
    )
    .unwrap();
    let target = format!("{}/team/p1:v1", reg.addr);
    let ca = reg.ca.as_ref().expect("REGISTRY_CA");
    let out = lab.committer(&[
        "commit",
        "--container",
        "p1",
        "--image",
        &target,
        "--registry-config",
        config.to_str().unwrap(),
        "--registry-ca",
        ca.to_str().unwrap(),
        "--log-level",
        "debug",
        "--log-format",
        "json",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    for secret in [PASSWORD, auth.as_str()] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a secret leaked:\n{stdout}\n{stderr}"
        );
    }
    // Base layers were not on that registry and not mountable: they came from the node's content store.
    assert!(stderr.contains("from the node's content store"), "{stderr}");
    let result: Value = serde_json::from_str(stdout.trim()).unwrap();
    let image = result["image"].as_str().unwrap();
    // skopeo's --cert-dir takes CA *.crt files only (a *.key there is read as a client key).
    let cert_dir = lab.dir.join("skopeo-certs");
    std::fs::create_dir_all(&cert_dir).unwrap();
    std::fs::copy(ca, cert_dir.join("ca.crt")).unwrap();
    let inspect = check(Command::new("skopeo").args([
        "inspect",
        "--creds",
        &format!("{USER}:{PASSWORD}"),
        "--cert-dir",
        cert_dir.to_str().unwrap(),
        &format!("docker://{image}"),
    ]));
    let inspect: Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 3);

    // Wrong password: one clear line, exit 5, the password nowhere.
    std::fs::write(
        &config,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{}"}}}}}}"#,
            reg.addr,
            base64_encode(b"pusher:wrong-Pa55")
        ),
    )
    .unwrap();
    let out = lab.committer(&[
        "commit",
        "--container",
        "p1",
        "--image",
        &format!("{}/team/p1:v2", reg.addr),
        "--registry-config",
        config.to_str().unwrap(),
        "--registry-ca",
        ca.to_str().unwrap(),
        "--log-level",
        "debug",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(!stderr.contains("wrong-Pa55"), "{stderr}");
    assert_eq!(lab.task_status("p1"), "RUNNING");
}

#[test]
fn base_layers_discarded_from_the_node_are_copied_from_the_base_registry() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("p2", &base, &RunOpts::default());
    lab.exec("p2", "echo after-discard > /data/p2");
    // What containerd's discard_unpacked_layers does: the layer blobs go, the snapshots stay.
    let manifest: Value = serde_json::from_str(&check(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{base}"),
    ])))
    .unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        lab.ctr(&["content", "rm", layer["digest"].as_str().unwrap()]);
    }
    let other = Registry::start(&lab.dir.join("other-registry"), &[]);
    let target = format!("{}/elsewhere/p2:v1", other.addr);
    let out = lab.committer(&[
        "commit",
        "--container",
        "p2",
        "--image",
        &target,
        "--plain-http",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is not on this node; copying it from"),
        "{stderr}"
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let unpacked = lab.pull_unpack(result["image"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(unpacked.join("data/p2")).unwrap(),
        "after-discard\n"
    );
    assert!(
        unpacked.join("bin/busybox").exists(),
        "base layers are in the pushed image"
    );
}

#[test]
fn a_base_in_the_same_registry_is_mounted_not_uploaded() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("p3", &base, &RunOpts::default());
    lab.exec("p3", "echo m > /m");
    let out = lab.committer(&[
        "commit",
        "--container",
        "p3",
        "--image",
        &format!("{}/other/p3:v1", lab.registry),
        "--plain-http",
        "--log-level",
        "debug",
        "--log-format",
        "text",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("mounted sha256:").count(),
        2,
        "both base layers mounted: {stderr}"
    );
    assert!(!stderr.contains("uploading base layer"), "{stderr}");
    assert_eq!(
        stderr.matches("uploaded layer").count(),
        1,
        "only the new layer is uploaded: {stderr}"
    );
}

/// A TLS registry whose CA is in the system trust only (`SSL_CERT_FILE`, or a file in
/// `SSL_CERT_DIR`), as a TLS-inspecting proxy's CA is: trusted without `--registry-ca`. Without it,
/// the same push fails on the certificate.
#[test]
fn a_registry_ca_in_ssl_cert_file_or_dir_is_trusted_without_flags() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("p4", &base, &RunOpts::default());
    lab.exec("p4", "echo trusted > /data/p4");
    let reg = Registry::start(&lab.dir.join("tls-only"), &["--tls"]);
    let ca = reg.ca.clone().expect("REGISTRY_CA");
    let cert_dir = lab.dir.join("ssl-cert-dir");
    std::fs::create_dir_all(&cert_dir).unwrap();
    std::fs::copy(&ca, cert_dir.join("lab-ca.pem")).unwrap();
    let commit = |tag: &str, env: Option<(&str, &Path)>| {
        let mut cmd = lab.committer_command();
        cmd.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let target = format!("{}/trust/p4:{tag}", reg.addr);
        crate::lab::run(cmd.args(["commit", "--container", "p4", "--image", &target]))
    };
    let out = commit("untrusted", None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    for (tag, env) in [
        ("file", ("SSL_CERT_FILE", ca.as_path())),
        ("dir", ("SSL_CERT_DIR", cert_dir.as_path())),
    ] {
        let out = commit(tag, Some(env));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", env.0);
    }
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}
