//! What a hostile sandbox can put in its filesystem, against both sources on real overlay
//! mounts: whiteout-like names, forged overlay xattrs, xattr names and sizes a PAX reader
//! misreads, sparse files, trees deeper than any unpacker can create, files swapped for a fifo
//! or a device after their lstat, and a reader that is blind to `trusted.*`.

use super::fixture::{Overlay, MOUNT_LOCK};
use super::scenario::{self, p, setx, write};
use super::{assert_unpacks_to, layer_file, rawtar};
use crate::diff::exact::{check_initial_user_ns, probe_trusted};
use crate::diff::fsx::hook::{self, Stage};
use crate::diff::{upperdir_is_exact, write_layer, DiffError, NotExact, Options, Source};
use std::path::Path;
use std::time::Instant;

fn layer(source: &Source, opts: &Options) -> Result<Vec<u8>, DiffError> {
    let r = write_layer(source, opts, Vec::new()).map(|(v, _)| v);
    hook::set(None);
    r
}

fn walk_all(dir: &Path, opts: &Options) -> Result<Vec<u8>, DiffError> {
    let source = Source::Walk {
        lower: None,
        upper: dir,
    };
    layer(&source, opts)
}

/// The upperdir and the walk (merged view against the lowerdir) of `ov`.
fn both(ov: &Overlay) -> [(&'static str, Source<'_>); 2] {
    [
        (
            "upperdir",
            Source::Upperdir {
                upper: &ov.upper,
                lowers: &ov.lowers,
            },
        ),
        (
            "walk",
            Source::Walk {
                lower: Some(&ov.lowers[0]),
                upper: &ov.merged,
            },
        ),
    ]
}

#[test]
fn names_starting_with_wh_are_refused_never_written_as_whiteouts() {
    for (name, want) in [
        (&b"data/.wh.keep"[..], "/data/.wh.keep"),
        (b"data/.wh..wh..opq", "/data/.wh..wh..opq"),
        (b"data/.wh.newdir/x", "/data/.wh.newdir"),
    ] {
        let mut ov = Overlay::new(1);
        scenario::mkdir(&ov.lowers[0], b"data");
        write(&ov.lowers[0], b"data/keep", b"base");
        ov.mount();
        let parent = &name[..name.iter().rposition(|&c| c == b'/').unwrap()];
        scenario::mkdir(&ov.merged, parent);
        write(&ov.merged, name, b"sandbox data");
        for (what, source) in both(&ov) {
            match layer(&source, &Options::default()) {
                Err(e @ DiffError::ReservedName { .. }) => {
                    assert!(e.to_string().starts_with(&format!("{want}: ")), "{e}")
                }
                other => panic!("{what} {want}: {:?}", other.map(|_| ())),
            }
        }
    }
}

#[test]
fn forged_user_overlay_xattrs_are_data_on_a_mount_without_userxattr() {
    let mut ov = Overlay::new(1);
    let l = ov.lowers[0].clone();
    scenario::mkdir(&l, b"data/keep");
    write(&l, b"data/keep/a", b"base file");
    scenario::mkdir(&l, b"data/moved");
    write(&l, b"data/moved/b", b"b");
    write(&l, b"data/big", &[3u8; 10_000]);
    ov.mount();
    let m = ov.merged.clone();
    setx(&p(&m, b"data/keep"), "user.overlay.opaque", b"y");
    setx(
        &p(&m, b"data/moved"),
        "user.overlay.redirect",
        b"/elsewhere",
    );
    setx(&p(&m, b"data/big"), "user.overlay.metacopy", b"");
    write(&m, b"data/empty", b"");
    setx(&p(&m, b"data/empty"), "user.overlay.whiteout", b"");
    {
        let _g = MOUNT_LOCK.read().unwrap_or_else(|e| e.into_inner());
        assert_eq!(upperdir_is_exact(&ov.upper, &ov.options()), Ok(()));
    }
    let view = ov.mount_container_view(&[]);
    let sources = [
        both(&ov)[0],
        (
            "walk",
            Source::Walk {
                lower: Some(&l),
                upper: &view,
            },
        ),
    ];
    for (what, source) in sources {
        let (tar, _) = layer_file(&source, &Options::default(), ov.dir.path());
        let entries = rawtar::entries(tar.try_clone().unwrap());
        let names: Vec<&[u8]> = entries.iter().map(|e| &e.path[..]).collect();
        assert!(
            !names.iter().any(|n| n.ends_with(b".wh..wh..opq")),
            "{what}"
        );
        assert!(names.contains(&&b"data/empty"[..]), "{what}: {names:?}");
        let keep = entries.iter().find(|e| e.path == b"data/keep/").unwrap();
        assert_eq!(
            keep.xattrs,
            [(b"user.overlay.opaque".to_vec(), b"y".to_vec())],
            "{what}"
        );
        assert_unpacks_to(tar, &l, &m, ov.dir.path(), what);
    }
}

