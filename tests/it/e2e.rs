//! End to end: a real container on the lab's containerd, committed and pushed to the lab's
//! registry, read back by skopeo + umoci and by containerd itself.

use crate::lab::{Lab, RunOpts};
use crate::tree::{compare_trees, CompareOpts};
use serde_json::Value;

/// The unpacked image equals the container's merged rootfs (content, type, mode, owner, link
/// target, hardlink groups), the runtime's own paths aside.
fn assert_image_equals_container(lab: &Lab, id: &str, unpacked: &std::path::Path) {
    let opts = CompareOpts {
        hardlinks: true,
        ..CompareOpts::container_rootfs()
    };
    let diffs = compare_trees(&lab.rootfs(id), unpacked, &opts);
    assert!(
        diffs.is_empty(),
        "pushed image differs from container {id}:\n{}",
        diffs.join("\n")
    );
}

/// Every basic change kind (add, modify, delete, replace, link, chmod, chown), made from inside the container.
const CHANGES: &str = r#"
set -e
echo added > /data/new.txt
echo modified >> /data/modify.txt
rm /data/delete.txt
rm -r /data/dir-to-delete
rm -r /data/dir-to-replace && mkdir /data/dir-to-replace && echo fresh > /data/dir-to-replace/fresh.txt
ln -s ../data/keep.txt /data/link-to-keep
ln -s /nonexistent/target /data/dangling
echo linked > /data/hard-a && ln /data/hard-a /data/hard-b
chmod 0600 /data/keep.txt
mkdir -p /new/deep/dir && echo deep > /new/deep/dir/f
chown 1234:5678 /new/deep/dir/f
echo "sub change" > /data/sub/deep/file
dd if=/dev/urandom of=/new/random.bin bs=64k count=48 2>/dev/null
"#;
// (The 3 MiB of random data make whole gzip blocks that committer stores without deflating: skopeo and umoci, Go
// readers of their own, must take them.)

fn out_path(lab: &Lab, name: &str) -> String {
    lab.dir.join(name).to_string_lossy().into_owned()
}

fn run_json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "committer failed ({}):\nstderr: {}\nstdout: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stdout must hold exactly the result JSON line: {stdout}"
    );
    serde_json::from_str(lines[0]).expect("result is JSON")
}

fn sandbox(lab: &Lab, id: &str, image: &str) {
    let labels = vec![
        (
            "io.kubernetes.pod.namespace".to_string(),
            "team-a".to_string(),
        ),
        ("io.kubernetes.pod.name".to_string(), format!("pod-{id}")),
        (
            "io.kubernetes.container.name".to_string(),
            "work".to_string(),
        ),
    ];
    lab.run_container(
        id,
        image,
        &RunOpts {
            labels,
            ..RunOpts::default()
        },
    );
}

