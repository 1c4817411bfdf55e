//! Real overlay mounts for tests: a temp dir with lowerdirs, upper, work and merged, mounted
//! with `mount -t overlay` and unmounted on drop (lazily if busy). Overlay module parameters
//! are global and read at mount time, so a test that flips them holds `MOUNT_LOCK` for writing
//! while it mounts (and restores them right after, even on panic); every other mount takes it
//! for reading.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::RwLock;

pub(crate) static MOUNT_LOCK: RwLock<()> = RwLock::new(());

pub(crate) struct Overlay {
    pub dir: tempfile::TempDir,
    /// Immediate parent first, as in `lowerdir=`.
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    /// Options added to the containerd ones (e.g. `userxattr`).
    pub extra: Vec<String>,
    mounted: Vec<PathBuf>,
}

impl Overlay {
    /// Creates the directories for `n` lowers; nothing is mounted yet.
    pub fn new(n: usize) -> Overlay {
        let dir = tempfile::Builder::new()
            .prefix("committer-diff-")
            .tempdir()
            .unwrap();
        let lowers: Vec<PathBuf> = (0..n)
            .map(|i| dir.path().join(format!("lower{i}")))
            .collect();
        let (upper, work, merged) = (
            dir.path().join("upper"),
            dir.path().join("work"),
            dir.path().join("merged"),
        );
        for d in lowers.iter().chain([&upper, &work, &merged]) {
            std::fs::create_dir(d).unwrap();
        }
        Overlay {
            dir,
            lowers,
            upper,
            work,
            merged,
            // Pinned, so that another process flipping the module defaults (the integration
            // tests do) cannot change what our mounts do or what upperdir_is_exact reads.
            extra: vec!["redirect_dir=off".into(), "metacopy=off".into()],
            mounted: Vec::new(),
        }
    }

    /// The options containerd's overlay snapshotter passes, plus `extra`.
    pub fn options(&self) -> Vec<String> {
        let mut o = vec![
            "index=off".into(),
            format!("workdir={}", self.work.display()),
            format!("upperdir={}", self.upper.display()),
            format!("lowerdir={}", join(&self.lowers)),
        ];
        o.extend(self.extra.iter().cloned());
        o
    }

    /// Mounts the read-write overlay on `merged`.
    pub fn mount(&mut self) {
        let _g = MOUNT_LOCK.read().unwrap_or_else(|e| e.into_inner());
        self.mount_locked();
    }

    /// Mounts with overlay module parameters set (e.g. `redirect_dir=Y`), restored afterwards,
    /// and without pinned options, as containerd mounts: the module defaults decide.
    pub fn mount_with_params(&mut self, params: &[(&str, &str)]) {
        self.extra
            .retain(|o| !o.starts_with("redirect_dir=") && !o.starts_with("metacopy="));
        let _g = MOUNT_LOCK.write().unwrap_or_else(|e| e.into_inner());
        let _p = ParamGuard::set(params);
        self.mount_locked();
    }

    fn mount_locked(&mut self) {
        let opts = self.options().join(",");
        mount_overlay(&opts, &self.merged);
        self.mounted.push(self.merged.clone());
    }

    /// A read-only overlay of the lowers alone (the "parent snapshot" view), mounted under
    /// the temp dir and unmounted with the rest.
    pub fn mount_lower_view(&mut self) -> PathBuf {
        let target = self.dir.path().join("lowerview");
        std::fs::create_dir_all(&target).unwrap();
        let _g = MOUNT_LOCK.read().unwrap_or_else(|e| e.into_inner());
        let lowers = if self.lowers.len() == 1 {
            // overlay needs two lowers without an upper; an empty one changes nothing.
            let empty = self.dir.path().join("empty");
            std::fs::create_dir_all(&empty).unwrap();
            vec![self.lowers[0].clone(), empty]
        } else {
            self.lowers.clone()
        };
        mount_overlay(&format!("ro,lowerdir={}", join(&lowers)), &target);
        self.mounted.push(target.clone());
        target
    }

    /// The container's tree as committer's walk reads it: a read-only overlay of the upperdir
    /// over the lowers (`lowerdir=UPPER:L…`, plus `extra` options), next to the live mount.
    pub fn mount_container_view(&mut self, extra: &[&str]) -> PathBuf {
        let target = self.dir.path().join("containerview");
        std::fs::create_dir_all(&target).unwrap();
        let _g = MOUNT_LOCK.read().unwrap_or_else(|e| e.into_inner());
        let mut dirs = vec![self.upper.clone()];
        dirs.extend(self.lowers.iter().cloned());
        let mut opts = format!("ro,lowerdir={}", join(&dirs));
        for e in extra {
            opts.push(',');
            opts.push_str(e);
        }
        mount_overlay(&opts, &target);
        self.mounted.push(target.clone());
        target
    }
}

fn join(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

pub(crate) fn mount_overlay(opts: &str, target: &Path) {
    let out = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", opts])
        .arg(target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -o {opts}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Overlay {
    fn drop(&mut self) {
        for m in self.mounted.drain(..).rev() {
            let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
            unsafe {
                if libc::umount2(c.as_ptr(), 0) != 0 {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
    }
}

/// Sets `/sys/module/overlay/parameters/*` and puts the old values back on drop.
pub(crate) struct ParamGuard {
    saved: Vec<(PathBuf, String)>,
}

impl ParamGuard {
    pub fn set(params: &[(&str, &str)]) -> ParamGuard {
        // Built first, so a failure half-way still restores what was changed.
        let mut guard = ParamGuard { saved: Vec::new() };
        for (name, value) in params {
            let p = Path::new("/sys/module/overlay/parameters").join(name);
            let old = std::fs::read_to_string(&p).unwrap().trim().to_string();
            guard.saved.push((p.clone(), old));
            std::fs::write(&p, value).unwrap();
        }
        guard
    }
}

impl Drop for ParamGuard {
    fn drop(&mut self) {
        for (p, old) in self.saved.drain(..).rev() {
            let _ = std::fs::write(&p, &old);
        }
    }
}

/// `cp -a` (keeps owners, modes, times, xattrs, devices, hardlinks, holes).
pub(crate) fn copy_tree(from: &Path, to: &Path) {
    let out = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cp -a: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
