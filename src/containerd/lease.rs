//! A containerd lease held for the length of a commit, so garbage collection cannot remove the
//! snapshot or base content we are reading. Its ID is derived from the container, so it is also
//! the lock that keeps two commits of one container apart.
//!
//! The lease carries its owner's token (`committer.owner`): it is deleted only by its owner (or
//! the owner's supervisor), never by a commit that merely knows its ID. It expires `ttl` after
//! its last renewal; while the commit works it is renewed every third of the TTL, so a commit
//! longer than the TTL keeps it and no later commit can take it over. containerd has no call
//! that updates a lease's labels, so a renewal hands the resources to a short-lived second lease
//! (`ID.handover`), re-creates the lease with a later expiry, and drops the handover: garbage
//! collection never sees the resources unleased. Calls that create a resource under the lease
//! (a view, content, an image record) and a renewal exclude each other (`Deadlined::gate`): a
//! resource created mid-renewal would otherwise land on a lease about to be deleted, or be
//! missing from the resources copied over. A renewal waits for such calls in flight (the diff
//! service's can take minutes; the lease has two thirds of its TTL left then).

use super::{Containerd, ContainerdError};
use containerd_client::services::v1::{
    AddResourceRequest, CreateRequest, DeleteRequest, ListRequest, ListResourcesRequest, Resource,
};
use std::collections::HashMap;

const EXPIRE_LABEL: &str = "containerd.io/gc.expire";
const OWNER_LABEL: &str = "committer.owner";
/// How long a lease outlives a committer that was killed before anyone could delete it.
const LEASE_TTL: time::Duration = time::Duration::hours(1);
/// Overrides the TTL in seconds (tests, or sites that want a dead commit's lock to clear sooner).
pub const TTL_ENV: &str = "COMMITTER_LEASE_TTL_SECONDS";

pub struct Lease {
    pub id: String,
    owner: String,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// The lease (and lock) ID for a container.
pub fn lease_id(container_id: &str) -> String {
    format!("committer/{container_id}")
}

fn ttl() -> time::Duration {
    std::env::var(TTL_ENV)
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|s| *s >= 3)
        .map(time::Duration::seconds)
        .unwrap_or(LEASE_TTL)
}

fn create_request(id: &str, owner: &str) -> CreateRequest {
    let expire = rfc3339(time::OffsetDateTime::now_utc() + ttl());
    CreateRequest {
        id: id.to_string(),
        labels: HashMap::from([
            (EXPIRE_LABEL.to_string(), expire),
            (OWNER_LABEL.to_string(), owner.to_string()),
        ]),
    }
}

