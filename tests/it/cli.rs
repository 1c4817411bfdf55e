//! The CLI as people meet it: every bad input ends in one line (text) or one JSON object, with
//! the documented exit code, the sandbox running, no tag and an empty spool dir; docker-commit
//! habits; the result matches its JSON Schema; the README's flag table matches `--help`; a
//! terminal sees a moving bar and a summary.

mod schema;

use crate::lab::{Lab, RunOpts};
use schema::{schema, validate};
use serde_json::Value;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Output;

/// The error lines of a failed run's stderr: plain `committer: …` lines, and the `msg` of JSON
/// lines whose level is "error" (other JSON lines are log events).
pub fn error_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| match serde_json::from_str::<Value>(l) {
            Ok(v) if v["level"] == "error" => v["msg"].as_str().map(String::from),
            Ok(_) => None,
            Err(_) => Some(l.to_string()),
        })
        .collect()
}

/// A run's stderr as text: JSON log lines are read back as their message, so a test can look
/// for a quoted name whatever the log format (piped stderr is JSON lines).
pub fn stderr_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(v) => v["msg"].as_str().unwrap_or(l).to_string(),
            Err(_) => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A progress event (piped stderr shows one as each stage begins, and every 2 s): a run that fails
/// after its read began may show one before its error line, depending on the 100 ms ticker.
fn is_progress(line: &str) -> bool {
    line.starts_with("committer: info: progress: ")
        || serde_json::from_str::<Value>(line).is_ok_and(|v| v["event"] == "progress")
}

/// Exactly one stderr line besides progress events (none at all with `--quiet`):
/// `committer: …` without raw control characters in text mode, one JSON object with level
/// "error" and the exit code in JSON mode.
pub fn assert_one_line(out: &Output, json: bool, code: i32, case: &str) {
    assert_one_line_besides(out, json, code, case, |_| false)
}

/// `assert_one_line`, where lines `also(line)` accepts may come before the one line; every line
/// is in the chosen format (one JSON object each, or `committer: …`).
pub fn assert_one_line_besides(
    out: &Output,
    json: bool,
    code: i32,
    case: &str,
    also: impl Fn(&str) -> bool,
) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let what = format!("{case} ({}): {stderr}", if json { "json" } else { "text" });
    assert_eq!(out.status.code(), Some(code), "exit code of {what}");
    assert!(out.stdout.is_empty(), "stdout of {what}");
    for l in stderr.lines() {
        let is_json = serde_json::from_str::<Value>(l).is_ok_and(|v| v.is_object());
        assert_eq!(is_json, json, "a line in the other format in {what}");
    }
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !is_progress(l) && !also(l))
        .collect();
    assert_eq!(lines.len(), 1, "one line for {what}");
    if json {
        let v: Value = serde_json::from_str(lines[0]).expect("a JSON error line");
        assert_eq!(
            (v["level"].as_str(), v["exitCode"].as_i64()),
            (Some("error"), Some(code as i64)),
            "{what}"
        );
    } else {
        assert!(lines[0].starts_with("committer: "), "{what}");
        let level = ["info", "warn", "error", "debug"]
            .iter()
            .any(|l| lines[0].starts_with(&format!("committer: {l}: ")));
        assert!(!level, "a log line, not the failure line: {what}");
        assert!(
            !lines[0].chars().any(|c| c.is_control()),
            "raw control character in {what}"
        );
    }
}

pub fn spool_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// A socket that accepts connections and never answers (kept open by a thread).
fn silent_socket(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
}

/// A place the user `nobody` can reach: a root-only (0600) socket and a spool it may write to.
struct NobodyPlace {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    spool: std::path::PathBuf,
}

impl NobodyPlace {
    fn new() -> NobodyPlace {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("committer-nobody-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (socket, spool) = (dir.path().join("c.sock"), dir.path().join("spool"));
        drop(UnixListener::bind(&socket).unwrap());
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::create_dir(&spool).unwrap();
        std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o1777)).unwrap();
        NobodyPlace {
            _dir: dir,
            socket,
            spool,
        }
    }

    /// committer run as nobody (setpriv).
    fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_committer"));
        cmd
    }
}

