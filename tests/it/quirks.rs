//! Pushing to registries as they behave in the field (quirk proxy profiles in front of a real
//! registry), and the kind/EKS node case against real parts: a base on a TLS + htpasswd registry
//! known only through a `certs.d` directory, its layer blobs gone from the content store.

mod proxy;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::lab::{check, Lab, RunOpts};
use crate::push::Registry;
use crate::tree::{compare_trees, CompareOpts};
use proxy::{Profile, Proxy, LIMIT};
use serde_json::Value;

/// Incompressible data several times the proxy's limits, plus a small change.
const CHANGES: &str = "head -c 3145728 /dev/urandom > /data/big; echo quirky > /data/small";

fn assert_image_equals_container(lab: &Lab, id: &str, image: &str) {
    let unpacked = lab.pull_unpack(image);
    let opts = CompareOpts {
        hardlinks: true,
        ..CompareOpts::container_rootfs()
    };
    let diffs = compare_trees(&lab.rootfs(id), &unpacked, &opts);
    assert!(
        diffs.is_empty(),
        "{image} differs from {id}:\n{}",
        diffs.join("\n")
    );
}

/// Commit `id` to `image`; the parsed result on success, else panics with stderr.
fn commit_ok(lab: &Lab, id: &str, image: &str, extra: &[&str]) -> (Value, String) {
    let mut args = vec![
        "commit",
        "--container",
        id,
        "--image",
        image,
        "--plain-http",
    ];
    args.extend_from_slice(extra);
    let out = lab.committer(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{image}: {stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

fn docker_config(dir: &Path, host: &str, user: &str, pass: &str) -> String {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let path = dir.join(format!("config-{user}.json"));
    std::fs::write(
        &path,
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn every_registry_profile_takes_a_commit_whose_layer_exceeds_its_limits() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("q", &base, &RunOpts::default());
    lab.exec("q", CHANGES);
    let upstream = Registry::start(&lab.dir.join("upstream"), &[]);

    let profiles = [
        (Profile::Ecr, "ecr", vec![]),
        (Profile::Ghcr, "ghcr", vec!["--chunk-size", "2097152"]),
        (Profile::Gar, "gar", vec![]),
        (Profile::Gar, "gar-chunked", vec!["--chunk-size", "1048576"]),
        (Profile::Quay, "quay", vec!["--chunk-size", "1048576"]),
        (Profile::Cloudflare, "cloudflare", vec![]),
        (Profile::H2NoLength, "h2", vec![]),
        (Profile::Reset, "reset", vec![]),
        (Profile::DockerHub, "hub", vec![]),
    ];
    for (profile, name, extra) in profiles {
        let started = Instant::now();
        let p = rt.block_on(Proxy::start(profile, &upstream.addr));
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if profile == Profile::DockerHub {
            extra.push("--registry-config".into());
            extra.push(docker_config(&lab.dir, &p.addr, "writer", "pw"));
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (result, stderr) = commit_ok(&lab, "q", &format!("{}/{name}/q:v1", p.addr), &extra);
        let log = p.log();
        check_profile(profile, name, &log, &stderr);
        // Read back from the registry itself: it stored and checked the bytes.
        let image = result["image"]
            .as_str()
            .unwrap()
            .replace(&p.addr, &upstream.addr);
        assert_image_equals_container(&lab, "q", &image);
        if profile == Profile::H2NoLength {
            // Again: every blob is there now, and HEAD says so without a length.
            let before = p.log().len();
            // Its own message: a commit in the same second would otherwise make the same config.
            let mut again_args = extra.clone();
            again_args.extend(["-m", "committed again"]);
            commit_ok(&lab, "q", &format!("{}/{name}/q:v2", p.addr), &again_args);
            let again = &p.log()[before..];
            assert!(
                again
                    .iter()
                    .any(|l| l.starts_with("HEAD") && l.ends_with("-> 200")),
                "{again:#?}"
            );
            // The base layers are not sent again. The config is new (its history has a new
            // comment): one PUT. The new layer is streamed again, one PATCH and its PUT: its digest
            // is only known once it is compressed, and the upload starts before that.
            let uploads = again.iter().filter(|l| {
                l.starts_with("PATCH") || l.contains("blobs/uploads/") && l.starts_with("PUT")
            });
            assert_eq!(uploads.count(), 3, "{again:#?}");
        }
        eprintln!("profile {name}: {:?}", started.elapsed());
    }
}

/// What each profile must have made the client do (so the quirk was met, not avoided).
fn check_profile(profile: Profile, name: &str, log: &[String], stderr: &str) {
    let has = |s: &str| log.iter().any(|l| l.contains(s));
    let all = log.join("\n");
    match profile {
        Profile::Ecr => assert!(has("PATCH") && has("-> 201"), "{all}"),
        Profile::Ghcr => {
            assert!(has("-> 416"), "the 2 MiB chunk met the 1 MiB limit:\n{all}");
            assert!(has("manifests/") && has("-> 400"), "{all}");
            assert!(
                stderr.contains(&format!("chunks of {LIMIT} bytes")),
                "{stderr}"
            );
        }
        Profile::Gar if name == "gar-chunked" => {
            assert!(has("-> 400"), "a second chunk was refused:\n{all}");
            assert!(
                stderr.contains("takes no chunks"),
                "then one PATCH: {stderr}"
            );
        }
        Profile::Gar => assert!(!has("-> 400"), "one PATCH per session:\n{all}"),
        Profile::Cloudflare => {
            assert!(has("-> 413"), "{all}");
            assert_fell_back_without_compressing_again(stderr);
            let big_patches = log
                .iter()
                .filter(|l| l.starts_with("PATCH") && l.ends_with("202"));
            assert!(big_patches.count() >= 3, "the layer went in chunks:\n{all}");
        }
        Profile::Quay => {
            assert!(has("-> 0"), "a chunk was reset:\n{all}");
            assert!(
                stderr.contains("asking the registry where it stands"),
                "{stderr}"
            );
            assert!(
                !stderr.contains("starting again at byte 0"),
                "resumed: {stderr}"
            );
        }
        Profile::H2NoLength | Profile::DockerHub | Profile::NoMount => {
            assert!(has("HEAD"), "{all}")
        }
        Profile::Reset => {
            let resets = log.iter().filter(|l| l.ends_with("-> 0")).count();
            // the new layer's streamed upload, two base layers from the content store, the config
            assert!(resets >= 4, "{resets} resets:\n{all}");
            assert_fell_back_without_compressing_again(stderr);
        }
    }
}

/// The layer's streamed upload failed and the finished file was uploaded instead; the compressor
/// ran once (one "compressed the layer" line: a fallback that compressed again would log two).
fn assert_fell_back_without_compressing_again(stderr: &str) {
    assert!(
        stderr.contains("uploading the layer while it is compressed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("failed") && stderr.contains("uploading it again from the compressed file"),
        "the streamed upload failed and fell back: {stderr}"
    );
    assert_eq!(
        stderr.matches("compressed the layer into").count(),
        1,
        "compressed once: {stderr}"
    );
    assert!(!stderr.contains("while it was compressed"), "{stderr}");
}

/// A body cap (413 as soon as the streamed body passes it) and a reset in the middle of the
/// streamed body: the layer goes up again from the compressed file, by the chunked or plain path,
/// and the image is the container's tree. Against the bare registry, the same layer streams.
#[test]
fn a_failed_streamed_layer_upload_is_sent_again_from_the_file_without_compressing_again() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("st", &base, &RunOpts::default());
    // Larger than the cap, and compressible (a stream that ended early would show in the tree).
    lab.exec(
        "st",
        "head -c 3145728 /dev/urandom > /data/rand; seq 1 400000 > /data/seq; echo s > /data/s",
    );
    let upstream = Registry::start(&lab.dir.join("upstream"), &[]);
    for (profile, name) in [(Profile::Cloudflare, "cap"), (Profile::Reset, "reset")] {
        let p = rt.block_on(Proxy::start(profile, &upstream.addr));
        let (result, stderr) = commit_ok(&lab, "st", &format!("{}/{name}/st:v1", p.addr), &[]);
        let log = p.log();
        let streamed_cut = log
            .iter()
            .any(|l| l.starts_with("PATCH") && (l.ends_with("-> 413") || l.ends_with("-> 0")));
        assert!(streamed_cut, "{name}: {log:#?}");
        assert_fell_back_without_compressing_again(&stderr);
        if profile == Profile::Cloudflare {
            assert!(stderr.contains("chunks of"), "then in chunks: {stderr}");
        }
        let image = result["image"]
            .as_str()
            .unwrap()
            .replace(&p.addr, &upstream.addr);
        assert_image_equals_container(&lab, "st", &image);
    }
    // Nothing in the way: the layer goes up while it is compressed, and nothing is sent twice.
    let (result, stderr) = commit_ok(&lab, "st", &format!("{}/plain/st:v1", upstream.addr), &[]);
    assert!(stderr.contains("while it was compressed"), "{stderr}");
    assert!(!stderr.contains("uploading it again"), "{stderr}");
    assert_image_equals_container(&lab, "st", result["image"].as_str().unwrap());
}

#[test]
fn push_permission_and_stalls_fail_before_the_pause_with_exit_5() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("r", &base, &RunOpts::default());
    lab.exec("r", "echo r > /data/r");
    let upstream = Registry::start(&lab.dir.join("upstream"), &[]);

    // A read-only account on a Docker Hub-like token service.
    let hub = rt.block_on(Proxy::start(Profile::DockerHub, &upstream.addr));
    let config = docker_config(&lab.dir, &hub.addr, "reader", "pw");
    let out = lab.committer(&[
        "commit",
        "--container",
        "r",
        "--image",
        &format!("{}/someone/else:v1", hub.addr),
        "--plain-http",
        "--registry-config",
        &config,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("cannot push to"), "{stderr}");
    assert!(
        !hub.log().iter().any(|l| l.starts_with("PATCH")),
        "nothing was sent"
    );
    assert_eq!(lab.task_status("r"), "RUNNING");

    // A registry that accepts connections and never answers.
    let (stalled, _task) = rt.block_on(proxy::stalled());
    let t = Instant::now();
    let out = lab.committer(&[
        "commit",
        "--container",
        "r",
        "--image",
        &format!("{stalled}/a/b:v1"),
        "--plain-http",
        "--request-timeout",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains(&stalled), "names the host: {stderr}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(lab.task_status("r"), "RUNNING");
}

#[test]
fn a_mount_refused_with_405_falls_back_to_an_upload_and_is_not_asked_again() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    let upstream = Registry::start(&lab.dir.join("upstream"), &[]);
    let p = rt.block_on(Proxy::start(Profile::NoMount, &upstream.addr));
    // The base lives on the same registry as the target, so a mount is worth trying.
    let named = format!("{}/base/img:1", p.addr);
    check(std::process::Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{base}"),
        &format!("docker://{named}"),
    ]));
    lab.ctr(&["images", "pull", "--plain-http", &named]);
    lab.run_container("nm", &named, &RunOpts::default());
    lab.exec("nm", CHANGES);
    let (result, _) = commit_ok(&lab, "nm", &format!("{}/other/nm:v1", p.addr), &[]);
    let mounts = p.log().iter().filter(|l| l.contains("mount=")).count();
    assert_eq!(mounts, 1, "{:#?}", p.log());
    let image = result["image"]
        .as_str()
        .unwrap()
        .replace(&p.addr, &upstream.addr);
    assert_image_equals_container(&lab, "nm", &image);
}

/// A TCP relay that, once armed, cuts the connection carrying the N-th byte the server sends back.
struct Cutter {
    addr: String,
    armed: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
}

impl Cutter {
    fn start(upstream: String, after: u64) -> Cutter {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (armed, cut) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (a, c, total) = (armed.clone(), cut.clone(), Arc::new(AtomicU64::new(0)));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (c1, s1) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || relay(c1, s1, None));
                let cut = (a.clone(), c.clone(), total.clone(), after);
                std::thread::spawn(move || relay(server, client, Some(cut)));
            }
        });
        Cutter { addr, armed, cut }
    }
}

