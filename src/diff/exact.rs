//! Deciding whether an overlay upperdir alone is an exact diff. It is not when overlay may keep
//! part of the story elsewhere (a renamed directory's content stays in the lower layer behind
//! `overlay.redirect`; a chmod'ed file's data stays below `overlay.metacopy`), when an option we
//! do not know is in force, or when this thread cannot read `trusted.*` xattrs (they then read
//! as absent, so opaque directories and redirects would go unseen).
//!
//! Checks, in order: the mount options against a whitelist (plus the module defaults for
//! `redirect_dir`/`metacopy` when no option sets them), that this process can read `trusted.*`
//! xattrs at all (CAP_SYS_ADMIN in the initial user namespace, then a set-and-read-back probe),
//! and a metadata-only scan of the upperdir for redirect and metacopy xattrs. `write_layer` checks those xattrs again while it walks (the container
//! may rename a directory after this scan and before it is paused).

use super::fsx::{self, XattrAt};
use super::meta::private_prefix;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

/// Why the upperdir alone is not exact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotExact {
    #[error("mount option {0:?} is not known to keep the upperdir exact")]
    MountOption(String),
    #[error("overlay module default {0} is on and the mount options do not turn it off")]
    ModuleDefault(&'static str),
    #[error("this process cannot read trusted.* xattrs ({0}); opaque directories would go unseen")]
    TrustedXattrsUnreadable(String),
    #[error(
        "{0} is a renamed directory (overlay.redirect): its content is still in a lower layer"
    )]
    Redirect(String),
    #[error("{0} holds metadata only (overlay.metacopy): its data is still in a lower layer")]
    Metacopy(String),
    #[error("a lower directory at or above {0} is redirected: its lower content cannot be listed")]
    LowerRedirect(String),
    #[error("scanning the upperdir: {0}")]
    Scan(String),
}

/// Ok when the upperdir (with the lowerdirs for lookups) gives an exact diff for a mount with
/// these options; otherwise why not. See the module header for what is checked.
pub fn upperdir_is_exact(upper: &Path, mount_options: &[String]) -> Result<(), NotExact> {
    check_options(mount_options)?;
    check_module_defaults(mount_options, "/sys/module/overlay/parameters")?;
    let userxattr = mount_options.iter().any(|o| o == "userxattr");
    if !userxattr {
        probe_trusted(upper)?;
    }
    let root =
        fsx::open_root(upper).map_err(|e| NotExact::Scan(format!("{}: {e}", upper.display())))?;
    scan(root, private_prefix(userxattr))
}

/// The options containerd and friends pass that keep the upperdir complete.
pub(crate) fn check_options(options: &[String]) -> Result<(), NotExact> {
    for o in options {
        let (key, value) = o.split_once('=').unwrap_or((o, ""));
        let ok = match key {
            "index" => matches!(value, "on" | "off"),
            "workdir" | "upperdir" | "lowerdir" | "xino" => true,
            "redirect_dir" => matches!(value, "off" | "nofollow"),
            "metacopy" => value == "off",
            "userxattr" | "volatile" | "ro" | "rw" => value.is_empty(),
            _ => false,
        };
        if !ok {
            return Err(NotExact::MountOption(o.clone()));
        }
    }
    Ok(())
}

/// Without an explicit option the kernel takes `redirect_dir`/`metacopy` from the module
/// parameters; if those say on, the mount may well be using them.
pub(crate) fn check_module_defaults(options: &[String], params: &str) -> Result<(), NotExact> {
    if options.iter().any(|o| o == "userxattr") {
        return Ok(()); // the kernel turns both off for userxattr mounts
    }
    for (param, key) in [("redirect_dir", "redirect_dir="), ("metacopy", "metacopy=")] {
        if options.iter().any(|o| o.starts_with(key)) {
            continue;
        }
        let value = std::fs::read_to_string(format!("{params}/{param}")).unwrap_or_default();
        if value.trim() == "Y" {
            return Err(NotExact::ModuleDefault(param));
        }
    }
    Ok(())
}

/// `trusted.*` xattrs read as absent, without an error, to a process lacking CAP_SYS_ADMIN in
/// the *initial* user namespace: a namespaced CAP_SYS_ADMIN (a user-namespaced Job, rootless
/// containerd) shows in CapEff but reads nothing. So: the capability in this thread's effective
/// set, then this process in the initial user namespace, then a `trusted.*` xattr set and read
/// back on a temporary file — beside the upperdir, or in the temp dir when the snapshot root is
/// read-only (the check is the caller's capability, whatever the filesystem).
pub(crate) fn probe_trusted(upper: &Path) -> Result<(), NotExact> {
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    if cap_eff.is_some_and(|c| c & (1 << CAP_SYS_ADMIN) == 0) {
        return Err(NotExact::TrustedXattrsUnreadable("no CAP_SYS_ADMIN".into()));
    }
    check_initial_user_ns("/proc/self/ns/user")?;
    let tmp_dir = std::env::temp_dir();
    let dirs = [upper.parent(), Some(tmp_dir.as_path())];
    for dir in dirs.into_iter().flatten() {
        let Ok(tmp) = tempfile::Builder::new()
            .prefix(".committer-probe-")
            .tempfile_in(dir)
        else {
            continue; // read-only: try the next place
        };
        match set_and_read_back(tmp.as_file().as_fd()) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => continue,
            Err(e) => {
                return Err(NotExact::TrustedXattrsUnreadable(format!(
                    "a trusted.* xattr on {}: {e}",
                    tmp.path().display()
                )))
            }
            Ok(()) => return Ok(()),
        }
    }
    // Nowhere to write a probe: the capability and namespace checks are the answer.
    Ok(())
}

