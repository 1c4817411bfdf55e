//! Logging to stderr: text on a terminal, JSON lines otherwise. stdout carries only the result.
//! Callers pass messages that never contain secrets (the registry module redacts its own).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU8, Ordering};

static LEVEL: AtomicU8 = AtomicU8::new(2);
static JSON: AtomicU8 = AtomicU8::new(0);

/// 0 error, 1 warn, 2 info, 3 debug.
pub fn init(level: u8, json: Option<bool>) {
    LEVEL.store(level, Ordering::Relaxed);
    let json = json.unwrap_or_else(|| !std::io::stderr().is_terminal());
    JSON.store(json as u8, Ordering::Relaxed);
}

pub fn enabled(level: u8) -> bool {
    level <= LEVEL.load(Ordering::Relaxed)
}

/// A log line with structured fields (merged into the JSON object; text shows only `msg`).
pub fn event(level: u8, msg: &str, fields: serde_json::Value) {
    if !enabled(level) {
        return;
    }
    let name = ["error", "warn", "info", "debug"][level.min(3) as usize];
    if JSON.load(Ordering::Relaxed) == 1 {
        let ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut line = serde_json::json!({"time": ts, "level": name, "msg": msg});
        if let (Some(obj), serde_json::Value::Object(extra)) = (line.as_object_mut(), fields) {
            obj.extend(extra);
        }
        eprintln!("{line}");
    } else {
        eprintln!("committer: {name}: {msg}");
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
