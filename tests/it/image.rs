//! The used-by path: the committer image, built without a container engine by scripts/build-image.sh,
//! pushed with skopeo, pulled into the lab's containerd and run there as a container the way the commit Job runs
//! it — only the containerd socket and the snapshot root bind-mounted, the Job's capabilities and nothing more,
//! seccomp on, read-only root with a writable /tmp — committing a sibling container to the lab's registry.
//!
//! The oracles: the host's `committer diff` of the same container (same layer diffId), and skopeo + umoci
//! unpacking the pushed image (same tree as the sibling's rootfs).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lab::{check, describe, run, Lab, RunOpts};
use crate::tree::{compare_trees, sha256_file, CompareOpts};

/// What the sibling changes: an opaque directory (only visible through `trusted.overlay.opaque`, i.e. with
/// CAP_SYS_ADMIN), files and a directory that root cannot read or search without a DAC capability, a whiteout.
const CHANGES: &str = r#"
set -e
echo added > /data/new.txt
echo modified >> /data/modify.txt
rm /data/delete.txt
rm -r /data/dir-to-replace && mkdir /data/dir-to-replace && echo fresh > /data/dir-to-replace/fresh.txt
echo secret > /data/locked && chown 4321:4321 /data/locked && chmod 0000 /data/locked
mkdir -p /private/inner && echo deep > /private/inner/f && chmod 0600 /private/inner/f
chown -R 1234:1234 /private && chmod 0700 /private /private/inner
"#;

/// containerd's default capability set for a container (oci.populateDefaultUnixSpec); the Job drops them all.
const CONTAINERD_DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `capabilities.add` list of deploy/commit-job.yaml (a one-line flow list), e.g. ["SYS_ADMIN", "…"].
fn job_capabilities() -> Vec<String> {
    let yaml = std::fs::read_to_string(repo_root().join("deploy/commit-job.yaml")).unwrap();
    let line = yaml
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("add:"))
        .expect("deploy/commit-job.yaml has a capabilities `add: [...]` line");
    let list = line
        .trim_start_matches("add:")
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let caps: Vec<String> = list
        .split(',')
        .map(|c| c.trim().trim_matches('"').to_string())
        .filter(|c| !c.is_empty())
        .collect();
    assert!(!caps.is_empty(), "no capabilities in {line:?}");
    caps
}

/// The image scripts/build-image.sh wrote.
struct Built {
    digest: String,
    layout: PathBuf,
    tag: String,
    archive: PathBuf,
}

/// Runs scripts/build-image.sh with `args` then OUT_DIR, and reads back what it wrote.
fn build_image(args: &[&str], env: &[(String, String)], out: &Path) -> Built {
    let t = Instant::now();
    let mut cmd = Command::new(repo_root().join("scripts/build-image.sh"));
    cmd.args(args)
        .arg(out)
        .envs(env.iter().map(|(k, v)| (k, v)));
    let stdout = check(&mut cmd);
    eprintln!(
        "scripts/build-image.sh {}: {:?}",
        out.display(),
        t.elapsed()
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "build-image.sh prints the digest alone on stdout: {stdout:?}"
    );
    let digest = lines[0].to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "not a digest: {digest}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("digest")).unwrap().trim(),
        digest
    );
    let layout = out.join("oci");
    let index = read_json(&layout.join("index.json"));
    let tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(index["manifests"][0]["digest"], digest.as_str());
    let archive = out.join(format!("committer-{tag}.oci.tar"));
    assert!(archive.is_file(), "{} missing", archive.display());
    Built {
        digest,
        layout,
        tag,
        archive,
    }
}

