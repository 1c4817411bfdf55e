//! `--change` against the real `docker commit --change`: the same base image run as a container
//! by Docker 28 and as a sandbox by containerd, the same instructions applied by both, and the
//! two image configs compared field by field. Needs COMMITTER_DOCKER_28_BIN_DIR (scripts/test.sh
//! sets it); without it the test says SKIP and passes.

use crate::docker::Docker;
use crate::lab::{check, Lab, RunOpts};
use serde_json::{Map, Value};
use std::process::Command;

/// The config fields `docker commit --change` can set.
const FIELDS: [&str; 11] = [
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Volumes",
    "Labels",
    "StopSignal",
    "OnBuild",
    "Healthcheck",
];

/// Sets of `--change` values, each applied on its own to the base image.
fn change_sets() -> Vec<Vec<&'static str>> {
    vec![
        // ENV: both forms, quotes, spaces, escapes, expansion from the base's and earlier values.
        vec![
            "ENV A=1 B=\"two words\" C='single $A' D=$A-x E=${A}y F=\\$A",
            "ENV G the rest of the line, $A and \"quotes\"",
            "ENV PATH=$PATH:/opt/bin H=${UNSET:-fallback} I=${A:+set}",
            "ENV J=\"a \\\"quoted\\\" word\" K=tab\\ sep",
        ],
        // JSON CMD, shell ENTRYPOINT (which, as in a Dockerfile, does not reset a CMD set here).
        vec![
            "CMD [\"echo\", \"hi there\"]",
            "ENTRYPOINT /bin/sh -c 'echo $HOME'",
        ],
        // JSON ENTRYPOINT alone: the base's CMD is reset.
        vec!["ENTRYPOINT [\"/bin/echo\", \"x\"]"],
        // Shell CMD, then an empty JSON ENTRYPOINT.
        vec!["CMD echo \"$HOME\" && ls /", "ENTRYPOINT []"],
        // EXPOSE ranges and protocols, LABEL forms and expansion, USER, WORKDIR (relative after
        // absolute, with a variable), VOLUME both forms, STOPSIGNAL, ONBUILD.
        vec![
            "ENV P=8080 U=app W=/srv",
            "EXPOSE 80 53/udp 8000-8002/tcp $P 443/TCP 9/sctp",
            "LABEL a=b \"c d\"=\"e f\" port=$P",
            "LABEL legacy value with spaces",
            "USER $U:1000",
            "WORKDIR $W",
            "WORKDIR rel/dir",
            "VOLUME /data /other",
            "VOLUME [\"/v1\", \"/v2\"]",
            "STOPSIGNAL SIGINT",
            "ONBUILD RUN echo built",
            "onbuild add . /app",
        ],
        // HEALTHCHECK, with options and in both forms.
        vec!["HEALTHCHECK --interval=5s --timeout=3s --retries=2 CMD curl -f http://localhost/ || exit 1"],
        vec!["HEALTHCHECK --start-period=1m CMD [\"/bin/check\", \"--quick\"]"],
        vec!["HEALTHCHECK NONE"],
    ]
}

/// Sets both refuse (committer with exit 2 naming the instruction).
fn refused_sets() -> Vec<Vec<&'static str>> {
    [
        "VOLUME /data \"/quoted vol\"",
        "RUN echo hi",
        "FROM busybox",
        "MAINTAINER someone",
        "ADD . /app",
        "ARG x=1",
        "SHELL [\"/bin/bash\", \"-c\"]",
        "ONBUILD ONBUILD RUN x",
        "ONBUILD FROM busybox",
        "EXPOSE",
        "ENV A",
        "LABEL =x",
        "USER",
        "WORKDIR",
        "STOPSIGNAL",
        "HEALTHCHECK --interval=1x CMD true",
        "HEALTHCHECK --bogus=1 CMD true",
        "HEALTHCHECK",
        "STOPSIGNAL NOPE",
        "EXPOSE abc",
        "WORKDIR $NOPE",
    ]
    .into_iter()
    .map(|c| vec![c])
    .collect()
}

fn docker28() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("COMMITTER_DOCKER_28_BIN_DIR");
    if dir.is_none() {
        eprintln!(
            "SKIP: COMMITTER_DOCKER_28_BIN_DIR is not set (scripts/test.sh fetches Docker 28)"
        );
    }
    dir.map(Into::into)
}

