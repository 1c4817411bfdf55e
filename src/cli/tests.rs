//! Parsing and validation of the command line, without running anything.

use super::*;

fn parse(args: &[&str]) -> Result<CommitPlan, String> {
    let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
    match cli.command {
        Command::Commit(c) => c.plan().map_err(|e| e.0),
        Command::Diff(_) => Err("diff".into()),
    }
}

#[test]
fn docker_commit_positionals_and_short_flags_parse() {
    let p = parse(&[
        "committer",
        "commit",
        "-m",
        "msg",
        "-a",
        "me",
        "-c",
        "ENV A=1",
        "-c",
        "USER 1",
        "-p=false",
        "abc123",
        "reg.example/r:t",
    ])
    .unwrap();
    assert!(matches!(p.source.selector, Selector::Id(ref id) if id == "abc123"));
    assert_eq!(p.image.tag_or_latest(), "t");
    assert_eq!(
        (p.message.as_str(), p.author.as_deref()),
        ("msg", Some("me"))
    );
    let want = crate::image::Changes::parse(&["ENV A=1".into(), "USER 1".into()]).unwrap();
    assert_eq!(p.changes, want);
    assert!(!p.source.pause);
}

#[test]
fn a_lone_positional_with_pod_is_the_image() {
    let p = parse(&["committer", "commit", "--pod", "ns/p", "reg.example/r:t"]).unwrap();
    assert!(matches!(p.source.selector, Selector::Pod { .. }));
    assert_eq!(p.image.tag_or_latest(), "t");
}

#[test]
fn tags_are_deduplicated_and_the_main_tag_is_not_repeated() {
    let p = parse(&[
        "committer",
        "commit",
        "c",
        "reg.example/r:latest",
        "--tag",
        "latest",
        "--tag",
        "x",
        "--tag",
        "x",
    ])
    .unwrap();
    assert_eq!(p.extra_tags, ["x"]);
}

#[test]
fn container_name_without_pod_and_two_containers_are_refused() {
    let e = parse(&[
        "committer",
        "commit",
        "--container",
        "c",
        "--container-name",
        "x",
        "--image",
        "r/x",
    ]);
    assert!(e.unwrap_err().contains("--pod"));
    let e = parse(&[
        "committer",
        "commit",
        "a",
        "--container",
        "b",
        "--image",
        "r/x",
    ]);
    assert!(e.unwrap_err().contains("twice"));
}

#[test]
fn threads_are_bounded_by_the_cores() {
    let p = parse(&["committer", "commit", "c", "r/x", "--threads", "100000"]).unwrap();
    assert_eq!(p.source.compress.threads, cores());
}

#[test]
fn excludes_are_normalised_or_refused() {
    assert_eq!(
        normalise_exclude("/tmp/../tmp/cache/").unwrap(),
        "/tmp/cache"
    );
    assert_eq!(normalise_exclude("//a/./b").unwrap(), "/a/b");
    assert!(normalise_exclude("/../etc").is_err());
    assert!(normalise_exclude("/").is_err());
    assert!(normalise_exclude("tmp").is_err());
}

#[test]
fn unix_scheme_addresses_are_socket_paths() {
    let p = parse(&[
        "committer",
        "commit",
        "c",
        "r/x",
        "--address",
        "unix:///run/x.sock",
    ]);
    assert_eq!(p.unwrap().source.address, PathBuf::from("/run/x.sock"));
    let e = parse(&[
        "committer",
        "commit",
        "c",
        "r/x",
        "--address",
        "tcp://1.2.3.4:1",
    ]);
    assert!(e.unwrap_err().contains("tcp://"));
}