impl Containerd {
    /// Creates the container's lease, attaches it to every later call on this connection and
    /// renews it until the lease is dropped. Fails clearly when another commit holds it.
    pub async fn take_lease(&self, container_id: &str) -> Result<Lease, ContainerdError> {
        let id = lease_id(container_id);
        let owner = crate::guard::owner_token();
        match self.leases().create(create_request(&id, &owner)).await {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                let now = time::OffsetDateTime::now_utc();
                if let Some(t) = self.lease_labels(&id).await?.and_then(|l| expiry(&l)) {
                    if t > now {
                        return Err(ContainerdError::Busy {
                            container: container_id.to_string(),
                            lease: id,
                            until: rfc3339(t),
                        });
                    }
                }
                // Expired: its committer died and nobody cleaned up. Take it over.
                let _ = self
                    .leases()
                    .delete(DeleteRequest {
                        id: id.clone(),
                        sync: false,
                    })
                    .await;
                self.leases()
                    .create(create_request(&id, &owner))
                    .await
                    .map_err(|s| ContainerdError::rpc("creating a lease", s))?;
            }
            Err(s) => return Err(ContainerdError::rpc("creating a lease", s)),
        }
        self.set_lease(Some(&id));
        let renewer = tokio::spawn(renew_forever(self.clone(), id.clone(), owner.clone()));
        Ok(Lease { id, owner, renewer })
    }

    /// The lease's labels, or None when it does not exist.
    async fn lease_labels(
        &self,
        id: &str,
    ) -> Result<Option<HashMap<String, String>>, ContainerdError> {
        let leases = self
            .leases()
            .list(ListRequest {
                filters: vec![format!("id=={id}")],
            })
            .await
            .map_err(|s| ContainerdError::rpc("listing leases", s))?
            .into_inner()
            .leases;
        Ok(leases.into_iter().find(|l| l.id == id).map(|l| l.labels))
    }

    /// Adds a resource (a content digest or a snapshot) to the lease.
    pub async fn lease_resource(
        &self,
        lease: &Lease,
        id: &str,
        kind: &str,
    ) -> Result<(), ContainerdError> {
        self.add_resource(&lease.id, id, kind).await
    }

    async fn add_resource(&self, lease: &str, id: &str, kind: &str) -> Result<(), ContainerdError> {
        self.leases()
            .add_resource(AddResourceRequest {
                id: lease.to_string(),
                resource: Some(Resource {
                    id: id.to_string(),
                    r#type: kind.to_string(),
                }),
            })
            .await
            .map(|_| ())
            .map_err(|s| ContainerdError::rpc(format!("adding {kind} {id} to lease {lease}"), s))
    }

    /// Stops renewing and deletes the lease if it is still ours.
    pub async fn drop_lease(&self, lease: Lease) -> Result<(), ContainerdError> {
        lease.renewer.abort();
        self.set_lease(None);
        self.delete_lease_if_owned(&format!("{}.handover", lease.id), &lease.owner)
            .await?;
        self.delete_lease_if_owned(&lease.id, &lease.owner).await
    }

    /// Deletes lease `id` only when its owner label is `owner`: a commit that lost its lease
    /// (expired and taken over) never deletes the new holder's.
    pub async fn delete_lease_if_owned(
        &self,
        id: &str,
        owner: &str,
    ) -> Result<(), ContainerdError> {
        match self.lease_labels(id).await? {
            Some(labels) if labels.get(OWNER_LABEL).map(String::as_str) == Some(owner) => {}
            Some(_) => {
                crate::log::warn(&format!(
                    "lease {id} belongs to another commit now; leaving it alone"
                ));
                return Ok(());
            }
            None => return Ok(()),
        }
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

    /// Moves the lease's expiry `ttl` ahead (see the module header for how).
    async fn renew(&self, id: &str, owner: &str) -> Result<(), ContainerdError> {
        let _exclusive = self.channel.gate.clone().write_owned().await;
        let handover = format!("{id}.handover");
        let resources = self
            .leases()
            .list_resources(ListResourcesRequest { id: id.to_string() })
            .await
            .map_err(|s| ContainerdError::rpc(format!("listing the resources of lease {id}"), s))?
            .into_inner()
            .resources;
        let _ = self.delete_lease_if_owned(&handover, owner).await;
        self.leases()
            .create(create_request(&handover, owner))
            .await
            .map_err(|s| ContainerdError::rpc(format!("creating lease {handover}"), s))?;
        for r in &resources {
            self.add_resource(&handover, &r.id, &r.r#type).await?;
        }
        self.set_lease(Some(&handover));
        self.delete_lease_if_owned(id, owner).await?;
        self.leases()
            .create(create_request(id, owner))
            .await
            .map_err(|s| match s.code() {
                tonic::Code::AlreadyExists => ContainerdError::Invalid {
                    what: format!("renewing lease {id}"),
                    detail: "another commit took it in the moment it was re-created".into(),
                },
                _ => ContainerdError::rpc(format!("re-creating lease {id}"), s),
            })?;
        for r in &resources {
            self.add_resource(id, &r.id, &r.r#type).await?;
        }
        self.set_lease(Some(id));
        self.delete_lease_if_owned(&handover, owner).await
    }
}

/// Renews the lease every third of its TTL until aborted (the lease dropped).
async fn renew_forever(ctr: Containerd, id: String, owner: String) {
    let every = std::time::Duration::from_secs((ttl().whole_seconds() / 3).max(1) as u64);
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = ctr.renew(&id, &owner).await {
            crate::log::error(&format!(
                "{e}; the commit goes on, but its lease may expire before it ends"
            ));
        }
    }
}

fn expiry(labels: &HashMap<String, String>) -> Option<time::OffsetDateTime> {
    labels.get(EXPIRE_LABEL).and_then(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
    })
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
