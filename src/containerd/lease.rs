//! A containerd lease held for the length of a commit, so garbage collection cannot remove the
//! snapshot or base content we are reading. Its ID is derived from the container, so it is also
//! the lock that keeps two commits of one container apart. It expires by itself (and a later
//! commit takes it over) if we die without deleting it and the guardian could not either.

use super::{Containerd, ContainerdError};
use containerd_client::services::v1::{
    AddResourceRequest, CreateRequest, DeleteRequest, ListRequest, Resource,
};
use std::collections::HashMap;

const EXPIRE_LABEL: &str = "containerd.io/gc.expire";
/// How long a lease outlives a committer that was killed before anyone could delete it.
const LEASE_TTL: time::Duration = time::Duration::hours(1);

pub struct Lease {
    pub id: String,
}

/// The lease (and lock) ID for a container.
pub fn lease_id(container_id: &str) -> String {
    format!("committer/{container_id}")
}

impl Containerd {
    /// Creates the container's lease and attaches it to every later call on this connection.
    /// Fails clearly when another commit of the same container holds it.
    pub async fn take_lease(&self, container_id: &str) -> Result<Lease, ContainerdError> {
        let id = lease_id(container_id);
        let now = time::OffsetDateTime::now_utc();
        let expire = rfc3339(now + LEASE_TTL);
        let labels = HashMap::from([(EXPIRE_LABEL.to_string(), expire.clone())]);
        let create = CreateRequest {
            id: id.clone(),
            labels: labels.clone(),
        };
        match self.leases().create(create.clone()).await {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                let held_until = self.lease_expiry(&id).await?;
                match held_until {
                    Some(t) if t > now => {
                        return Err(ContainerdError::Busy {
                            container: container_id.to_string(),
                            lease: id,
                            until: rfc3339(t),
                        })
                    }
                    // Expired: its committer died and nobody cleaned up. Take it over.
                    _ => {
                        let _ = self
                            .leases()
                            .delete(DeleteRequest {
                                id: id.clone(),
                                sync: false,
                            })
                            .await;
                        self.leases()
                            .create(create)
                            .await
                            .map_err(|s| ContainerdError::rpc("creating a lease", s))?;
                    }
                }
            }
            Err(s) => return Err(ContainerdError::rpc("creating a lease", s)),
        }
        self.set_lease(Some(&id));
        Ok(Lease { id })
    }

    async fn lease_expiry(
        &self,
        id: &str,
    ) -> Result<Option<time::OffsetDateTime>, ContainerdError> {
        let leases = self
            .leases()
            .list(ListRequest {
                filters: vec![format!("id=={id}")],
            })
            .await
            .map_err(|s| ContainerdError::rpc("listing leases", s))?
            .into_inner()
            .leases;
        Ok(leases
            .iter()
            .find(|l| l.id == id)
            .and_then(|l| l.labels.get(EXPIRE_LABEL))
            .and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            }))
    }

    /// Adds a resource (a content digest or a snapshot) to the lease.
    pub async fn lease_resource(
        &self,
        lease: &Lease,
        id: &str,
        kind: &str,
    ) -> Result<(), ContainerdError> {
        self.leases()
            .add_resource(AddResourceRequest {
                id: lease.id.clone(),
                resource: Some(Resource {
                    id: id.to_string(),
                    r#type: kind.to_string(),
                }),
            })
            .await
            .map(|_| ())
            .map_err(|s| {
                ContainerdError::rpc(format!("adding {kind} {id} to lease {}", lease.id), s)
            })
    }

    pub async fn drop_lease(&self, lease: Lease) -> Result<(), ContainerdError> {
        self.set_lease(None);
        self.delete_lease(&lease.id).await
    }

    pub async fn delete_lease(&self, id: &str) -> Result<(), ContainerdError> {
        match self
            .leases()
            .delete(DeleteRequest {
                id: id.to_string(),
                sync: false,
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(ContainerdError::rpc(format!("deleting lease {id}"), s)),
        }
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
