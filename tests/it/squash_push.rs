//! Squashing commits through the command line (`--squash`, `--max-layers`), pulled by
//! containerd and run as a new sandbox: the chain stays original base + 1 layer over the cycles,
//! the restored sandbox equals the one committed, and a deleted random file is in no blob.

use crate::lab::{Lab, RunOpts};
use crate::tree::{compare_trees, CompareOpts};
use committer::media;
use committer::report::CommitResult;
use serde_json::Value;

/// Commits container `id` to `REGISTRY/snap:TAG` with `extra` flags; returns the image by digest.
/// On overlay, a squash reads upperdirs: the stack of them, or, when the image is its own
/// original base (nothing to merge), the container's upperdir as an append does.
fn commit(lab: &Lab, id: &str, tag: &str, extra: &[&str]) -> String {
    let result = lab.commit(id, &format!("snap:{tag}"), extra);
    if extra.contains(&"--squash") && result.diff_source_reason != "overlay upperdir is exact" {
        assert_squashed_from_the_uppers(&result);
    }
    result.image
}

/// A squash of a snapshot image: must have merged the stack of upperdirs.
fn commit_squash(lab: &Lab, id: &str, tag: &str, extra: &[&str]) -> String {
    let result = lab.commit(id, &format!("snap:{tag}"), &[&["--squash"], extra].concat());
    assert_squashed_from_the_uppers(&result);
    result.image
}

fn assert_squashed_from_the_uppers(result: &CommitResult) {
    assert_eq!(result.diff_source, "upperdir", "{result:?}");
    let reason = &result.diff_source_reason;
    assert!(
        reason.starts_with("--squash: the upperdir and") && reason.contains("merged"),
        "{result:?}"
    );
}

fn manifest(image: &str) -> Value {
    let raw = crate::lab::check(std::process::Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ]));
    serde_json::from_str(&raw).unwrap()
}

fn media_type(docker: bool) -> &'static str {
    if docker {
        media::DOCKER_MANIFEST
    } else {
        media::OCI_MANIFEST
    }
}

/// The manifest's layer sizes.
fn layer_sizes(image: &str) -> Vec<u64> {
    manifest(image)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .collect()
}

/// Runs `image` as `next` and checks it equals the committed sandbox `prev`.
fn restore_equals(lab: &Lab, image: &str, prev: &str, next: &str) {
    lab.ctr(&["images", "pull", "--plain-http", image]);
    lab.run_container(next, image, &RunOpts::default());
    let diffs = compare_trees(
        &lab.rootfs(prev),
        &lab.rootfs(next),
        &CompareOpts::container_rootfs(),
    );
    assert!(
        diffs.is_empty(),
        "{next} differs from {prev}:\n{}",
        diffs.join("\n")
    );
}

#[test]
fn squashed_snapshots_restore_like_the_sandbox_and_stay_base_plus_one() {
    squash_cycles(false);
}

#[test]
fn squashed_snapshots_of_a_docker_schema2_base_stay_docker_and_base_plus_one() {
    squash_cycles(true);
}

fn squash_cycles(docker: bool) {
    let _defaults = crate::lab::overlay_defaults();
    let lab = Lab::start();
    let base = lab.base_image(if docker { "base-docker" } else { "base-oci" }, docker);
    let base_size: u64 = layer_sizes(&base).iter().sum();
    lab.run_container("c1", &base, &RunOpts::default());
    lab.exec("c1", "head -c 4194304 /dev/urandom > /big && echo one > /a");
    let snap1 = commit(&lab, "c1", "1", &[]);
    restore_equals(&lab, &snap1, "c1", "c2");
    lab.exec(
        "c2",
        "rm /big && echo two > /a && echo b > /b && rm /bin/true",
    );
    assert_eq!(layer_sizes(&snap1).len(), 3);

    let mut prev = "c2".to_string();
    for cycle in 2..4 {
        let image = commit_squash(&lab, &prev, &cycle.to_string(), &[]);
        let sizes = layer_sizes(&image);
        let m = manifest(&image);
        assert_eq!(m["mediaType"], media_type(docker));
        let top = m["layers"][2]["mediaType"].as_str().unwrap().to_string();
        assert!(top.contains(if docker { "docker" } else { "oci" }), "{top}");
        assert_eq!(sizes.len(), 3, "cycle {cycle}: base + 1");
        let added: u64 = sizes.iter().sum::<u64>() - base_size;
        assert!(
            added < 64 * 1024,
            "cycle {cycle}: the deleted 4 MiB file is in a blob ({added} bytes)"
        );
        let next = format!("c{}", cycle + 1);
        restore_equals(&lab, &image, &prev, &next);
        lab.exec(
            &next,
            &format!("echo {cycle} > /a && echo {cycle} > /cycle-{cycle}"),
        );
        prev = next;
    }
}

