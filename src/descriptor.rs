//! Typed content descriptors read out of a base manifest (kept as exact JSON bytes elsewhere so
//! that unknown keys survive): the base's config and layers as `Descriptor`s, so that no later
//! stage digs digests out of untyped JSON.

use crate::base::BaseImage;
use crate::digest::Digest;
use crate::image::ImageError;
use serde_json::Value;

/// An OCI/Docker content descriptor: what a manifest says about one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

impl Descriptor {
    fn from_json(v: &Value) -> Option<Descriptor> {
        Some(Descriptor {
            media_type: v.get("mediaType")?.as_str()?.to_string(),
            digest: v.get("digest")?.as_str()?.parse().ok()?,
            size: v.get("size")?.as_u64()?,
        })
    }
}

/// The base manifest's config and layers, typed.
#[derive(Debug, Clone)]
pub struct BaseBlobs {
    pub manifest: Digest,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

impl BaseBlobs {
    /// Every blob of the base, manifest first: what the lease must hold.
    pub fn all_digests(&self) -> impl Iterator<Item = &Digest> {
        std::iter::once(&self.manifest)
            .chain(std::iter::once(&self.config.digest))
            .chain(self.layers.iter().map(|l| &l.digest))
    }
}

/// Reads the typed descriptors of `base`; a malformed one is an `ImageError` naming it.
pub fn base_blobs(base: &BaseImage) -> Result<BaseBlobs, ImageError> {
    let bad = |what: &str, v: &Value| ImageError {
        image: base.name.clone(),
        detail: format!(
            "manifest {}: malformed {what} descriptor {v}",
            base.manifest_digest
        ),
    };
    let config = base.manifest.get("config").unwrap_or(&Value::Null);
    let config = Descriptor::from_json(config).ok_or_else(|| bad("config", config))?;
    let layers = base
        .layers()
        .iter()
        .map(|l| Descriptor::from_json(l).ok_or_else(|| bad("layer", l)))
        .collect::<Result<_, _>>()?;
    Ok(BaseBlobs {
        manifest: base.manifest_digest.clone(),
        config,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(manifest: Value) -> BaseImage {
        BaseImage {
            name: "reg/base:1".into(),
            manifest_digest: Digest::of(b"m"),
            manifest_media_type: crate::media::OCI_MANIFEST.into(),
            manifest,
            config_bytes: b"{}".to_vec(),
        }
    }

    #[test]
    fn descriptors_are_read_in_manifest_order() {
        let (c, a, b) = (Digest::of(b"c"), Digest::of(b"a"), Digest::of(b"b"));
        let m = serde_json::json!({
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c.as_str(), "size": 2},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": a.as_str(), "size": 10},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": b.as_str(), "size": 20, "annotations": {"k": "v"}}
            ]
        });
        let blobs = base_blobs(&base(m)).unwrap();
        assert_eq!(blobs.config.digest, c);
        let layers: Vec<_> = blobs.layers.iter().map(|l| (&l.digest, l.size)).collect();
        assert_eq!(layers, vec![(&a, 10), (&b, 20)]);
        assert_eq!(blobs.all_digests().count(), 4);
    }

    #[test]
    fn a_layer_without_a_valid_digest_is_an_image_error_naming_the_image() {
        let m = serde_json::json!({
            "config": {"mediaType": "x", "digest": Digest::of(b"c").as_str(), "size": 2},
            "layers": [{"mediaType": "x", "digest": "md5:abc", "size": 1}]
        });
        let e = base_blobs(&base(m)).unwrap_err().to_string();
        assert!(e.contains("reg/base:1") && e.contains("md5:abc"), "{e}");
    }
}
