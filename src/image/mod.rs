//! The new image's config and manifest, built by editing the base's JSON (so that keys we do
//! not know — Healthcheck, Shell, OnBuild, annotations — survive in their order) and serialised
//! once into the exact bytes that are hashed and uploaded.

use crate::base::BaseImage;
use crate::digest::Digest;
use crate::layer::{Compression, LayerDescriptor};
use crate::media;
use serde_json::{json, Map, Value};

pub mod chain;
mod change;
mod healthcheck;
mod process;
pub mod provenance;
mod shlex;

pub use chain::ChainPlan;
pub use change::{ChangeError, Changes};
pub use process::{process_config, ProcessConfig, ProcessError};
pub use provenance::Provenance;

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

/// What the history entry says about this commit (as `docker commit` writes it).
pub struct HistoryNote<'a> {
    pub created: &'a str,
    /// Docker writes the container's command here; committer its own name unless told.
    pub created_by: &'a str,
    pub comment: &'a str,
    pub author: Option<&'a str>,
}

/// Everything beyond the new layer that goes into the config and manifest.
#[derive(Debug, Default)]
pub struct Edits {
    /// `--change` instructions, applied after `process`.
    pub changes: Changes,
    /// The sandbox's own process config (opt-in), applied first.
    pub process: Option<ProcessConfig>,
    /// Append or squash; None: append on the base.
    pub chain: Option<ChainPlan>,
    pub provenance: Provenance,
}

/// The base config parsed, with its history padded to one entry per layer.
pub struct BaseConfig {
    pub json: Value,
    pub padded_history: usize,
}

impl BaseConfig {
    pub fn read(base: &BaseImage) -> Result<BaseConfig, ImageError> {
        let err = |detail: String| ImageError {
            image: base.name.clone(),
            detail,
        };
        let mut json: Value = serde_json::from_slice(&base.config_bytes)
            .map_err(|e| err(format!("config is not JSON: {e}")))?;
        let obj = json
            .as_object_mut()
            .ok_or_else(|| err("config is not a JSON object".into()))?;
        let base_layers = base.layers().len();
        let rootfs = obj
            .entry("rootfs")
            .or_insert_with(|| json!({"type": "layers", "diff_ids": []}));
        let n = rootfs
            .get("diff_ids")
            .and_then(Value::as_array)
            .ok_or_else(|| err("config has no rootfs.diff_ids array".into()))?
            .len();
        if n != base_layers {
            return Err(err(format!(
                "config lists {n} diff_ids but the manifest {base_layers} layers"
            )));
        }
        let history = obj.entry("history").or_insert_with(|| Value::Array(vec![]));
        let history = history
            .as_array_mut()
            .ok_or_else(|| err("config history is not an array".into()))?;
        pad_history(history, base_layers);
        let padded_history = history.len();
        Ok(BaseConfig {
            json,
            padded_history,
        })
    }

    /// The chain plan for this base in `mode`.
    pub fn plan(&self, base: &BaseImage, mode: chain::Mode) -> ChainPlan {
        chain::plan(base, &self.json, self.padded_history, mode)
    }
}

/// Applies the process config and `--change`s to a copy of the base config, so that a change
/// Docker would refuse for this base (an expansion of an unset `${VAR:?}`, a bad signal after
/// expansion) fails before the sandbox is paused. Err(None): the base config is unusable (then
/// `new_config` reports it).
pub fn check_changes(base: &BaseImage, edits: &Edits) -> Result<(), Option<ChangeError>> {
    let config = BaseConfig::read(base).map_err(|_| None)?;
    let mut inner = config
        .json
        .get("config")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(p) = &edits.process {
        p.apply(&mut inner);
    }
    edits.changes.apply(&mut inner).map_err(Some)
}

