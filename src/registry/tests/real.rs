//! Against the real distribution registry (Debian `docker-registry`, via scripts/registry.sh): anonymous
//! HTTP, htpasswd over TLS with a test CA, bearer tokens from a token service with a cross-repo mount,
//! credential helpers and Kubernetes dockerconfigjson files; skopeo reads what was pushed.

use std::path::Path;

use bytes::Bytes;
use futures_util::StreamExt;

use super::token::{TokenService, IDENTITY_TOKEN, PASSWORD, USER};
use super::{
    config_with_auth, connect, everything, image, plain, random_file, write_json, Registry,
    OCI_MANIFEST,
};
use crate::digest::Digest;
use crate::registry::{Client, ClientOptions, ErrorKind, MountOutcome};

const MIB: usize = 1024 * 1024;

/// Push `layer` from a file plus a config and a manifest tagged `tag`; returns the manifest digest.
async fn push_image(
    client: &Client,
    layer: &Path,
    layer_digest: &Digest,
    size: u64,
    tag: &str,
) -> Digest {
    if client.blob_exists(layer_digest).await.unwrap().is_none() {
        client
            .upload_blob_file(layer_digest, layer, size)
            .await
            .unwrap();
    }
    let (config, config_digest, manifest) = image(layer_digest, size);
    client
        .upload_blob_bytes(&config_digest, config)
        .await
        .unwrap();
    client
        .put_manifest(tag, OCI_MANIFEST, manifest)
        .await
        .unwrap()
}

#[tokio::test]
async fn anonymous_http_chunked_push_reads_back_and_skopeo_sees_it() {
    let reg = Registry::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let size = 20 * MIB;
    let (path, digest) = random_file(dir.path(), size, 1);
    let client = connect(&reg.reference("team/app"), &plain(None), None)
        .await
        .unwrap()
        .with_chunk_size(4 * MIB as u64);

    assert_eq!(client.blob_exists(&digest).await.unwrap(), None);
    let manifest_digest = push_image(&client, &path, &digest, size as u64, "v1").await;
    assert_eq!(
        client.blob_exists(&digest).await.unwrap(),
        Some(size as u64)
    );

    let (media_type, body) = client.get_manifest("v1").await.unwrap().unwrap();
    assert_eq!(
        (media_type.as_str(), Digest::of(&body)),
        (OCI_MANIFEST, manifest_digest.clone())
    );
    assert!(client
        .get_manifest(manifest_digest.as_str())
        .await
        .unwrap()
        .is_some());
    assert_eq!(client.get_manifest("missing").await.unwrap(), None);

    let mut read = 0;
    let mut blob = client.fetch_blob(&digest).await.unwrap();
    while let Some(chunk) = blob.next().await {
        read += chunk.unwrap().len();
    }
    assert_eq!(read, size);

    let out = std::process::Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{}/team/app:v1", reg.addr()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspected["Digest"], manifest_digest.to_string());
    assert_eq!(inspected["Layers"][0], digest.to_string());
}

#[tokio::test]
async fn a_declined_mount_on_the_real_registry_is_not_mounted_and_the_upload_continues() {
    let reg = Registry::start(&[]);
    let client = connect(&reg.reference("b"), &plain(None), None)
        .await
        .unwrap();
    let data = Bytes::from_static(b"not in repo a");
    let digest = Digest::of(&data);
    assert_eq!(
        client.mount_blob(&digest, "a").await.unwrap(),
        MountOutcome::NotMounted
    );
    client.upload_blob_bytes(&digest, data).await.unwrap();
    assert_eq!(client.blob_exists(&digest).await.unwrap(), Some(13));
}

