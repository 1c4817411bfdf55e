//! The OCI distribution client: push blobs and manifests to a registry repository, read them back.
//!
//! - `reference`: docker-style image references.
//! - `credentials`: docker `config.json` / Kubernetes dockerconfigjson files and credential helpers.
//! - `auth`: `WWW-Authenticate` challenges, basic auth, bearer tokens.
//! - `client`: the `Client`, its request loop (auth, retries, redirects), manifests.
//! - `upload`: blob upload steps (mount, POST, PATCH…, PUT) with resumption; blob reads.
//! - `error`: `RegistryError` with method, redacted URL, status, OCI error body and a hint.

mod auth;
mod client;
mod credentials;
mod error;
mod reference;
mod upload;

#[cfg(test)]
mod tests;

pub use client::{Client, ClientOptions};
pub use error::{redact_url, ErrorKind, OciError, RegistryError, Secret};
pub use reference::{ParseReferenceError, Reference, DOCKER_HUB, DOCKER_HUB_API};
pub use upload::{BlobStream, MountOutcome};