/// New config = base config (minus squashed snapshot layers) + our diff_id (unless the diff is
/// empty) + the process config and `--change`s + the chain record + a history entry.
pub fn new_config(
    base: &BaseImage,
    layer: Option<&LayerDescriptor>,
    family: Family,
    note: &HistoryNote,
    edits: &Edits,
) -> Result<Blob, ImageError> {
    let err = |detail: String| ImageError {
        image: base.name.clone(),
        detail,
    };
    let base_config = BaseConfig::read(base)?;
    let plan = match &edits.chain {
        Some(p) => p.clone(),
        None => base_config.plan(base, chain::Mode::Append),
    };
    let mut config = base_config.json;
    let obj = config.as_object_mut().expect("checked by BaseConfig::read");
    if let Some(ids) = obj
        .get_mut("rootfs")
        .and_then(|r| r.get_mut("diff_ids"))
        .and_then(Value::as_array_mut)
    {
        ids.truncate(plan.keep_layers);
        if let Some(l) = layer {
            ids.push(Value::String(l.diff_id.to_string()));
        }
    }
    let inner = obj
        .entry("config")
        .or_insert_with(|| Value::Object(Map::new()));
    if inner.is_null() {
        *inner = Value::Object(Map::new());
    }
    let inner = inner
        .as_object_mut()
        .ok_or_else(|| err("config.config is not a JSON object".into()))?;
    if let Some(p) = &edits.process {
        p.apply(inner);
    }
    record_original(inner, &plan.original);
    edits.changes.apply(inner).map_err(|e| err(e.to_string()))?;

    if let Some(history) = obj.get_mut("history").and_then(Value::as_array_mut) {
        history.truncate(plan.keep_history);
        history.push(history_entry(note, layer.is_none()));
    }
    obj.insert("created".into(), Value::String(note.created.to_string()));
    // docker commit sets (or, when empty, leaves out) the image's author and comment.
    set_or_remove(obj, "author", note.author.unwrap_or(""));
    set_or_remove(obj, "comment", note.comment);

    let bytes = serde_json::to_vec(&config).map_err(|e| err(format!("serialising config: {e}")))?;
    Ok(Blob::new(family.config_media_type(), bytes))
}

fn set_or_remove(obj: &mut Map<String, Value>, key: &str, value: &str) {
    if value.is_empty() {
        obj.remove(key);
    } else {
        obj.insert(key.into(), Value::String(value.into()));
    }
}

fn history_entry(note: &HistoryNote, empty: bool) -> Value {
    let mut entry = Map::new();
    entry.insert("created".into(), Value::String(note.created.to_string()));
    if let Some(a) = note.author.filter(|a| !a.is_empty()) {
        entry.insert("author".into(), Value::String(a.to_string()));
    }
    entry.insert("created_by".into(), Value::String(note.created_by.into()));
    if !note.comment.is_empty() {
        entry.insert("comment".into(), Value::String(note.comment.to_string()));
    }
    if empty {
        entry.insert("empty_layer".into(), Value::Bool(true));
    }
    Value::Object(entry)
}

/// Writes the original base's record into the config's labels.
fn record_original(inner: &mut Map<String, Value>, original: &chain::OriginalBase) {
    let labels = inner
        .entry("Labels")
        .or_insert_with(|| Value::Object(Map::new()));
    if !labels.is_object() {
        *labels = Value::Object(Map::new());
    }
    if let Some(labels) = labels.as_object_mut() {
        for (k, v) in original.labels() {
            labels.insert(k.into(), Value::String(v));
        }
    }
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

/// New manifest = base manifest with our config, the kept base layers + our layer, and the
/// provenance annotations (OCI manifests only: Docker schema2 defines no annotations).
pub fn new_manifest(
    base: &BaseImage,
    config: &Blob,
    layer: Option<&LayerDescriptor>,
    family: Family,
    edits: &Edits,
    created: &str,
) -> Result<Blob, ImageError> {
    let err = |detail: &str| ImageError {
        image: base.name.clone(),
        detail: detail.to_string(),
    };
    let plan = match &edits.chain {
        Some(p) => p.clone(),
        None => BaseConfig::read(base)?.plan(base, chain::Mode::Append),
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
    layers.truncate(plan.keep_layers);
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
    match family {
        Family::Oci => {
            let ann = provenance::annotations(&plan.original, base, created, &edits.provenance);
            obj.insert("annotations".into(), Value::Object(ann));
        }
        Family::Docker => {
            obj.remove("annotations");
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
mod tests;
