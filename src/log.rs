//! Logging to stderr: text on a terminal, JSON lines otherwise. stdout carries only the result.
//! Callers pass messages that never contain secrets (the registry module redacts its own).
//!
//! Every line is one line: names from the sandbox (a file called `a\nb`, an ANSI escape) are
//! escaped in text (`escape`) and by JSON's own escaping, so they cannot forge a log line or
//! repaint the terminal.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU8, Ordering};

static LEVEL: AtomicU8 = AtomicU8::new(2);
static JSON: AtomicU8 = AtomicU8::new(0);

/// 0 error, 1 warn, 2 info, 3 debug. `json` None: JSON unless stderr is a terminal.
pub fn init(level: u8, json: Option<bool>) {
    LEVEL.store(level, Ordering::Relaxed);
    let json = json.unwrap_or_else(|| !std::io::stderr().is_terminal());
    JSON.store(json as u8, Ordering::Relaxed);
}

/// This process's arguments (a name that is not UTF-8 shown with U+FFFD, never a panic).
pub fn args_lossy() -> Vec<String> {
    std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// Initialises from a command line not parsed yet (the supervisor's own lines, an argument
/// error): `--log-format`, `--log-level` (or `COMMITTER_LOG`) and `-q/--quiet`, as clap would
/// read them; anything unreadable keeps the default.
pub fn init_from_args(args: &[String]) {
    let flags: Vec<&str> = args
        .iter()
        .skip(1)
        .map(String::as_str)
        .take_while(|a| *a != "--")
        .collect();
    let value = |flag: &str| -> Option<&str> {
        let mut found = None;
        for (i, a) in flags.iter().enumerate() {
            if *a == flag {
                found = flags.get(i + 1).copied();
            } else if let Some(v) = a.strip_prefix(flag).and_then(|v| v.strip_prefix('=')) {
                found = Some(v);
            }
        }
        found
    };
    let json = match value("--log-format") {
        Some("json") => Some(true),
        Some("text") => Some(false),
        _ => None,
    };
    let env = std::env::var("COMMITTER_LOG").unwrap_or_default();
    let level = match value("--log-level").unwrap_or(&env) {
        "error" => 0,
        "warn" => 1,
        "debug" => 3,
        _ => 2,
    };
    let quiet = flags.iter().any(|a| *a == "-q" || *a == "--quiet");
    init(if quiet { level.min(1) } else { level }, json);
}

pub fn enabled(level: u8) -> bool {
    level <= LEVEL.load(Ordering::Relaxed)
}

pub fn is_json() -> bool {
    JSON.load(Ordering::Relaxed) == 1
}

/// `s` with control characters (newlines, ESC, C1 controls, DEL) written as `\n`, `\u{1b}`…
/// and backslashes doubled, so an escaped line is unambiguous.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn json_line(level: &str, msg: &str, fields: serde_json::Value) -> String {
    let mut line = serde_json::json!({"time": now(), "level": level, "msg": msg});
    if let (Some(obj), serde_json::Value::Object(extra)) = (line.as_object_mut(), fields) {
        obj.extend(extra);
    }
    line.to_string()
}

fn emit(line: &str) {
    crate::progress::suspend(|| eprintln!("{line}"));
}

/// A log line with structured fields (merged into the JSON object; text shows only `msg`).
pub fn event(level: u8, msg: &str, fields: serde_json::Value) {
    if !enabled(level) {
        return;
    }
    let name = ["error", "warn", "info", "debug"][level.min(3) as usize];
    if is_json() {
        emit(&json_line(name, msg, fields));
    } else {
        emit(&format!("committer: {name}: {}", escape(msg)));
    }
}

/// The one line a failed run ends with: `committer: MSG`, or a JSON object with the exit code.
pub fn failure(msg: &str, exit_code: i32) {
    if is_json() {
        let fields = serde_json::json!({"exitCode": exit_code});
        emit(&json_line("error", msg, fields));
    } else {
        emit(&format!("committer: {}", escape(msg)));
    }
}

pub fn error(msg: &str) {
    event(0, msg, serde_json::Value::Null)
}
pub fn warn(msg: &str) {
    event(1, msg, serde_json::Value::Null)
}
pub fn info(msg: &str) {
    event(2, msg, serde_json::Value::Null)
}
pub fn debug(msg: &str) {
    event(3, msg, serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_are_escaped_to_one_line() {
        assert_eq!(escape("plain /a b"), "plain /a b");
        assert_eq!(
            escape("/data/x\n{\"level\":\"error\"}\u{1b}[2J\\"),
            "/data/x\\n{\"level\":\"error\"}\\u{1b}[2J\\\\"
        );
        assert_eq!(escape("\u{9b}31m"), "\\u{9b}31m");
    }
}