#[test]
fn bad_inputs_end_in_one_line_with_the_documented_exit_code_and_leave_nothing() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("m1", &base, &RunOpts::default());
    // A few bytes of content in a tar of a few kB: --max-layer-bytes must count the tar.
    lab.exec("m1", "echo hi > /data/new; echo x > /data/modify.txt");
    for id in ["pfx-a", "pfx-b"] {
        lab.run_container(id, &base, &RunOpts::default());
    }
    let spool = lab.dir.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let (refused, silent) = (lab.dir.join("refused.sock"), lab.dir.join("silent.sock"));
    drop(UnixListener::bind(&refused).unwrap());
    silent_socket(&silent);
    let nobody = NobodyPlace::new();
    let repo = format!("{}/snap/matrix", lab.registry);
    let target = format!("{repo}:v1");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let (refused, silent) = (s(&refused), s(&silent));
    let denied = s(&nobody.socket);
    let unix_silent = format!("unix://{silent}");
    let digest_ref = format!("{repo}@sha256:{}", "a".repeat(64));
    let bad_pod = "team/a\n{\"level\":\"info\",\"msg\":\"forged\"}\u{1b}[2J";
    let t = target.as_str();
    #[rustfmt::skip]
    let cases: Vec<(&str, i32, Vec<&str>)> = vec![
        ("no command", 2, vec![]),
        ("unknown flag", 2, vec!["commit", "--bogus"]),
        ("no image", 2, vec!["commit", "m1"]),
        ("no container", 2, vec!["commit", "--image", t]),
        ("container twice", 2, vec!["commit", "m1", t, "--container", "other"]),
        ("container-name without pod", 2, vec!["commit", "--container", "m1", "--container-name", "x", "--image", t]),
        ("pod without slash", 2, vec!["commit", "--pod", "nopod", t]),
        ("bad reference", 2, vec!["commit", "m1", "UPPER/Case::bad"]),
        ("digest reference", 2, vec!["commit", "m1", &digest_ref]),
        ("bad tag", 2, vec!["commit", "m1", t, "--tag", "-bad"]),
        ("bad level", 2, vec!["commit", "m1", t, "--compression-level", "42"]),
        ("bad compression", 2, vec!["commit", "m1", t, "--compression", "lz4"]),
        ("zero threads", 2, vec!["commit", "m1", t, "--threads", "0"]),
        ("relative exclude", 2, vec!["commit", "m1", t, "--exclude", "tmp"]),
        ("escaping exclude", 2, vec!["commit", "m1", t, "--exclude", "/../etc"]),
        ("bad epoch", 2, vec!["commit", "m1", t, "--source-date-epoch", "soon"]),
        ("result file dir missing", 2, vec!["commit", "m1", t, "--result-file", "/nonexistent/dir/r.json"]),
        ("spool dir missing", 2, vec!["commit", "m1", t, "--spool-dir", "/nonexistent"]),
        ("tcp address", 2, vec!["commit", "m1", t, "--address", "tcp://127.0.0.1:1"]),
        ("diff output dir missing", 2, vec!["diff", "m1", "--output", "/nonexistent/dir/l.tar"]),
        ("bad COMMITTER_SPOOL_RESERVE", 2, vec!["commit", "m1", t]),
        ("container missing", 3, vec!["commit", "nope", t]),
        ("ambiguous prefix", 3, vec!["commit", "pfx-", t]),
        ("pod missing", 3, vec!["commit", "--pod", "team/none", t]),
        ("pod name with newline and escapes", 2, vec!["commit", "--pod", bad_pod, t]),
        ("socket missing", 3, vec!["commit", "m1", t, "--address", "unix:///nonexistent.sock"]),
        ("not a socket", 3, vec!["commit", "m1", t, "--address", "/etc/hosts"]),
        ("refused socket", 3, vec!["commit", "m1", t, "--address", &refused]),
        ("silent socket", 3, vec!["commit", "m1", t, "--address", &unix_silent]),
        ("layer over --max-layer-bytes", 4, vec!["commit", "m1", t, "--max-layer-bytes", "1500", "--compression", "none"]),
        ("too many files", 4, vec!["commit", "m1", t, "--max-files", "1"]),
        ("a limit containerd's differ cannot apply", 4, vec!["commit", "m1", t, "--diff-source", "containerd", "--max-layer-bytes", "1500"]),
        ("registry unreachable", 5, vec!["commit", "m1", "127.0.0.1:1/x/y:v1"]),
        ("empty SOURCE_DATE_EPOCH is unset", 5, vec!["commit", "m1", "127.0.0.1:1/x/y:v1"]),
        ("a panic while paused", 1, vec!["commit", "m1", t]),
        ("containerd answers an error", 6, vec!["commit", "m1", t, "--namespace", "a..b"]),
        ("socket permission denied", 3, vec!["commit", "m1", t, "--address", &denied]),
    ];
    for (case, code, args) in &cases {
        // A run that reaches the read is also run with --quiet: exactly one line, no progress.
        let mut runs = vec![(false, false), (true, false)];
        if *code == 4 || *code == 1 {
            runs.extend([(false, true), (true, true)]);
        }
        for (json, quiet) in runs {
            let (mut cmd, spool) = match *case {
                "socket permission denied" => (nobody.command(), nobody.spool.as_path()),
                _ => (lab.committer_command(), spool.as_path()),
            };
            cmd.args(args).env("TMPDIR", spool);
            cmd.args(["--log-format", if json { "json" } else { "text" }]);
            if quiet {
                cmd.arg("--quiet");
            }
            let commit_runs = args.first() == Some(&"commit") && !args.contains(&"--spool-dir");
            if commit_runs {
                cmd.args(["--plain-http", "--spool-dir"]).arg(spool);
            }
            match *case {
                "empty SOURCE_DATE_EPOCH is unset" => cmd.env("SOURCE_DATE_EPOCH", ""),
                "a panic while paused" => cmd.env("COMMITTER_TEST_PANIC", "reading"),
                "bad COMMITTER_SPOOL_RESERVE" => cmd.env("COMMITTER_SPOOL_RESERVE", "lots"),
                _ => &mut cmd,
            };
            let out = crate::lab::run(&mut cmd);
            assert_one_line(&out, json, *code, case);
            let line = stderr_text(&out);
            let want = match *case {
                "silent socket" => format!("containerd at {silent} did not answer within 10 s"),
                "a panic while paused" => "please report".into(),
                "containerd answers an error" => "containerd answered InvalidArgument".into(),
                "socket permission denied" => "permission denied: the socket is root's".into(),
                "bad COMMITTER_SPOOL_RESERVE" => {
                    "COMMITTER_SPOOL_RESERVE=\"lots\": give bytes".into()
                }
                _ => String::new(),
            };
            assert!(line.contains(&want), "{case}: {line}");
            if *case == "empty SOURCE_DATE_EPOCH is unset" {
                assert!(!line.contains("source-date-epoch"), "{line}");
            }
            assert_eq!(
                spool_files(spool),
                Vec::<String>::new(),
                "spool after {case}"
            );
        }
    }
    assert_eq!(lab.task_status("m1"), "RUNNING");
    assert!(
        lab.tags("snap/matrix").is_empty(),
        "a failed commit pushed a tag"
    );
}

