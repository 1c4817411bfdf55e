//! The reflink capture: on a loop-mounted XFS with reflink holding containerd's root
//! and the spool, the changed files are cloned while paused and the layer is built from the
//! clones after the resume; the pulled image still equals the container byte for byte, and a
//! sandbox writing right after the resume does not reach the layer. Elsewhere the capture copies.

use crate::fidelity::{host_changes, opts, TORTURE};
use crate::lab::{check, describe, Lab, RunOpts};
use crate::tree::compare_trees;
use committer::freeze::CaptureKind;
use committer::report::CommitResult;
use std::process::Command;

/// Big files (cloned, not inlined), one hardlinked, one rewritten in place, on top of the
/// fidelity torture.
const BIG: &str = r#"
set -e
head -c 9437185 /dev/urandom > /data/big-odd
head -c 4m /dev/urandom > /data/big-linked && ln /data/big-linked /data/big-link2
dd if=/dev/urandom of=/data/256k.bin bs=64k count=2 conv=notrunc 2>/dev/null
head -c 65536 /dev/urandom > /data/exactly-64k
"#;

fn commit(lab: &Lab, id: &str, spool: &std::path::Path) -> CommitResult {
    lab.commit(
        id,
        &format!("snap/{id}:v1"),
        &["--spool-dir", spool.to_str().unwrap()],
    )
}

/// The torture + big files in a `snapshotter` container, committed with the lab's spool;
/// the image equals the container and the result names `capture`.
fn exact_image(lab: &Lab, snapshotter: &str, capture: CaptureKind) {
    let base = lab.base_image("base", false);
    lab.run_container("t", &base, &RunOpts::default().snapshotter(snapshotter));
    lab.exec("t", TORTURE);
    lab.exec("t", BIG);
    host_changes(&lab.rootfs("t"));
    let result = commit(lab, "t", &lab.spool_dir);
    assert_eq!(result.paused.capture, Some(capture), "{result:?}");
    assert_eq!(result.paused.skipped, None, "{result:?}");
    let unpacked = lab.pull_unpack(&result.image);
    let diffs = compare_trees(&lab.rootfs("t"), &unpacked, &opts());
    assert!(
        diffs.is_empty(),
        "the image differs from the container ({snapshotter}, {capture:?}):\n{}",
        diffs.join("\n")
    );
    let left: Vec<_> = std::fs::read_dir(&lab.spool_dir).unwrap().collect();
    assert!(left.is_empty(), "the spool is left with {left:?}");
}

#[test]
fn xfs_overlay_is_captured_by_reflink_and_the_image_equals_the_container() {
    let _defaults = crate::lab::overlay_defaults();
    let lab = Lab::start_xfs();
    exact_image(&lab, "overlayfs", CaptureKind::Reflink);
}

#[test]
fn xfs_native_snapshotter_is_captured_by_reflink_and_the_image_equals_the_container() {
    let lab = Lab::start_xfs();
    exact_image(&lab, "native", CaptureKind::Reflink);
}

#[test]
fn the_default_filesystem_is_captured_by_copy_and_the_image_equals_the_container() {
    let _defaults = crate::lab::overlay_defaults();
    let lab = Lab::start();
    exact_image(&lab, "overlayfs", CaptureKind::Copy);
}

/// 64 counters, one at the start of each MiB of a 64 MiB random file, rewritten in order pass
/// after pass by a writer that never stops (frozen only while paused). A point-in-time capture
/// holds one pass boundary: counters never increase along the file and differ by at most one.
/// A capture that read the file after the resume (while gzip takes its time on 64 MiB of random
/// bytes) would see later passes further along the file.
#[test]
fn a_sandbox_rewriting_a_big_file_after_the_resume_does_not_change_the_layer() {
    let lab = Lab::start_xfs();
    let base = lab.base_image("base", false);
    lab.run_container("w", &base, &RunOpts::default());
    lab.exec("w", "head -c 64m /dev/urandom > /data/big");
    let writer = r#"
i=0
while :; do
  i=$((i+1))
  for j in $(seq 0 63); do
    printf '%08d' $i | dd of=/data/big bs=8 seek=$((j*131072)) conv=notrunc 2>/dev/null
  done
  echo $i > /data/passes.tmp && mv /data/passes.tmp /data/passes
done
"#;
    let mut bg = lab.ctr_command();
    bg.args([
        "tasks",
        "exec",
        "--exec-id",
        "writer",
        "w",
        "sh",
        "-c",
        writer,
    ]);
    bg.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = bg.spawn().expect("starting the writer");
    let passes = lab.rootfs("w").join("data/passes");
    let t = std::time::Instant::now();
    let done = || -> u64 {
        let text = std::fs::read_to_string(&passes).unwrap_or_default();
        text.trim().parse().unwrap_or(0)
    };
    while done() < 2 {
        assert!(t.elapsed().as_secs() < 60, "the writer made no passes");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let result = commit(&lab, "w", &lab.spool_dir);
    assert_eq!(
        result.paused.capture,
        Some(CaptureKind::Reflink),
        "{result:?}"
    );
    let unpacked = lab.pull_unpack(&result.image);
    let layer = std::fs::read(unpacked.join("data/big")).unwrap();
    assert_eq!(layer.len(), 64 << 20);
    let got: Vec<u64> = (0..64)
        .map(|j| counter_at(&layer, j << 20).expect("a counter in the layer"))
        .collect();
    let live_after = std::fs::read(lab.rootfs("w").join("data/big")).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let (first, last) = (got[0], got[63]);
    assert!(
        got.windows(2).all(|w| w[0] >= w[1]) && first - last <= 1,
        "the layer holds counters from more than one instant: {got:?}"
    );
    let later = counter_at(&live_after, 0).unwrap();
    assert!(
        later > first + 1,
        "the writer did not run on after the resume ({later} vs {first}): the test proved nothing"
    );
}

/// The 8 ASCII digits at `at`, as a number.
fn counter_at(bytes: &[u8], at: usize) -> Option<u64> {
    let s = std::str::from_utf8(bytes.get(at..at + 8)?).ok()?;
    s.trim().parse().ok()
}

/// On the XFS lab a reflink capture would need almost no room, but the spool's free space is
/// still checked against the diff before the pause: with 40 MiB of changes and ~16 MiB free,
/// the commit is refused, the sandbox runs on, nothing is left in the spool, no tag.
#[test]
fn on_xfs_a_spool_that_cannot_hold_the_diff_is_refused_before_the_pause() {
    let lab = Lab::start_xfs();
    let base = lab.base_image("base", false);
    lab.run_container("big", &base, &RunOpts::default());
    lab.exec("big", "head -c 40m /dev/urandom > /data/big");
    let st = rustix::fs::statvfs(&lab.spool_dir).unwrap();
    let free = st.f_bavail * st.f_frsize;
    let filler = lab.spool_dir.parent().unwrap().join("filler");
    check(
        Command::new("fallocate")
            .args(["-l", &(free - (16 << 20)).to_string()])
            .arg(&filler),
    );
    let spool = ["--spool-dir", lab.spool_dir.to_str().unwrap()];
    let out = lab.commit_output("big", "snap/big:v1", &spool);
    let _ = std::fs::remove_file(&filler);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let stderr = crate::cli::stderr_text(&out);
    assert!(
        stderr.contains("bytes free") && stderr.contains("--spool-dir"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&lab.spool_dir).unwrap().collect();
    assert!(left.is_empty(), "the spool is left with {left:?}");
    assert_eq!(lab.task_status("big"), "RUNNING");
    assert!(lab.tags("snap/big").is_empty(), "no tag");
}
