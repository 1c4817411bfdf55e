//! Fault behaviour against the in-process fake registry: retries, resumption after a reset and after a
//! 416, a declined mount, the chunk minimum, redirects without credentials, and redaction.

use bytes::Bytes;
use futures_util::StreamExt;

use super::fake::{Fake, Faults, Storage};
use super::{config_with_auth, connect, everything, plain, pseudo_random, random_file};
use crate::digest::Digest;
use crate::registry::{ErrorKind, MountOutcome};

const MIB: usize = 1024 * 1024;

fn patches(fake: &Fake) -> Vec<super::fake::Logged> {
    fake.log()
        .into_iter()
        .filter(|l| l.method == "PATCH")
        .collect()
}

fn range_start(l: &super::fake::Logged) -> u64 {
    l.content_range
        .as_deref()
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn retries_503_with_backoff_then_succeeds() {
    let fake = Fake::start(Faults::default()).await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    fake.state.lock().unwrap().faults.status_503 = 2;
    let data = Bytes::from_static(b"{\"config\":true}");
    let digest = Digest::of(&data);
    client.upload_blob_bytes(&digest, data).await.unwrap();
    let posts: Vec<u16> = fake
        .log()
        .iter()
        .filter(|l| l.method == "POST")
        .map(|l| l.status)
        .collect();
    assert_eq!(posts, vec![503, 503, 202]);
    assert_eq!(client.blob_exists(&digest).await.unwrap(), Some(15));
}

/// A small blob's PUT that keeps failing is tried as often as the retry budget says, not that
/// squared (the request's own retries inside the upload's).
#[tokio::test]
async fn a_small_blob_put_that_keeps_failing_is_tried_a_bounded_number_of_times() {
    let fake = Fake::start(Faults {
        put_503: true,
        ..Default::default()
    })
    .await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    let data = Bytes::from_static(b"{\"config\":true}");
    let e = client
        .upload_blob_bytes(&Digest::of(&data), data)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(503), "{}", everything(&e));
    let puts = fake.log().iter().filter(|l| l.method == "PUT").count();
    assert_eq!(puts, 6);
}

/// A base layer read from a registry is bounded by its descriptor's size: a registry that sends
/// more is an error once past it, not an unbounded read.
#[tokio::test]
async fn a_blob_longer_than_its_descriptor_is_an_error_once_past_its_size() {
    use crate::registry::{BlobSource, RegistryBlob};
    let fake = Fake::start(Faults::default()).await;
    let data = pseudo_random(200_000, 10);
    let digest = Digest::of(&data);
    fake.state
        .lock()
        .unwrap()
        .blobs
        .insert(digest.to_string(), data);
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    let blob = RegistryBlob {
        client,
        digest,
        size: 1000,
    };
    let items: Vec<_> = blob.open_at(0).await.unwrap().collect().await;
    let read: usize = items
        .iter()
        .filter_map(|i| i.as_ref().ok())
        .map(Bytes::len)
        .sum();
    let err = items.last().unwrap().as_ref().unwrap_err().to_string();
    assert!(err.contains("longer than its descriptor's size"), "{err}");
    assert!(read <= 1000, "{read} bytes read");
}

#[tokio::test]
async fn gives_up_after_the_retry_budget_with_the_status_and_oci_code() {
    let fake = Fake::start(Faults::default()).await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    fake.state.lock().unwrap().faults.status_503 = 100;
    let e = client.blob_exists(&Digest::of(b"x")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable);
    assert_eq!(e.status(), Some(503));
    assert!(e.to_string().starts_with("HEAD http://"), "{e}");
}

#[tokio::test]
async fn resumes_after_a_reset_mid_patch_from_the_reported_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (path, digest) = random_file(dir.path(), 3 * MIB + 123, 7);
    let kept = 300 * 1024;
    let fake = Fake::start(Faults {
        reset_patch: Some((2, kept)),
        ..Default::default()
    })
    .await;
    let client = connect(&fake.reference("a/b"), &plain(None), None)
        .await
        .unwrap()
        .with_chunk_size(MIB as u64);
    client
        .upload_blob_file(&digest, &path, (3 * MIB + 123) as u64)
        .await
        .unwrap();

    let starts: Vec<u64> = patches(&fake).iter().map(range_start).collect();
    let resumed = (MIB + kept) as u64;
    // The broken PATCH started at 1 MiB; the next one starts where the registry said it stood, not at 0.
    assert_eq!(starts[..3], [0, MIB as u64, resumed], "{starts:?}");
    assert!(starts[2..].iter().all(|s| *s >= resumed), "{starts:?}");
    assert!(fake
        .log()
        .iter()
        .any(|l| l.method == "GET" && l.target.contains("/blobs/uploads/")));
    assert_eq!(
        fake.state.lock().unwrap().blobs[digest.as_str()].len(),
        3 * MIB + 123
    );
}