#[test]
fn docker_commit_habits_push_a_result_that_matches_its_schema() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    let id = "sandbox-0123456789abcdef";
    lab.run_container(id, &base, &RunOpts::default());
    lab.exec(id, "echo changed > /data/modify.txt");
    let repo = format!("{}/snap/habits", lab.registry);
    let result_file = lab.dir.join("result.json");
    let out = lab.committer(&[
        "commit",
        "-m",
        "snapshot",
        "-a",
        "dev <dev@example.com>",
        "-p",
        "sandbox-01234",
        &format!("{repo}:v1"),
        "--tag",
        "v1",
        "--tag",
        "two",
        "--tag",
        "two",
        "--plain-http",
        "--quiet",
        "--result-file",
        &result_file.to_string_lossy(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("progress"),
        "--quiet shows no progress: {stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let result: Value = serde_json::from_str(stdout.trim()).unwrap();
    let schema = schema();
    assert_eq!(
        validate(&schema, &schema, &result, ""),
        Vec::<String>::new(),
        "{result:#}"
    );
    assert_eq!(result["container"], id);
    assert_eq!(
        result["extraTags"],
        serde_json::json!([format!("{repo}:two")])
    );
    assert_eq!(result["paused"]["skipped"], Value::Null);
    let mut tags = lab.tags("snap/habits");
    tags.sort();
    assert_eq!(tags, ["two", "v1"]);
    assert_eq!(
        std::fs::read_to_string(&result_file).unwrap(),
        stdout.trim()
    );
    assert_eq!(lab.task_status(id), "RUNNING");

    // Without a pause, the result says why it was skipped; --threads is cut to the cores; an
    // empty SOURCE_DATE_EPOCH (as CI systems export it) is no epoch at all.
    let out = crate::lab::run(
        lab.committer_command()
            .env("SOURCE_DATE_EPOCH", "")
            .args(["commit", id, &format!("{repo}:v2"), "--pause=false"])
            .args(["--plain-http", "--threads", "100000"]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        result["paused"],
        serde_json::json!({"ms": 0, "skipped": "no-pause", "capture": "copy"})
    );
}

#[test]
fn diff_writes_stdout_with_a_dash_and_leaves_no_partial_file_when_it_fails() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("d1", &base, &RunOpts::default());
    lab.exec("d1", "echo one > /data/a; echo two > /data/b");
    let out = lab.committer(&["diff", "d1", "--output", "-", "--compression", "none"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let desc: Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("diffId").is_some())
        .expect("the descriptor on stderr");
    use sha2::Digest;
    let sum = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&out.stdout)));
    assert_eq!(desc["digest"], sum.as_str(), "stdout holds the blob");
    assert_eq!(desc["size"], out.stdout.len() as u64);

    let dir = lab.dir.join("diffout");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("layer.tar");
    let out = lab.committer(&[
        "diff",
        "d1",
        "--output",
        &file.to_string_lossy(),
        "--max-files",
        "1",
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        spool_files(&dir),
        Vec::<String>::new(),
        "a failed diff leaves nothing"
    );
}

/// Long flags (and their defaults) of `committer SUB --help`.
fn help_flags(sub: &str) -> Vec<(String, Option<String>)> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_committer"))
        .args([sub, "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let flag = regex::Regex::new(r"^\s+(?:-\w, )?(--[a-z-]+)").unwrap();
    let default = regex::Regex::new(r"\[default: ([^\]]*)\]").unwrap();
    let mut flags: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        match flag.captures(line) {
            Some(c) => flags.push((c[1].to_string(), line.to_string())),
            None => {
                if let Some(last) = flags.last_mut() {
                    last.1 += " ";
                    last.1 += line.trim();
                }
            }
        }
    }
    flags
        .into_iter()
        .filter(|(f, _)| f != "--help" && f != "--version")
        .map(|(f, text)| {
            let d = default.captures(&text);
            (f, d.map(|c| c[1].trim_matches('"').to_string()))
        })
        .collect()
}

#[test]
fn every_flag_in_help_is_in_the_readme_table_with_the_same_default_and_back() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let flag = regex::Regex::new(r"`(?:-\w, )?(--[a-z-]+)").unwrap();
    let mut table: Vec<(String, String)> = Vec::new();
    for row in readme.lines().filter(|l| l.starts_with("| `-")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        for c in flag.captures_iter(cells[0]) {
            table.push((c[1].to_string(), cells.get(1).unwrap_or(&"").to_string()));
        }
    }
    let mut in_help: Vec<String> = Vec::new();
    for sub in ["commit", "diff"] {
        for (f, default) in help_flags(sub) {
            let row = table.iter().find(|(t, _)| *t == f);
            let Some((_, cell)) = row else {
                panic!("{f} (committer {sub} --help) is not in the README's flag table");
            };
            if let Some(d) = default {
                assert!(
                    cell.contains(&format!("`{d}`")),
                    "{f}: --help says default {d:?}, README says {cell:?}"
                );
            }
            in_help.push(f);
        }
    }
    for (f, _) in &table {
        assert!(
            in_help.contains(f),
            "the README lists {f}, which --help does not"
        );
    }
}

