//! Snapshot chains: which of the base image's layers belong to the *original* base (the image
//! the sandbox first started from) and which are earlier snapshot layers, and whether this
//! commit appends one more layer or squashes all snapshot layers into one.
//!
//! The record lives in the config's labels (inherited by every later snapshot, and by images
//! built `FROM` one): the original base's name, manifest digest, layer count, history length
//! and the chain ID of its layers. The chain ID is checked against the base config's
//! `diff_ids` before the record is trusted, so a re-based or rewritten image is never
//! squashed onto the wrong layers.

use crate::base::BaseImage;
use crate::digest::Digest;
use serde_json::Value;

pub const LABEL_NAME: &str = "dev.committer.base.name";
pub const LABEL_DIGEST: &str = "dev.committer.base.digest";
pub const LABEL_LAYERS: &str = "dev.committer.base.layers";
pub const LABEL_HISTORY: &str = "dev.committer.base.history";
pub const LABEL_CHAIN_ID: &str = "dev.committer.base.chain-id";

/// How the chain grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// One more layer on top of the base image (what docker, nerdctl and buildah do).
    #[default]
    Append,
    /// One layer holding every change since the original base.
    Squash,
    /// Append while the chain has at most this many snapshot layers; squash when it would exceed.
    MaxLayers(usize),
}

/// The image the chain started from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalBase {
    pub name: String,
    pub digest: String,
    /// How many of the base config's diff_ids (and manifest layers) are the original's.
    pub layers: usize,
    /// How many history entries (empty-layer ones included) are the original's.
    pub history: usize,
    pub chain_id: String,
}

impl OriginalBase {
    /// The labels that carry this record into the new image.
    pub fn labels(&self) -> [(&'static str, String); 5] {
        [
            (LABEL_NAME, self.name.clone()),
            (LABEL_DIGEST, self.digest.clone()),
            (LABEL_LAYERS, self.layers.to_string()),
            (LABEL_HISTORY, self.history.to_string()),
            (LABEL_CHAIN_ID, self.chain_id.clone()),
        ]
    }
}

/// What this commit does to the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainPlan {
    pub original: OriginalBase,
    /// How many of the base's layers the new image keeps (all of them when appending). The
    /// new layer must be the diff against exactly these layers.
    pub keep_layers: usize,
    /// How many history entries the new image keeps before its own.
    pub keep_history: usize,
    pub squash: bool,
    /// Why a requested squash is not done (for the log), when it is not.
    pub note: Option<String>,
}

/// OCI chain ID of a layer stack: the key containerd gives the committed snapshot of it.
pub fn chain_id(diff_ids: &[String]) -> Option<String> {
    let (first, rest) = diff_ids.split_first()?;
    Some(rest.iter().fold(first.clone(), |acc, d| {
        Digest::of(format!("{acc} {d}").as_bytes()).to_string()
    }))
}

fn diff_ids(config: &Value) -> Vec<String> {
    config
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn history_len(config: &Value) -> usize {
    config
        .get("history")
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

/// The record in the base config's labels, checked against its layers. Ok(None): no record
/// (the base is not a committer snapshot); Err: a record that does not match (the reason).
pub fn recorded_original(config: &Value) -> Result<Option<OriginalBase>, String> {
    let labels = config.pointer("/config/Labels").and_then(Value::as_object);
    let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    let Some(name) = label(LABEL_NAME) else {
        return Ok(None);
    };
    let number = |k: &str| {
        label(k)
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| format!("label {k} is missing or not a number"))
    };
    let (layers, history) = (number(LABEL_LAYERS)?, number(LABEL_HISTORY)?);
    let ids = diff_ids(config);
    if layers == 0 || layers > ids.len() || history > history_len(config) {
        return Err(format!(
            "label {LABEL_LAYERS}={layers} does not fit an image of {} layers",
            ids.len()
        ));
    }
    let recorded = label(LABEL_CHAIN_ID).unwrap_or("");
    if chain_id(&ids[..layers]).as_deref() != Some(recorded) {
        return Err(format!(
            "its first {layers} layers are not the recorded original base {name} (chain ID differs)"
        ));
    }
    Ok(Some(OriginalBase {
        name: name.to_string(),
        digest: label(LABEL_DIGEST).unwrap_or("").to_string(),
        layers,
        history,
        chain_id: recorded.to_string(),
    }))
}

/// The base image itself as an original base (first commit, or an unrecognised chain).
/// `history` is its history length once padded to one entry per layer.
fn as_original(base: &BaseImage, config: &Value, padded_history: usize) -> OriginalBase {
    let ids = diff_ids(config);
    OriginalBase {
        name: base.name.clone(),
        digest: base.manifest_digest.to_string(),
        layers: ids.len(),
        history: padded_history,
        chain_id: chain_id(&ids).unwrap_or_default(),
    }
}

/// Decides append or squash for a commit on `base` (whose config is `config`).
/// `padded_history` is the base history's length after `pad_history`.
pub fn plan(base: &BaseImage, config: &Value, padded_history: usize, mode: Mode) -> ChainPlan {
    let total = diff_ids(config).len();
    let (original, note) = match recorded_original(config) {
        Ok(Some(o)) => (o, None),
        Ok(None) => (as_original(base, config, padded_history), None),
        Err(why) => (
            as_original(base, config, padded_history),
            Some(format!(
                "base image {}: {why}; it is taken as the original base (append)",
                base.name
            )),
        ),
    };
    let snapshot_layers = total - original.layers;
    let squash = snapshot_layers > 0
        && match mode {
            Mode::Append => false,
            Mode::Squash => true,
            Mode::MaxLayers(n) => snapshot_layers + 1 > n.max(1),
        };
    let (keep_layers, keep_history) = if squash {
        (original.layers, original.history)
    } else {
        (total, padded_history)
    };
    let note = note.filter(|_| mode != Mode::Append);
    ChainPlan {
        original,
        keep_layers,
        keep_history,
        squash,
        note,
    }
}

#[cfg(test)]
#[path = "chain_tests.rs"]
mod tests;
