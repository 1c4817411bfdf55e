//! `--change` parsing and application, one Docker behaviour per test.

use super::*;
use serde_json::json;

fn applied(base: Value, changes: &[&str]) -> Value {
    let changes: Vec<String> = changes.iter().map(|s| s.to_string()).collect();
    let mut cfg = base.as_object().unwrap().clone();
    Changes::parse(&changes).unwrap().apply(&mut cfg).unwrap();
    Value::Object(cfg)
}

fn parse_err(change: &str) -> ChangeError {
    Changes::parse(&[change.to_string()]).unwrap_err()
}

#[test]
fn cmd_json_form_is_kept_and_shell_form_runs_through_sh() {
    let v = applied(
        json!({"Cmd": ["old"], "ArgsEscaped": true}),
        &[r#"CMD ["a", "b c"]"#],
    );
    assert_eq!(v, json!({"Cmd": ["a", "b c"]}));
    let v = applied(json!({}), &["cmd echo $HOME  >/x"]);
    assert_eq!(v["Cmd"], json!(["/bin/sh", "-c", "echo $HOME  >/x"]));
}

#[test]
fn shell_form_uses_the_config_shell_and_a_bad_json_array_is_shell_form() {
    let v = applied(json!({"Shell": ["/bin/bash", "-lc"]}), &["CMD [1, 2]"]);
    assert_eq!(v["Cmd"], json!(["/bin/bash", "-lc", "[1, 2]"]));
}

#[test]
fn entrypoint_clears_cmd_unless_cmd_is_in_the_same_changes() {
    let base = json!({"Entrypoint": null, "Cmd": ["sh"]});
    let v = applied(base.clone(), &[r#"ENTRYPOINT ["/run"]"#]);
    assert_eq!(v, json!({"Entrypoint": ["/run"]}));
    let v = applied(base.clone(), &["CMD x", r#"ENTRYPOINT ["/run"]"#]);
    assert_eq!(v["Cmd"], json!(["/bin/sh", "-c", "x"]));
    let v = applied(base, &["ENTRYPOINT /run it"]);
    assert_eq!(v["Entrypoint"], json!(["/bin/sh", "-c", "/run it"]));
}

#[test]
fn env_replaces_in_place_appends_new_and_expands_with_the_env_before_it() {
    let base = json!({"Env": ["PATH=/bin", "A=old"]});
    let v = applied(
        base,
        &[
            r#"ENV A=new B=$A C="x y" PATH=$PATH:/opt"#,
            "ENV D $A and more",
        ],
    );
    assert_eq!(
        v["Env"],
        json!([
            "PATH=/bin:/opt",
            "A=new",
            "B=old",
            "C=x y",
            "D=new and more"
        ])
    );
}

#[test]
fn label_expose_volume_add_to_sorted_maps() {
    let base = json!({"Labels": {"z": "1"}, "Env": ["P=9000"], "Volumes": null});
    let v = applied(
        base,
        &[
            r#"LABEL a="hello world" z=2"#,
            "EXPOSE 80 53/UDP $P 8000-8002/tcp 127.0.0.1:8080:81",
            r#"VOLUME ["/data", "/b"]"#,
            "VOLUME /c /d",
        ],
    );
    assert_eq!(v["Labels"], json!({"a": "hello world", "z": "2"}));
    let ports: Vec<&String> = v["ExposedPorts"].as_object().unwrap().keys().collect();
    assert_eq!(
        ports,
        ["53/udp", "80/tcp", "8000/tcp", "8001/tcp", "8002/tcp", "81/tcp", "9000/tcp"]
    );
    assert_eq!(
        v["Volumes"],
        json!({"/b": {}, "/c": {}, "/d": {}, "/data": {}})
    );
}

#[test]
fn user_workdir_stopsignal_onbuild_are_set_as_docker_writes_them() {
    let base = json!({"WorkingDir": "/app"});
    let v = applied(
        base,
        &[
            "USER 1000:1000",
            "WORKDIR sub/../src",
            "STOPSIGNAL SIGRTMIN+3",
            "onbuild RUN echo  hi",
        ],
    );
    assert_eq!(v["User"], "1000:1000");
    assert_eq!(v["WorkingDir"], "/app/src");
    assert_eq!(v["StopSignal"], "SIGRTMIN+3");
    assert_eq!(v["OnBuild"], json!(["RUN echo  hi"]));
    let v = applied(json!({}), &["WORKDIR /abs//kept", "STOPSIGNAL 9"]);
    assert_eq!(v["WorkingDir"], "/abs//kept");
}

#[test]
fn continuation_lines_and_comments_read_as_a_dockerfile() {
    let v = applied(
        json!({}),
        &["LABEL a=1 \\\n# note\n  b=2", "# only a comment", ""],
    );
    assert_eq!(v["Labels"], json!({"a": "1", "b": "2"}));
}

#[test]
fn untouched_keys_keep_their_order() {
    let base = json!({"Healthcheck": {"Test": ["NONE"]}, "User": "root", "Zeta": 1});
    let v = applied(base, &["USER app", "LABEL x=y"]);
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["Healthcheck", "User", "Zeta", "Labels"]);
}

#[test]
fn instructions_docker_commit_refuses_are_named() {
    for (change, word) in [
        ("RUN rm -rf /", "RUN"),
        ("copy a b", "copy"),
        ("FROM x", "FROM"),
        ("MAINTAINER me", "MAINTAINER"),
    ] {
        let e = parse_err(change);
        assert_eq!(e.instruction, change);
        assert!(
            e.detail
                .starts_with(&format!("{word} is not a valid change command")),
            "{e}"
        );
    }
}

#[test]
fn syntax_errors_name_the_instruction() {
    let cases = [
        ("ENV a=1 b", "can't find = in \"b\""),
        ("ENV", "ENV requires at least one argument"),
        ("LABEL onlykey", "LABEL must have two arguments"),
        ("USER", "USER requires exactly one argument"),
        ("ONBUILD ONBUILD RUN x", "isn't allowed"),
        ("ONBUILD FROM x", "FROM isn't allowed as an ONBUILD trigger"),
        ("EXPOSE", "at least one argument"),
    ];
    for (change, want) in cases {
        let e = parse_err(change);
        assert!(e.detail.contains(want), "{change}: {e}");
        assert!(e.to_string().contains(change), "{e}");
    }
}

#[test]
fn values_docker_rejects_are_refused_when_applied() {
    let cases = [
        ("STOPSIGNAL SIGNOPE", "invalid signal: SIGNOPE"),
        ("STOPSIGNAL 0", "invalid signal"),
        ("EXPOSE 80/icmp", "invalid proto: icmp"),
        ("EXPOSE 70000", "invalid containerPort"),
        ("ENV a=${NOPE:?required}", "NOPE: required"),
        ("VOLUME [\"\"]", "can not be an empty string"),
        ("ENV =x", "ENV names can not be blank"),
    ];
    for (change, want) in cases {
        let mut cfg = Map::new();
        let e = Changes::parse(&[change.to_string()])
            .unwrap()
            .apply(&mut cfg)
            .unwrap_err();
        assert!(e.detail.contains(want), "{change}: {e}");
        assert_eq!(e.instruction, change);
    }
}

#[test]
fn healthcheck_replaces_the_base_one() {
    let base = json!({"Healthcheck": {"Test": ["CMD-SHELL", "old"], "Retries": 9}});
    let v = applied(base, &["HEALTHCHECK --interval=5s CMD [\"/ok\"]"]);
    assert_eq!(
        v["Healthcheck"],
        json!({"Test": ["CMD", "/ok"], "Interval": 5_000_000_000i64})
    );
    assert!(parse_err("HEALTHCHECK RUN x").detail.contains("try CMD"));
}
