//! The sandbox's own process (args, env, working directory, user) from its OCI runtime spec,
//! for recording into the image config so `docker run IMAGE` starts the way the pod did —
//! without the variables the kubelet and the CRI inject (service links, `KUBERNETES_*`,
//! `HOSTNAME`), which describe the cluster the pod ran in, not the sandbox.

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
#[error("the container's OCI runtime spec {detail}")]
pub struct ProcessError {
    pub detail: String,
}

/// The process part of a runtime spec, filtered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// `uid:gid` as the runtime resolved it.
    pub user: String,
}

/// Reads `process` from the container's OCI runtime spec (JSON bytes).
pub fn process_config(spec_json: &[u8]) -> Result<ProcessConfig, ProcessError> {
    let err = |detail: String| ProcessError { detail };
    let spec: Value =
        serde_json::from_slice(spec_json).map_err(|e| err(format!("is not JSON: {e}")))?;
    let process = spec
        .get("process")
        .ok_or_else(|| err("has no process".into()))?;
    let strings = |k: &str| -> Vec<String> {
        process
            .get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let id = |k: &str| {
        process
            .pointer(&format!("/user/{k}"))
            .and_then(Value::as_u64)
    };
    Ok(ProcessConfig {
        args: strings("args"),
        env: strings("env")
            .into_iter()
            .filter(|e| !injected(e))
            .collect(),
        cwd: process
            .get("cwd")
            .and_then(Value::as_str)
            .unwrap_or("/")
            .to_string(),
        user: format!("{}:{}", id("uid").unwrap_or(0), id("gid").unwrap_or(0)),
    })
}

/// Variables Kubernetes injects: `KUBERNETES_*`, the service links of every service in the
/// namespace (`X_SERVICE_HOST`, `X_SERVICE_PORT[_NAME]`, `X_PORT=tcp://…`,
/// `X_PORT_80_TCP[_PROTO|_PORT|_ADDR]`), and the CRI's `HOSTNAME`. A user's own `MY_PORT=8080`
/// is kept: only the docker-link shapes are dropped.
fn injected(entry: &str) -> bool {
    let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
    if key.starts_with("KUBERNETES_") || key == "HOSTNAME" {
        return true;
    }
    if key.ends_with("_SERVICE_HOST")
        || key.ends_with("_SERVICE_PORT")
        || key.contains("_SERVICE_PORT_")
    {
        return true;
    }
    let link_url = ["tcp://", "udp://", "sctp://"]
        .iter()
        .any(|p| value.starts_with(p));
    if key.ends_with("_PORT") && link_url {
        return true;
    }
    is_port_link(key)
}

/// `NAME_PORT_<number>_<TCP|UDP|SCTP>` with an optional `_PROTO`, `_PORT` or `_ADDR`.
fn is_port_link(key: &str) -> bool {
    key.match_indices("_PORT_")
        .filter(|(i, _)| *i > 0)
        .any(|(i, _)| link_tail(&key[i + "_PORT_".len()..]))
}

fn link_tail(tail: &str) -> bool {
    let mut parts = tail.split('_');
    let num_ok = parts
        .next()
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let proto_ok = parts
        .next()
        .is_some_and(|p| matches!(p, "TCP" | "UDP" | "SCTP"));
    let suffix_ok = match parts.next() {
        None => true,
        Some(s) => matches!(s, "PROTO" | "PORT" | "ADDR") && parts.next().is_none(),
    };
    num_ok && proto_ok && suffix_ok
}

impl ProcessConfig {
    /// Writes the process into the config's `config` object. When the args start with the
    /// image's ENTRYPOINT it is kept and the rest becomes CMD; otherwise the args are the CMD
    /// and ENTRYPOINT is dropped, so `docker run IMAGE` runs exactly the args.
    pub fn apply(&self, cfg: &mut Map<String, Value>) {
        let strs = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        let entrypoint: Vec<String> = cfg
            .get("Entrypoint")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if !entrypoint.is_empty() && self.args.starts_with(&entrypoint) {
            cfg.insert("Cmd".into(), strs(&self.args[entrypoint.len()..]));
        } else {
            cfg.remove("Entrypoint");
            cfg.insert("Cmd".into(), strs(&self.args));
        }
        cfg.insert("Env".into(), strs(&self.env));
        cfg.insert("WorkingDir".into(), Value::String(self.cwd.clone()));
        cfg.insert("User".into(), Value::String(self.user.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(env: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&json!({"ociVersion": "1.0.2", "process": {
            "args": ["/bin/app", "--serve"], "env": env, "cwd": "/work",
            "user": {"uid": 1000, "gid": 100, "additionalGids": [100]}}}))
        .unwrap()
    }

    #[test]
    fn kubernetes_injected_variables_are_dropped_and_the_rest_kept_in_order() {
        let env = [
            "PATH=/usr/bin",
            "KUBERNETES_SERVICE_HOST=10.0.0.1",
            "KUBERNETES_PORT=tcp://10.0.0.1:443",
            "REDIS_MASTER_SERVICE_HOST=10.0.0.11",
            "REDIS_MASTER_SERVICE_PORT=6379",
            "REDIS_MASTER_SERVICE_PORT_REDIS=6379",
            "REDIS_MASTER_PORT=tcp://10.0.0.11:6379",
            "REDIS_MASTER_PORT_6379_TCP=tcp://10.0.0.11:6379",
            "REDIS_MASTER_PORT_6379_TCP_PROTO=tcp",
            "REDIS_MASTER_PORT_6379_TCP_ADDR=10.0.0.11",
            "HOSTNAME=pod-0",
            "MY_PORT=8080",
            "APP_PORT_NAME=web",
            "TOKEN_FILE=/run/x",
        ];
        let p = process_config(&spec(&env)).unwrap();
        assert_eq!(
            p.env,
            [
                "PATH=/usr/bin",
                "MY_PORT=8080",
                "APP_PORT_NAME=web",
                "TOKEN_FILE=/run/x"
            ]
        );
        assert_eq!(p.args, ["/bin/app", "--serve"]);
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/work", "1000:100"));
    }

    #[test]
    fn args_keep_a_matching_entrypoint_and_otherwise_replace_it() {
        let p = process_config(&spec(&[])).unwrap();
        let mut cfg = json!({"Entrypoint": ["/bin/app"], "Cmd": ["x"], "Labels": {}})
            .as_object()
            .unwrap()
            .clone();
        p.apply(&mut cfg);
        assert_eq!(cfg["Entrypoint"], json!(["/bin/app"]));
        assert_eq!(cfg["Cmd"], json!(["--serve"]));
        let mut cfg = json!({"Entrypoint": ["/tini"]})
            .as_object()
            .unwrap()
            .clone();
        p.apply(&mut cfg);
        assert!(cfg.get("Entrypoint").is_none());
        assert_eq!(cfg["Cmd"], json!(["/bin/app", "--serve"]));
        assert_eq!(cfg["WorkingDir"], "/work");
    }

    #[test]
    fn a_spec_without_process_is_an_error() {
        assert!(process_config(b"{}").is_err());
        assert!(process_config(b"nope").is_err());
    }
}
