//! The `hopper_instances` table.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
};

use chrono::NaiveDateTime;
use diesel::{
    prelude::*,
    sql_types::{BigInt, Bool, Nullable, Text, Timestamp},
};
use diesel_async::RunQueryDsl;

use super::{Bind, Conn, schema::hopper_instances, sql, sql::PG_CLOCK, with_conn};
use crate::domain::{InstanceStatus, Scope};

/// One Hopper instance.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Queryable,
    QueryableByName,
    Selectable,
    Insertable,
    serde::Serialize,
    serde::Deserialize,
)]
#[diesel(table_name = hopper_instances)]
pub struct Instance {
    /// Unique id.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Where it sits in the tree.
    pub scope: Scope,
    /// The parent instance; `None` for a root.
    pub parent_id: Option<String>,
    /// Run state.
    pub status: InstanceStatus,
    /// Free-form configuration.
    pub config: serde_json::Value,
    /// When it was registered.
    pub created_at: NaiveDateTime,
    /// When it last changed.
    pub updated_at: NaiveDateTime,
    /// Its lease period in milliseconds, if it was registered with one.
    #[serde(default)]
    pub lease_ms: Option<i64>,
    /// When its lease lapses unless renewed (the database's clock).
    #[serde(default)]
    pub lease_expires_at: Option<NaiveDateTime>,
}

impl Instance {
    /// When its lease lapsed, if it has by `now`: the instance is unresponsive.
    pub fn lapsed(&self, now: NaiveDateTime) -> Option<NaiveDateTime> {
        self.lease_expires_at.filter(|at| *at <= now)
    }
}

/// `clock + <lease_ms column> milliseconds`, as SQL for either backend.
fn lease_from_now(conn: &Conn) -> String {
    match conn {
        Conn::Pg(_) => format!("{PG_CLOCK} + lease_ms * INTERVAL '1 millisecond'"),
        Conn::Sqlite(_) => {
            "strftime('%Y-%m-%d %H:%M:%f', 'now', '+' || (lease_ms / 1000.0) || ' seconds')".into()
        }
    }
}

/// Renews an instance's lease: one period from the database's clock now. `None` if there is no
/// such instance or it has no lease (the caller tells which). One statement.
pub(crate) async fn renew_lease(conn: &mut Conn, id: &str) -> QueryResult<Option<Instance>> {
    let text = format!(
        "UPDATE hopper_instances SET lease_expires_at = {}
         WHERE id = $1 AND lease_ms IS NOT NULL
         RETURNING *",
        lease_from_now(conn)
    );
    with_conn!(conn, |c| sql(&text)
        .bind::<Text, _>(id)
        .get_result(c)
        .await
        .optional())
}

/// The restart brake: beats the sweepers' heartbeat and, if the last beat (of any replica) is
/// older than `gap`, gives every lease a full period from now, since nobody could renew one
/// meanwhile. Returns how many leases it extended. Run inside a transaction.
pub(crate) async fn brake_leases(conn: &mut Conn, gap: std::time::Duration) -> QueryResult<usize> {
    #[derive(QueryableByName)]
    struct Beat {
        #[diesel(sql_type = Timestamp)]
        beat_at: NaiveDateTime,
        #[diesel(sql_type = Timestamp)]
        now: NaiveDateTime,
    }
    let clock = super::clock(conn);
    let lock = match conn {
        Conn::Pg(_) => " FOR UPDATE",
        Conn::Sqlite(_) => "",
    };
    let read = format!("SELECT beat_at, {clock} AS now FROM sweeper_heartbeat WHERE id = 1{lock}");
    let beat: Beat = with_conn!(conn, |c| sql(&read).get_result(c).await)?;
    let beat_text = format!("UPDATE sweeper_heartbeat SET beat_at = {clock} WHERE id = 1");
    with_conn!(conn, |c| sql(&beat_text).execute(c).await)?;
    let gap = chrono::TimeDelta::from_std(gap).unwrap_or(chrono::TimeDelta::MAX);
    if beat.now - beat.beat_at <= gap {
        return Ok(0);
    }
    let extend = format!(
        "UPDATE hopper_instances SET lease_expires_at = {from_now}
         WHERE lease_ms IS NOT NULL AND (lease_expires_at IS NULL OR lease_expires_at < {from_now})",
        from_now = lease_from_now(conn)
    );
    with_conn!(conn, |c| sql(&extend).execute(c).await)
}

/// How many instances are unresponsive now (their lease lapsed), and the next lease to lapse
/// after now, if any: one index probe each.
pub(crate) async fn leases(conn: &mut Conn) -> QueryResult<(i64, Option<NaiveDateTime>)> {
    #[derive(QueryableByName)]
    struct Leases {
        #[diesel(sql_type = BigInt)]
        lapsed: i64,
        #[diesel(sql_type = Nullable<Timestamp>)]
        next: Option<NaiveDateTime>,
    }
    let text = format!(
        "SELECT (SELECT COUNT(*) FROM hopper_instances
                 WHERE lease_expires_at IS NOT NULL AND lease_expires_at <= {now}) AS lapsed,
                (SELECT MIN(lease_expires_at) FROM hopper_instances
                 WHERE lease_expires_at IS NOT NULL AND lease_expires_at > {now}) AS next",
        now = super::clock(conn)
    );
    let leases: Leases = with_conn!(conn, |c| sql(&text).get_result(c).await)?;
    Ok((leases.lapsed, leases.next))
}