#[tokio::test]
async fn htpasswd_over_tls_with_a_test_ca_and_config_json() {
    let reg = Registry::start(&["--tls", "--htpasswd", "bob:pa55-word"]);
    let dir = tempfile::tempdir().unwrap();
    let ca = Some(reg.env["REGISTRY_CA"].clone().into());
    let good = config_with_auth(dir.path(), reg.addr(), "bob", "pa55-word");
    let opts = ClientOptions {
        ca_file: ca.clone(),
        registry_config: Some(good),
        ..Default::default()
    };
    let client = connect(&reg.reference("secure/app"), &opts, None)
        .await
        .unwrap();
    let data = Bytes::from(super::pseudo_random(3 * MIB, 2));
    let digest = Digest::of(&data);
    client.upload_blob_bytes(&digest, data).await.unwrap();
    assert_eq!(
        client.blob_exists(&digest).await.unwrap(),
        Some(3 * MIB as u64)
    );
    // Chunked file upload over TLS (HTTP/2 here: distribution offers h2 by ALPN).
    let (path, file_digest) = random_file(dir.path(), 3 * MIB + 5, 11);
    let chunked = client.clone().with_chunk_size(MIB as u64);
    chunked
        .upload_blob_file(&file_digest, &path, (3 * MIB + 5) as u64)
        .await
        .unwrap();
    assert_eq!(
        chunked.blob_exists(&file_digest).await.unwrap(),
        Some((3 * MIB + 5) as u64)
    );

    let bad_dir = tempfile::tempdir().unwrap();
    let bad = config_with_auth(bad_dir.path(), reg.addr(), "bob", "wrong-Pa55word");
    let opts = ClientOptions {
        ca_file: ca,
        registry_config: Some(bad.clone()),
        ..Default::default()
    };
    let e = connect(&reg.reference("secure/app"), &opts, None)
        .await
        .unwrap_err();
    let text = everything(&e);
    assert!(e.is_auth(), "{text}");
    assert!(
        text.contains("HTTP 401") && text.contains("check credentials in --registry-config"),
        "{text}"
    );
    assert!(
        text.contains(&bad.display().to_string()),
        "names the credential source: {text}"
    );
    assert!(
        !text.contains("wrong-Pa55word") && !text.contains("d3Jvbmc"),
        "{text}"
    );
}

#[tokio::test]
async fn untrusted_certificate_and_protocol_mismatches_are_named() {
    let reg = Registry::start(&["--tls"]);
    let opts = ClientOptions {
        registry_config: plain(None).registry_config,
        ..Default::default()
    };
    let e = connect(&reg.reference("a"), &opts, None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Tls, "{e}");
    assert!(
        e.to_string().contains(&format!(
            "TLS certificate for {} not trusted: pass --registry-ca FILE",
            reg.addr()
        )),
        "{e}"
    );

    let e = connect(&reg.reference("a"), &plain(None), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("drop --plain-http"), "{e}");

    let http = Registry::start(&[]);
    let e = connect(&http.reference("a"), &opts, None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Tls, "{e}");
    assert!(e.to_string().contains("does not speak TLS"), "{e}");
}

#[tokio::test]
async fn connection_refused_says_so_and_names_the_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let reference = format!("127.0.0.1:{port}/a").parse().unwrap();
    let e = connect(&reference, &plain(None), None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable);
    assert!(
        e.to_string().contains(&format!(
            "is the registry up? connection refused to 127.0.0.1:{port}"
        )),
        "{e}"
    );
}