/// A body cap (413) shrinks the upload into chunks; a registry that then refuses the second chunk
/// (400) cannot take the blob at all: the upload ends with an error after a few PATCHes, rather than
/// going back to one PATCH that the cap refuses again, forever.
#[tokio::test]
async fn a_body_cap_and_no_second_chunk_end_the_upload_instead_of_cycling() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * MIB + 5;
    let (path, digest) = random_file(dir.path(), size, 9);
    let fake = Fake::start(Faults {
        body_cap: Some(MIB),
        one_patch_per_session: true,
        ..Default::default()
    })
    .await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    let upload = client.upload_blob_file(&digest, &path, size as u64);
    let result = tokio::time::timeout(std::time::Duration::from_secs(30), upload)
        .await
        .expect("the upload ends");
    let e = result.unwrap_err();
    assert_eq!(e.status(), Some(400), "{}", everything(&e));
    let statuses: Vec<u16> = patches(&fake).iter().map(|l| l.status).collect();
    // 3 MiB → 413, 1.5 MiB → 413, 768 KiB → 202, the next 768 KiB → 400: nothing more.
    assert_eq!(statuses, [413, 413, 202, 400]);
}

#[tokio::test]
async fn resyncs_after_a_416_and_resends_the_lost_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let (path, digest) = random_file(dir.path(), 3 * MIB, 8);
    let fake = Fake::start(Faults {
        lose_patch: Some(2),
        ..Default::default()
    })
    .await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap()
        .with_chunk_size(MIB as u64);
    client
        .upload_blob_file(&digest, &path, (3 * MIB) as u64)
        .await
        .unwrap();

    let p = patches(&fake);
    let statuses: Vec<u16> = p.iter().map(|l| l.status).collect();
    let starts: Vec<u64> = p.iter().map(range_start).collect();
    assert_eq!(statuses, vec![202, 202, 416, 202, 202], "{starts:?}");
    assert_eq!(
        starts,
        vec![0, MIB as u64, 2 * MIB as u64, MIB as u64, 2 * MIB as u64]
    );
    assert!(fake
        .state
        .lock()
        .unwrap()
        .blobs
        .contains_key(digest.as_str()));
}

#[tokio::test]
async fn honours_oci_chunk_min_length() {
    let dir = tempfile::tempdir().unwrap();
    let (path, digest) = random_file(dir.path(), 2 * MIB + 10, 9);
    let fake = Fake::start(Faults {
        chunk_min: Some(MIB as u64),
        ..Default::default()
    })
    .await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap()
        .with_chunk_size(64 * 1024);
    client
        .upload_blob_file(&digest, &path, (2 * MIB + 10) as u64)
        .await
        .unwrap();
    let sizes: Vec<usize> = patches(&fake).iter().map(|l| l.body_len).collect();
    assert_eq!(sizes, vec![MIB, MIB, 10]);
    assert!(
        patches(&fake).iter().all(|l| !l.chunked),
        "file chunks go with a Content-Length"
    );
}

#[tokio::test]
async fn a_declined_mount_leaves_a_session_the_next_upload_continues() {
    let fake = Fake::start(Faults {
        mount_declines: true,
        ..Default::default()
    })
    .await;
    let client = connect(&fake.reference("b"), &plain(None), None)
        .await
        .unwrap();
    let data = Bytes::from(pseudo_random(1000, 3));
    let digest = Digest::of(&data);
    fake.state
        .lock()
        .unwrap()
        .blobs
        .insert(digest.to_string(), data.to_vec());
    assert_eq!(
        client.mount_blob(&digest, "a").await.unwrap(),
        MountOutcome::NotMounted
    );
    client.upload_blob_bytes(&digest, data).await.unwrap();
    let posts = fake.log().iter().filter(|l| l.method == "POST").count();
    assert_eq!(
        posts, 1,
        "the upload reused the mount's session instead of POSTing again"
    );
}

