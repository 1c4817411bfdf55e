//! `--change "HEALTHCHECK …"`: BuildKit's `parseHealthcheck` (`NONE`, or `[--interval=D]
//! [--timeout=D] [--start-period=D] [--start-interval=D] [--retries=N] CMD command`) into the
//! JSON Docker writes for `Healthcheck`: `Test` plus the non-zero durations in nanoseconds.

use serde_json::{json, Map, Value};

/// Parses the arguments of HEALTHCHECK into the config's `Healthcheck` value.
pub fn parse(rest: &str) -> Result<Value, String> {
    let mut words = rest.split_whitespace().peekable();
    let mut flags = Vec::new();
    while let Some(flag) = words.next_if(|w| w.starts_with("--")) {
        flags.push(flag);
    }
    let Some(typ) = words.next() else {
        return Err("HEALTHCHECK requires at least one argument".into());
    };
    let after_flags = flags
        .last()
        .and_then(|f| rest.find(f).map(|i| i + f.len()))
        .unwrap_or(0);
    let args = rest[after_flags..]
        .trim_start()
        .get(typ.len()..)
        .unwrap_or_default()
        .trim();
    match typ.to_ascii_uppercase().as_str() {
        "NONE" if args.is_empty() && flags.is_empty() => Ok(json!({"Test": ["NONE"]})),
        "NONE" => Err("HEALTHCHECK NONE takes no arguments".into()),
        "CMD" => {
            let mut health = Map::new();
            health.insert("Test".into(), test(args)?);
            for flag in flags {
                set_flag(&mut health, flag)?;
            }
            Ok(Value::Object(health))
        }
        other => Err(format!("Unknown type \"{other}\" in HEALTHCHECK (try CMD)")),
    }
}

fn test(args: &str) -> Result<Value, String> {
    if args.starts_with('[') {
        if let Ok(list) = serde_json::from_str::<Vec<String>>(args) {
            if list.is_empty() {
                return Err("Missing command after HEALTHCHECK CMD".into());
            }
            let mut test = vec!["CMD".to_string()];
            test.extend(list);
            return Ok(json!(test));
        }
    }
    if args.is_empty() {
        return Err("Missing command after HEALTHCHECK CMD".into());
    }
    Ok(json!(["CMD-SHELL", args]))
}

fn set_flag(health: &mut Map<String, Value>, flag: &str) -> Result<(), String> {
    let (name, value) = flag
        .trim_start_matches("--")
        .split_once('=')
        .ok_or_else(|| format!("Missing a value on flag: {flag}"))?;
    let key = match name {
        "interval" => "Interval",
        "timeout" => "Timeout",
        "start-period" => "StartPeriod",
        "start-interval" => "StartInterval",
        "retries" => {
            let n: i32 = value
                .parse()
                .map_err(|_| format!("invalid --retries value {value:?}"))?;
            if n < 0 {
                return Err(format!("--retries cannot be negative ({n})"));
            }
            if n > 0 {
                health.insert("Retries".into(), json!(n));
            }
            return Ok(());
        }
        _ => return Err(format!("Unknown flag: {name}")),
    };
    let nanos = go_duration(value).ok_or_else(|| format!("time: invalid duration {value:?}"))?;
    if nanos != 0 && nanos < 1_000_000 {
        return Err(format!("Interval \"{name}\" cannot be less than 1ms"));
    }
    if nanos != 0 {
        health.insert(key.into(), json!(nanos));
    }
    Ok(())
}

/// Go's `time.ParseDuration` (`1m30s`, `1.5h`, `250ms`, `0`), in nanoseconds.
fn go_duration(s: &str) -> Option<i64> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += number * scale;
    }
    let nanos = total.round() as i64;
    Some(if neg { -nanos } else { nanos })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmd_shell_and_exec_forms_with_durations_in_nanoseconds() {
        assert_eq!(
            parse("--interval=30s --timeout=1m30s --retries=3 CMD curl -f http://localhost/")
                .unwrap(),
            json!({"Test": ["CMD-SHELL", "curl -f http://localhost/"],
                   "Interval": 30_000_000_000i64, "Timeout": 90_000_000_000i64, "Retries": 3})
        );
        assert_eq!(
            parse(r#"cmd ["/bin/check", "-q"]"#).unwrap(),
            json!({"Test": ["CMD", "/bin/check", "-q"]})
        );
        assert_eq!(
            parse("--start-period=1.5s --start-interval=0 CMD true").unwrap(),
            json!({"Test": ["CMD-SHELL", "true"], "StartPeriod": 1_500_000_000i64})
        );
        assert_eq!(parse("none").unwrap(), json!({"Test": ["NONE"]}));
    }

    #[test]
    fn docker_refusals_are_kept() {
        for (rest, want) in [
            ("NONE x", "takes no arguments"),
            ("RUN x", "Unknown type \"RUN\""),
            ("CMD", "Missing command"),
            ("--interval=10us CMD x", "cannot be less than 1ms"),
            ("--interval=5 CMD x", "invalid duration"),
            ("--retries=-1 CMD x", "cannot be negative"),
            ("--every=5s CMD x", "Unknown flag: every"),
            ("", "at least one argument"),
        ] {
            let e = parse(rest).unwrap_err();
            assert!(e.contains(want), "{rest}: {e}");
        }
    }
}