#[tokio::test]
async fn bearer_tokens_push_and_cross_repo_mount_without_upload() {
    let tokens = TokenService::start().await;
    let reg = Registry::start(&["--token", &tokens.realm, tokens.cert.to_str().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_auth(dir.path(), reg.addr(), USER, PASSWORD);
    let src = connect(
        &reg.reference("base/img"),
        &plain(Some(config.clone())),
        None,
    )
    .await
    .unwrap();
    let (path, digest) = random_file(dir.path(), 2 * MIB, 3);
    push_image(&src, &path, &digest, 2 * MIB as u64, "1").await;

    let dst = connect(&reg.reference("team/derived"), &plain(Some(config)), None)
        .await
        .unwrap();
    assert_eq!(dst.blob_exists(&digest).await.unwrap(), None);
    assert_eq!(
        dst.mount_blob(&digest, "base/img").await.unwrap(),
        MountOutcome::Mounted
    );
    assert_eq!(
        dst.blob_exists(&digest).await.unwrap(),
        Some(2 * MIB as u64)
    );
    let scopes = tokens.scopes();
    assert!(
        scopes.contains(&"repository:base/img:pull".to_string()),
        "{scopes:?}"
    );
    assert!(
        scopes.contains(&"repository:team/derived:pull,push".to_string()),
        "{scopes:?}"
    );
}

/// A registry behind `tokens`, and a client of its repository "a" whose config file holds only an
/// identity token for it (the registry and the config's dir live as long as the caller keeps them).
async fn identity_token_client(tokens: &TokenService) -> (Registry, tempfile::TempDir, Client) {
    let reg = Registry::start(&["--token", &tokens.realm, tokens.cert.to_str().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_json(
        dir.path(),
        "id.json",
        &serde_json::json!({"auths": {reg.addr(): {"identitytoken": IDENTITY_TOKEN}}}),
    );
    let client = connect(&reg.reference("a"), &plain(Some(config)), None)
        .await
        .unwrap();
    (reg, dir, client)
}

#[tokio::test]
async fn bearer_identity_token_uses_the_refresh_grant_and_wrong_creds_fail_early() {
    let tokens = TokenService::start().await;
    let (reg, dir, client) = identity_token_client(&tokens).await;
    client
        .upload_blob_bytes(&Digest::of(b"c"), Bytes::from_static(b"c"))
        .await
        .unwrap();
    assert!(tokens
        .requests
        .lock()
        .unwrap()
        .iter()
        .all(|r| r.method == "POST"));

    let bad = config_with_auth(dir.path(), reg.addr(), USER, "not-the-password");
    let e = connect(&reg.reference("a"), &plain(Some(bad)), None)
        .await
        .unwrap_err();
    let text = everything(&e);
    assert!(e.is_auth() && text.contains("/token"), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");
}

#[tokio::test]
async fn credential_helper_on_a_private_path_supplies_credentials() {
    let reg = Registry::start(&["--htpasswd", "carol:helper-pw"]);
    let dir = tempfile::tempdir().unwrap();
    let helper = dir.path().join("docker-credential-test");
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\n[ \"$server\" = \"{}\" ] || {{ echo 'credentials not found in native keychain'; exit 1; }}\necho '{{\"ServerURL\":\"'$server'\",\"Username\":\"carol\",\"Secret\":\"helper-pw\"}}'\n",
        reg.addr()
    );
    std::fs::write(&helper, script).unwrap();
    std::fs::set_permissions(
        &helper,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .unwrap();
    let config = write_json(
        dir.path(),
        "config.json",
        &serde_json::json!({"credHelpers": {reg.addr(): "test"}}),
    );
    let client = connect(
        &reg.reference("a"),
        &plain(Some(config.clone())),
        Some(dir.path()),
    )
    .await
    .unwrap();
    client
        .upload_blob_bytes(&Digest::of(b"h"), Bytes::from_static(b"h"))
        .await
        .unwrap();

    // credsStore: the same helper for every registry.
    let store = write_json(
        dir.path(),
        "store.json",
        &serde_json::json!({"credsStore": "test"}),
    );
    connect(&reg.reference("a"), &plain(Some(store)), Some(dir.path()))
        .await
        .unwrap();
}

#[tokio::test]
async fn kubernetes_dockerconfigjson_with_url_keys() {
    let reg = Registry::start(&["--htpasswd", "dave:k8s-pw"]);
    let dir = tempfile::tempdir().unwrap();
    // As mounted from a kubernetes.io/dockerconfigjson Secret: the key is a URL, username+password+auth.
    let secret = write_json(
        dir.path(),
        ".dockerconfigjson",
        &serde_json::json!({"auths": {format!("http://{}/v2/", reg.addr()): {"username": "dave", "password": "k8s-pw", "auth": "ZGF2ZTprOHMtcHc="}}}),
    );
    let client = connect(&reg.reference("a"), &plain(Some(secret)), None)
        .await
        .unwrap();
    client
        .upload_blob_bytes(&Digest::of(b"k"), Bytes::from_static(b"k"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_connection_cut_mid_patch_to_the_real_registry_is_survived() {
    let reg = Registry::start(&[]);
    let proxy =
        super::proxy::CuttingProxy::start(reg.addr().to_string(), (MIB + MIB / 2) as u64).await;
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * MIB;
    let (path, digest) = random_file(dir.path(), size, 13);
    let reference = format!("{}/cut/app", proxy.addr).parse().unwrap();
    let client = connect(&reference, &plain(None), None)
        .await
        .unwrap()
        .with_chunk_size(MIB as u64);
    client
        .upload_blob_file(&digest, &path, size as u64)
        .await
        .unwrap();
    assert!(
        proxy.cut.load(std::sync::atomic::Ordering::SeqCst),
        "the proxy cut a PATCH"
    );
    assert_eq!(
        client.blob_exists(&digest).await.unwrap(),
        Some(size as u64)
    );
    // distribution 2.8 cancels a session whose data no longer matches its `_state` offset, so the
    // client had to start a second session (see upload.rs); a registry that resumes would need one.
    eprintln!("sessions opened: {}", proxy.count("POST /v2/"));
    assert!((1..=2).contains(&proxy.count("POST /v2/")));
}

/// containerd's `certs.d`: a `hosts.toml` mirror is read from first; an upstream that is down is
/// skipped with a warning when a mirror answers.
#[tokio::test]
async fn a_certs_d_mirror_serves_base_blobs_when_the_upstream_is_down() {
    use crate::registry::{BlobSource, RegistryBlob};
    let mirror = Registry::start(&[]);
    let seed = connect(&mirror.reference("library/base"), &plain(None), None)
        .await
        .unwrap();
    let data = Bytes::from(super::pseudo_random(300_000, 21));
    let digest = Digest::of(&data);
    seed.upload_blob_bytes(&digest, data.clone()).await.unwrap();

    let certs = tempfile::tempdir().unwrap();
    let upstream = "127.0.0.1:1"; // nothing listens on port 1
    let host_dir = certs.path().join(upstream);
    std::fs::create_dir(&host_dir).unwrap();
    let toml = format!(
        "server = \"http://{upstream}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        mirror.addr()
    );
    std::fs::write(host_dir.join("hosts.toml"), toml).unwrap();
    let opts = ClientOptions {
        certs_dir: Some(certs.path().to_path_buf()),
        ..plain(None)
    };
    let reference = format!("{upstream}/library/base").parse().unwrap();
    let clients = Client::pull_hosts(&reference, &opts).await.unwrap();
    assert_eq!(clients.len(), 1, "the upstream was skipped");
    let blob = RegistryBlob {
        client: clients[0].clone(),
        digest: digest.clone(),
        size: data.len() as u64,
    };
    let read: Vec<u8> = blob
        .open_at(1000)
        .await
        .unwrap()
        .map(|c| c.unwrap().to_vec())
        .concat()
        .await;
    assert_eq!(read, data[1000..]);
}

/// Artifactory and ACR have no OAuth2 POST (they answer 400 or 401): the identity token then goes as
/// a password on the classic GET.
#[tokio::test]
async fn an_identity_token_refused_on_post_is_sent_on_the_get() {
    for status in [400, 401] {
        let tokens = TokenService::start_with(Some(status)).await;
        let (_reg, _dir, client) = identity_token_client(&tokens).await;
        client
            .upload_blob_bytes(&Digest::of(b"g"), Bytes::from_static(b"g"))
            .await
            .unwrap();
        let methods: Vec<String> = tokens
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.method.clone())
            .collect();
        assert!(
            !methods.is_empty() && methods.iter().all(|m| m == "GET"),
            "{status}: {methods:?}"
        );
    }
}
