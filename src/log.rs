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

fn emit(level: u8, name: &str, msg: &str) {
    if !enabled(level) {
        return;
    }
    if JSON.load(Ordering::Relaxed) == 1 {
        let ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let line = serde_json::json!({"time": ts, "level": name, "msg": msg});
        eprintln!("{line}");
    } else {
        eprintln!("committer: {name}: {msg}");
    }
}

pub fn error(msg: &str) {
    emit(0, "error", msg)
}
pub fn warn(msg: &str) {
    emit(1, "warn", msg)
}
pub fn info(msg: &str) {
    emit(2, "info", msg)
}
pub fn debug(msg: &str) {
    emit(3, "debug", msg)
}