/// `null`, `[]` and `{}` are what an absent field reads as.
fn field(config: &Map<String, Value>, name: &str) -> Value {
    match config.get(name) {
        None | Some(Value::Null) => Value::Null,
        Some(Value::Array(a)) if a.is_empty() => Value::Null,
        Some(Value::Object(o)) if o.is_empty() => Value::Null,
        Some(v) => v.clone(),
    }
}

/// The image config's `config` object of a pushed image.
fn pushed_config(image: &str) -> Map<String, Value> {
    let raw = check(Command::new("skopeo").args([
        "inspect",
        "--config",
        "--raw", // the blob as pushed: parsed, skopeo drops what OCI's struct lacks (OnBuild, Healthcheck)
        "--tls-verify=false",
        &format!("docker://{image}"),
    ]));
    let v: Value = serde_json::from_str(&raw).unwrap();
    let mut config = v["config"].as_object().cloned().unwrap_or_default();
    // committer's own record of the chain's original base (README, "Snapshot chains").
    if let Some(Value::Object(labels)) = config.get_mut("Labels") {
        labels.retain(|k, _| !k.starts_with("dev.committer."));
    }
    config
}

#[test]
fn change_gives_the_config_docker_commit_change_gives() {
    let Some(bin) = docker28() else { return };
    let lab = Lab::start();
    let base = lab.base_image("base", false);
    lab.run_container("sandbox", &base, &RunOpts::default());
    let docker = Docker::start(&bin, &lab.dir.join("docker-28"), &lab.cgroup_parent);
    docker.cli(&["pull", "-q", &base]);
    // Created, never started: its config is the image's, as the sandbox's is.
    docker.cli(&[
        "create",
        "--name",
        "sandbox-copy",
        "--network",
        "none",
        &base,
    ]);

    let mut diffs = Vec::new();
    let mut refused = Vec::new();
    let accepted = change_sets().len();
    for (n, set) in change_sets().into_iter().chain(refused_sets()).enumerate() {
        let tag = format!("changed:{n}");
        let mut args = vec!["commit".to_string()];
        for c in &set {
            args.push("--change".into());
            args.push(c.to_string());
        }
        args.extend(["sandbox-copy".to_string(), tag.clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = docker.try_cli(&args);
        let mut flags = Vec::new();
        for c in &set {
            flags.extend(["--change", c]);
        }
        let target = format!("{}/{tag}", lab.registry);
        let base_args = [
            "commit",
            "--container",
            "sandbox",
            "--plain-http",
            "--image",
        ];
        let ours = lab.committer(&[&base_args[..], &[target.as_str()], &flags].concat());
        match (out.status.success(), ours.status.success()) {
            (true, true) => {}
            (false, false) if ours.status.code() == Some(2) => {
                eprintln!(
                    "set {n}: both refuse it: docker {}; committer {}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    crate::cli::stderr_text(&ours).trim()
                );
                assert!(
                    crate::cli::stderr_text(&ours).contains("--change"),
                    "committer names the instruction: {}",
                    crate::lab::describe(&ours)
                );
                refused.push(n);
                continue;
            }
            (docker_ok, _) => {
                diffs.push(format!(
                    "set {n} {set:?}: docker {}, committer {}",
                    if docker_ok {
                        "accepted it".to_string()
                    } else {
                        format!(
                            "refused it ({})",
                            String::from_utf8_lossy(&out.stderr).trim()
                        )
                    },
                    crate::lab::describe(&ours)
                ));
                continue;
            }
        }
        let theirs: Value = serde_json::from_str(&docker.cli(&[
            "image",
            "inspect",
            "-f",
            "{{json .Config}}",
            &tag,
        ]))
        .unwrap();
        let theirs = theirs.as_object().cloned().unwrap_or_default();
        let ours = pushed_config(&crate::lab::result_of(&ours).image);
        for f in FIELDS {
            let (d, c) = (field(&theirs, f), field(&ours, f));
            if d != c {
                diffs.push(format!("set {n} {set:?}: {f}: docker {d}, committer {c}"));
            }
        }
    }
    assert!(diffs.is_empty(), "differences:\n{}", diffs.join("\n"));
    let expect: Vec<usize> = (accepted..accepted + refused_sets().len()).collect();
    assert_eq!(refused, expect, "the sets both refuse");
}