/// OUT_DIR/build.env (KEY='value' lines) as environment variables, without DIGEST/TAG/LIBC (outputs).
fn build_env(p: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .filter(|(k, _)| !["DIGEST", "TAG", "LIBC"].contains(&k.as_str()))
        .collect()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// The image is the binary and /tmp on nothing: ENTRYPOINT /committer, user 0, no shell, no Cmd/Env, labels.
fn assert_image_shape(b: &Built) {
    let manifest = read_json(&blob(&b.layout, &b.digest));
    let config = read_json(&blob(
        &b.layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    let c = &config["config"];
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/committer"]),
        "{config}"
    );
    assert_eq!(c["User"], "0");
    assert!(c.get("Cmd").is_none_or(Value::is_null), "no Cmd: {config}");
    assert!(c.get("Env").is_none_or(Value::is_null), "no Env: {config}");
    assert_eq!(
        (config["os"].as_str(), config["architecture"].as_str()),
        (Some("linux"), Some("amd64"))
    );
    let labels = &c["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        labels["org.opencontainers.image.source"],
        env!("CARGO_PKG_REPOSITORY")
    );
    assert!(
        labels["org.opencontainers.image.revision"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{labels}"
    );
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.revision"],
        labels["org.opencontainers.image.revision"]
    );

    let libc = labels["dev.committer.libc"].as_str().unwrap_or_default();
    assert!(
        ["musl", "glibc-static"].contains(&libc),
        "dev.committer.libc: {labels}"
    );
    eprintln!("image {}: static binary with {libc}", b.digest);

    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    let listing = check(
        Command::new("tar")
            .arg("-tvzf")
            .arg(blob(&b.layout, layers[0]["digest"].as_str().unwrap())),
    );
    let entries: BTreeSet<(String, String)> = listing
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[f.len() - 1].trim_end_matches('/').to_string(),
                f[0].to_string(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = [
        (".", "drwxr-xr-x"),
        ("committer", "-rwxr-xr-x"),
        ("tmp", "drwxrwxrwt"),
    ]
    .iter()
    .map(|(p, m)| (p.to_string(), m.to_string()))
    .collect();
    assert_eq!(
        entries, want,
        "the layer holds the binary and /tmp only:\n{listing}"
    );
}

/// `ctr run --rm` of the committer image as the Job runs it. `caps` are added to an empty set.
fn run_as_job(lab: &Lab, image: &str, id: &str, caps: &[String], args: &[&str]) -> Output {
    run(&mut job_command(lab, image, id, caps, args))
}

fn job_command(lab: &Lab, image: &str, id: &str, caps: &[String], args: &[&str]) -> Command {
    let snapshots = lab.dir.join("root/io.containerd.snapshotter.v1.overlayfs");
    let mut cmd = lab.ctr_command();
    cmd.args(["run", "--rm", "--net-host", "--seccomp", "--read-only"]);
    cmd.arg("--runc-root").arg(&lab.runc_root);
    cmd.arg("--cgroup")
        .arg(format!("{}/{id}", lab.cgroup_parent));
    // A fresh /tmp like the Job's emptyDir, mounted first: the lab's socket may live under /tmp, and a later
    // mount would hide it. Then the socket file itself, read-write (connect(2) needs write permission), and the
    // snapshots read-only, both at the host's paths.
    cmd.arg("--mount")
        .arg("type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev:mode=1777");
    let sock = lab.address.display();
    cmd.arg("--mount")
        .arg(format!("type=bind,src={sock},dst={sock},options=rbind:rw"));
    let snap = snapshots.display();
    cmd.arg("--mount")
        .arg(format!("type=bind,src={snap},dst={snap},options=rbind:ro"));
    // ctr adds, then drops: drop only what is not asked for.
    let wanted: Vec<String> = caps.iter().map(|c| format!("CAP_{c}")).collect();
    for c in CONTAINERD_DEFAULT_CAPS
        .iter()
        .map(|c| format!("CAP_{c}"))
        .filter(|c| !wanted.contains(c))
    {
        cmd.arg("--cap-drop").arg(c);
    }
    for c in &wanted {
        cmd.arg("--cap-add").arg(c);
    }
    // ctr replaces the image's entrypoint and cmd with these args.
    cmd.args([image, id, "/committer"]).args(args);
    cmd
}

/// committer as PID 1 of the Job's container: a SIGKILL of its commit process while the sandbox
/// is paused is undone by PID 1 within 2 s (sandbox RUNNING, no lease, no tag, exit 137).
fn sigkill_of_the_worker_in_the_job_container(lab: &Lab, image: &str, caps: &[String]) {
    crate::supervisor::long_capture_sandbox(lab, "paused-sib");
    let sock = lab.address.to_str().unwrap().to_string();
    let target = format!("{}/snap/paused-sib:killed", lab.registry);
    let args = [
        "commit",
        "--container",
        "paused-sib",
        "--image",
        &target,
        "--plain-http",
        "--address",
        &sock,
        "--namespace",
        &lab.namespace,
    ];
    let mut cmd = job_command(lab, image, "committer-killed", caps, &args);
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    crate::safety::wait_until("the sandbox to be paused", Duration::from_secs(60), || {
        lab.task_status("paused-sib") == "PAUSED"
    });
    let pid1 = lab.task_pid("committer-killed");
    let worker = crate::safety::worker_of(pid1);
    crate::safety::signal(worker, rustix::process::Signal::KILL);
    let killed = Instant::now();
    crate::safety::wait_until("the sandbox to run again", Duration::from_secs(2), || {
        lab.task_status("paused-sib") == "RUNNING"
    });
    eprintln!(
        "in the Job's container: RUNNING {:?} after the SIGKILL",
        killed.elapsed()
    );
    let out = child.wait_with_output().unwrap();
    let stderr = crate::cli::stderr_text(&out);
    assert_eq!(out.status.code(), Some(137), "{stderr}");
    assert!(
        stderr.contains("cleaned up after it; the sandbox \"paused-sib\" is running again"),
        "{stderr}"
    );
    let leases = lab.ctr(&["leases", "ls"]);
    assert!(!leases.contains("committer/paused-sib"), "{leases}");
    assert!(lab.tags("snap/paused-sib").is_empty());
}

fn one_json_line(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "committer in the container failed ({}):\n{}",
        out.status,
        describe(out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stdout must hold only the result JSON:\n{}",
        describe(out)
    );
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}"))
}

/// skopeo + umoci unpack `image_ref`; it must be the container's rootfs (runtime mounts aside).
fn assert_image_is_rootfs(lab: &Lab, image_ref: &str, container: &str) {
    let unpacked = lab.pull_unpack(image_ref);
    let opts = CompareOpts {
        hardlinks: true,
        ..CompareOpts::container_rootfs()
    };
    let diffs = compare_trees(&lab.rootfs(container), &unpacked, &opts);
    assert!(
        diffs.is_empty(),
        "{image_ref} differs from {container}'s rootfs:\n{}",
        diffs.join("\n")
    );
}

#[test]
fn image_built_without_an_engine_runs_under_containerd_as_the_job_and_commits_a_sibling() {
    // It asserts the upperdir source: no test may flip overlay module defaults meanwhile.
    let _defaults = crate::lab::overlay_defaults();
    let t = Instant::now();
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("sib", &base, &RunOpts::cri("team-a", "sandbox-0", "work"));
    lab.exec("sib", CHANGES);

    // Build the static binary and the image; then package that binary again with the inputs the first build
    // recorded: the same image, archive included, byte for byte.
    let out = lab.dir.join("image");
    let built = build_image(&[], &[], &out);
    assert_image_shape(&built);
    let inputs = build_env(&out.join("build.env"));
    let binary = out.join("committer");
    let again = build_image(
        &["--binary", binary.to_str().unwrap()],
        &inputs,
        &lab.dir.join("image-again"),
    );
    assert_eq!(
        again.digest, built.digest,
        "build-image.sh is not reproducible (inputs: {inputs:?})"
    );
    assert_eq!(
        sha256_file(&again.archive),
        sha256_file(&built.archive),
        "the OCI archives differ"
    );

    // Push with skopeo (it must keep the manifest byte for byte), pull into containerd by digest.
    let pushed_tag = format!("{}/platform/committer:{}", lab.registry, built.tag);
    let digestfile = lab.dir.join("pushed-digest");
    check(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false", "--digestfile"])
            .arg(&digestfile)
            .arg(format!("oci:{}:{}", built.layout.display(), built.tag))
            .arg(format!("docker://{pushed_tag}")),
    );
    assert_eq!(
        std::fs::read_to_string(&digestfile).unwrap().trim(),
        built.digest
    );
    let committer_image = format!("{}/platform/committer@{}", lab.registry, built.digest);
    lab.ctr(&["images", "pull", "--plain-http", &committer_image]);

    // The oracle: the host binary's diff of the same container.
    let host_layer = lab.dir.join("host-diff.tgz");
    let host = lab.committer(&[
        "diff",
        "--container",
        "sib",
        "--output",
        host_layer.to_str().unwrap(),
    ]);
    assert!(
        host.status.success(),
        "host committer diff failed:\n{}",
        describe(&host)
    );
    let host: Value = serde_json::from_slice(&host.stdout).expect("diff prints JSON");

    let caps = job_capabilities();
    let sock = lab.address.to_str().unwrap().to_string();
    let commit_args = |tag: &str| -> Vec<String> {
        let target = format!("{}/snap/sib:{tag}", lab.registry);
        [
            "commit",
            "--container",
            "sib",
            "--image",
            &target,
            "--plain-http",
            "--address",
            &sock,
            "--namespace",
            &lab.namespace,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let ran = Instant::now();
    let args = commit_args("job");
    let out = run_as_job(
        &lab,
        &committer_image,
        "committer-job",
        &caps,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    eprintln!("in-container commit: {:?}", ran.elapsed());
    let result = one_json_line(&out);
    assert_eq!(
        result["layer"]["diffId"], host["diffId"],
        "in-container commit vs host diff:\n{result}\n{host}"
    );
    assert_eq!(
        result["diffSource"], "upperdir",
        "the Job's capabilities must let committer trust the upperdir: {result}"
    );
    assert_eq!(result["tag"], format!("{}/snap/sib:job", lab.registry));
    assert_eq!(lab.task_status("sib"), "RUNNING", "the sibling runs on");

    assert_image_is_rootfs(&lab, result["image"].as_str().unwrap(), "sib");
    sigkill_of_the_worker_in_the_job_container(&lab, &committer_image, &caps);

    // With less than the Job's capabilities committer must not trust the upperdir: it either commits through
    // another source (the walk, or containerd's diff service, which needs only the socket) and the image is still
    // the sibling's rootfs, or it fails with one line on stderr, nothing on stdout and no tag.
    let mut subsets: Vec<Vec<String>> = caps
        .iter()
        .map(|missing| caps.iter().filter(|c| *c != missing).cloned().collect())
        .collect();
    subsets.push(Vec::new());
    for (n, fewer) in subsets.iter().enumerate() {
        let tag = format!("fewer-caps-{n}");
        let args = commit_args(&tag);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_as_job(
            &lab,
            &committer_image,
            &format!("committer-{tag}"),
            fewer,
            &argv,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            let result = one_json_line(&out);
            eprintln!(
                "capabilities {fewer:?}: pushed via {} ({})",
                result["diffSource"], result["diffSourceReason"]
            );
            assert_ne!(
                result["diffSource"], "upperdir",
                "the upperdir trusted with only {fewer:?}: {result}"
            );
            assert_image_is_rootfs(&lab, result["image"].as_str().unwrap(), "sib");
        } else {
            eprintln!("capabilities {fewer:?}: {} {}", out.status, stderr.trim());
            assert!(
                out.stdout.is_empty(),
                "a failure prints no result:\n{}",
                describe(&out)
            );
            assert!(!stderr.trim().is_empty(), "a failure says why on stderr");
            assert!(
                !lab.tags("snap/sib").contains(&tag),
                "a failed commit pushed tag {tag}"
            );
        }
    }
    eprintln!("image test: {:?}", t.elapsed());
}

/// The Job's args use only flags that `committer commit` knows.
#[test]
fn commit_job_template_uses_only_known_flags() {
    let yaml = std::fs::read_to_string(repo_root().join("deploy/commit-job.yaml")).unwrap();
    let help = check(Command::new(env!("CARGO_BIN_EXE_committer")).args(["commit", "--help"]));
    let flags: Vec<&str> = yaml
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("- --"))
        .map(|f| f.split([' ', '=']).next().unwrap())
        .collect();
    assert!(flags.len() >= 5, "no args found in the Job: {flags:?}");
    for f in flags {
        assert!(
            help.contains(&format!("--{f} ")) || help.contains(&format!("--{f}\n")),
            "--{f} is not a commit flag"
        );
    }
}