#[test]
fn commit_pushes_an_image_equal_to_the_container_rootfs_and_it_runs() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    sandbox(&lab, "c1", &base);
    lab.exec("c1", CHANGES);

    let target = format!("{}/snap/c1:v1", lab.registry);
    let out = lab.committer(&[
        "commit",
        "--container",
        "c1",
        "--image",
        &target,
        "--plain-http",
    ]);
    let result = run_json(&out);
    let digest = result["manifestDigest"].as_str().unwrap();
    assert_eq!(
        result["image"],
        format!("{}/snap/c1@{digest}", lab.registry)
    );
    assert_eq!(result["tag"], target);
    assert_eq!(
        result["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(result["baseImage"], base);
    assert_eq!(
        result["layer"]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(
        lab.task_status("c1"),
        "RUNNING",
        "the sandbox runs on after the commit"
    );

    // An independent reader: skopeo copies it to an OCI layout, umoci unpacks it.
    let unpacked = lab.pull_unpack(result["image"].as_str().unwrap());
    assert_image_equals_container(&lab, "c1", &unpacked);

    // The laptop: Docker pulls and runs it, equal to the sandbox but for Docker's own files
    // (docker::DOCKER_OWN_FILES: /.dockerenv, /etc/hosts, /etc/hostname, /etc/resolv.conf, /etc/mtab).
    let opts = CompareOpts {
        hardlinks: true,
        ..CompareOpts::container_rootfs()
    };
    let image = result["image"].as_str().unwrap();
    if let Some(diffs) = crate::docker::docker_readback(&lab, image, &lab.rootfs("c1"), &opts) {
        assert!(
            diffs.is_empty(),
            "docker run's root filesystem differs from container c1:\n{}",
            diffs.join("\n")
        );
    }

    // containerd pulls it by digest and runs it as a new sandbox that sees the changes.
    let by_digest = result["image"].as_str().unwrap();
    lab.ctr(&["images", "pull", "--plain-http", by_digest]);
    let seen = lab.run_once(
        by_digest,
        "restored",
        "cat /data/new.txt /data/dir-to-replace/fresh.txt; test ! -e /data/delete.txt && test ! -e /data/dir-to-delete && echo gone",
    );
    assert_eq!(seen.trim(), "added\nfresh\ngone");
}

#[test]
fn pod_selector_finds_the_same_container_as_its_id() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    sandbox(&lab, "c2", &base);
    lab.exec("c2", "echo x > /data/x");
    let by_id = run_json(&lab.committer(&[
        "diff",
        "--container",
        "c2",
        "--output",
        &out_path(&lab, "by-id.tgz"),
    ]));
    let by_pod = run_json(&lab.committer(&[
        "diff",
        "--pod",
        "team-a/pod-c2",
        "--container-name",
        "work",
        "--output",
        &out_path(&lab, "by-pod.tgz"),
    ]));
    let by_pod_alone = run_json(&lab.committer(&[
        "diff",
        "--pod",
        "team-a/pod-c2",
        "--output",
        &out_path(&lab, "p.tgz"),
    ]));
    assert_eq!(by_id["diffId"], by_pod["diffId"]);
    assert_eq!(
        by_id["digest"], by_pod_alone["digest"],
        "an unchanged container gives the same layer digest"
    );
}

#[test]
fn docker_schema2_base_gives_a_docker_manifest() {
    let lab = Lab::start();
    let base = lab.base_image("dockerbase", true);
    sandbox(&lab, "c3", &base);
    lab.exec("c3", "echo hi > /hi");
    let target = format!("{}/snap/c3:v1", lab.registry);
    let result = run_json(&lab.committer(&[
        "commit",
        "--container",
        "c3",
        "--image",
        &target,
        "--plain-http",
    ]));
    assert_eq!(
        result["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        result["layer"]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    let unpacked = lab.pull_unpack(result["image"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(unpacked.join("hi")).unwrap(),
        "hi\n"
    );
}

/// Asserts one error line on stderr that mentions `needle`, the exit code, and nothing on stdout.
fn assert_clear_failure(out: &std::process::Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout on failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Structured log events (JSON lines) may precede it; the error itself is one line: plain
    // text on a terminal, a JSON object with level "error" when stderr is piped (as here).
    let errors = crate::cli::error_lines(&stderr);
    assert_eq!(errors.len(), 1, "one error line, got: {stderr}");
    assert!(
        errors[0].contains(needle),
        "error should mention {needle:?}: {}",
        errors[0]
    );
}

#[test]
fn bad_inputs_get_one_clear_line_and_push_nothing() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    sandbox(&lab, "c4", &base);
    // A second container in the same pod makes the pod ambiguous without --container-name.
    lab.run_container(
        "c4b",
        &base,
        &RunOpts {
            labels: vec![
                ("io.kubernetes.pod.namespace".into(), "team-a".into()),
                ("io.kubernetes.pod.name".into(), "pod-c4".into()),
                ("io.kubernetes.container.name".into(), "sidecar".into()),
            ],
            ..RunOpts::default()
        },
    );
    let target = format!("{}/snap/bad:v1", lab.registry);
    let commit = |extra: &[&str]| {
        let mut args = vec!["commit", "--image", &target, "--plain-http"];
        args.extend_from_slice(extra);
        lab.committer(&args)
    };

    assert_clear_failure(&commit(&["--container", "nope"]), 3, "\"nope\" not found");
    assert_clear_failure(&commit(&["--pod", "team-a/pod-c4"]), 3, "--container-name");
    assert_clear_failure(&commit(&["--pod", "team-a/pod-none"]), 3, "team-a/pod-none");
    assert_clear_failure(
        &lab.committer(&[
            "commit",
            "--container",
            "c4",
            "--image",
            &target,
            "--plain-http",
            "--address",
            "/nonexistent.sock",
        ]),
        3,
        "/nonexistent.sock",
    );
    assert_clear_failure(
        &lab.committer(&[
            "commit",
            "--container",
            "c4",
            "--image",
            "127.0.0.1:1/x/y:v1",
            "--plain-http",
        ]),
        5,
        "127.0.0.1:1",
    );
    assert_clear_failure(
        &lab.committer(&[
            "commit",
            "--container",
            "c4",
            "--image",
            "UPPER/Case::bad",
            "--plain-http",
        ]),
        2,
        "--image",
    );
    assert_eq!(lab.task_status("c4"), "RUNNING");
    assert!(
        lab.tags("snap/bad").is_empty(),
        "no tag may be pushed by a failed commit"
    );
}

#[test]
fn a_container_on_an_off_host_runtime_is_refused() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.ctr(&[
        "containers",
        "create",
        "--runtime",
        "io.containerd.runsc.v1",
        &base,
        "gvisor-sandbox",
    ]);
    let target = format!("{}/snap/gv:v1", lab.registry);
    let out = lab.committer(&[
        "commit",
        "--container",
        "gvisor-sandbox",
        "--image",
        &target,
        "--plain-http",
    ]);
    assert_clear_failure(&out, 4, "runsc");
}

