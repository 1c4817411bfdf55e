//! Layer fidelity: a torture of change kinds, committed from a real container in each setup (overlay
//! default, redirect_dir=on, metacopy=on, the native snapshotter), must read back — through
//! skopeo + umoci and through containerd's own unpacker — equal to the container's merged rootfs:
//! content, type, mode, owner, mtime, link target, xattrs, device numbers, hardlink groups.

use crate::lab::{Lab, RunOpts};
use crate::tree::{compare_trees, CompareOpts};
use serde_json::Value;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Sets an overlay module parameter and puts the old value back on drop (also on panic).
struct ParamGuard {
    path: String,
    old: String,
}

impl ParamGuard {
    fn set(name: &str, value: &str) -> ParamGuard {
        let path = format!("/sys/module/overlay/parameters/{name}");
        let old = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {path}: {e}"))
            .trim()
            .to_string();
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        ParamGuard { path, old }
    }
}

impl Drop for ParamGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.old);
    }
}

/// Changes made inside the container with busybox: every kind the layer must carry.
pub(crate) const TORTURE: &str = r#"
set -e
cd /data
echo new > new.txt
echo more >> modify.txt
rm delete.txt
rm -r dir-to-delete
rm -r dir-to-replace && mkdir dir-to-replace && echo n > dir-to-replace/n
chmod 0600 keep.txt
chown 4000:4001 256k.bin
chmod 4755 exec.sh
mkdir sticky && chmod 1777 sticky
mkdir sgid && chmod 2750 sgid
ln -s keep.txt newlink
ln -s /etc/passwd abs-link
ln -s ../../../../../../etc/shadow escaping-link
rm symlink-to-keep && ln -s modify.txt symlink-to-keep
echo h > h1 && ln h1 h2 && ln h1 sub/h3
ln hardlink-a hardlink-c
mkfifo fifo
mknod chardev c 1 3
mknod blockdev b 7 200
mkdir -p deep/a/b/c/d/e/f/g && echo leaf > deep/a/b/c/d/e/f/g/leaf
long=$(printf 'n%.0s' $(seq 1 200)); echo long > "$long"
d=$(printf 'd%.0s' $(seq 1 120)); f=$(printf 'f%.0s' $(seq 1 120)); mkdir "$d" && echo x > "$d/$f"
echo sp > "with space"
echo nl > "$(printf 'new\nline')"
truncate -s 64M sparse && echo end >> sparse
chown 3000000:3000001 new.txt
mkdir empty-dir
: > empty-file
echo root-file > /root/file
rm -r /home/app
mv sub sub-renamed
rm /bin/ls
"#;

/// Changes made from the host through the merged mount (as the container would see them):
/// xattrs and names that are not UTF-8.
pub(crate) fn host_changes(root: &Path) {
    let data = root.join("data");
    xattr_set(&data.join("new.txt"), "user.note", b"hello");
    xattr_set(
        &data.join("new.txt"),
        "user.binary",
        &[0, 159, 146, 150, 0xff],
    );
    xattr_set(
        &data.join("owned.txt"),
        "user.copied-up",
        b"on a lower file",
    );
    xattr_set(&data.join("sticky"), "user.dir", b"on a dir");
    let weird = std::ffi::OsStr::from_bytes(b"not-utf8-\xff\xfe");
    std::fs::write(data.join(weird), b"bytes").unwrap();
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::setxattr(path, name, value, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", path.display()));
}

pub(crate) fn opts() -> CompareOpts {
    CompareOpts {
        mtime: true,
        xattrs: true,
        hardlinks: true,
        ..CompareOpts::container_rootfs()
    }
}

/// Runs the torture in a fresh container, commits it, and checks both unpackers (and Docker, the
/// laptop's reader, when `docker`).
fn torture(snapshotter: &str, expect_source: &str, docker: bool) {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("t", &base, &RunOpts::default().snapshotter(snapshotter));
    lab.exec("t", TORTURE);
    host_changes(&lab.rootfs("t"));

    let target = format!("{}/torture/{snapshotter}:v1", lab.registry);
    let out = lab.committer(&[
        "commit",
        "--container",
        "t",
        "--image",
        &target,
        "--plain-http",
    ]);
    assert!(
        out.status.success(),
        "commit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).expect("result JSON");
    assert_eq!(result["diffSource"], expect_source, "{result}");
    let image = result["image"].as_str().unwrap();

    let by_umoci = lab.pull_unpack(image);
    let diffs = compare_trees(&lab.rootfs("t"), &by_umoci, &opts());
    assert!(
        diffs.is_empty(),
        "umoci's unpack differs from the container ({snapshotter}):\n{}",
        diffs.join("\n")
    );

    if docker {
        docker_reads_the_torture(&lab, image);
    }

    lab.ctr(&["images", "pull", "--plain-http", image]);
    lab.run_container(
        "restored",
        image,
        &RunOpts::default().snapshotter(snapshotter),
    );
    let mut diffs = compare_trees(&lab.rootfs("t"), &lab.rootfs("restored"), &opts());
    if snapshotter == "native" {
        // containerd's native snapshotter copies the parent for each new snapshot with continuity's
        // CopyDir, which sets a directory's times before filling it: every directory of a native
        // snapshot carries the copy's time, whatever the layers said. Not ours to fix; files'
        // mtimes still must match.
        diffs.retain(|d| {
            !(d.contains(": mtime ")
                && lab
                    .rootfs("t")
                    .join(d.split(':').next().unwrap().trim_start_matches('/'))
                    .is_dir())
        });
    }
    assert!(
        diffs.is_empty(),
        "containerd's unpack differs from the container ({snapshotter}):\n{}",
        diffs.join("\n")
    );

    // The same unchanged container committed again gives the same layer.
    let again = lab.committer(&[
        "commit",
        "--container",
        "t",
        "--image",
        &format!("{target}-again"),
        "--plain-http",
    ]);
    let again: Value = serde_json::from_slice(&again.stdout).expect("second result");
    assert_eq!(again["layer"]["digest"], result["layer"]["digest"]);
}

/// Docker pulls and runs the torture image; its root filesystem equals the sandbox's but for
/// Docker's own files (`docker::DOCKER_OWN_FILES`) and what its init layer does to their
/// directory: it creates `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf` and `/etc/mtab`, so
/// `/etc` carries the init layer's mtime.
fn docker_reads_the_torture(lab: &Lab, image: &str) {
    let Some(mut diffs) = crate::docker::docker_readback(lab, image, &lab.rootfs("t"), &opts())
    else {
        return;
    };
    diffs.retain(|d| !d.starts_with("/etc: mtime "));
    assert!(
        diffs.is_empty(),
        "docker run's root filesystem differs from the container:\n{}",
        diffs.join("\n")
    );
}

#[test]
fn torture_overlay_default_reads_the_upperdir_exactly() {
    let _defaults = crate::lab::overlay_defaults();
    torture("overlayfs", "upperdir", true);
}

#[test]
fn torture_overlay_redirect_dir_falls_back_to_an_exact_walk() {
    let _turn = crate::lab::overlay_params_changing();
    let _redirect = ParamGuard::set("redirect_dir", "Y");
    torture("overlayfs", "walk", false);
}

#[test]
fn torture_overlay_metacopy_falls_back_to_an_exact_walk() {
    let _turn = crate::lab::overlay_params_changing();
    let _redirect = ParamGuard::set("redirect_dir", "Y");
    let _metacopy = ParamGuard::set("metacopy", "Y");
    torture("overlayfs", "walk", false);
}

#[test]
fn torture_native_snapshotter_is_walked_exactly() {
    torture("native", "walk", false);
}
