//! `--change`: the Dockerfile instructions `docker commit --change` accepts, parsed the way
//! moby's `BuildFromConfig` does (the changes joined by newlines and read as a Dockerfile:
//! `\` continuations, `#` comment lines, instructions in any case) and applied to the
//! image config's `config` object edited as JSON, so keys we do not touch keep their place.

use super::shlex::{process_word, process_words, split_words};
use serde_json::{Map, Value};

/// The instructions `docker commit --change` accepts (moby `validCommitCommands`).
const ACCEPTED: &str =
    "CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, VOLUME, WORKDIR, STOPSIGNAL, ONBUILD, HEALTHCHECK";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--change {instruction:?}: {detail}")]
pub struct ChangeError {
    /// The instruction as written.
    pub instruction: String,
    pub detail: String,
}

/// A command line in exec (JSON) or shell form.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CmdLine {
    Exec(Vec<String>),
    Shell(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Cmd(CmdLine),
    Entrypoint(CmdLine),
    Env(Vec<(String, String)>),
    Label(Vec<(String, String)>),
    Expose(Vec<String>),
    User(String),
    Volume(Vec<String>),
    Workdir(String),
    StopSignal(String),
    Onbuild(String),
    Healthcheck(Value),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Instruction {
    text: String,
    kind: Kind,
}

/// Parsed `--change` instructions, applied in order by `apply`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes(Vec<Instruction>);

impl Changes {
    /// Parses the `--change` values; syntax errors and instructions `docker commit` refuses
    /// come back naming the instruction.
    pub fn parse(changes: &[String]) -> Result<Changes, ChangeError> {
        let text = changes.join("\n");
        logical_lines(&text)
            .into_iter()
            .map(|line| parse_line(&line))
            .collect::<Result<_, _>>()
            .map(Changes)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Applies the instructions, in order, to an image config's `config` object. Variables in
    /// ENV, LABEL, EXPOSE, USER, VOLUME, WORKDIR and STOPSIGNAL expand from its `Env` as it
    /// stands when the instruction runs, as in a Dockerfile.
    pub fn apply(&self, config: &mut Map<String, Value>) -> Result<(), ChangeError> {
        let mut cmd_set = false;
        for i in &self.0 {
            apply_one(config, &i.kind, &mut cmd_set).map_err(|detail| ChangeError {
                instruction: i.text.clone(),
                detail,
            })?;
        }
        Ok(())
    }
}

/// Joins `\`-continued lines and drops empty and `#` comment lines (also inside a
/// continuation), as the Dockerfile parser does.
fn logical_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for raw in text.lines() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let body = raw.trim_end();
        let (body, continues) = match body.strip_suffix('\\') {
            Some(b) => (b, true),
            None => (body, false),
        };
        let line = current.get_or_insert_with(String::new);
        line.push_str(body);
        if !continues {
            out.extend(current.take());
        }
    }
    out.extend(current);
    out.into_iter().filter(|l| !l.trim().is_empty()).collect()
}

fn parse_line(line: &str) -> Result<Instruction, ChangeError> {
    let text = line.trim().to_string();
    let (word, rest) = text
        .split_once(char::is_whitespace)
        .map(|(w, r)| (w, r.trim()))
        .unwrap_or((&text, ""));
    let err = |detail: String| ChangeError {
        instruction: text.clone(),
        detail,
    };
    let name = word.to_ascii_uppercase();
    let kind = parse_args(&name, rest).map_err(|d| {
        err(d.unwrap_or_else(|| {
            format!("{word} is not a valid change command (docker commit accepts {ACCEPTED})")
        }))
    })?;
    Ok(Instruction { text, kind })
}