/// The inode number the kernel gives the initial user namespace (`PROC_USER_INIT_INO`).
const INITIAL_USER_NS_INO: u64 = 0xEFFF_FFFD;

/// Fails when `ns` (normally `/proc/self/ns/user`) is not the initial user namespace.
pub(crate) fn check_initial_user_ns(ns: &str) -> Result<(), NotExact> {
    match rustix::fs::stat(ns) {
        Ok(st) if st.st_ino == INITIAL_USER_NS_INO => Ok(()),
        Ok(st) => Err(NotExact::TrustedXattrsUnreadable(format!(
            "running in a user namespace (user:[{}]), whose CAP_SYS_ADMIN does not reach trusted.* xattrs",
            st.st_ino
        ))),
        Err(e) => Err(NotExact::TrustedXattrsUnreadable(format!(
            "cannot tell the user namespace ({ns}: {e})"
        ))),
    }
}

/// Sets `trusted.committer.probe` on `fd` and reads it back.
fn set_and_read_back(fd: BorrowedFd) -> std::io::Result<()> {
    let (name, value) = ("trusted.committer.probe", b"1");
    rustix::fs::fsetxattr(fd, name, value, rustix::fs::XattrFlags::empty())?;
    match fsx::xattr_get(XattrAt::Fd(fd), name.as_bytes())? {
        Some(v) if v == value => Ok(()),
        _ => Err(std::io::Error::other(format!(
            "{name} reads back as absent"
        ))),
    }
}

/// Depth-first scan for redirect (directories) and metacopy (regular files) xattrs under
/// `private` (the mount's overlay prefix: a sandbox's own `user.overlay.*` on a mount without
/// `userxattr` is data). Reads metadata only, so it costs about a tenth of the diff itself.
/// An explicit stack of open directories, so depth costs heap, not the thread's stack.
fn scan(root: OwnedFd, private: &[u8]) -> Result<(), NotExact> {
    let err =
        |rel: &[u8], e: std::io::Error| NotExact::Scan(format!("{}: {e}", super::display(rel)));
    let names = fsx::list_names(root.as_fd()).map_err(|e| err(b"", e))?;
    let mut stack = vec![(root, Vec::new(), names.into_iter())];
    while let Some((dir, rel, names)) = stack.last_mut() {
        let Some(name) = names.next() else {
            stack.pop();
            continue;
        };
        let path = super::emit::join_path(rel, &name);
        let Some(st) = fsx::lstat_opt(dir.as_fd(), &name).map_err(|e| err(&path, e))? else {
            continue;
        };
        match st.ftype {
            rustix::fs::FileType::Directory => {
                let sub = fsx::open_dir_at(dir.as_fd(), &name).map_err(|e| err(&path, e))?;
                if has_overlay_xattr(XattrAt::Fd(sub.as_fd()), private, b"redirect")
                    .map_err(|e| err(&path, e))?
                {
                    return Err(NotExact::Redirect(super::display(&path)));
                }
                if path.len() > super::MAX_PATH_BYTES {
                    continue; // the diff itself refuses it, naming it
                }
                let names = fsx::list_names(sub.as_fd()).map_err(|e| err(&path, e))?;
                stack.push((sub, path, names.into_iter()));
            }
            rustix::fs::FileType::RegularFile
                if has_overlay_xattr(XattrAt::Name(dir.as_fd(), &name), private, b"metacopy")
                    .map_err(|e| err(&path, e))? =>
            {
                return Err(NotExact::Metacopy(super::display(&path)));
            }
            _ => {}
        }
    }
    Ok(())
}

fn has_overlay_xattr(at: XattrAt, private: &[u8], key: &[u8]) -> std::io::Result<bool> {
    let names = fsx::xattr_names(at)?;
    Ok(names.iter().any(|n| n.strip_prefix(private) == Some(key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn containerd_default_options_are_exact() {
        let o = opts(&[
            "index=off",
            "workdir=/w",
            "upperdir=/u",
            "lowerdir=/a:/b",
            "xino=auto",
            "ro",
        ]);
        assert_eq!(check_options(&o), Ok(()));
    }

    #[test]
    fn redirect_metacopy_and_unknown_options_are_not_exact() {
        for bad in [
            "redirect_dir=on",
            "redirect_dir=follow",
            "metacopy=on",
            "nfs_export=on",
            "uuid=on",
        ] {
            let o = opts(&["workdir=/w", bad]);
            assert_eq!(
                check_options(&o),
                Err(NotExact::MountOption(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            check_options(&opts(&["redirect_dir=nofollow", "metacopy=off"])),
            Ok(())
        );
    }

    #[test]
    fn module_default_counts_only_without_an_explicit_option() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("redirect_dir"), "Y\n").unwrap();
        std::fs::write(dir.path().join("metacopy"), "N\n").unwrap();
        let p = dir.path().to_str().unwrap();
        assert_eq!(
            check_module_defaults(&[], p),
            Err(NotExact::ModuleDefault("redirect_dir"))
        );
        assert_eq!(
            check_module_defaults(&opts(&["redirect_dir=off"]), p),
            Ok(())
        );
    }
}
