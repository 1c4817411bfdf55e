//! The spool on a small disk: a diff that cannot fit is refused before the sandbox is paused,
//! with the numbers; one that fits once (but not twice) commits, because the uncompressed
//! capture is given back to the filesystem as the compressor consumes it.

use crate::lab::{check, describe, Lab, RunOpts};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of `mib` MiB mounted under the lab dir, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(lab: &Lab, name: &str, mib: u64) -> SmallDisk {
        let dir = lab.dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        check(Command::new("mount").args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m"),
            "spool",
            dir.to_str().unwrap(),
        ]));
        SmallDisk(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn commit_with_spool(lab: &Lab, id: &str, spool: &Path) -> std::process::Output {
    lab.commit_output(
        id,
        &format!("snap/{id}:v1"),
        &["--spool-dir", spool.to_str().unwrap()],
    )
}

#[test]
fn a_diff_larger_than_the_spool_is_refused_before_the_pause() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("big", &base, &RunOpts::default());
    lab.exec("big", "head -c 24m /dev/urandom > /data/big");
    let disk = SmallDisk::mount(&lab, "spool-8m", 8);
    let out = commit_with_spool(&lab, "big", disk.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let line = stderr
        .lines()
        .find(|l| l.contains("--spool-dir"))
        .unwrap_or_else(|| panic!("no line names --spool-dir:\n{stderr}"));
    assert!(line.contains(disk.path().to_str().unwrap()), "{line}");
    assert!(line.contains("bytes free"), "{line}");
    assert!(
        disk.entries().is_empty(),
        "nothing left in the spool: {:?}",
        disk.entries()
    );
    assert_eq!(lab.task_status("big"), "RUNNING");
    assert!(lab.tags("snap/big").is_empty(), "no tag");
}

/// 40 MiB of random data compresses to ~40 MiB: capture + layer would need ~80 MiB, the spool
/// has 72 MiB. The capture is released as it is compressed (in 8 MiB steps), so the commit
/// fits.
#[test]
fn a_diff_that_fits_once_but_not_twice_commits() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("mid", &base, &RunOpts::default());
    lab.exec("mid", "head -c 40m /dev/urandom > /data/rand");
    let disk = SmallDisk::mount(&lab, "spool-72m", 72);
    let out = commit_with_spool(&lab, "mid", disk.path());
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        disk.entries().is_empty(),
        "the spool is emptied after the push: {:?}",
        disk.entries()
    );
    let unpacked = lab.pull_unpack(&crate::lab::result_of(&out).image);
    let pushed = std::fs::read(unpacked.join("data/rand")).unwrap();
    let live = check(Command::new("sha256sum").arg(lab.rootfs("mid").join("data/rand")));
    let sum = check(Command::new("sha256sum").arg(unpacked.join("data/rand")));
    assert_eq!(pushed.len(), 40 << 20);
    assert_eq!(
        live.split_whitespace().next(),
        sum.split_whitespace().next()
    );
}
