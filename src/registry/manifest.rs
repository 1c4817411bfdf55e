//! Manifests: `PUT` under a digest or tag (retrying GHCR's transient `MANIFEST_BLOB_UNKNOWN`), `GET`
//! with the exact bytes and media type.

use bytes::Bytes;
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};

use super::auth::repo_scope;
use super::client::{
    check_content_digest, header_str, header_value, Body, Client, MANIFEST_ACCEPT,
};
use super::error::RegistryError;
use crate::digest::Digest;

impl Client {
    /// PUT a manifest under a tag or digest. Returns the sha256 of `body`, after checking it against the
    /// registry's `Docker-Content-Digest` when the registry sends one.
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&body);
        let mut req = self.req(
            Method::PUT,
            self.repo_url(&format!("manifests/{reference}"))?,
        );
        req.headers.insert(CONTENT_TYPE, header_value(media_type)?);
        req.body = Body::Bytes(body);
        let mut unknown_blob_retries = 0;
        let resp = loop {
            let resp = self.execute(&req).await?;
            if resp.status() == StatusCode::CREATED || resp.status() == StatusCode::OK {
                break resp;
            }
            let err = self.fail(&req, resp).await;
            // GHCR answers MANIFEST_BLOB_UNKNOWN for a short while after the blobs' PUTs succeeded
            // (rust-oci-client#37): the blobs are there, the index has not caught up.
            if err.oci_code() != Some("MANIFEST_BLOB_UNKNOWN") || unknown_blob_retries >= 4 {
                return Err(err);
            }
            crate::log::debug(&format!("{err}; trying again"));
            tokio::time::sleep(self.retry.delay(unknown_blob_retries + 2)).await;
            unknown_blob_retries += 1;
        };
        check_content_digest(
            &resp,
            &digest,
            &format!("manifest {}:{reference}", self.inner.repository),
        )?;
        Ok(digest)
    }

    /// GET a manifest (tag or digest): `(media type, exact bytes)`, or `None` on 404. When `reference` is a
    /// digest the bytes are checked against it.
    pub async fn get_manifest(
        &self,
        reference: &str,
    ) -> Result<Option<(String, Bytes)>, RegistryError> {
        let mut req = self.req(
            Method::GET,
            self.repo_url(&format!("manifests/{reference}"))?,
        );
        req.scopes = vec![repo_scope(&self.inner.repository, "pull")];
        req.headers
            .insert(ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        let resp = self.execute(&req).await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(self.fail(&req, resp).await),
        }
        let content_type = header_str(&resp, CONTENT_TYPE.as_str())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string());
        let body = resp
            .bytes()
            .await
            .map_err(|e| RegistryError::transport("GET", &req.url, e))?;
        if let Ok(expected) = reference.parse::<Digest>() {
            let found = Digest::of(&body);
            if found != expected {
                return Err(RegistryError::DigestMismatch {
                    what: format!("manifest {reference}"),
                    expected,
                    found: found.to_string(),
                });
            }
        }
        // Some registries answer `application/json` or nothing; the manifest's own mediaType is then the truth.
        let media_type = match content_type {
            Some(ct) if ct.starts_with("application/vnd.") => ct,
            other => media_type_field(&body).or(other).unwrap_or_default(),
        };
        Ok(Some((media_type, body)))
    }
}

fn media_type_field(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("mediaType")?.as_str().map(str::to_string)
}