#[test]
fn max_layers_appends_until_the_bound_then_squashes_and_every_image_restores_exactly() {
    let _defaults = crate::lab::overlay_defaults();
    let lab = Lab::start();
    let base = lab.base_image("base-oci", false);
    lab.run_container("c0", &base, &RunOpts::default());
    let mut prev = "c0".to_string();
    let mut counts = Vec::new();
    for cycle in 0..6 {
        // Each cycle rewrites /a, adds /cN and deletes the file added two cycles before.
        let delete = match cycle {
            0 | 1 => String::new(),
            n => format!(" && rm /c{}", n - 2),
        };
        lab.exec(
            &prev,
            &format!("echo {cycle} > /a && echo x > /c{cycle}{delete}"),
        );
        let result = lab.commit(&prev, &format!("snap:{cycle}"), &["--max-layers", "2"]);
        let image = result.image.as_str();
        let layers = layer_sizes(image).len();
        if cycle > 0 && layers == 3 {
            assert_squashed_from_the_uppers(&result);
        }
        assert!(layers <= 2 + 2, "cycle {cycle}: {layers} layers");
        counts.push(layers);
        let next = format!("c{}", cycle + 1);
        restore_equals(&lab, image, &prev, &next);
        prev = next;
    }
    assert_eq!(counts, [3, 4, 3, 4, 3, 4], "append, append, squash, …");
}

/// Bench (run with `--ignored --nocapture`): an append commit against a squash of the same
/// small change on an original base of 30 000 files. The squash reads the stack of upperdirs.
#[test]
#[ignore]
fn bench_squash_walk_against_append_on_a_large_base() {
    use crate::lab::check;
    use std::process::Command;
    let _defaults = crate::lab::overlay_defaults();
    let lab = Lab::start();
    let base = lab.base_image("base-oci", false);
    lab.run_container("c1", &base, &RunOpts::default());
    lab.exec(
        "c1",
        "mkdir /many && cd /many && i=0; while [ $i -lt 30000 ]; do echo $i > f$i; i=$((i+1)); done",
    );
    let snap = commit(&lab, "c1", "many", &[]);
    // The same image without committer's record: an original base of 3 layers.
    let layout = lab.dir.join("big-layout");
    let oci = |tag: &str| format!("oci:{}:{tag}", layout.display());
    check(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{snap}"))
            .arg(oci("x")),
    );
    check(
        Command::new("umoci")
            .args(["config", "--clear=config.labels", "--image"])
            .arg(format!("{}:x", layout.display()))
            .args(["--tag", "big"]),
    );
    let big = format!("{}/big:1", lab.registry);
    check(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(oci("big"))
            .arg(format!("docker://{big}")),
    );
    lab.ctr(&["images", "pull", "--plain-http", &big]);
    lab.run_container("c2", &big, &RunOpts::default());
    lab.exec("c2", "echo two > /a");
    let snap2 = commit(&lab, "c2", "2", &[]);
    restore_equals(&lab, &snap2, "c2", "c3");
    lab.exec("c3", "echo three > /a");
    let t = std::time::Instant::now();
    commit(&lab, "c3", "append", &[]);
    let append = t.elapsed();
    let t = std::time::Instant::now();
    commit_squash(&lab, "c3", "squash", &[]);
    let squash = t.elapsed();
    eprintln!("30000-file base, 1-file change: append commit {append:?}, squash {squash:?}");
}