type CutState = (Arc<AtomicBool>, Arc<AtomicBool>, Arc<AtomicU64>, u64);

fn relay(mut from: TcpStream, mut to: TcpStream, cut: Option<CutState>) {
    let mut buf = [0u8; 16384];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        if let Some((armed, done, total, after)) = &cut {
            if armed.load(Ordering::SeqCst) && !done.load(Ordering::SeqCst) {
                let seen = total.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                if seen > *after {
                    done.store(true, Ordering::SeqCst);
                    break;
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// What containerd's `discard_unpacked_layers` leaves of `image`: manifest and config, no layer blobs.
fn discard_layer_blobs(lab: &Lab, image: &str) {
    let manifest: Value =
        serde_json::from_str(&check(std::process::Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{image}"),
        ])))
        .unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        lab.ctr(&["content", "rm", layer["digest"].as_str().unwrap()]);
    }
}

/// A containerd `certs.d` directory naming `host` as an HTTPS registry with `ca`, as a kind node has.
fn certs_d_for(dir: &Path, host: &str, ca: &Path) -> std::path::PathBuf {
    let certs_d = dir.join("certs.d");
    let host_dir = certs_d.join(host);
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::copy(ca, host_dir.join("ca.crt")).unwrap();
    let toml = format!(
        "server = \"https://{host}\"\n\n[host.\"https://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"ca.crt\"\n"
    );
    std::fs::write(host_dir.join("hosts.toml"), toml).unwrap();
    certs_d
}

#[test]
fn kind_node_without_base_layers_copies_them_from_a_tls_registry_known_by_certs_d() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    let tls = Registry::start(&lab.dir.join("tls"), &["--tls", "--htpasswd", "puller:pw"]);
    let ca = tls.ca.clone().unwrap();
    // The node reaches the base registry through a relay that will cut one blob download.
    let cutter = Cutter::start(tls.addr.clone(), 400 * 1024);
    let certs_d = certs_d_for(&lab.dir, &cutter.addr, &ca);
    let named = format!("{}/base/kind:1", cutter.addr);
    let cert_dir = lab.dir.join("skopeo-certs");
    std::fs::create_dir_all(&cert_dir).unwrap();
    std::fs::copy(&ca, cert_dir.join("ca.crt")).unwrap();
    check(std::process::Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-creds",
        "puller:pw",
        "--dest-cert-dir",
        cert_dir.to_str().unwrap(),
        &format!("docker://{base}"),
        &format!("docker://{named}"),
    ]));
    lab.ctr(&[
        "images",
        "pull",
        "--user",
        "puller:pw",
        "--hosts-dir",
        certs_d.to_str().unwrap(),
        &named,
    ]);
    discard_layer_blobs(&lab, &base);
    lab.run_container("k", &named, &RunOpts::default());
    lab.exec("k", "echo kind > /data/k");
    let target = Registry::start(&lab.dir.join("target"), &[]);
    let config = docker_config(&lab.dir, &cutter.addr, "puller", "pw");
    cutter.armed.store(true, Ordering::SeqCst);
    let (result, stderr) = commit_ok(
        &lab,
        "k",
        &format!("{}/kind/k:v1", target.addr),
        &[
            "--registry-config",
            &config,
            "--certs-dir",
            certs_d.to_str().unwrap(),
        ],
    );
    assert!(
        stderr.contains("is not on this node; copying it from"),
        "{stderr}"
    );
    assert!(
        cutter.cut.load(Ordering::SeqCst),
        "the relay cut a download"
    );
    assert_image_equals_container(&lab, "k", result["image"].as_str().unwrap());
}
