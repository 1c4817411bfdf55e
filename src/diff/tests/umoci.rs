//! A real unpacker: umoci (Go's archive/tar, the reader containerd uses) unpacks an OCI image
//! whose base layer is the lower tree and whose top layer is ours; the rootfs must equal the
//! merged tree.

use super::fixture::Overlay;
use super::scenario;
use super::tree::{self, CompareOpts};
use crate::diff::{write_layer, Options, Source};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::Path;

/// Stores `data` as a blob; returns its descriptor.
fn blob(layout: &Path, media_type: &str, data: &[u8]) -> serde_json::Value {
    let hex = hex::encode(Sha256::digest(data));
    std::fs::write(layout.join("blobs/sha256").join(&hex), data).unwrap();
    json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len()})
}

/// An OCI layout at `layout` with `layers` (uncompressed) tagged `t`.
fn oci_layout(layout: &Path, layers: &[Vec<u8>]) {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let media = "application/vnd.oci.image.layer.v1.tar";
    let descs: Vec<_> = layers.iter().map(|l| blob(layout, media, l)).collect();
    let diff_ids: Vec<_> = descs.iter().map(|d| d["digest"].clone()).collect();
    let config = json!({"architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let config = blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        config.to_string().as_bytes(),
    );
    let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": descs});
    let mut m = blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    );
    m["annotations"] = json!({"org.opencontainers.image.ref.name": "t"});
    let index = json!({"schemaVersion": 2, "manifests": [m]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
}

fn unpack_with_umoci(ov: &Overlay, top: Vec<u8>, what: &str) {
    assert_umoci_unpacks_to(&ov.lowers[0], top, &ov.merged, ov.dir.path(), what);
}

/// umoci unpacks an image of two layers, the whole of `base` then `top`, in `scratch`; the
/// rootfs must equal `expected`.
pub(crate) fn assert_umoci_unpacks_to(
    base: &Path,
    top: Vec<u8>,
    expected: &Path,
    scratch: &Path,
    what: &str,
) {
    let base = Source::Walk {
        lower: None,
        upper: base,
    };
    let (base, _) = write_layer(&base, &Options::default(), Vec::new()).unwrap();
    let layout = scratch.join(format!("oci-{what}"));
    oci_layout(&layout, &[base, top]);
    let rootfs = scratch.join(format!("rootfs-{what}"));
    let out = std::process::Command::new("umoci")
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:t", layout.display()))
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tree::assert_same(
        &tree::snapshot(expected, &CompareOpts::layer()),
        &tree::snapshot(&rootfs, &CompareOpts::layer()),
        &CompareOpts::layer(),
        what,
    );
}

#[test]
fn umoci_unpacks_both_sources_to_the_merged_tree() {
    let mut ov = Overlay::new(1);
    scenario::make_lower(&ov.lowers[0]);
    ov.mount();
    scenario::change(&ov.merged, 8 << 20);
    let up = Source::Upperdir {
        upper: &ov.upper,
        lowers: &ov.lowers,
    };
    let walk = Source::Walk {
        lower: Some(&ov.lowers[0]),
        upper: &ov.merged,
    };
    for (what, source) in [("umoci-upperdir", up), ("umoci-walk", walk)] {
        let (top, _) = write_layer(&source, &Options::default(), Vec::new()).unwrap();
        unpack_with_umoci(&ov, top, what);
    }
}