#[test]
fn containerd_diff_source_pushes_the_same_tree_through_the_socket_only() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    sandbox(&lab, "c5", &base);
    lab.exec("c5", CHANGES);
    let target = format!("{}/snap/c5:v1", lab.registry);
    let result = run_json(&lab.committer(&[
        "commit",
        "--container",
        "c5",
        "--image",
        &target,
        "--plain-http",
        "--diff-source",
        "containerd",
    ]));
    assert_eq!(result["diffSource"], "containerd");
    assert_eq!(lab.task_status("c5"), "RUNNING");
    let unpacked = lab.pull_unpack(result["image"].as_str().unwrap());
    assert_image_equals_container(&lab, "c5", &unpacked);
}

#[test]
fn mount_stubs_and_exclusions_stay_out_and_the_base_shows_through() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    let injected = lab.dir.join("injected.conf");
    std::fs::write(&injected, "from the host\n").unwrap();
    let opts = RunOpts {
        mounts: vec![
            format!(
                "type=bind,src={},dst=/etc/injected.conf,options=rbind:ro",
                injected.display()
            ),
            format!(
                "type=bind,src={},dst=/var/run/secrets/sa,options=rbind:ro",
                lab.dir.join("logs").display()
            ),
        ],
        ..RunOpts::default()
    };
    lab.run_container("c6", &base, &opts);
    lab.exec("c6", "echo changed > /data/keep.txt; mkdir -p /cache/big && echo junk > /cache/big/f; echo kept > /data/kept");
    let target = format!("{}/snap/c6:v1", lab.registry);
    let result = run_json(&lab.committer(&[
        "commit",
        "--container",
        "c6",
        "--image",
        &target,
        "--plain-http",
        "--exclude",
        "/data/keep.txt",
        "--exclude",
        "/cache",
    ]));
    let unpacked = lab.pull_unpack(result["image"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(unpacked.join("data/kept")).unwrap(),
        "kept\n"
    );
    assert_eq!(
        std::fs::read_to_string(unpacked.join("data/keep.txt")).unwrap(),
        "keep me\n",
        "excluded: base content"
    );
    assert!(
        !unpacked.join("cache").exists(),
        "an excluded new dir is absent"
    );
    assert!(
        !unpacked.join("etc/injected.conf").exists(),
        "a mount stub is left out"
    );
    assert!(
        !unpacked.join("var/run/secrets").exists(),
        "a mount-point dir stub is left out"
    );
}