/// Err(None) names an instruction that is not accepted; Err(Some) a syntax error.
fn parse_args(name: &str, rest: &str) -> Result<Kind, Option<String>> {
    let one = |what: &str| {
        if rest.is_empty() {
            Err(Some(format!("{what} requires exactly one argument")))
        } else {
            Ok(rest.to_string())
        }
    };
    Ok(match name {
        "CMD" => Kind::Cmd(cmd_line(rest)),
        "ENTRYPOINT" => Kind::Entrypoint(cmd_line(rest)),
        "ENV" => Kind::Env(name_values(name, rest)?),
        "LABEL" => Kind::Label(name_values(name, rest)?),
        "EXPOSE" if rest.is_empty() => {
            return Err(Some("EXPOSE requires at least one argument".into()))
        }
        "EXPOSE" => Kind::Expose(rest.split_whitespace().map(str::to_string).collect()),
        "USER" => Kind::User(one(name)?),
        "WORKDIR" => Kind::Workdir(one(name)?),
        "STOPSIGNAL" => Kind::StopSignal(one(name)?),
        "VOLUME" => Kind::Volume(volumes(rest)?),
        "ONBUILD" => Kind::Onbuild(onbuild(rest)?),
        "HEALTHCHECK" => Kind::Healthcheck(super::healthcheck::parse(rest).map_err(Some)?),
        _ => return Err(None),
    })
}

/// JSON form when the text is a JSON array of strings; anything else (even `[1, 2]`) is the
/// shell form, as in Docker.
fn cmd_line(rest: &str) -> CmdLine {
    if rest.starts_with('[') {
        if let Ok(args) = serde_json::from_str::<Vec<String>>(rest) {
            return CmdLine::Exec(args);
        }
    }
    if rest.is_empty() {
        return CmdLine::Exec(vec![]);
    }
    CmdLine::Shell(rest.to_string())
}

/// `name=value ...`, or the legacy `name value` (the value is the rest of the line).
fn name_values(what: &str, rest: &str) -> Result<Vec<(String, String)>, Option<String>> {
    let words = split_words(rest);
    let Some(first) = words.first() else {
        return Err(Some(format!("{what} requires at least one argument")));
    };
    if !first.contains('=') {
        let Some((k, v)) = rest.split_once(char::is_whitespace) else {
            return Err(Some(format!("{what} must have two arguments")));
        };
        return Ok(vec![(k.to_string(), v.trim_start().to_string())]);
    }
    words
        .iter()
        .map(|w| {
            w.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    Some(format!(
                        "Syntax error - can't find = in {w:?}. Must be of the form: name=value"
                    ))
                })
        })
        .collect()
}

fn volumes(rest: &str) -> Result<Vec<String>, Option<String>> {
    let list = match serde_json::from_str::<Vec<String>>(rest) {
        Ok(list) if rest.starts_with('[') => list,
        _ => rest.split_whitespace().map(str::to_string).collect(),
    };
    if list.is_empty() {
        return Err(Some("VOLUME requires at least one argument".into()));
    }
    Ok(list)
}

