//! Deciding whether an overlay upperdir alone is an exact diff. It is not when overlay may keep
//! part of the story elsewhere (a renamed directory's content stays in the lower layer behind
//! `overlay.redirect`; a chmod'ed file's data stays below `overlay.metacopy`), when an option we
//! do not know is in force, or when this thread cannot read `trusted.*` xattrs (they then read
//! as absent, so opaque directories and redirects would go unseen).
//!
//! Checks, in order: the mount options against a whitelist (plus the module defaults for
//! `redirect_dir`/`metacopy` when no option sets them), a set-and-read-back probe of a
//! `trusted.*` xattr beside the upperdir, and a metadata-only scan of the upperdir for redirect
//! and metacopy xattrs. `write_layer` checks those xattrs again while it walks (the container
//! may rename a directory after this scan and before it is paused).

use super::fsx::{self, XattrAt};
use std::os::fd::{AsFd, BorrowedFd};
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
    if !mount_options.iter().any(|o| o == "userxattr") {
        probe_trusted(upper)?;
    }
    let root =
        fsx::open_root(upper).map_err(|e| NotExact::Scan(format!("{}: {e}", upper.display())))?;
    scan(root.as_fd(), &mut Vec::new())
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

/// CAP_SYS_ADMIN in the thread's effective set, then a `trusted.*` xattr set and read back on a
/// temporary file beside the upperdir (same filesystem). Capabilities in a user namespace other
/// than the filesystem's do not count, which only the probe catches.
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
    let Some(dir) = upper.parent() else {
        return Ok(());
    };
    // A directory we cannot write to leaves the capability check as the answer.
    let Ok(tmp) = tempfile::Builder::new()
        .prefix(".committer-probe-")
        .tempfile_in(dir)
    else {
        return Ok(());
    };
    let (name, value) = ("trusted.committer.probe", b"1");
    let fd = tmp.as_file().as_fd();
    rustix::fs::fsetxattr(fd, name, value, rustix::fs::XattrFlags::empty()).map_err(|e| {
        NotExact::TrustedXattrsUnreadable(format!(
            "setting {name} on {}: {e}",
            tmp.path().display()
        ))
    })?;
    match fsx::xattr_get(XattrAt::Fd(fd), name.as_bytes()) {
        Ok(Some(v)) if v == value => Ok(()),
        Ok(_) => Err(NotExact::TrustedXattrsUnreadable(format!(
            "{name} reads back as absent"
        ))),
        Err(e) => Err(NotExact::TrustedXattrsUnreadable(format!(
            "reading {name}: {e}"
        ))),
    }
}

/// Depth-first scan for redirect (directories) and metacopy (regular files) xattrs. Reads
/// metadata only, so it costs about a tenth of the diff itself.
fn scan(dir: BorrowedFd, rel: &mut Vec<u8>) -> Result<(), NotExact> {
    let err =
        |rel: &[u8], e: std::io::Error| NotExact::Scan(format!("{}: {e}", super::display(rel)));
    for name in fsx::list_names(dir).map_err(|e| err(rel, e))? {
        let len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        let Some(st) = fsx::lstat_opt(dir, &name).map_err(|e| err(rel, e))? else {
            rel.truncate(len);
            continue;
        };
        match st.ftype {
            rustix::fs::FileType::Directory => {
                let sub = fsx::open_dir_at(dir, &name).map_err(|e| err(rel, e))?;
                if has_overlay_xattr(XattrAt::Fd(sub.as_fd()), b"redirect")
                    .map_err(|e| err(rel, e))?
                {
                    return Err(NotExact::Redirect(super::display(rel)));
                }
                scan(sub.as_fd(), rel)?;
            }
            rustix::fs::FileType::RegularFile
                if has_overlay_xattr(XattrAt::Name(dir, &name), b"metacopy")
                    .map_err(|e| err(rel, e))? =>
            {
                return Err(NotExact::Metacopy(super::display(rel)));
            }
            _ => {}
        }
        rel.truncate(len);
    }
    Ok(())
}

fn has_overlay_xattr(at: XattrAt, key: &[u8]) -> std::io::Result<bool> {
    let names = fsx::xattr_names(at)?;
    Ok(names.iter().any(|n| {
        let private = n
            .strip_prefix(b"trusted.overlay.")
            .or_else(|| n.strip_prefix(b"user.overlay."));
        private == Some(key)
    }))
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
