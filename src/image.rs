//! The new image's config and manifest, built by editing the base's JSON (so that keys we do
//! not know — Healthcheck, Shell, OnBuild, annotations — survive in their order) and serialised
//! once into the exact bytes that are hashed and uploaded.

use crate::containerd::content::BaseImage;
use crate::digest::Digest;
use crate::layer::LayerDescriptor;
use serde_json::{json, Map, Value};

pub mod media {
    //! Media types, and which family (OCI or Docker schema2) each belongs to.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    pub fn is_index(mt: &str) -> bool {
        mt == OCI_INDEX || mt == DOCKER_LIST
    }
    pub fn is_manifest(mt: &str) -> bool {
        mt == OCI_MANIFEST || mt == DOCKER_MANIFEST
    }
}

/// How the new layer is compressed; decides its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

/// Which manifest family the new image is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Oci,
    Docker,
}

impl Family {
    /// The base's family, except that Docker schema2 has no zstd layer type: a zstd layer on a
    /// Docker base makes an OCI image (base layer types are relabelled to their OCI twins).
    pub fn for_base(base_manifest_media_type: &str, compression: Compression) -> Family {
        if base_manifest_media_type == media::DOCKER_MANIFEST && compression == Compression::Gzip {
            Family::Docker
        } else {
            Family::Oci
        }
    }

    pub fn manifest_media_type(self) -> &'static str {
        match self {
            Family::Oci => media::OCI_MANIFEST,
            Family::Docker => media::DOCKER_MANIFEST,
        }
    }

    pub fn config_media_type(self) -> &'static str {
        match self {
            Family::Oci => media::OCI_CONFIG,
            Family::Docker => media::DOCKER_CONFIG,
        }
    }

    pub fn layer_media_type(self, c: Compression) -> &'static str {
        match (self, c) {
            (Family::Docker, Compression::None) => media::DOCKER_LAYER_TAR,
            (Family::Docker, _) => media::DOCKER_LAYER_GZIP,
            (Family::Oci, Compression::Gzip) => media::OCI_LAYER_GZIP,
            (Family::Oci, Compression::Zstd) => media::OCI_LAYER_ZSTD,
            (Family::Oci, Compression::None) => media::OCI_LAYER_TAR,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("base image {image:?}: {detail}")]
pub struct ImageError {
    pub image: String,
    pub detail: String,
}

/// A blob ready to upload: its exact bytes and descriptor fields.
#[derive(Debug, Clone)]
pub struct Blob {
    pub media_type: String,
    pub digest: Digest,
    pub bytes: Vec<u8>,
}

impl Blob {
    fn new(media_type: &str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.to_string(),
            digest: Digest::of(&bytes),
            bytes,
        }
    }
}

/// What the history entry says about this commit.
pub struct HistoryNote<'a> {
    pub created: &'a str,
    pub comment: &'a str,
}

/// New config = base config + our diff_id (unless the diff is empty) + a history entry.
pub fn new_config(
    base: &BaseImage,
    layer: Option<&LayerDescriptor>,
    family: Family,
    note: &HistoryNote,
) -> Result<Blob, ImageError> {
    let err = |detail: &str| ImageError {
        image: base.name.clone(),
        detail: detail.to_string(),
    };
    let mut config: Value = serde_json::from_slice(&base.config_bytes)
        .map_err(|e| err(&format!("config is not JSON: {e}")))?;
    let obj = config
        .as_object_mut()
        .ok_or_else(|| err("config is not a JSON object"))?;
    let base_layers = base.layers().len();

    let rootfs = obj
        .entry("rootfs")
        .or_insert_with(|| json!({"type": "layers", "diff_ids": []}));
    let diff_ids = rootfs
        .get_mut("diff_ids")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| err("config has no rootfs.diff_ids array"))?;
    if diff_ids.len() != base_layers {
        return Err(err(&format!(
            "config lists {} diff_ids but the manifest {} layers",
            diff_ids.len(),
            base_layers
        )));
    }
    if let Some(l) = layer {
        diff_ids.push(Value::String(l.diff_id.to_string()));
    }

    let history = obj.entry("history").or_insert_with(|| Value::Array(vec![]));
    let history = history
        .as_array_mut()
        .ok_or_else(|| err("config history is not an array"))?;
    pad_history(history, base_layers);
    let mut entry = Map::new();
    entry.insert("created".into(), Value::String(note.created.to_string()));
    entry.insert("created_by".into(), Value::String("committer".into()));
    entry.insert("comment".into(), Value::String(note.comment.to_string()));
    if layer.is_none() {
        entry.insert("empty_layer".into(), Value::Bool(true));
    }
    history.push(Value::Object(entry));
    obj.insert("created".into(), Value::String(note.created.to_string()));

    let bytes =
        serde_json::to_vec(&config).map_err(|e| err(&format!("serialising config: {e}")))?;
    Ok(Blob::new(family.config_media_type(), bytes))
}

