//! `--process-config` proven by running the image: a CRI container whose process differs from its
//! image's config (command and args, env with the variables Kubernetes injects, working dir,
//! user and group) is committed with `--process-config`; the pushed image, run with no arguments
//! by `ctr run` and by Docker 28, starts that process as that user, in that directory, with that
//! env minus Kubernetes' variables.

use crate::cri::{cri_lab, kubelet_container_labels, push_base, Cri};
use crate::lab::check;
use k8s_cri::v1 as cri;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Prints who, where and with what it runs, then stays (a sandbox's process does not exit).
const SCRIPT: &str =
    "echo \"start uid=$(id -u) gid=$(id -g) cwd=$(pwd) greeting=$GREETING args=$0|$1\"; \
    env | sort | sed 's/^/env:/'; echo end; exec sleep 1000000";

const EXPECTED: &str = "start uid=1000 gid=1000 cwd=/data greeting=hello  world args=arg0|arg one";

fn sandbox_config(pod: &crate::cri::Pod, name: &str) -> cri::ContainerConfig {
    let env = |k: &str, v: &str| cri::KeyValue {
        key: k.into(),
        value: v.into(),
    };
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: String::new(),
            ..Default::default()
        }),
        command: vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()],
        args: vec!["arg0".into(), "arg one".into()],
        working_dir: "/data".into(),
        envs: vec![
            env("GREETING", "hello  world"),
            env("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            env("KUBERNETES_PORT", "tcp://10.96.0.1:443"),
            env("MYSVC_SERVICE_HOST", "10.96.0.2"),
            env("MYSVC_SERVICE_PORT", "80"),
            env("MYSVC_PORT_80_TCP_ADDR", "10.96.0.2"),
        ],
        labels: kubelet_container_labels(&pod.config, name),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1000 }),
                run_as_group: Some(cri::Int64Value { value: 1000 }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Polls `read` until its text holds the line `end`; returns the text.
fn wait_output(what: &str, mut read: impl FnMut() -> String) -> String {
    let start = Instant::now();
    loop {
        let text = read();
        if text.lines().any(|l| l == "end") {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: no complete output in 30 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The first line is the sandbox's; its env has GREETING and none of Kubernetes' variables.
fn assert_started_like_the_sandbox(what: &str, text: &str) {
    let start = text.lines().find(|l| l.starts_with("start ")).unwrap_or("");
    assert_eq!(start, EXPECTED, "{what}:\n{text}");
    let env: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("env:"))
        .collect();
    assert!(env.contains(&"GREETING=hello  world"), "{what}: {env:?}");
    for k in ["KUBERNETES_", "MYSVC_"] {
        assert!(
            !env.iter().any(|e| e.starts_with(k)),
            "{what}: {k}* in {env:?}"
        );
    }
}

#[test]
fn process_config_image_runs_with_no_arguments_as_the_sandbox_ran() {
    let lab = cri_lab("default");
    let base = push_base(&lab, "base");
    let mut cri = Cri::connect(&lab);
    let image_ref = cri.pull(&base);
    let pod = cri.run_pod("default", "proc");
    let mut config = sandbox_config(&pod, "app");
    config.image.as_mut().unwrap().image = image_ref;
    let id = cri.create_and_start(&pod, config);
    let sandbox = wait_output("the sandbox", || {
        cri.exec_sync(&id, "echo \"start uid=$(id -u) gid=$(id -g) cwd=$(pwd) greeting=$GREETING\"; env | sort | sed 's/^/env:/'; echo end")
    });
    // The sandbox itself does see Kubernetes' variables; the image must not carry them.
    assert!(
        sandbox.contains("env:KUBERNETES_SERVICE_HOST="),
        "{sandbox}"
    );
    let (who, _args) = EXPECTED.split_once(" args=").unwrap();
    assert!(sandbox.starts_with(&format!("{who}\n")), "{sandbox}");

    let image = lab.commit(&id, "proc:1", &["--process-config"]).image;
    let raw = check(std::process::Command::new("skopeo").args([
        "inspect",
        "--config",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ]));
    let config: Value = serde_json::from_str(&raw).unwrap();
    let c = &config["config"];
    assert_eq!(c["User"], "1000:1000", "{c}");
    assert_eq!(c["WorkingDir"], "/data", "{c}");

    // containerd: `ctr run` with no arguments.
    lab.ctr(&["images", "pull", "--plain-http", &image]);
    let log = lab.dir.join("logs").join("proc-ctr.log");
    let mut cmd = lab.ctr_command();
    cmd.args(["run", "-d"]);
    cmd.arg("--log-uri")
        .arg(format!("file://{}", log.display()));
    cmd.arg("--runc-root").arg(&lab.runc_root);
    cmd.arg("--cgroup")
        .arg(format!("{}/proc-ctr", lab.cgroup_parent));
    cmd.args([image.as_str(), "proc-ctr"]);
    check(&mut cmd);
    let out = wait_output("ctr run", || {
        std::fs::read_to_string(&log).unwrap_or_default()
    });
    assert_started_like_the_sandbox("ctr run", &out);

    // Docker 28: `docker run IMAGE`.
    let Some(bin) = std::env::var_os("COMMITTER_DOCKER_28_BIN_DIR") else {
        eprintln!("SKIP docker-28: COMMITTER_DOCKER_28_BIN_DIR is not set");
        return;
    };
    let docker = crate::docker::Docker::start(
        std::path::Path::new(&bin),
        &lab.dir.join("docker-28"),
        &lab.cgroup_parent,
    );
    docker.cli(&[
        "run",
        "-d",
        "--name",
        "sandbox-copy",
        "--network",
        "none",
        &image,
    ]);
    let out = wait_output("docker run", || docker.cli(&["logs", "sandbox-copy"]));
    assert_started_like_the_sandbox("docker run", &out);
}