#[tokio::test]
async fn a_granted_mount_uploads_nothing() {
    let fake = Fake::start(Faults::default()).await;
    let client = connect(&fake.reference("b"), &plain(None), None)
        .await
        .unwrap();
    let digest = Digest::of(b"layer");
    fake.state
        .lock()
        .unwrap()
        .blobs
        .insert(digest.to_string(), b"layer".to_vec());
    assert_eq!(
        client.mount_blob(&digest, "a").await.unwrap(),
        MountOutcome::Mounted
    );
    let mount = fake.log().into_iter().find(|l| l.method == "POST").unwrap();
    assert!(
        mount.target.contains("mount=sha256%3A") && mount.target.contains("from=a"),
        "{}",
        mount.target
    );
    assert_eq!(patches(&fake).len(), 0);
}

#[tokio::test]
async fn the_default_upload_is_one_sized_patch_without_content_range() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * MIB + 17;
    let (path, digest) = random_file(dir.path(), size, 4);
    let fake = Fake::start(Faults::default()).await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    client
        .upload_blob_file(&digest, &path, size as u64)
        .await
        .unwrap();
    let p = patches(&fake);
    assert_eq!(
        (
            p.len(),
            p[0].chunked,
            p[0].content_range.as_deref(),
            p[0].body_len
        ),
        (1, false, None, size)
    );
}

#[tokio::test]
async fn a_small_blob_goes_in_the_put() {
    let fake = Fake::start(Faults::default()).await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    let data = pseudo_random(50_000, 6);
    let digest = Digest::of(&data);
    client
        .upload_blob_bytes(&digest, Bytes::from(data.clone()))
        .await
        .unwrap();
    assert_eq!(patches(&fake).len(), 0);
    assert_eq!(fake.state.lock().unwrap().blobs[digest.as_str()], data);
}

#[tokio::test]
/// Another origin (the same loopback host, another port: plain HTTP may not leave the host) gets
/// no credentials.
async fn redirect_to_another_origin_carries_no_authorization() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(100_000, 5);
    let digest = Digest::of(&data);
    let storage = Storage::start(data.clone()).await;
    let auth = "Basic dTpwYXNzd29yZC0xMjM="; // u:password-123
    let faults = Faults {
        require_auth: Some(auth.into()),
        blob_redirect: Some(format!("http://127.0.0.1:{}", storage.addr.port())),
        ..Default::default()
    };
    let fake = Fake::start(faults).await;
    fake.state
        .lock()
        .unwrap()
        .blobs
        .insert(digest.to_string(), data.clone());
    let config = config_with_auth(dir.path(), &fake.addr.to_string(), "u", "password-123");
    let client = connect(&fake.reference("a"), &plain(Some(config)), None)
        .await
        .unwrap();

    let stream = client.fetch_blob(&digest).await.unwrap();
    let got: Vec<Bytes> = stream.map(|r| r.unwrap()).collect().await;
    assert_eq!(got.concat(), data);
    assert_eq!(*storage.saw_authorization.lock().unwrap(), vec![false]);
    assert!(fake
        .log()
        .iter()
        .any(|l| l.target.contains("/blobs/sha256:") && l.authorization && l.status == 307));
}

#[tokio::test]
async fn a_blob_that_does_not_match_its_digest_fails_the_stream() {
    let storage = Storage::start(b"not what was asked for".to_vec()).await;
    let fake = Fake::start(Faults {
        blob_redirect: Some(format!("http://127.0.0.1:{}", storage.addr.port())),
        ..Default::default()
    })
    .await;
    let digest = Digest::of(b"the real bytes");
    fake.state
        .lock()
        .unwrap()
        .blobs
        .insert(digest.to_string(), b"the real bytes".to_vec());
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    let items: Vec<_> = client.fetch_blob(&digest).await.unwrap().collect().await;
    let err = items.last().unwrap().as_ref().unwrap_err().to_string();
    assert!(
        err.contains("digest mismatch") && !err.contains("SIGNED"),
        "{err}"
    );
}