/// The trigger is stored as written; triggers Docker refuses are refused here too.
fn onbuild(rest: &str) -> Result<String, Option<String>> {
    let trigger = rest.split_whitespace().next().unwrap_or("");
    match trigger.to_ascii_uppercase().as_str() {
        "" => Err(Some("ONBUILD requires at least one argument".into())),
        "ONBUILD" => Err(Some(
            "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into(),
        )),
        t @ ("FROM" | "MAINTAINER") => {
            Err(Some(format!("{t} isn't allowed as an ONBUILD trigger")))
        }
        _ => Ok(rest.to_string()),
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn string_array(items: Vec<String>) -> Value {
    Value::Array(items.into_iter().map(Value::String).collect())
}

fn apply_one(cfg: &mut Map<String, Value>, kind: &Kind, cmd_set: &mut bool) -> Result<(), String> {
    let env = strings(cfg.get("Env"));
    let expand = |w: &str| process_word(w, &env);
    match kind {
        Kind::Cmd(line) => {
            let cmd = resolve(line, cfg);
            *cmd_set |= !cmd.is_empty();
            cfg.insert("Cmd".into(), string_array(cmd));
            // Linux builds record ArgsEscaped = false, which Docker leaves out of the JSON.
            cfg.remove("ArgsEscaped");
        }
        Kind::Entrypoint(line) => {
            let ep = resolve(line, cfg);
            cfg.insert("Entrypoint".into(), string_array(ep));
            cfg.remove("ArgsEscaped");
            // A new ENTRYPOINT drops the base's CMD unless a CMD came in the same changes.
            if !*cmd_set {
                cfg.remove("Cmd");
            }
        }
        Kind::Env(pairs) => apply_env(cfg, pairs, &env)?,
        Kind::Label(pairs) => apply_labels(cfg, pairs, &env)?,
        Kind::Expose(words) => apply_expose(cfg, words, &env)?,
        Kind::Volume(vols) => apply_volumes(cfg, vols, &env)?,
        Kind::User(u) => {
            cfg.insert("User".into(), Value::String(expand(u)?));
        }
        Kind::Workdir(w) => {
            let current = cfg.get("WorkingDir").and_then(Value::as_str).unwrap_or("");
            let dir = workdir(current, &expand(w)?)?;
            cfg.insert("WorkingDir".into(), Value::String(dir));
        }
        Kind::StopSignal(s) => {
            let s = expand(s)?;
            check_signal(&s)?;
            cfg.insert("StopSignal".into(), Value::String(s));
        }
        Kind::Healthcheck(h) => {
            cfg.insert("Healthcheck".into(), h.clone());
        }
        Kind::Onbuild(t) => {
            let mut triggers = strings(cfg.get("OnBuild"));
            triggers.push(t.clone());
            cfg.insert("OnBuild".into(), string_array(triggers));
        }
    }
    Ok(())
}

/// ENV: every pair expands with the env as it was before the instruction; an existing name is
/// replaced in place, a new one appended.
fn apply_env(
    cfg: &mut Map<String, Value>,
    pairs: &[(String, String)],
    env: &[String],
) -> Result<(), String> {
    let mut out = env.to_vec();
    for (k, v) in pairs {
        let (k, v) = (process_word(k, env)?, process_word(v, env)?);
        if k.is_empty() {
            return Err("ENV names can not be blank".into());
        }
        let entry = format!("{k}={v}");
        match out
            .iter_mut()
            .find(|e| e.split_once('=').map_or(e.as_str(), |p| p.0) == k)
        {
            Some(slot) => *slot = entry,
            None => out.push(entry),
        }
    }
    cfg.insert("Env".into(), string_array(out));
    Ok(())
}

fn apply_labels(
    cfg: &mut Map<String, Value>,
    pairs: &[(String, String)],
    env: &[String],
) -> Result<(), String> {
    let mut labels = Vec::new();
    for (k, v) in pairs {
        let k = process_word(k, env)?;
        if k.is_empty() {
            return Err("LABEL names can not be blank".into());
        }
        labels.push((k, Value::String(process_word(v, env)?)));
    }
    set_in_map(cfg, "Labels", labels);
    Ok(())
}

fn apply_expose(
    cfg: &mut Map<String, Value>,
    words: &[String],
    env: &[String],
) -> Result<(), String> {
    let mut ports = Vec::new();
    for w in words {
        for p in process_words(w, env)? {
            ports.extend(port_spec(&p)?);
        }
    }
    set_in_map(cfg, "ExposedPorts", empty_values(ports));
    Ok(())
}

fn apply_volumes(
    cfg: &mut Map<String, Value>,
    vols: &[String],
    env: &[String],
) -> Result<(), String> {
    let mut paths = Vec::new();
    for v in vols {
        let v = process_word(v.trim(), env)?;
        if v.is_empty() {
            return Err("VOLUME specified can not be an empty string".into());
        }
        paths.push(v);
    }
    set_in_map(cfg, "Volumes", empty_values(paths));
    Ok(())
}

/// The shell form runs through the config's `Shell` (default `/bin/sh -c`).
fn resolve(line: &CmdLine, cfg: &Map<String, Value>) -> Vec<String> {
    match line {
        CmdLine::Exec(args) => args.clone(),
        CmdLine::Shell(text) => {
            let mut shell = strings(cfg.get("Shell"));
            if shell.is_empty() {
                shell = vec!["/bin/sh".into(), "-c".into()];
            }
            shell.push(text.clone());
            shell
        }
    }
}

fn empty_values(keys: Vec<String>) -> Vec<(String, Value)> {
    keys.into_iter()
        .map(|k| (k, Value::Object(Map::new())))
        .collect()
}

/// Adds entries to a JSON object field (created when absent or null), keys sorted as Go's
/// encoder writes maps.
fn set_in_map(cfg: &mut Map<String, Value>, field: &str, entries: Vec<(String, Value)>) {
    let mut map: Vec<(String, Value)> = cfg
        .get(field)
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    for (k, v) in entries {
        match map.iter_mut().find(|(mk, _)| *mk == k) {
            Some(slot) => slot.1 = v,
            None => map.push((k, v)),
        }
    }
    map.sort_by(|a, b| a.0.cmp(&b.0));
    cfg.insert(field.into(), Value::Object(map.into_iter().collect()));
}

/// `[[ip:]hostport:]port[-end][/proto]` → the container ports `port/proto`, a range expanded.
fn port_spec(raw: &str) -> Result<Vec<String>, String> {
    let container = raw.rsplit(':').next().unwrap_or(raw);
    let (range, proto) = match container.split_once('/') {
        Some((r, p)) if !p.is_empty() => (r, p.to_ascii_lowercase()),
        Some((r, _)) => (r, "tcp".to_string()),
        None => (container, "tcp".to_string()),
    };
    if range.is_empty() {
        return Err(format!("no port specified: {raw}<empty>"));
    }
    if !["tcp", "udp", "sctp"].contains(&proto.as_str()) {
        return Err(format!("invalid proto: {proto}"));
    }
    let port = |s: &str| {
        s.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("invalid containerPort: {range}"))
    };
    let (start, end) = match range.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(range)?, port(range)?),
    };
    if end < start {
        return Err(format!("invalid containerPort: {range}"));
    }
    Ok((start..=end).map(|p| format!("{p}/{proto}")).collect())
}

