//! Config and manifest building: unknown keys survive, history, squash, annotations.

use super::*;

fn base(config: &str, manifest: Value) -> BaseImage {
    BaseImage {
        name: "reg/base:1".into(),
        manifest_digest: Digest::of(b"m"),
        manifest_media_type: media::OCI_MANIFEST.into(),
        manifest,
        config_bytes: config.as_bytes().to_vec(),
    }
}

fn one_layer_manifest(mt: &str) -> Value {
    json!({"schemaVersion": 2, "mediaType": mt,
           "config": {"mediaType": media::OCI_CONFIG, "digest": Digest::of(b"c").to_string(), "size": 1},
           "layers": [{"mediaType": media::DOCKER_LAYER_GZIP, "digest": Digest::of(b"l").to_string(), "size": 5}]})
}

fn layer() -> LayerDescriptor {
    LayerDescriptor {
        digest: Digest::of(b"z"),
        diff_id: Digest::of(b"t"),
        size: 9,
        media_type: media::OCI_LAYER_GZIP.into(),
    }
}

const NOTE: HistoryNote = HistoryNote {
    created: "2026-01-01T00:00:00Z",
    created_by: "committer",
    comment: "c",
    author: None,
};

#[test]
fn config_keeps_unknown_keys_in_order_and_appends_diff_id() {
    let cfg = r#"{"zeta":1,"config":{"Healthcheck":{"Test":["CMD","true"]},"Shell":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:aa"]},"alpha":2}"#;
    let b = base(cfg, one_layer_manifest(media::OCI_MANIFEST));
    let blob = new_config(&b, Some(&layer()), Family::Oci, &NOTE, &Edits::default()).unwrap();
    let text = String::from_utf8(blob.bytes.clone()).unwrap();
    assert!(
        text.starts_with(
            r#"{"zeta":1,"config":{"Healthcheck":{"Test":["CMD","true"]},"Shell":["/bin/sh"],"Labels":{"#
        ),
        "{text}"
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["rootfs"]["diff_ids"][1], layer().diff_id.to_string());
    assert_eq!(
        v["history"].as_array().unwrap().len(),
        2,
        "one placeholder for the base layer + ours"
    );
    assert_eq!(v["history"][1]["created_by"], "committer");
    assert_eq!(blob.digest, Digest::of(&blob.bytes));
}

#[test]
fn empty_diff_adds_only_an_empty_layer_history_entry() {
    let cfg =
        r#"{"rootfs":{"type":"layers","diff_ids":["sha256:aa"]},"history":[{"created_by":"x"}]}"#;
    let b = base(cfg, one_layer_manifest(media::OCI_MANIFEST));
    let v: Value = serde_json::from_slice(
        &new_config(&b, None, Family::Oci, &NOTE, &Edits::default())
            .unwrap()
            .bytes,
    )
    .unwrap();
    assert_eq!(v["rootfs"]["diff_ids"].as_array().unwrap().len(), 1);
    assert_eq!(v["history"][1]["empty_layer"], true);
}

#[test]
fn config_with_mismatched_diff_ids_is_refused() {
    let b = base(
        r#"{"rootfs":{"type":"layers","diff_ids":[]}}"#,
        one_layer_manifest(media::OCI_MANIFEST),
    );
    assert!(new_config(&b, None, Family::Oci, &NOTE, &Edits::default()).is_err());
}

#[test]
fn docker_base_with_zstd_becomes_oci_and_relabels_base_layers() {
    assert_eq!(
        Family::for_base(media::DOCKER_MANIFEST, Compression::Zstd),
        Family::Oci
    );
    assert_eq!(
        Family::for_base(media::DOCKER_MANIFEST, Compression::Gzip),
        Family::Docker
    );
    let b = base(
        r#"{"rootfs":{"type":"layers","diff_ids":["sha256:aa"]}}"#,
        one_layer_manifest(media::DOCKER_MANIFEST),
    );
    let cfg = new_config(&b, Some(&layer()), Family::Oci, &NOTE, &Edits::default()).unwrap();
    let m: Value = serde_json::from_slice(
        &new_manifest(
            &b,
            &cfg,
            Some(&layer()),
            Family::Oci,
            &Edits::default(),
            "t",
        )
        .unwrap()
        .bytes,
    )
    .unwrap();
    assert_eq!(m["mediaType"], media::OCI_MANIFEST);
    assert_eq!(m["layers"][0]["mediaType"], media::OCI_LAYER_GZIP);
    assert_eq!(m["layers"][1]["digest"], layer().digest.to_string());
    assert_eq!(m["config"]["digest"], cfg.digest.to_string());
}

