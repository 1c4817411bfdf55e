//! Deadlines on containerd: connecting (and the first call) must finish within `CONNECT`, and
//! every later call gets a deadline chosen by its gRPC method (`for_method`), enforced here on
//! the client side so a containerd that accepts and never answers cannot hang a commit.
//!
//! The deadline covers the wait for the response's headers: a streaming Read that has started
//! is not cut, however long the blob.

use super::ContainerdError;
use containerd_client::tonic::{
    self,
    body::Body,
    codegen::{http, Service},
    transport::{Channel, Endpoint},
};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Connecting and the first call; the default deadline of a call.
pub const CONNECT: Duration = Duration::from_secs(10);
/// Calls whose cost grows with the container: creating or removing a view (the native
/// snapshotter copies the parent).
const SLOW: Duration = Duration::from_secs(600);
/// Freezing or thawing the sandbox's cgroup: slower than a lookup when its processes sit in disk
/// waits, but a commit must not hold a sandbox frozen for minutes on a stuck runtime.
const FREEZE: Duration = Duration::from_secs(30);

/// The deadline of one call, by its path `/containerd.services.NAME.v1.SERVICE/METHOD`: the one
/// table of containerd deadlines. `None`: containerd's diff service compares the whole
/// filesystem (a minute per GiB measured here).
fn for_method(path: &str) -> Option<Duration> {
    let method = path.rsplit('/').next().unwrap_or_default();
    if path.contains(".diff.v1.Diff/") {
        return None;
    }
    if path.contains(".tasks.v1.Tasks/") && matches!(method, "Pause" | "Resume") {
        return Some(FREEZE);
    }
    let slow = path.contains(".snapshots.v1.Snapshots/")
        && matches!(method, "Prepare" | "View" | "Remove" | "Commit");
    Some(if slow { SLOW } else { CONNECT })
}

/// A channel whose calls fail with `DeadlineExceeded`, naming the socket, past their deadline.
#[derive(Clone)]
pub struct Deadlined {
    inner: Channel,
    address: Arc<str>,
    /// Calls that create a resource under the connection's lease hold this shared; a lease
    /// renewal holds it exclusively (`lease.rs`), so no resource is created while the lease
    /// is being handed over.
    pub(super) gate: Arc<tokio::sync::RwLock<()>>,
}

/// Whether a call can add a resource to the lease named in its header: a snapshot view or
/// active snapshot, content written (by us or by the diff service), an image record.
fn creates_leased(path: &str) -> bool {
    let method = path.rsplit('/').next().unwrap_or_default();
    (path.contains(".snapshots.v1.Snapshots/") && matches!(method, "Prepare" | "View"))
        || path.contains(".diff.v1.Diff/")
        || (path.contains(".content.v1.Content/") && method == "Write")
        || (path.contains(".images.v1.Images/") && matches!(method, "Create" | "Update"))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<http::Request<Body>> for Deadlined {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let limit = for_method(req.uri().path());
        let address = self.address.clone();
        let gated =
            req.headers().contains_key("containerd-lease") && creates_leased(req.uri().path());
        // The channel made ready by poll_ready goes into the call (tower's contract).
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let gate = self.gate.clone();
        Box::pin(async move {
            // Held until containerd answered: by then the resource is on the lease.
            let _shared = match gated {
                true => Some(gate.read_owned().await),
                false => None,
            };
            let call = inner.call(req);
            let Some(limit) = limit else {
                return call.await.map_err(Into::into);
            };
            match tokio::time::timeout(limit, call).await {
                Ok(r) => r.map_err(Into::into),
                // A Status passes through tonic unchanged: the caller sees this code and message.
                Err(_) => Err(Box::new(tonic::Status::deadline_exceeded(format!(
                    "containerd at {address} did not answer within {} s",
                    limit.as_secs()
                ))) as BoxError),
            }
        })
    }
}

/// Opens the channel over the unix socket at `path` within `CONNECT`.
pub async fn connect(path: &Path) -> Result<Deadlined, ContainerdError> {
    let socket = path.to_path_buf();
    let endpoint = Endpoint::try_from("http://[::]")
        .expect("a constant URI")
        .connect_timeout(CONNECT);
    let connecting = endpoint.connect_with_connector(tower::service_fn(move |_| {
        let socket = socket.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(socket).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    }));
    let unusable = |problem: String| ContainerdError::SocketUnusable {
        path: path.to_path_buf(),
        problem,
    };
    match tokio::time::timeout(CONNECT, connecting).await {
        Err(_) => Err(ContainerdError::NoAnswer {
            path: path.to_path_buf(),
            secs: CONNECT.as_secs(),
        }),
        Ok(Err(e)) => Err(unusable(match io_cause(&e) {
            Some(io) => socket_problem(io),
            None => e.to_string(),
        })),
        Ok(Ok(inner)) => Ok(Deadlined {
            inner,
            address: path.display().to_string().into(),
            gate: Arc::default(),
        }),
    }
}

fn io_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

/// What a failed open of the socket means, and what to do about it.
pub fn socket_problem(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            "connection refused: containerd is not listening there (a socket file stays behind when it stops); is it running?".into()
        }
        std::io::ErrorKind::PermissionDenied => {
            "permission denied: the socket is root's; run as root or as a member of the socket's group".into()
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diff_service_has_no_deadline_and_views_a_long_one() {
        assert_eq!(for_method("/containerd.services.diff.v1.Diff/Diff"), None);
        assert_eq!(
            for_method("/containerd.services.snapshots.v1.Snapshots/View"),
            Some(SLOW)
        );
        assert_eq!(
            for_method("/containerd.services.tasks.v1.Tasks/Pause"),
            Some(FREEZE)
        );
        assert_eq!(
            for_method("/containerd.services.containers.v1.Containers/Get"),
            Some(CONNECT)
        );
    }
}
