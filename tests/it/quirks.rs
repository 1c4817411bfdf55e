//! Pushing to registries as they behave in the field (quirk proxy profiles in front of a real
//! registry), and the kind/EKS node case against real parts: a base on a TLS + htpasswd registry
//! known only through a `certs.d` directory, its layer blobs gone from the content store.

mod limits;
mod proxy;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::lab::{check, Lab, RunOpts};
use crate::push::Registry;
use crate::tree::{compare_trees, CompareOpts};
use proxy::{Profile, Proxy, LIMIT};
use serde_json::Value;

/// Incompressible data several times the proxy's limits, plus a small change.
const CHANGES: &str = "head -c 3145728 /dev/urandom > /data/big; echo quirky > /data/small";
/// Debug lines: the retries and shape changes a profile must cause are logged at debug level.
const DEBUG: [&str; 2] = ["--log-level", "debug"];

/// A base image whose top layer is 3 MiB of incompressible data (several times the proxy's
/// limits), committed from the lab's base to `registry` and pulled into containerd.
fn big_base(lab: &Lab, registry: &str) -> String {
    let base = lab.base_image("base", false);
    lab.run_container("big-base", &base, &RunOpts::default());
    lab.exec("big-base", "head -c 3145728 /dev/urandom > /data/base-big");
    let image = format!("{registry}/base/big:1");
    commit_ok(lab, "big-base", &image, &[]);
    lab.ctr(&["images", "pull", "--plain-http", &image]);
    image
}

