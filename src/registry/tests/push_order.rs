//! The order of a push's last steps, against the in-process fake: the manifest goes up by digest
//! once its blobs are there, then each tag, so a tag never names a manifest the registry does not
//! hold whole; a manifest the registry refuses (one of its blobs missing, as after a failed
//! upload) moves no tag.

use bytes::Bytes;

use super::fake::{Fake, Faults};
use super::{connect, image, plain, OCI_MANIFEST};
use crate::digest::Digest;
use crate::image::Blob;
use crate::push::push_manifest;

fn manifest(body: &Bytes) -> Blob {
    Blob {
        media_type: OCI_MANIFEST.into(),
        digest: Digest::of(body),
        bytes: body.to_vec(),
    }
}

/// The references of the manifest PUTs, in the order they were made, with their status.
fn manifest_puts(fake: &Fake) -> Vec<(String, u16)> {
    fake.log()
        .into_iter()
        .filter(|l| l.method == "PUT")
        .filter_map(|l| {
            let (_, r) = l.target.split_once("/manifests/")?;
            Some((r.to_string(), l.status))
        })
        .collect()
}

fn tags() -> Vec<String> {
    vec!["v1".into(), "v1.0".into()]
}

#[tokio::test]
async fn the_manifest_goes_up_by_digest_after_its_blobs_then_each_tag() {
    let fake = Fake::start(Faults::default()).await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    let layer = Bytes::from_static(b"layer bytes");
    let layer_digest = Digest::of(&layer);
    let (config, config_digest, body) = image(&layer_digest, layer.len() as u64);
    client
        .upload_blob_bytes(&layer_digest, layer)
        .await
        .unwrap();
    client
        .upload_blob_bytes(&config_digest, config)
        .await
        .unwrap();
    let m = manifest(&body);
    push_manifest(&client, &m, &tags()).await.unwrap();

    let by_digest = m.digest.to_string();
    assert_eq!(
        manifest_puts(&fake),
        [(by_digest, 201), ("v1".into(), 201), ("v1.0".into(), 201)]
    );
    let log = fake.log();
    let first_manifest = log
        .iter()
        .position(|l| l.target.contains("/manifests/"))
        .unwrap();
    assert!(
        log[first_manifest..]
            .iter()
            .all(|l| !l.target.contains("/blobs/")),
        "a blob request after the manifest: {log:#?}"
    );
    let state = fake.state.lock().unwrap();
    assert_eq!(state.manifests["v1"].1, body.to_vec());
    assert_eq!(state.manifests["v1.0"].1, body.to_vec());
}

#[tokio::test]
async fn a_manifest_with_a_missing_blob_moves_no_tag() {
    let fake = Fake::start(Faults::default()).await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    // The layer's upload failed: only the config is there.
    let layer_digest = Digest::of(b"never uploaded");
    let (config, config_digest, body) = image(&layer_digest, 14);
    client
        .upload_blob_bytes(&config_digest, config)
        .await
        .unwrap();
    let e = push_manifest(&client, &manifest(&body), &tags())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("MANIFEST_BLOB_UNKNOWN"), "{e}");
    let puts = manifest_puts(&fake);
    let by_digest = Digest::of(&body).to_string();
    assert!(!puts.is_empty());
    assert!(
        puts.iter()
            .all(|(r, status)| *r == by_digest && *status == 400),
        "only the manifest by digest may be tried: {puts:?}"
    );
    let state = fake.state.lock().unwrap();
    assert!(state.manifests.is_empty(), "nothing stored");
}

#[tokio::test]
async fn a_manifest_the_registry_does_not_take_moves_no_tag() {
    let fake = Fake::start(Faults::default()).await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    let body = Bytes::from_static(br#"{"schemaVersion":2}"#);
    let m = manifest(&body);
    // The PUT by digest and its retries fail: 503 until the retry budget is spent.
    fake.state.lock().unwrap().faults.status_503 = 100;
    assert!(push_manifest(&client, &m, &tags()).await.is_err());
    let puts = manifest_puts(&fake);
    assert!(!puts.is_empty());
    assert!(
        puts.iter().all(|(r, _)| *r == m.digest.to_string()),
        "no tag after a failed PUT by digest: {puts:?}"
    );
    assert!(fake.state.lock().unwrap().manifests.is_empty());
}