#[test]
fn only_security_capability_and_user_xattrs_are_kept_unless_asked() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), b"f", b"x");
    let f = t.path().join("f");
    setx(&f, "security.selinux", b"system_u:object_r:node_t:s0");
    setx(&f, "security.ima", b"\x03\x02");
    setx(&f, "security.SMACK64", b"node");
    let cap = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    setx(&f, "security.capability", &cap);
    setx(&f, "user.note", b"kept");
    let kept = |opts: &Options| -> Vec<String> {
        let tar = walk_all(t.path(), opts).unwrap();
        rawtar::entries(&tar[..])[0]
            .xattrs
            .iter()
            .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
            .collect()
    };
    assert_eq!(
        kept(&Options::default()),
        ["security.capability", "user.note"]
    );
    let asked = Options {
        keep_xattrs: vec!["security.selinux".into(), "security.SMACK64*".into()],
        ..Options::default()
    };
    assert_eq!(
        kept(&asked),
        [
            "security.SMACK64",
            "security.capability",
            "security.selinux",
            "user.note"
        ]
    );
}

#[test]
fn an_xattr_name_holding_an_equals_sign_is_refused_naming_the_file() {
    let t = tempfile::tempdir().unwrap();
    scenario::mkdir(t.path(), b"etc");
    write(t.path(), b"etc/conf", b"x");
    setx(&t.path().join("etc/conf"), "user.a=b", b"c");
    match walk_all(t.path(), &Options::default()) {
        Err(e @ DiffError::XattrName { .. }) => assert_eq!(
            e.to_string(),
            "/etc/conf: the extended attribute name \"user.a=b\" contains '=', which a PAX record cannot carry"
        ),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

/// A tmpfs under `dir` (it takes 64 KiB xattr values, ext4 only a block).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Tmpfs {
        let target = dir.join("tmpfs");
        std::fs::create_dir(&target).unwrap();
        rustix::mount::mount(
            "tmpfs",
            &target,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .unwrap();
        Tmpfs(target)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

#[test]
fn eight_mib_of_xattrs_is_refused_naming_the_file_and_never_held_whole() {
    let t = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(t.path());
    write(&fs.0, b"fat", b"x");
    let value = vec![b'v'; 64_000];
    for i in 0..131 {
        setx(&fs.0.join("fat"), &format!("user.k{i:03}"), &value); // 8.4 MB
    }
    match walk_all(&fs.0, &Options::default()) {
        Err(DiffError::HeaderTooLarge { path, bytes, .. }) => {
            assert_eq!(path, "/fat");
            assert!(
                bytes <= (1 << 20) + 64_010,
                "read {bytes} bytes before stopping"
            );
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn a_sparse_file_past_the_hole_budget_is_refused_in_milliseconds() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), b"small", b"s");
    let f = std::fs::File::create(t.path().join("big")).unwrap();
    f.set_len(50 << 30).unwrap();
    let start = Instant::now();
    match walk_all(t.path(), &Options::default()) {
        Err(e @ DiffError::Sparse { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("/big is sparse (53687091200 bytes long, 0 allocated)"),
                "{msg}"
            );
            assert!(msg.contains("--max-hole-bytes"), "{msg}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let took = start.elapsed();
    eprintln!("50 GiB sparse file refused after {took:?}");
    assert!(took.as_secs() < 2, "{took:?}");
    // Within the budget it is written out (as zeros, as every unpacker would restore it).
    f.set_len(3 << 20).unwrap();
    let opts = Options {
        max_hole_bytes: Some(4 << 20),
        ..Options::default()
    };
    let tar = walk_all(t.path(), &opts).unwrap();
    assert_eq!(rawtar::entries(&tar[..])[0].size, 3 << 20);
}

/// `depth` nested directories named `d` under `root`, made with `mkdirat` one level at a time
/// (the full path is far past PATH_MAX), with a file at the bottom.
fn deep_tree(root: &Path, depth: usize) {
    use rustix::fs::{mkdirat, openat, Mode, OFlags};
    let mut fd = rustix::fs::open(root, OFlags::DIRECTORY, Mode::empty()).unwrap();
    for _ in 0..depth {
        mkdirat(&fd, "d", Mode::from_raw_mode(0o755)).unwrap();
        fd = openat(&fd, "d", OFlags::DIRECTORY, Mode::empty()).unwrap();
    }
    let f = openat(
        &fd,
        "leaf",
        OFlags::CREATE | OFlags::WRONLY,
        Mode::from_raw_mode(0o644),
    );
    drop(f.unwrap());
}

#[test]
fn a_tree_deeper_than_any_path_is_refused_without_recursion() {
    let mut ov = Overlay::new(1);
    ov.mount();
    deep_tree(&ov.upper, 4096);
    let sources = both(&ov);
    for (what, source) in sources {
        let opts = Options::default();
        // A small stack proves the walk does not recurse per level.
        let r = std::thread::scope(|s| {
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn_scoped(s, || layer(&source, &opts))
                .unwrap()
                .join()
                .unwrap()
        });
        match r {
            Err(e @ DiffError::PathTooLong { .. }) => {
                let msg = e.to_string();
                assert!(msg.len() < 700, "{what}: {} bytes", msg.len());
                assert!(msg.contains("over the 3839 a layer may hold"), "{msg}");
            }
            other => panic!("{what}: {:?}", other.map(|_| ())),
        }
    }
}

#[test]
fn a_regular_file_swapped_for_a_fifo_or_device_after_lstat_is_never_opened() {
    use rustix::fs::FileType;
    for (ft, dev) in [
        (FileType::Fifo, (0, 0)),
        (FileType::CharacterDevice, (1, 3)),
    ] {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), b"victim", b"data");
        let path = t.path().join("victim");
        hook::set(Some(Box::new(move |stage, n| {
            if stage == Stage::AfterStat && n == b"victim" {
                std::fs::remove_file(&path).unwrap();
                scenario::mknod(&path, ft, dev.0, dev.1);
            }
        })));
        let start = Instant::now();
        match walk_all(t.path(), &Options::default()) {
            Err(DiffError::FileChanged { path, found, .. }) => {
                assert_eq!(path, "/victim");
                assert!(found.contains("not a RegularFile any more"), "{found}");
            }
            other => panic!("{ft:?}: {:?}", other.map(|_| ())),
        }
        assert!(start.elapsed().as_secs() < 2, "blocked on the {ft:?}");
    }
}

#[test]
fn this_process_is_in_the_initial_user_namespace_and_may_read_trusted_xattrs() {
    assert_eq!(check_initial_user_ns("/proc/self/ns/user"), Ok(()));
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("upper")).unwrap();
    assert_eq!(probe_trusted(&t.path().join("upper")), Ok(()));
}

/// In a child process moved into a new user namespace (full capabilities there, none over the
/// host's files), with the upperdir's parent read-only, the probe must say "blind".
#[test]
fn a_namespaced_cap_sys_admin_on_a_read_only_root_is_not_taken_for_trusted_access() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("snapshots");
    std::fs::create_dir_all(root.join("1/fs")).unwrap();
    let ro = |flags| {
        rustix::mount::mount_bind(&root, &root).unwrap();
        rustix::mount::mount_remount(&root, flags, "").unwrap();
    };
    ro(rustix::mount::MountFlags::BIND | rustix::mount::MountFlags::RDONLY);
    let upper = root.join("1/fs");
    // SAFETY: the child only unshares, runs the probe and _exits; glibc keeps malloc usable
    // after fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: the forked child is single-threaded; nothing relies on its old namespace.
        let code = match unsafe {
            rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWUSER)
        } {
            Err(_) => 3,
            Ok(()) => match probe_trusted(&upper) {
                Err(NotExact::TrustedXattrsUnreadable(why)) if why.contains("user namespace") => 0,
                Err(_) => 2,
                Ok(()) => 1,
            },
        };
        // SAFETY: ends the forked child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let _ = rustix::mount::unmount(&root, rustix::mount::UnmountFlags::DETACH);
    assert!(libc::WIFEXITED(status), "child status {status}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "1: probe passed, 2: wrong reason, 3: unshare failed"
    );
}