#[test]
fn an_unchanged_container_gets_no_empty_layer_but_a_history_entry() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("c7", &base, &RunOpts::default());
    let target = format!("{}/snap/c7:v1", lab.registry);
    let result = run_json(&lab.committer(&[
        "commit",
        "--container",
        "c7",
        "--image",
        &target,
        "--plain-http",
    ]));
    assert!(result["layer"].is_null(), "{result}");
    let config = crate::lab::check(std::process::Command::new("skopeo").args([
        "inspect",
        "--config",
        "--tls-verify=false",
        &format!("docker://{}", result["image"].as_str().unwrap()),
    ]));
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
    let history = config["history"].as_array().unwrap();
    assert_eq!(history.last().unwrap()["empty_layer"], true);
    assert_eq!(history.last().unwrap()["created_by"], "committer");
}

/// `committer diff --diff-source containerd` once ignored the flag and walked the snapshot
/// locally. Here the snapshotter's directories are hidden from committer (a tmpfs over them in
/// its own mount namespace), as in a Job that mounts only the socket: only containerd's own
/// differ can produce the layer, and the file must hold the container's change.
#[test]
fn diff_with_the_containerd_source_needs_only_the_socket() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    sandbox(&lab, "c9", &base);
    lab.exec("c9", "echo through-the-socket > /data/socket-only");
    let snapshots = lab.dir.join("root/io.containerd.snapshotter.v1.overlayfs");
    let output = out_path(&lab, "socket-only.tgz");
    let hidden_with = |source: &str, extra: &str, output: &str| {
        let script = format!(
            "mount -t tmpfs hidden {} && exec \"$0\" diff --container c9 --diff-source {source} --output {output} {extra}",
            snapshots.display()
        );
        let exe = env!("CARGO_BIN_EXE_committer");
        let mut unshare = std::process::Command::new("unshare");
        unshare
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
                exe,
            ])
            .env("CONTAINERD_ADDRESS", &lab.address)
            .env("CONTAINERD_NAMESPACE", &lab.namespace);
        crate::lab::run(&mut unshare)
    };
    let hidden = |source: &str| hidden_with(source, "", &output);
    let walked = hidden("walk");
    assert!(
        !walked.status.success(),
        "a local walk cannot see the hidden snapshot; it must fail:\n{}",
        crate::lab::describe(&walked)
    );
    let desc = run_json(&hidden("containerd"));
    let bytes = std::fs::read(&output).unwrap();
    assert_eq!(desc["size"].as_u64(), Some(bytes.len() as u64));
    let digest = format!("sha256:{}", sha256_hex(&bytes));
    assert_eq!(desc["digest"].as_str(), Some(digest.as_str()));
    let listing = crate::lab::check(std::process::Command::new("tar").args([
        "-xzOf",
        &output,
        "data/socket-only",
    ]));
    assert_eq!(listing, "through-the-socket\n");
    assert_eq!(lab.task_status("c9"), "RUNNING");

    // What only a local source can apply is refused, not silently ignored: containerd chosen, or
    // auto falling back to it.
    let refused = out_path(&lab, "refused.tgz");
    for (source, flags) in [
        ("containerd", "--max-layer-bytes 1"),
        ("auto", "--max-files 1"),
        ("auto", "--keep-xattrs security.selinux --max-hole-bytes 0"),
    ] {
        let out = hidden_with(source, flags, &refused);
        let stderr = crate::cli::stderr_text(&out);
        assert_eq!(out.status.code(), Some(4), "{source} {flags}: {stderr}");
        let named = flags
            .split(' ')
            .filter(|f| f.starts_with("--"))
            .collect::<Vec<_>>();
        let want = format!(
            "containerd's diff service cannot apply {}",
            named.join(", ")
        );
        assert!(stderr.contains(&want), "{source} {flags}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{source} {flags}: {stderr}");
        assert!(!std::path::Path::new(&refused).exists());
    }
    assert_eq!(lab.task_status("c9"), "RUNNING");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}