#[test]
fn a_terminal_sees_the_bar_move_and_a_summary_before_the_result() {
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("t1", &base, &RunOpts::default());
    lab.exec("t1", "head -c 100000000 /dev/urandom > /data/big");
    let typescript = lab.dir.join("typescript");
    let cmd = format!(
        "CONTAINERD_ADDRESS={} CONTAINERD_NAMESPACE={} {} commit t1 {}/snap/tty:v1 --plain-http --compression zstd",
        lab.address.display(),
        lab.namespace,
        env!("CARGO_BIN_EXE_committer"),
        lab.registry
    );
    let out = crate::lab::run(std::process::Command::new("script").args([
        "-qefc",
        &cmd,
        &typescript.to_string_lossy(),
    ]));
    let screen = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    assert!(out.status.success(), "{screen}");
    let frames = |verb: &str| -> Vec<String> {
        let re = regex::Regex::new(&format!(r"{verb}\s+\[[=> ]+\]\s+([0-9.]+ [kMG]?i?B)")).unwrap();
        let mut seen: Vec<String> = re
            .captures_iter(&screen)
            .map(|c| c[1].to_string())
            .collect();
        seen.dedup();
        seen
    };
    assert!(
        frames("compressing").len() >= 2,
        "the compress bar moved: {screen:?}"
    );
    assert!(screen.contains("uploading"), "{screen:?}");
    let summary = screen
        .find("committer: info: pushed ")
        .expect("a summary line");
    let result = screen.find("{\"schemaVersion\"").expect("the result");
    assert!(summary < result, "the summary comes before the result");

    // Piped: JSON progress events, each stage against its total.
    let out = lab.committer(&[
        "commit",
        "t1",
        &format!("{}/snap/tty:v2", lab.registry),
        "--plain-http",
        "--threads",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let events: Vec<Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "progress")
        .collect();
    let compressing: Vec<&Value> = events
        .iter()
        .filter(|e| e["stage"] == "compressing")
        .collect();
    assert!(
        !compressing.is_empty(),
        "a progress event while compressing: {stderr}"
    );
    for e in &compressing {
        assert!(e["compressTotal"].as_u64() >= Some(100_000_000), "{e}");
        assert!(
            e["compressedBytes"].as_u64() <= e["compressTotal"].as_u64(),
            "{e}"
        );
        assert_eq!(
            e["readBytes"], e["compressTotal"],
            "the read is not counted again: {e}"
        );
    }
}

/// `committer ARGS` with its read of the sandbox held (`COMMITTER_TEST_STALL`), started; returns
/// once the sandbox is paused, with the commit process (the worker) to kill.
pub(crate) fn spawn_stalled(
    lab: &Lab,
    id: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, u32) {
    let mut cmd = lab.committer_command();
    cmd.envs(env.iter().copied())
        .env("COMMITTER_TEST_STALL", "reading")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let start = std::time::Instant::now();
    while lab.task_status(id) != "PAUSED" {
        if start.elapsed() > std::time::Duration::from_secs(30)
            || child.try_wait().unwrap().is_some()
        {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{id} was not paused: {}", crate::lab::describe(&out));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let worker = crate::safety::worker_of(child.id());
    (child, worker)
}

/// The exit codes of a commit that meets another, a signal or a SIGKILL while the sandbox is paused,
/// each one line in the format the command line chose: a second commit is busy (7), SIGTERM
/// interrupts (130), SIGKILL of the commit process is reported by the supervisor (137: what killed
/// it, the sandbox running again); the spool is empty after each, and a killed `diff` leaves no
/// staged output either.
#[test]
fn a_busy_interrupted_or_killed_commit_ends_in_one_line_in_the_chosen_format_and_leaves_no_file() {
    use crate::safety::signal;
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("k1", &base, &RunOpts::default());
    lab.exec("k1", "echo changed > /data/modify.txt");
    let spool = lab.spool_dir.to_string_lossy().into_owned();
    let target = format!("{}/snap/k1:v1", lab.registry);
    for json in [false, true] {
        let format = if json { "json" } else { "text" };
        let args = [
            "commit",
            "k1",
            &target,
            "--plain-http",
            "--spool-dir",
            &spool,
            "--log-format",
            format,
        ];
        let (child, worker) = spawn_stalled(&lab, "k1", &args, &[]);
        let busy = crate::lab::run(lab.committer_command().args(args));
        assert_one_line(&busy, json, 7, "a second commit of the same container");
        signal(worker, rustix::process::Signal::KILL);
        let out = child.wait_with_output().unwrap();
        assert_one_line(&out, json, 137, "SIGKILL of the commit process");
        let line = stderr_text(&out);
        assert!(
            line.contains("killed (signal 9)") && line.contains("\"k1\" is running again"),
            "{line}"
        );
        assert_eq!(lab.task_status("k1"), "RUNNING");
        assert_eq!(spool_files(&lab.spool_dir), Vec::<String>::new());

        let (child, _) = spawn_stalled(&lab, "k1", &args, &[]);
        signal(child.id(), rustix::process::Signal::TERM);
        let out = child.wait_with_output().unwrap();
        assert_one_line(&out, json, 130, "SIGTERM");
        assert!(stderr_text(&out).contains("interrupted by SIGTERM"));
        assert_eq!(lab.task_status("k1"), "RUNNING");
        assert_eq!(spool_files(&lab.spool_dir), Vec::<String>::new());
    }
    assert!(lab.tags("snap/k1").is_empty());

    // `diff` stages its blob beside --output: killed, it leaves neither that nor a spool file.
    let out_dir = lab.dir.join("diff-out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let output = out_dir.join("layer.tgz").to_string_lossy().into_owned();
    let args = ["diff", "k1", "--output", &output];
    let (child, worker) = spawn_stalled(&lab, "k1", &args, &[("TMPDIR", &spool)]);
    assert!(!spool_files(&out_dir).is_empty(), "the staged output");
    signal(worker, rustix::process::Signal::KILL);
    let out = child.wait_with_output().unwrap();
    assert_one_line(&out, true, 137, "SIGKILL of a diff");
    assert_eq!(
        spool_files(&out_dir),
        Vec::<String>::new(),
        "beside --output"
    );
    assert_eq!(spool_files(&lab.spool_dir), Vec::<String>::new());
    assert_eq!(lab.task_status("k1"), "RUNNING");
}