/// Tools (docker, buildkit) expect one non-empty history entry per layer. A base whose history
/// is short (images built without history) gets placeholders so our entry lines up with our layer.
fn pad_history(history: &mut Vec<Value>, layers: usize) {
    let non_empty = history
        .iter()
        .filter(|h| {
            !h.get("empty_layer")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        })
        .count();
    for _ in non_empty..layers {
        history.push(json!({"created_by": "(base layer without history)"}));
    }
}

/// New manifest = base manifest with our config and the base layers + our layer.
pub fn new_manifest(
    base: &BaseImage,
    config: &Blob,
    layer: Option<&LayerDescriptor>,
    family: Family,
) -> Result<Blob, ImageError> {
    let err = |detail: &str| ImageError {
        image: base.name.clone(),
        detail: detail.to_string(),
    };
    let mut manifest = base.manifest.clone();
    let obj = manifest
        .as_object_mut()
        .ok_or_else(|| err("manifest is not a JSON object"))?;
    obj.insert("schemaVersion".into(), json!(2));
    obj.insert(
        "mediaType".into(),
        Value::String(family.manifest_media_type().into()),
    );
    obj.insert(
        "config".into(),
        json!({"mediaType": config.media_type, "digest": config.digest.to_string(), "size": config.bytes.len()}),
    );
    // A subject would claim we are an artifact attached to the base; we are a new image.
    obj.remove("subject");
    let mut layers = base.layers();
    if family == Family::Oci {
        for l in &mut layers {
            relabel_docker_layer(l);
        }
    }
    if let Some(l) = layer {
        layers.push(
            json!({"mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.size}),
        );
    }
    obj.insert("layers".into(), Value::Array(layers));
    if family == Family::Oci {
        let ann = obj
            .entry("annotations")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(ann) = ann.as_object_mut() {
            ann.insert(
                "org.opencontainers.image.base.name".into(),
                Value::String(base.name.clone()),
            );
            ann.insert(
                "org.opencontainers.image.base.digest".into(),
                Value::String(base.manifest_digest.to_string()),
            );
        }
    }
    let bytes =
        serde_json::to_vec(&manifest).map_err(|e| err(&format!("serialising manifest: {e}")))?;
    Ok(Blob::new(family.manifest_media_type(), bytes))
}

/// Docker layer media types name the same bytes as their OCI twins.
fn relabel_docker_layer(layer: &mut Value) {
    let Some(mt) = layer.get("mediaType").and_then(Value::as_str) else {
        return;
    };
    let oci = match mt {
        media::DOCKER_LAYER_GZIP => media::OCI_LAYER_GZIP,
        media::DOCKER_LAYER_TAR => media::OCI_LAYER_TAR,
        _ => return,
    };
    layer["mediaType"] = Value::String(oci.into());
}

#[cfg(test)]
mod tests {
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
        comment: "c",
    };

    #[test]
    fn config_keeps_unknown_keys_in_order_and_appends_diff_id() {
        let cfg = r#"{"zeta":1,"config":{"Healthcheck":{"Test":["CMD","true"]},"Shell":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:aa"]},"alpha":2}"#;
        let b = base(cfg, one_layer_manifest(media::OCI_MANIFEST));
        let blob = new_config(&b, Some(&layer()), Family::Oci, &NOTE).unwrap();
        let text = String::from_utf8(blob.bytes.clone()).unwrap();
        assert!(
            text.starts_with(
                r#"{"zeta":1,"config":{"Healthcheck":{"Test":["CMD","true"]},"Shell":["/bin/sh"]}"#
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
        let cfg = r#"{"rootfs":{"type":"layers","diff_ids":["sha256:aa"]},"history":[{"created_by":"x"}]}"#;
        let b = base(cfg, one_layer_manifest(media::OCI_MANIFEST));
        let v: Value =
            serde_json::from_slice(&new_config(&b, None, Family::Oci, &NOTE).unwrap().bytes)
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
        assert!(new_config(&b, None, Family::Oci, &NOTE).is_err());
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
        let cfg = new_config(&b, Some(&layer()), Family::Oci, &NOTE).unwrap();
        let m: Value = serde_json::from_slice(
            &new_manifest(&b, &cfg, Some(&layer()), Family::Oci)
                .unwrap()
                .bytes,
        )
        .unwrap();
        assert_eq!(m["mediaType"], media::OCI_MANIFEST);
        assert_eq!(m["layers"][0]["mediaType"], media::OCI_LAYER_GZIP);
        assert_eq!(m["layers"][1]["digest"], layer().digest.to_string());
        assert_eq!(m["config"]["digest"], cfg.digest.to_string());
    }
}