fn n_layer_base(n: usize, history: usize) -> BaseImage {
    let ids: Vec<String> = (0..n).map(|i| Digest::of(&[i as u8]).to_string()).collect();
    let layers: Vec<Value> = ids
        .iter()
        .map(|d| json!({"mediaType": media::OCI_LAYER_GZIP, "digest": d, "size": 1}))
        .collect();
    let cfg = json!({"config": {"Env": ["PATH=/bin"]}, "rootfs": {"type": "layers", "diff_ids": ids},
                     "history": vec![json!({"created_by": "x"}); history]});
    base(
        &cfg.to_string(),
        json!({"schemaVersion": 2, "mediaType": media::OCI_MANIFEST, "layers": layers,
               "annotations": {"org.opencontainers.image.revision": "base's"}}),
    )
}

/// Commits `n` snapshot layers on a 2-layer base, returning the last image as a base.
fn snapshot_chain(n: usize) -> BaseImage {
    let mut b = n_layer_base(2, 2);
    for i in 0..n {
        let cfg = new_config(&b, Some(&layer()), Family::Oci, &NOTE, &Edits::default()).unwrap();
        let m = new_manifest(
            &b,
            &cfg,
            Some(&layer()),
            Family::Oci,
            &Edits::default(),
            "t",
        )
        .unwrap();
        b = BaseImage {
            name: format!("reg/snap:{i}"),
            manifest_digest: m.digest.clone(),
            manifest_media_type: media::OCI_MANIFEST.into(),
            manifest: serde_json::from_slice(&m.bytes).unwrap(),
            config_bytes: cfg.bytes,
        };
    }
    b
}

#[test]
fn squash_keeps_the_original_base_layers_and_history_and_adds_one() {
    let snap = snapshot_chain(3);
    assert_eq!(snap.layers().len(), 5);
    let edits = Edits {
        chain: Some(
            BaseConfig::read(&snap)
                .unwrap()
                .plan(&snap, chain::Mode::Squash),
        ),
        ..Edits::default()
    };
    let cfg = new_config(&snap, Some(&layer()), Family::Oci, &NOTE, &edits).unwrap();
    let m = new_manifest(&snap, &cfg, Some(&layer()), Family::Oci, &edits, "t").unwrap();
    let c: Value = serde_json::from_slice(&cfg.bytes).unwrap();
    let m: Value = serde_json::from_slice(&m.bytes).unwrap();
    assert_eq!(c["rootfs"]["diff_ids"].as_array().unwrap().len(), 3);
    assert_eq!(c["history"].as_array().unwrap().len(), 3);
    assert_eq!(m["layers"].as_array().unwrap().len(), 3);
    assert_eq!(m["layers"][0], snap.layers()[0]);
    assert_eq!(m["layers"][2]["digest"], layer().digest.to_string());
    let base = n_layer_base(2, 2);
    assert_eq!(m["annotations"][provenance::BASE_NAME], base.name);
    assert_eq!(m["annotations"][provenance::PARENT_NAME], "reg/snap:2");
    assert_eq!(c["config"]["Labels"][chain::LABEL_LAYERS], "2");
}