/// The raw manifest of `image` on a plain-HTTP registry.
fn manifest_of(image: &str) -> Value {
    let raw = check(std::process::Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ]));
    serde_json::from_str(&raw).unwrap()
}

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
    let upstream = Registry::start(&lab.dir.join("upstream"), &[]);
    // Both the base's top layer (from the content store) and the new layer are 3 MiB.
    let base = big_base(&lab, &upstream.addr);
    lab.run_container("q", &base, &RunOpts::default());
    lab.exec("q", CHANGES);

    let chunks = |size: &'static str| vec!["--chunk-size", size, DEBUG[0], DEBUG[1]];
    let profiles = [
        (Profile::Ecr, "ecr", vec![]),
        (Profile::Ecr, "ecr-chunked", chunks("1048576")),
        (Profile::Ghcr, "ghcr", chunks("2097152")),
        (Profile::Gar, "gar", vec![]),
        (Profile::Gar, "gar-chunked", chunks("1048576")),
        (Profile::Quay, "quay", chunks("1048576")),
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

/// What each profile must have made the client do (so the quirk was met, not avoided). Three
/// blobs exceed the 1 MiB limits: the busybox layer (just), the base's 3 MiB top layer and the
/// new 3 MiB layer; each must meet the quirk.
fn check_profile(profile: Profile, name: &str, log: &[String], stderr: &str) {
    let has = |s: &str| log.iter().any(|l| l.contains(s));
    let count = |method: &str, end: &str| {
        log.iter()
            .filter(|l| l.starts_with(method) && l.ends_with(end))
            .count()
    };
    let all = log.join("\n");
    if name.ends_with("chunked") || matches!(profile, Profile::Ghcr | Profile::Quay) {
        // --chunk-size: the new layer too goes in chunks, from its file.
        assert!(
            !stderr.contains("uploading the layer while it is compressed"),
            "{stderr}"
        );
    }
    let mut patches = std::collections::BTreeMap::new();
    for l in log.iter().filter(|l| l.starts_with("PATCH")) {
        *patches.entry(l.rsplit("-> ").next().unwrap()).or_insert(0) += 1;
    }
    eprintln!("profile {name}: PATCH answers {patches:?}");
    match profile {
        Profile::Ecr => {
            // Every PATCH answered 201; the client went on after each.
            assert_eq!(count("PATCH", "-> 202"), 0, "{all}");
            let wanted = if name == "ecr-chunked" { 9 } else { 3 };
            assert!(count("PATCH", "-> 201") >= wanted, "{all}");
            // The stale Range was not believed: no chunk was sent at the wrong offset.
            assert!(!has("-> 416"), "{all}");
            if name == "ecr-chunked" {
                assert_eq!(count("PATCH", "-> 0"), 1, "a later chunk was cut:\n{all}");
                assert!(
                    count("GET", "-> 404") >= 1,
                    "the upload's status: 404\n{all}"
                );
                assert!(stderr.contains("starting again at byte 0"), "{stderr}");
            }
        }
        Profile::Ghcr => {
            assert!(
                count("PATCH", "-> 416") >= 3,
                "each blob's first chunk:\n{all}"
            );
            assert!(has("manifests/") && has("-> 400"), "{all}");
            assert!(
                stderr.contains(&format!("chunks of {LIMIT} bytes")),
                "{stderr}"
            );
        }
        Profile::Gar if name == "gar-chunked" => {
            assert!(
                count("PATCH", "-> 400") >= 3,
                "each blob's second chunk:\n{all}"
            );
            assert!(
                stderr.contains("takes no chunks"),
                "then one PATCH: {stderr}"
            );
        }
        Profile::Gar => assert!(!has("-> 400"), "one PATCH per session:\n{all}"),
        Profile::Cloudflare => {
            assert!(
                count("PATCH", "-> 413") >= 3,
                "each blob over the cap:\n{all}"
            );
            assert_fell_back_without_compressing_again(stderr);
            assert!(
                count("PATCH", "202") >= 9,
                "the blobs went in chunks:\n{all}"
            );
        }
        Profile::Quay => {
            assert_eq!(count("PATCH", "-> 0"), 1, "a chunk was reset:\n{all}");
            assert!(count("PATCH", "-> 202") >= 9, "in chunks:\n{all}");
            assert!(
                stderr.contains("asking the registry where it stands"),
                "{stderr}"
            );
            assert!(
                !stderr.contains("starting again at byte 0"),
                "resumed: {stderr}"
            );
        }
        Profile::H2NoLength | Profile::DockerHub | Profile::NoMount(_) => {
            assert!(has("HEAD"), "{all}")
        }
        Profile::Reset => {
            let resets = log.iter().filter(|l| l.ends_with("-> 0")).count();
            // the new layer's streamed upload, base layers from the content store, the config
            assert!(resets >= 4, "{resets} resets:\n{all}");
            assert_fell_back_without_compressing_again(stderr);
        }
        Profile::Stall | Profile::Slow => unreachable!("not a push profile"),
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
        let (result, stderr) = commit_ok(&lab, "st", &format!("{}/{name}/st:v1", p.addr), &DEBUG);
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
fn a_mount_refused_with_405_or_404_falls_back_to_an_upload_and_is_not_asked_again() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    let upstream = Registry::start(&lab.dir.join("upstream"), &[]);
    for status in [405, 404] {
        let p = rt.block_on(Proxy::start(Profile::NoMount(status), &upstream.addr));
        // The base lives on the same registry as the target, so a mount is worth trying.
        let named = format!("{}/base{status}/img:1", p.addr);
        check(std::process::Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("docker://{base}"),
            &format!("docker://{named}"),
        ]));
        lab.ctr(&["images", "pull", "--plain-http", &named]);
        let id = format!("nm{status}");
        lab.run_container(&id, &named, &RunOpts::default());
        lab.exec(&id, CHANGES);
        let (result, _) = commit_ok(&lab, &id, &format!("{}/other{status}/nm:v1", p.addr), &[]);
        let log = p.log();
        let mounts: Vec<&String> = log.iter().filter(|l| l.contains("mount=")).collect();
        assert_eq!(mounts.len(), 1, "{status}: {log:#?}");
        assert!(mounts[0].ends_with(&format!("-> {status}")), "{mounts:?}");
        let image = result["image"]
            .as_str()
            .unwrap()
            .replace(&p.addr, &upstream.addr);
        assert_image_equals_container(&lab, &id, &image);
    }
}

/// What kinds of upload a Reset proxy cut in one commit, from the target's and the base registry's
/// proxy logs, told apart by the blobs' sizes in the pushed manifest.
#[derive(Debug, Default)]
struct Cuts {
    new_layer: usize,
    base_from_node: usize,
    base_from_registry: usize,
    config: usize,
}