/// moby `normalizeWorkdirUnix`: a relative path joins the current one; an absolute one is
/// kept as written.
fn workdir(current: &str, requested: &str) -> Result<String, String> {
    if requested.is_empty() {
        return Err("cannot normalize nothing".into());
    }
    if requested.starts_with('/') {
        return Ok(requested.to_string());
    }
    let mut parts: Vec<&str> = Vec::new();
    for p in current.split('/').chain(requested.split('/')) {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Linux signal names as moby/sys `signal.SignalMap` knows them (SIG prefix optional).
const SIGNALS: &[&str] = &[
    "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL",
    "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP", "TSTP",
    "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ", "RTMIN", "RTMAX",
];

/// moby `signal.ParseSignal`: a non-zero number, or a known name.
fn check_signal(raw: &str) -> Result<(), String> {
    if let Ok(n) = raw.parse::<i64>() {
        return if n == 0 {
            Err(format!("invalid signal: {raw}"))
        } else {
            Ok(())
        };
    }
    let upper = raw.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let rt = |prefix: &str, sign: char| {
        name.strip_prefix(prefix)
            .and_then(|n| n.strip_prefix(sign))
            .and_then(|n| n.parse::<u8>().ok())
            .is_some_and(|n| (1..=15).contains(&n) && !(sign == '-' && n > 14))
    };
    if SIGNALS.contains(&name) || rt("RTMIN", '+') || rt("RTMAX", '-') {
        Ok(())
    } else {
        Err(format!("invalid signal: {raw}"))
    }
}

#[cfg(test)]
#[path = "change_tests.rs"]
mod tests;