/// Filters for [`list`]; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this scope.
    pub scope: Option<Scope>,
    /// Only direct children of this instance.
    pub parent_id: Option<String>,
    /// Only this run state.
    pub status: Option<InstanceStatus>,
    /// Only this instance and those below it.
    pub within: Option<String>,
}

/// Inserts a new instance.
pub async fn insert(conn: &mut Conn, instance: &Instance) -> QueryResult<()> {
    with_conn!(conn, |c| diesel::insert_into(hopper_instances::table)
        .values(instance)
        .execute(c)
        .await
        .map(drop))
}

/// Reads one instance.
pub async fn find(conn: &mut Conn, id: &str) -> QueryResult<Option<Instance>> {
    with_conn!(conn, |c| hopper_instances::table
        .find(id)
        .select(Instance::as_select())
        .first(c)
        .await
        .optional())
}

/// Lists instances matching `filter` with ids greater than `after`, ordered by id.
pub async fn list(
    conn: &mut Conn,
    filter: &Filter,
    after: Option<&str>,
    limit: i64,
) -> QueryResult<Vec<Instance>> {
    with_conn!(conn, |c| {
        let mut query = hopper_instances::table
            .select(Instance::as_select())
            .into_boxed();
        if let Some(scope) = filter.scope {
            query = query.filter(hopper_instances::scope.eq(scope));
        }
        if let Some(parent_id) = &filter.parent_id {
            query = query.filter(hopper_instances::parent_id.eq(parent_id));
        }
        if let Some(status) = filter.status {
            query = query.filter(hopper_instances::status.eq(status));
        }
        if let Some(root) = &filter.within {
            query = query.filter(
                diesel::dsl::sql::<Bool>(
                    "id IN (WITH RECURSIVE subtree (id) AS (\
                     SELECT id FROM hopper_instances WHERE id = ",
                )
                .bind::<Text, _>(root)
                .sql(
                    " UNION ALL SELECT i.id FROM hopper_instances i \
                     JOIN subtree s ON i.parent_id = s.id) SELECT id FROM subtree)",
                ),
            );
        }
        if let Some(after) = after {
            query = query.filter(hopper_instances::id.gt(after));
        }
        query.order(hopper_instances::id).limit(limit).load(c).await
    })
}

/// Sets an instance's run state; `None` if there is no such instance.
pub async fn set_status(
    conn: &mut Conn,
    id: &str,
    status: InstanceStatus,
    now: NaiveDateTime,
) -> QueryResult<Option<Instance>> {
    with_conn!(conn, |c| diesel::update(hopper_instances::table.find(id))
        .set((
            hopper_instances::status.eq(status),
            hopper_instances::updated_at.eq(now)
        ))
        .returning(Instance::as_returning())
        .get_result(c)
        .await
        .optional())
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = Text)]
    id: String,
}

/// The instance and its ancestors, nearest first, in one round trip; empty if unknown.
pub async fn lineage(conn: &mut Conn, id: &str) -> QueryResult<Vec<String>> {
    const LINEAGE: &str = "
        WITH RECURSIVE lineage (id, parent_id, depth) AS (
            SELECT id, parent_id, 0 FROM hopper_instances WHERE id = $1
            UNION ALL
            SELECT i.id, i.parent_id, l.depth + 1
            FROM hopper_instances i JOIN lineage l ON i.id = l.parent_id
        )
        SELECT id FROM lineage ORDER BY depth";
    with_conn!(conn, |c| sql(LINEAGE)
        .bind::<Text, _>(id)
        .load::<Id>(c)
        .await
        .map(|rows| rows.into_iter().map(|row| row.id).collect()))
}

/// Whether `instance_id` is, or is an ancestor of, an instance the task involves: where it is
/// now, or either end of one of its delegations. One round trip.
pub(crate) async fn involved_in_task(
    conn: &mut Conn,
    task_id: &str,
    instance_id: &str,
) -> QueryResult<bool> {
    const INVOLVED: &str = "
        WITH RECURSIVE up (id, parent_id) AS (
            SELECT id, parent_id FROM hopper_instances
            WHERE id IN (
                SELECT instance_id FROM tasks WHERE id = $1
                UNION SELECT source_instance_id FROM task_delegations WHERE task_id = $1
                UNION SELECT target_instance_id FROM task_delegations WHERE task_id = $1
            )
            UNION
            SELECT i.id, i.parent_id FROM hopper_instances i JOIN up ON i.id = up.parent_id
        )
        SELECT id FROM up WHERE id = $2";
    with_conn!(conn, |c| sql(INVOLVED)
        .bind::<Text, _>(task_id)
        .bind::<Text, _>(instance_id)
        .load::<Id>(c)
        .await
        .map(|rows| !rows.is_empty()))
}

/// The lineages of registered instances, kept for the life of the pool. An instance's parent
/// never changes once it is registered and instances are never deleted, so an entry never goes
/// stale; an unknown id is not remembered (it may be registered later, through any replica).
#[derive(Debug, Default)]
pub(crate) struct Lineages(RwLock<HashMap<String, Arc<[String]>>>);

impl Lineages {
    /// [`lineage`], from memory after the first time; empty if the instance is unknown.
    pub async fn get(&self, conn: &mut Conn, id: &str) -> QueryResult<Arc<[String]>> {
        let known = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned();
        if let Some(lineage) = known {
            return Ok(lineage);
        }
        let lineage: Arc<[String]> = lineage(conn, id).await?.into();
        if !lineage.is_empty() {
            self.0
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id.to_owned(), lineage.clone());
        }
        Ok(lineage)
    }
}