fn cuts(target_log: &[String], base_log: &[String], manifest: &Value) -> Cuts {
    let size = |v: &Value| format!("len={}", v["size"].as_u64().unwrap());
    let layers = manifest["layers"].as_array().unwrap();
    let (from_registry, from_node, new) = (size(&layers[0]), size(&layers[1]), size(&layers[2]));
    let config = size(&manifest["config"]);
    let cut_with = |log: &[String], len: &str| {
        log.iter()
            .filter(|l| l.ends_with(&format!(" {len} -> 0")))
            .count()
    };
    Cuts {
        new_layer: cut_with(target_log, &new) + cut_with(target_log, "len=streamed"),
        base_from_node: cut_with(target_log, &from_node),
        base_from_registry: cut_with(base_log, &from_registry),
        config: cut_with(target_log, &config),
    }
}

/// One connection reset in every kind of upload — the new layer (streamed, then from its file),
/// a base layer from the node's content store, a base layer the node discarded (read from the base's
/// registry, its GET cut half-way), the config — in each of ten commits: each survives, and each
/// image read back is the container's tree.
#[test]
fn a_reset_in_every_kind_of_upload_is_survived_ten_times_out_of_ten() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    let base_upstream = Registry::start(&lab.dir.join("base-upstream"), &[]);
    let upstream = Registry::start(&lab.dir.join("upstream"), &[]);
    // The base is read through a Reset proxy; it injects nothing until the commits start.
    let base_proxy = rt.block_on(Proxy::start(Profile::Reset, &base_upstream.addr));
    base_proxy.disarm();
    let named = format!("{}/base/img:1", base_proxy.addr);
    check(std::process::Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{base}"),
        &format!("docker://{named}"),
    ]));
    lab.ctr(&["images", "pull", "--plain-http", &named]);
    // The node keeps the base's second layer and discards the first (the larger, busybox).
    let base_manifest = manifest_of(&named);
    let discarded = &base_manifest["layers"][0];
    lab.ctr(&["content", "rm", discarded["digest"].as_str().unwrap()]);
    let discarded_size = discarded["size"].as_u64().unwrap() as usize;
    lab.run_container("rs", &named, &RunOpts::default());
    lab.exec(
        "rs",
        "head -c 262144 /dev/urandom > /data/r; echo reset > /data/s",
    );
    let target = rt.block_on(Proxy::start(Profile::Reset, &upstream.addr));
    let started = Instant::now();
    let mut total = Cuts::default();
    for run in 0..10 {
        base_proxy.rearm();
        target.rearm();
        // That layer's upload to the target is left whole: its fault is the cut read from the base.
        target.spare_upload(discarded_size);
        let (base_before, target_before) = (base_proxy.log().len(), target.log().len());
        let image = format!("{}/run{run}/rs:v1", target.addr);
        let (result, stderr) = commit_ok(&lab, "rs", &image, &[]);
        assert!(
            stderr.contains("is not on this node; copying it from"),
            "{stderr}"
        );
        let pushed = result["image"]
            .as_str()
            .unwrap()
            .replace(&target.addr, &upstream.addr);
        let c = cuts(
            &target.log()[target_before..],
            &base_proxy.log()[base_before..],
            &manifest_of(&pushed),
        );
        eprintln!("run {run}: {c:?}");
        assert!(
            c.new_layer > 0 && c.base_from_node > 0 && c.base_from_registry > 0 && c.config > 0,
            "run {run}: every kind of upload was cut: {c:?}"
        );
        total.new_layer += c.new_layer;
        total.base_from_node += c.base_from_node;
        total.base_from_registry += c.base_from_registry;
        total.config += c.config;
        assert_image_equals_container(&lab, "rs", &pushed);
    }
    eprintln!("ten commits in {:?}: {total:?}", started.elapsed());
    assert!(
        total.new_layer > 0
            && total.base_from_node > 0
            && total.base_from_registry > 0
            && total.config > 0,
        "every kind of upload was cut at least once: {total:?}"
    );
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
