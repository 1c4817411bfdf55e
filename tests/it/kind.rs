//! The Kubernetes side of the field: the commit Job template's filler (deploy/fill-commit-job.sh) accepts only
//! values its grammar allows, so a user-influenced value cannot add YAML to the privileged Job.

use std::process::Command;

use crate::lab::{describe, run};

fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Valid values for every placeholder, as a controller would pass them.
fn good_values() -> Vec<(&'static str, String)> {
    vec![
        ("JOB_NAME", "commit-web-0-1".into()),
        ("JOB_NAMESPACE", "committer".into()),
        ("NODE", "ip-10-0-1-2.eu-west-1.compute.internal".into()),
        ("POD_NAMESPACE", "shop".into()),
        ("POD_NAME", "web-0".into()),
        ("CONTAINER_NAME", "app".into()),
        ("TARGET", "registry.example:5000/snaps/web-0:snap-1".into()),
        ("COMMITTER_IMAGE", "registry.example/platform/committer".into()),
        ("IMAGE_DIGEST", format!("sha256:{}", "ab".repeat(32))),
        ("PUSH_SECRET", "push-creds".into()),
    ]
}

fn fill(values: &[(&str, String)]) -> std::process::Output {
    let mut cmd = Command::new(repo_root().join("deploy/fill-commit-job.sh"));
    cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap());
    for (k, v) in values {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

fn with(key: &str, value: &str) -> Vec<(&'static str, String)> {
    let mut v = good_values();
    v.iter_mut().find(|(k, _)| *k == key).unwrap().1 = value.to_string();
    v
}

#[test]
fn job_filler_puts_each_valid_value_in_its_place() {
    let out = fill(&good_values());
    assert!(out.status.success(), "{}", describe(&out));
    let job = String::from_utf8(out.stdout).unwrap();
    for line in [
        "  name: commit-web-0-1\n",
        "      nodeName: ip-10-0-1-2.eu-west-1.compute.internal\n",
        "            - shop/web-0\n",
        "            - registry.example:5000/snaps/web-0:snap-1\n",
        "          image: registry.example/platform/committer@sha256:abab",
        "            secretName: push-creds\n",
    ] {
        assert!(job.contains(line), "{line:?} not in the filled Job:\n{job}");
    }
    let yaml: Vec<&str> = job.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    assert!(
        yaml.iter().all(|l| !l.contains("${")),
        "a placeholder was left:\n{job}"
    );
}

#[test]
fn job_filler_rejects_a_newline_that_would_inject_yaml() {
    // Each would add a `command:` (or another key) to the privileged container if pasted textually.
    let cases = [
        ("TARGET", "registry.example/snaps/x:1\n          command: [\"/bin/sh\"]"),
        ("POD_NAME", "web-0\n          command: [\"/bin/sh\"]"),
        ("NODE", "node-1\n      hostPID: true"),
        ("CONTAINER_NAME", "app\r\n            - --x"),
        ("TARGET", "registry.example/snaps/x:1 # comment"),
        ("POD_NAME", "web: 0"),
        ("JOB_NAME", "Commit"),
        ("TARGET", "snaps/x:1"),
        ("TARGET", "registry.example/snaps/x@sha256:00"),
        ("IMAGE_DIGEST", "latest"),
        ("COMMITTER_IMAGE", "registry.example/platform/committer:1"),
        ("PUSH_SECRET", ""),
    ];
    for (key, value) in cases {
        let out = fill(&with(key, value));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}={value:?}: {}", describe(&out));
        assert!(out.stdout.is_empty(), "{key}={value:?} printed a Job");
        assert_eq!(stderr.lines().count(), 1, "{key}={value:?}: not one line: {stderr}");
        assert!(stderr.contains(key), "{key}={value:?}: {stderr}");
    }
    let mut missing = good_values();
    missing.retain(|(k, _)| *k != "NODE");
    let out = fill(&missing);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NODE is not set"));
}