/// 20 cycles of commit → restore as a new sandbox → change (rewrite a file, add 1 MiB, delete
/// what was added two cycles before; in cycle 1 a 16 MiB file that cycle 3 deletes), append
/// against squash. Every restore equals the sandbox; squashed images stay base + 1 layer and
/// hold only what is live (the deleted files are in no blob), while appended ones grow. Prints
/// the table the README quotes (commit time, layers, blob MiB per cycle) with `--nocapture`.
#[test]
fn twenty_cycles_of_squash_stay_base_plus_one_and_hold_only_what_is_live() {
    let _defaults = crate::lab::overlay_defaults();
    let lab = Lab::start();
    let base = lab.base_image("base-oci", false);
    let base_sizes = layer_sizes(&base);
    let base_bytes: u64 = base_sizes.iter().sum();
    let mut rows = Vec::new();
    for (mode, flags) in [("append", vec![]), ("squash", vec!["--squash"])] {
        let mut prev = format!("{mode}-0");
        lab.run_container(&prev, &base, &RunOpts::default());
        for cycle in 1..=20u64 {
            let mut script =
                format!("echo {cycle} > /a && head -c 1048576 /dev/urandom > /f{cycle}");
            if cycle > 2 {
                script.push_str(&format!(" && rm /f{}", cycle - 2));
            }
            if cycle == 1 {
                script.push_str(" && head -c 16777216 /dev/urandom > /big");
            }
            if cycle == 3 {
                script.push_str(" && rm /big");
            }
            lab.exec(&prev, &script);
            let t = std::time::Instant::now();
            let image = commit(&lab, &prev, &format!("{mode}-{cycle}"), &flags);
            let ms = t.elapsed().as_millis();
            let sizes = layer_sizes(&image);
            let bytes: u64 = sizes.iter().sum();
            if mode == "squash" {
                assert_eq!(sizes.len(), base_sizes.len() + 1, "cycle {cycle}: base + 1");
                if cycle >= 3 {
                    // Live: two 1 MiB random files and a few bytes; 5% and 64 KiB of slack.
                    let live = 2 << 20;
                    assert!(
                        bytes <= base_bytes + live + live / 20 + (64 << 10),
                        "cycle {cycle}: {bytes} bytes in blobs, base {base_bytes}"
                    );
                }
            } else {
                assert_eq!(sizes.len() as u64, base_sizes.len() as u64 + cycle);
            }
            rows.push((mode, cycle, ms, sizes.len(), bytes));
            let next = format!("{mode}-{cycle}r");
            restore_equals(&lab, &image, &prev, &next);
            prev = next;
        }
    }
    eprintln!("| cycle | append: commit ms, layers, MiB | squash: commit ms, layers, MiB |");
    eprintln!("|---|---|---|");
    for cycle in 1..=20 {
        let row = |m: &str| {
            let r = rows.iter().find(|r| r.0 == m && r.1 == cycle).unwrap();
            format!("{} ms, {}, {:.1}", r.2, r.3, r.4 as f64 / 1048576.0)
        };
        eprintln!("| {cycle} | {} | {} |", row("append"), row("squash"));
    }
}

/// The entry names of `image`'s top layer (committed with `--compression none`), fetched from
/// the registry by digest.
fn top_layer_names(lab: &Lab, image: &str) -> Vec<String> {
    let m = manifest(image);
    let top = m["layers"].as_array().unwrap().last().unwrap();
    assert_eq!(top["mediaType"], media::OCI_LAYER_TAR, "{m}");
    let repo = image.split('@').next().unwrap();
    let (host, name) = repo.split_once('/').unwrap();
    let digest = top["digest"].as_str().unwrap();
    let blob = lab.dir.join(digest.trim_start_matches("sha256:"));
    crate::lab::check(
        std::process::Command::new("curl")
            .args(["-fsSo"])
            .arg(&blob)
            .arg(format!("http://{host}/v2/{name}/blobs/{digest}")),
    );
    let mut archive = tar::Archive::new(std::fs::File::open(blob).unwrap());
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path().unwrap().to_string_lossy().into_owned();
            p.trim_end_matches('/').to_string()
        })
        .collect()
}

