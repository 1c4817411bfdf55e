//! Chain planning: which layers are the original base's, and when a commit squashes.

use super::*;
use serde_json::json;

fn ids(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| Digest::of(format!("layer{i}").as_bytes()).to_string())
        .collect()
}

fn base(name: &str) -> BaseImage {
    BaseImage {
        name: name.into(),
        manifest_digest: Digest::of(name.as_bytes()),
        manifest_media_type: crate::media::OCI_MANIFEST.into(),
        manifest: json!({}),
        config_bytes: vec![],
    }
}

/// A config of `total` layers whose first `original` were recorded as the original base.
fn snapshot_config(total: usize, original: usize) -> Value {
    let ids = ids(total);
    let o = OriginalBase {
        name: "reg/base:1".into(),
        digest: "sha256:bb".into(),
        layers: original,
        history: original + 1,
        chain_id: chain_id(&ids[..original]).unwrap(),
    };
    let labels: serde_json::Map<String, Value> = o
        .labels()
        .into_iter()
        .map(|(k, v)| (k.to_string(), Value::String(v)))
        .collect();
    json!({"config": {"Labels": labels}, "rootfs": {"diff_ids": ids},
           "history": vec![json!({}); total + 1]})
}

#[test]
fn chain_id_follows_the_oci_definition() {
    let ids = ids(2);
    assert_eq!(chain_id(&ids[..1]).unwrap(), ids[0]);
    let two = Digest::of(format!("{} {}", ids[0], ids[1]).as_bytes()).to_string();
    assert_eq!(chain_id(&ids).unwrap(), two);
    assert_eq!(chain_id(&[]), None);
}

#[test]
fn a_plain_base_is_its_own_original_and_every_mode_appends() {
    let cfg = json!({"rootfs": {"diff_ids": ids(3)}, "history": [{}, {}, {}]});
    for mode in [Mode::Append, Mode::Squash, Mode::MaxLayers(1)] {
        let p = plan(&base("reg/base:1"), &cfg, 3, mode);
        assert!(!p.squash, "{mode:?}");
        assert_eq!((p.keep_layers, p.keep_history), (3, 3));
        assert_eq!(p.original.layers, 3);
        assert_eq!(p.original.name, "reg/base:1");
        assert_eq!(p.original.chain_id, chain_id(&ids(3)).unwrap());
    }
}

#[test]
fn squash_keeps_only_the_original_base_layers_and_history() {
    let cfg = snapshot_config(6, 2);
    let p = plan(&base("reg/snap:5"), &cfg, 7, Mode::Squash);
    assert!(p.squash);
    assert_eq!((p.keep_layers, p.keep_history), (2, 3));
    assert_eq!(p.original.name, "reg/base:1");
    assert_eq!(p.note, None);
    let p = plan(&base("reg/snap:5"), &cfg, 7, Mode::Append);
    assert_eq!((p.squash, p.keep_layers, p.keep_history), (false, 6, 7));
    assert_eq!(p.original.name, "reg/base:1", "append keeps the record");
}

#[test]
fn max_layers_appends_until_the_bound_then_squashes() {
    // 2 base layers + k snapshot layers; with N = 3, commits 1..3 append, the 4th squashes.
    for (snapshots, squash) in [(0, false), (1, false), (2, false), (3, true), (4, true)] {
        let cfg = snapshot_config(2 + snapshots, 2);
        let p = plan(&base("b"), &cfg, 3 + snapshots, Mode::MaxLayers(3));
        assert_eq!(p.squash, squash, "{snapshots} snapshot layers");
        let after = if squash { 2 } else { 2 + snapshots } + 1;
        assert!(after <= 2 + 3);
    }
}

#[test]
fn a_record_whose_layers_do_not_match_is_not_trusted() {
    let mut cfg = snapshot_config(4, 2);
    cfg["rootfs"]["diff_ids"][1] = json!(Digest::of(b"other").to_string());
    assert!(recorded_original(&cfg)
        .unwrap_err()
        .contains("chain ID differs"));
    let p = plan(&base("reg/rebased:1"), &cfg, 5, Mode::Squash);
    assert!(!p.squash);
    assert_eq!(p.original.name, "reg/rebased:1");
    assert_eq!(p.original.layers, 4);
    assert!(p.note.unwrap().contains("append"));

    let mut cfg = snapshot_config(4, 2);
    cfg["config"]["Labels"][LABEL_LAYERS] = json!("9");
    assert!(recorded_original(&cfg).is_err());
}
