//! Registering, reading and updating instances.

use std::collections::HashMap;

use super::{Page, PageRequest, id_cursor, new_id, remember, replay, taken};
use crate::{
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
}

/// Registers an instance under an existing parent.
pub async fn register(db: &Db, new: NewInstance) -> Result<Instance, Error> {
    db.write(async |tx| {
        let request_id = new.request_id.as_deref();
        if let Some(original) = replay(tx, request_id, "RegisterInstance", &new).await? {
            return Ok(original);
        }
        let at = now();
        let instance = Instance {
            id: new.id.clone().unwrap_or_else(new_id),
            name: new.name.clone(),
            scope: new.scope,
            parent_id: new.parent_id.clone(),
            status: new.status,
            config: new.config.clone(),
            created_at: at,
            updated_at: at,
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

/// Reads one instance.
pub async fn get(db: &Db, id: &str) -> Result<Instance, Error> {
    let mut conn = db.conn().await?;
    instances::find(&mut conn, id)
        .await?
        .ok_or_else(|| Error::not_found("instance", id))
}

/// Lists instances ordered by id.
pub async fn list(db: &Db, filter: &Filter, page: &PageRequest) -> Result<Page<Instance>, Error> {
    let after = id_cursor(&page.token)?;
    let limit = i64::try_from(page.size + 1).unwrap_or(i64::MAX);
    let mut conn = db.conn().await?;
    let rows = instances::list(&mut conn, filter, after.as_deref(), limit).await?;
    Ok(Page::cut(rows, page.size, |instance| instance.id.clone()))
}

/// Sets an instance's run state.
pub async fn set_status(db: &Db, id: &str, status: InstanceStatus) -> Result<Instance, Error> {
    let (mut conn, _turn) = db.conn_for_write().await?;
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

/// The instances of `filter.within` (every instance if `None`), ordered by id, each with its
/// load. Two statements on one connection; the instance table is small (it is the tree of
/// Hopper instances, not of tasks), so the whole tree is one response.
pub async fn tree(db: &Db, filter: &Filter) -> Result<Vec<Node>, Error> {
    let mut conn = db.conn().await?;
    let instances = instances::list(&mut conn, filter, None, i64::MAX).await?;
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