/// Deletions and re-creations spread over three cycles, then one squash: what a snapshot added
/// and a later one deleted leaves no whiteout (the base never had it), a base file deleted and
/// re-created is there, a base directory emptied in one cycle and partly refilled in the next
/// is opaque with the refill only, and the restored sandbox equals the committed one.
#[test]
fn squash_over_deletions_across_cycles_whiteouts_only_what_the_base_had() {
    let _defaults = crate::lab::overlay_defaults();
    let lab = Lab::start();
    let base = lab.base_image("base-oci", false);
    lab.run_container("d1", &base, &RunOpts::default());
    lab.exec(
        "d1",
        "echo n > /new1 && mkdir -p /newdir/s && echo n > /newdir/s/f && rm /data/delete.txt \
         && rm -r /data/sub && mkdir /data/sub && echo a > /data/sub/a && rm -r /data/dir-to-delete \
         && rm -r /data/dir-to-replace && echo f > /data/dir-to-replace && echo m1 > /data/modify.txt",
    );
    let s1 = commit(&lab, "d1", "x1", &[]);
    restore_equals(&lab, &s1, "d1", "d2");
    lab.exec(
        "d2",
        "rm /new1 && rm -r /newdir && echo back > /data/delete.txt && echo x > /data/sub/x \
         && mkdir /data/dir-to-delete && echo c > /data/dir-to-delete/c && rm /data/keep.txt",
    );
    let s2 = commit(&lab, "d2", "x2", &[]);
    restore_equals(&lab, &s2, "d2", "d3");
    lab.exec(
        "d3",
        "mkdir /newdir && echo again > /newdir/g && rm /data/sub/a && echo m3 > /data/modify.txt \
         && echo k > /data/keep.txt && rm /data/hardlink-a",
    );
    let s3 = commit_squash(&lab, "d3", "sq", &["--compression", "none"]);
    assert_eq!(layer_sizes(&s3).len(), 3, "base + 1");
    restore_equals(&lab, &s3, "d3", "d4");

    let names = top_layer_names(&lab, &s3);
    let has = |n: &str| names.iter().any(|e| e == n);
    for n in [
        "newdir/g",
        "data/delete.txt",
        "data/sub/.wh..wh..opq",
        "data/sub/x",
        "data/dir-to-delete/.wh..wh..opq",
        "data/dir-to-delete/c",
        "data/.wh.dir-to-replace",
        "data/dir-to-replace",
        "data/keep.txt",
        "data/modify.txt",
        "data/.wh.hardlink-a",
    ] {
        assert!(has(n), "{n} missing from {names:?}");
    }
    for n in [
        ".wh.new1",
        ".wh.newdir",
        "newdir/.wh..wh..opq",
        "newdir/s",
        "data/sub/a",
        "data/.wh.delete.txt",
        "data/.wh.keep.txt",
        "data/.wh.sub",
    ] {
        assert!(!has(n), "{n} in {names:?}");
    }
}

/// The native snapshotter copies trees, so every directory's mtime in a sandbox is the copy's:
/// a squash writes only what the sandbox changed (directories only above a changed entry), by a
/// walk, and restores like the sandbox.
#[test]
fn native_squash_writes_only_what_changed() {
    let lab = Lab::start();
    let base = lab.base_image("base-oci", false);
    let native = RunOpts::default().snapshotter("native");
    lab.run_container("n1", &base, &native);
    lab.exec("n1", "echo one > /a && rm /data/delete.txt");
    let s1 = lab.commit("n1", "snap:n1", &[]).image;
    let pull = ["images", "pull", "--plain-http", "--snapshotter", "native"];
    let out = lab.try_ctr(&[&pull[..], &[&s1]].concat());
    // containerd 2's ctr pulls through the transfer service, which unpacks only into the
    // snapshotters its config names (overlayfs): its client-side pull (`--local`) unpacks into any.
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no unpack platforms"), "{err}");
        lab.ctr(&[&pull[..], &["--local", &s1]].concat());
    }
    lab.run_container("n2", &s1, &native);
    lab.exec("n2", "echo two > /a && echo b > /etc/b");
    let result = lab.commit("n2", "snap:n2", &["--squash", "--compression", "none"]);
    assert_eq!(result.diff_source, "walk", "{result:?}");
    let image = result.image.as_str();
    let mut names = top_layer_names(&lab, image);
    names.sort();
    assert_eq!(
        names,
        ["a", "data", "data/.wh.delete.txt", "etc", "etc/b"],
        "{result:?}"
    );
    restore_equals(&lab, image, "n2", "n3");
}