#[tokio::test]
async fn rejected_credentials_never_show_the_password_or_upload_state() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start(Faults {
        require_auth: Some("Basic nope".into()),
        ..Default::default()
    })
    .await;
    let config = config_with_auth(
        dir.path(),
        &fake.addr.to_string(),
        "u",
        "hunter2-very-secret",
    );
    let e = connect(&fake.reference("a"), &plain(Some(config.clone())), None)
        .await
        .unwrap_err();
    let text = everything(&e);
    assert!(e.is_auth(), "{text}");
    assert!(
        !text.contains("hunter2") && !text.contains("aHVudGVy"),
        "{text}"
    );
    assert!(
        text.contains("check credentials in --registry-config"),
        "{text}"
    );

    // An upload URL's `_state` is redacted from errors.
    let fake = Fake::start(Faults::default()).await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    let e = client
        .upload_blob_bytes(&Digest::of(b"other"), Bytes::from_static(b"bytes"))
        .await
        .unwrap_err();
    let text = everything(&e);
    assert!(
        text.contains("DIGEST_INVALID") && text.contains("_state=REDACTED"),
        "{text}"
    );
}

#[tokio::test]
async fn manifests_round_trip_and_a_missing_one_is_none() {
    let fake = Fake::start(Faults::default()).await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    let body = Bytes::from_static(br#"{"schemaVersion":2}"#);
    let d = client
        .put_manifest("v1", super::OCI_MANIFEST, body.clone())
        .await
        .unwrap();
    assert_eq!(d, Digest::of(&body));
    assert_eq!(
        client.get_manifest(d.as_str()).await.unwrap(),
        Some((super::OCI_MANIFEST.to_string(), body))
    );
    assert_eq!(client.get_manifest("nope").await.unwrap(), None);
}

#[tokio::test]
async fn a_file_shorter_than_its_size_is_an_io_error_not_a_network_retry() {
    let dir = tempfile::tempdir().unwrap();
    let (path, digest) = random_file(dir.path(), 1000, 12);
    let fake = Fake::start(Faults::default()).await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    let e = client
        .upload_blob_file(&digest, &path, 2000)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("fewer than the 2000"), "{e}");
    assert_eq!(patches(&fake).len(), 0);
}

#[tokio::test]
async fn a_revoked_bearer_token_is_fetched_again_once_on_401() {
    let fake = Fake::start(Faults {
        bearer_generation: Some(1),
        ..Default::default()
    })
    .await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    let digest = Digest::of(b"x");
    assert_eq!(client.blob_exists(&digest).await.unwrap(), None);
    assert_eq!(
        fake.state.lock().unwrap().token_fetches,
        1,
        "the token is cached"
    );
    fake.state.lock().unwrap().faults.bearer_generation = Some(2);
    assert_eq!(client.blob_exists(&digest).await.unwrap(), None);
    assert_eq!(fake.state.lock().unwrap().token_fetches, 2);
}

#[tokio::test]
async fn a_manifest_digest_the_registry_disagrees_with_is_an_error() {
    let fake = Fake::start(Faults {
        lie_about_digest: true,
        ..Default::default()
    })
    .await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    let e = client
        .put_manifest("v1", super::OCI_MANIFEST, Bytes::from_static(b"{}"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
    assert!(
        e.to_string().contains("digest mismatch for manifest a:v1"),
        "{e}"
    );
}

#[tokio::test]
async fn a_mount_the_credentials_cannot_read_is_not_mounted_rather_than_an_error() {
    let faults = Faults {
        mount_unauthorized: true,
        bearer_generation: Some(1),
        ..Default::default()
    };
    let fake = Fake::start(faults).await;
    let client = connect(&fake.reference("b"), &plain(None), None)
        .await
        .unwrap();
    let outcome = client
        .mount_blob(&Digest::of(b"x"), "private/base")
        .await
        .unwrap();
    assert_eq!(outcome, MountOutcome::NotMounted);
}

#[tokio::test]
async fn the_session_check_push_opened_carries_the_first_upload() {
    let dir = tempfile::tempdir().unwrap();
    let (path, digest) = random_file(dir.path(), 2 * MIB, 13);
    let fake = Fake::start(Faults::default()).await;
    let client = connect(&fake.reference("a"), &plain(None), None)
        .await
        .unwrap();
    client.check_push().await.unwrap();
    client
        .upload_blob_file(&digest, &path, (2 * MIB) as u64)
        .await
        .unwrap();
    let posts = fake.log().iter().filter(|l| l.method == "POST").count();
    assert_eq!(posts, 1, "{:#?}", fake.log());
    assert!(fake
        .state
        .lock()
        .unwrap()
        .blobs
        .contains_key(digest.as_str()));
}
