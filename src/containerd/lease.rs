//! A containerd lease held for the length of a commit, so garbage collection cannot remove the
//! snapshot or base content we are reading. It expires by itself if we die without deleting it.

use super::{Containerd, ContainerdError};
use containerd_client::services::v1::{AddResourceRequest, CreateRequest, DeleteRequest, Resource};
use std::collections::HashMap;

pub struct Lease {
    pub id: String,
}

impl Containerd {
    /// Creates a lease and attaches it to every later call on this connection.
    pub async fn take_lease(&self, container_id: &str) -> Result<Lease, ContainerdError> {
        let id = format!("committer-{}-{}", container_id, std::process::id());
        // How long a lease outlives a committer that was killed before it could delete it.
        let expire = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), expire)]);
        self.leases()
            .create(CreateRequest { id: id.clone(), labels })
            .await
            .map_err(|s| ContainerdError::rpc("creating a lease", s))?;
        self.set_lease(Some(&id));
        Ok(Lease { id })
    }

    /// Adds a resource (a content digest or a snapshot) to the lease.
    pub async fn lease_resource(&self, lease: &Lease, id: &str, kind: &str) -> Result<(), ContainerdError> {
        self.leases()
            .add_resource(AddResourceRequest {
                id: lease.id.clone(),
                resource: Some(Resource { id: id.to_string(), r#type: kind.to_string() }),
            })
            .await
            .map(|_| ())
            .map_err(|s| ContainerdError::rpc(format!("adding {kind} {id} to lease {}", lease.id), s))
    }

    pub async fn drop_lease(&self, lease: Lease) -> Result<(), ContainerdError> {
        self.set_lease(None);
        self.leases()
            .delete(DeleteRequest { id: lease.id.clone(), sync: false })
            .await
            .map(|_| ())
            .map_err(|s| ContainerdError::rpc(format!("deleting lease {}", lease.id), s))
    }
}
