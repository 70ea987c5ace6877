//! Registering, reading and updating instances.

use std::{collections::HashMap, time::Duration};

use chrono::SubsecRound;

use super::{
    Page, PageRequest,
    access::{self, Action},
    id_cursor, new_id, remember, replay, taken,
};
use crate::{
    auth::Caller,
    domain::{DelegationStatus, InstanceStatus, Scope},
    error::Error,
    store::{
        Db, delegations,
        instances::{self, Filter, Instance},
        now,
    },
};

/// A validated RegisterInstance request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewInstance {
    /// Makes the request idempotent: a retry with the same id returns the original result.
    pub request_id: Option<String>,
    /// Caller-chosen id; `None` for a generated one.
    pub id: Option<String>,
    /// Human-readable name.
    pub name: String,
    /// Where it sits in the tree.
    pub scope: Scope,
    /// The parent instance, which must exist.
    pub parent_id: Option<String>,
    /// Initial run state.
    pub status: InstanceStatus,
    /// Free-form configuration.
    pub config: serde_json::Value,
    /// Its lease period, if it is to renew one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<Duration>,
}

/// Registers an instance under an existing parent.
pub async fn register(db: &Db, caller: &Caller, new: NewInstance) -> Result<Instance, Error> {
    db.write(async |tx| {
        let parent_id = new.parent_id.as_deref();
        access::authorize(tx, caller, Action::RegisterInstance { parent_id }).await?;
        let request_id = new.request_id.as_deref();
        if let Some(original) = replay(tx, request_id, "RegisterInstance", &new).await? {
            return Ok(original);
        }
        let at = now();
        let lease_ms = new
            .lease
            .map(|lease| i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let lease_expires_at = match new.lease {
            Some(lease) => Some((delegations::clock_now(tx).await? + lease).trunc_subsecs(6)),
            None => None,
        };
        let instance = Instance {
            id: new.id.clone().unwrap_or_else(new_id),
            name: new.name.clone(),
            scope: new.scope,
            parent_id: new.parent_id.clone(),
            status: new.status,
            config: new.config.clone(),
            created_at: at,
            updated_at: at,
            lease_ms,
            lease_expires_at,
        };
        if let Some(parent) = &instance.parent_id
            && instances::find(tx, parent).await?.is_none()
        {
            return Err(Error::not_found("parent instance", parent));
        }
        instances::insert(tx, &instance)
            .await
            .map_err(taken("instance", &instance.id))?;
        remember(tx, request_id, &instance).await?;
        Ok(instance)
    })
    .await
}

/// Renews an instance's lease for one period from now (the database's clock): one statement,
/// no event. FAILED_PRECONDITION if the instance has no lease.
pub async fn renew_lease(db: &Db, caller: &Caller, id: &str) -> Result<Instance, Error> {
    let (mut conn, _turn) = db.conn_for_write().await?;
    access::authorize(&mut conn, caller, Action::RenewLease(id)).await?;
    if let Some(renewed) = instances::renew_lease(&mut conn, id).await? {
        return Ok(renewed);
    }
    match instances::find(&mut conn, id).await? {
        None => Err(Error::not_found("instance", id)),
        Some(_) => Err(Error::precondition(format!(
            "instance {id} has no lease; only an instance registered with one renews it"
        ))),
    }
}

/// Reads one instance.
pub async fn get(db: &Db, caller: &Caller, id: &str) -> Result<Instance, Error> {
    let mut conn = db.conn().await?;
    access::authorize(&mut conn, caller, Action::ReadInstance(id)).await?;
    instances::find(&mut conn, id)
        .await?
        .ok_or_else(|| Error::not_found("instance", id))
}

/// Lists instances ordered by id; an instance caller sees only those it manages.
pub async fn list(
    db: &Db,
    caller: &Caller,
    filter: &Filter,
    page: &PageRequest,
) -> Result<Page<Instance>, Error> {
    let after = id_cursor(&page.token)?;
    let limit = i64::try_from(page.size + 1).unwrap_or(i64::MAX);
    let filter = Filter {
        within: access::visible_subtree(caller).or_else(|| filter.within.clone()),
        ..filter.clone()
    };
    let mut conn = db.conn().await?;
    let rows = instances::list(&mut conn, &filter, after.as_deref(), limit).await?;
    Ok(Page::cut(rows, page.size, |instance| instance.id.clone()))
}

/// Sets an instance's run state.
pub async fn set_status(
    db: &Db,
    caller: &Caller,
    id: &str,
    status: InstanceStatus,
) -> Result<Instance, Error> {
    let (mut conn, _turn) = db.conn_for_write().await?;
    access::authorize(&mut conn, caller, Action::ManageInstance(id)).await?;
    instances::set_status(&mut conn, id, status, now())
        .await?
        .ok_or_else(|| Error::not_found("instance", id))
}

/// An instance of a tree, with its load.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The instance.
    pub instance: Instance,
    /// Delegations sent to it and still pending.
    pub pending: u32,
    /// Delegations it accepted and has not finished.
    pub accepted: u32,
}

/// The subtree of `root` (without one: every instance `caller` manages), ordered by id, each
/// with its load; NOT_FOUND if there is no such root. Two statements on one connection; the
/// instance table is small (it is the tree of Hopper instances, not of tasks), so the whole
/// tree is one response.
pub async fn tree(db: &Db, caller: &Caller, root: Option<&str>) -> Result<Vec<Node>, Error> {
    let mut conn = db.conn().await?;
    if let Some(root) = root {
        access::authorize(&mut conn, caller, Action::ManageInstance(root)).await?;
    }
    let filter = Filter {
        within: root
            .map(str::to_owned)
            .or_else(|| access::visible_subtree(caller)),
        ..Filter::default()
    };
    let instances = instances::list(&mut conn, &filter, None, i64::MAX).await?;
    // A subtree holds at least its root: an empty one has no root.
    if let Some(root) = root
        && instances.is_empty()
    {
        return Err(Error::not_found("instance", root));
    }
    let mut load: HashMap<String, (u32, u32)> = HashMap::new();
    for (target, status, count) in delegations::active_load(&mut conn).await? {
        let entry = load.entry(target).or_default();
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        match status {
            DelegationStatus::Pending => entry.0 = count,
            _ => entry.1 = count,
        }
    }
    Ok(instances
        .into_iter()
        .map(|instance| {
            let (pending, accepted) = load.get(&instance.id).copied().unwrap_or_default();
            Node {
                instance,
                pending,
                accepted,
            }
        })
        .collect())
}