#[test]
fn author_comment_and_created_by_are_written_like_docker_commit() {
    let b = n_layer_base(1, 1);
    let note = HistoryNote {
        created: "2026-01-01T00:00:00Z",
        created_by: "/bin/sh -c sleep infinity",
        comment: "snapshot 3",
        author: Some("Ada <ada@example.com>"),
    };
    let c: Value = serde_json::from_slice(
        &new_config(&b, Some(&layer()), Family::Oci, &note, &Edits::default())
            .unwrap()
            .bytes,
    )
    .unwrap();
    assert_eq!(
        c["history"][1],
        json!({"created": "2026-01-01T00:00:00Z", "author": "Ada <ada@example.com>",
               "created_by": "/bin/sh -c sleep infinity", "comment": "snapshot 3"})
    );
    assert_eq!(c["author"], "Ada <ada@example.com>");
    assert_eq!(c["comment"], "snapshot 3");
}

#[test]
fn changes_apply_to_the_config_and_their_errors_name_the_base() {
    let b = n_layer_base(1, 1);
    let edits = Edits {
        changes: Changes::parse(&["ENV A=$PATH:/x".into(), "CMD [\"run\"]".into()]).unwrap(),
        ..Edits::default()
    };
    let c: Value = serde_json::from_slice(
        &new_config(&b, None, Family::Oci, &NOTE, &edits)
            .unwrap()
            .bytes,
    )
    .unwrap();
    assert_eq!(c["config"]["Env"], json!(["PATH=/bin", "A=/bin:/x"]));
    assert_eq!(c["config"]["Cmd"], json!(["run"]));
    let bad = Edits {
        changes: Changes::parse(&["STOPSIGNAL NOPE".into()]).unwrap(),
        ..Edits::default()
    };
    let e = new_config(&b, None, Family::Oci, &NOTE, &bad).unwrap_err();
    assert!(e.to_string().contains("STOPSIGNAL NOPE"), "{e}");
}

#[test]
fn oci_manifest_carries_provenance_and_docker_manifest_none() {
    let b = n_layer_base(1, 1);
    let edits = Edits {
        provenance: Provenance {
            pod_namespace: Some("team-a".into()),
            pod_name: Some("sbx-1".into()),
            node: Some("node-7".into()),
            ..Provenance::default()
        },
        ..Edits::default()
    };
    let cfg = new_config(&b, Some(&layer()), Family::Oci, &NOTE, &edits).unwrap();
    let m: Value = serde_json::from_slice(
        &new_manifest(
            &b,
            &cfg,
            Some(&layer()),
            Family::Oci,
            &edits,
            "2026-01-01T00:00:00Z",
        )
        .unwrap()
        .bytes,
    )
    .unwrap();
    let ann = m["annotations"].as_object().unwrap();
    assert_eq!(ann[provenance::BASE_NAME], "reg/base:1");
    assert_eq!(ann[provenance::BASE_DIGEST], b.manifest_digest.to_string());
    assert_eq!(ann[provenance::CREATED], "2026-01-01T00:00:00Z");
    assert_eq!(ann[provenance::POD_NAMESPACE], "team-a");
    assert_eq!(ann[provenance::NODE], "node-7");
    assert!(
        ann.get(provenance::PARENT_NAME).is_none(),
        "first commit has no parent"
    );
    assert!(
        ann.get("org.opencontainers.image.revision").is_none(),
        "base's own are dropped"
    );
    let docker = new_manifest(&b, &cfg, Some(&layer()), Family::Docker, &edits, "t").unwrap();
    let m: Value = serde_json::from_slice(&docker.bytes).unwrap();
    assert!(m.get("annotations").is_none());
}

#[test]
fn changes_are_checked_against_the_base_before_anything_is_read() {
    let b = n_layer_base(1, 1);
    let edits = |c: &str| Edits {
        changes: Changes::parse(&[c.to_string()]).unwrap(),
        ..Edits::default()
    };
    assert!(check_changes(&b, &edits("ENV X=${PATH:?}")).is_ok());
    let e = check_changes(&b, &edits("ENV X=${NOPE:?unset}"))
        .unwrap_err()
        .unwrap();
    assert_eq!(e.instruction, "ENV X=${NOPE:?unset}");
}
