//! Registering, reading and updating instances.

use super::{Page, PageRequest, id_cursor, new_id, remember, replay, taken};
use crate::{
    domain::{InstanceStatus, Scope},
    error::Error,
    store::{
        Db,
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
    let mut tx = db.begin().await?;
    let outcome = async {
        let request_id = new.request_id.as_deref();
        if let Some(original) = replay(&mut tx, request_id, "RegisterInstance", &new).await? {
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
            && instances::find(&mut tx, parent).await?.is_none()
        {
            return Err(Error::not_found("parent instance", parent));
        }
        instances::insert(&mut tx, &instance)
            .await
            .map_err(taken("instance", &instance.id))?;
        remember(&mut tx, request_id, &instance).await?;
        Ok(instance)
    }
    .await;
    tx.finish(outcome).await
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
