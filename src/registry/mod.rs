//! The OCI distribution client: push blobs and manifests to a registry repository, read them back.
//!
//! - `reference`: docker-style image references.
//! - `credentials`: docker `config.json` / Kubernetes dockerconfigjson files and credential helpers.
//! - `auth`: `WWW-Authenticate` challenges, basic auth, bearer tokens.
//! - `client`: the `Client`, its request loop (auth, retries, redirects, deadlines).
//! - `connect`: `ClientOptions` and how a client is made (hosts, credentials, first contact).
//! - `hosts`, `tls`: which hosts to contact (containerd `certs.d` mirrors), what TLS trusts there.
//! - `manifest`: manifest PUT and GET.
//! - `source`: where a blob's bytes come from (`BlobSource`: file, bytes, another registry).
//! - `streamed`: a blob uploaded while it is produced (one PATCH of unknown length, then PUT).
//! - `transfer`: `push_blob` (HEAD → mount → upload) and the upload loop with its retries and shape.
//! - `upload`: the single requests of an upload (mount, POST, PATCH, status GET, PUT).
//! - `error`: `RegistryError` with method, redacted URL, status, OCI error body and a hint.

mod auth;
mod client;
mod connect;
mod credentials;
mod error;
mod hosts;
mod manifest;
mod reference;
mod source;
mod stall;
mod streamed;
mod tls;
mod transfer;
mod upload;

#[cfg(test)]
mod tests;

pub use client::Client;
pub use connect::ClientOptions;
pub use error::{redact_url, ErrorKind, OciError, RegistryError, Secret};
pub use reference::{ParseReferenceError, Reference, DOCKER_HUB, DOCKER_HUB_API};
pub use source::{BlobSource, BlobStream, ByteStream, BytesSource, FileSource, RegistryBlob};
pub use streamed::StreamedUpload;
pub use transfer::BlobPushed;
pub use upload::MountOutcome;
