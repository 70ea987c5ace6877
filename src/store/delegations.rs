//! The `task_delegations` table, including the recursive walks along parent links.

use chrono::NaiveDateTime;
use diesel::{prelude::*, sql_types::Text};
use diesel_async::RunQueryDsl;

use super::{Conn, schema::task_delegations as td, with_conn};
use crate::domain::{DelegationStatus, DelegationType};

/// One hop of a task between two instances.
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
#[diesel(table_name = td)]
pub struct Delegation {
    /// Unique id (UUID v7).
    pub id: String,
    /// The task being delegated.
    pub task_id: String,
    /// The accepted delegation this hop continues; `None` at the origin.
    pub parent_delegation_id: Option<String>,
    /// The sending instance.
    pub source_instance_id: String,
    /// The receiving instance.
    pub target_instance_id: String,
    /// The kind of hop.
    pub delegation_type: DelegationType,
    /// Lifecycle status.
    pub status: DelegationStatus,
    /// When it was made.
    pub delegated_at: NaiveDateTime,
    /// When it was accepted.
    pub accepted_at: Option<NaiveDateTime>,
    /// When it completed.
    pub completed_at: Option<NaiveDateTime>,
    /// Outcome, once completed.
    pub result: Option<serde_json::Value>,
    /// Why it was rejected.
    pub rejection_reason: Option<String>,
    /// Free-form notes.
    pub notes: Option<String>,
    /// Who made it.
    pub delegated_by: Option<String>,
    /// When the row was created.
    pub created_at: NaiveDateTime,
    /// When the row last changed.
    pub updated_at: NaiveDateTime,
}

/// The columns a change sets; `None` leaves a column as it is.
#[derive(Debug, Clone, Copy, AsChangeset)]
#[diesel(table_name = td)]
pub struct Change<'a> {
    /// New status.
    pub status: Option<DelegationStatus>,
    /// Set on acceptance.
    pub accepted_at: Option<NaiveDateTime>,
    /// Set on completion.
    pub completed_at: Option<NaiveDateTime>,
    /// Set on completion.
    pub result: Option<&'a serde_json::Value>,
    /// Set on rejection.
    pub rejection_reason: Option<&'a str>,
    /// Replaces the notes.
    pub notes: Option<&'a str>,
    /// Always set.
    pub updated_at: NaiveDateTime,
}

impl Change<'_> {
    /// A change of nothing but `updated_at`; fill in the rest with struct update syntax.
    pub fn at(now: NaiveDateTime) -> Self {
        Self {
            status: None,
            accepted_at: None,
            completed_at: None,
            result: None,
            rejection_reason: None,
            notes: None,
            updated_at: now,
        }
    }
}

/// Where a page of delegations starts: after this `(delegated_at, id)`.
pub type Cursor = (NaiveDateTime, String);

/// Which delegations [`list`] reads.
#[derive(Debug, Clone, Copy)]
pub enum Listing<'a> {
    /// Every delegation of a task.
    OfTask(&'a str),
    /// The pending delegations sent to an instance.
    PendingFor(&'a str),
}

/// Inserts a new delegation.
pub async fn insert(conn: &mut Conn, delegation: &Delegation) -> QueryResult<()> {
    with_conn!(conn, |c| diesel::insert_into(td::table)
        .values(delegation)
        .execute(c)
        .await
        .map(drop))
}

/// Reads one delegation.
pub async fn find(conn: &mut Conn, id: &str) -> QueryResult<Option<Delegation>> {
    with_conn!(conn, |c| td::table
        .find(id)
        .select(Delegation::as_select())
        .first(c)
        .await
        .optional())
}

/// Lists delegations oldest first, after `after`, at most `limit`.
pub async fn list(
    conn: &mut Conn,
    listing: Listing<'_>,
    after: Option<&Cursor>,
    limit: i64,
) -> QueryResult<Vec<Delegation>> {
    with_conn!(conn, |c| {
        let mut query = td::table.select(Delegation::as_select()).into_boxed();
        query = match listing {
            Listing::OfTask(task_id) => query.filter(td::task_id.eq(task_id)),
            Listing::PendingFor(instance_id) => query
                .filter(td::target_instance_id.eq(instance_id))
                .filter(td::status.eq(DelegationStatus::Pending)),
        };
        if let Some((at, id)) = after {
            query = query.filter(
                td::delegated_at
                    .gt(at)
                    .or(td::delegated_at.eq(at).and(td::id.gt(id))),
            );
        }
        query
            .order((td::delegated_at, td::id))
            .limit(limit)
            .load(c)
            .await
    })
}

/// The task's pending delegation, if it has one.
pub async fn pending_of_task(conn: &mut Conn, task_id: &str) -> QueryResult<Option<String>> {
    with_conn!(conn, |c| td::table
        .filter(td::task_id.eq(task_id))
        .filter(td::status.eq(DelegationStatus::Pending))
        .select(td::id)
        .first(c)
        .await
        .optional())
}

/// The most recent accepted delegation that brought the task to `instance_id`.
pub async fn accepted_into(
    conn: &mut Conn,
    task_id: &str,
    instance_id: &str,
) -> QueryResult<Option<String>> {
    with_conn!(conn, |c| td::table
        .filter(td::task_id.eq(task_id))
        .filter(td::target_instance_id.eq(instance_id))
        .filter(td::status.eq(DelegationStatus::Accepted))
        .order((td::delegated_at.desc(), td::id.desc()))
        .select(td::id)
        .first(c)
        .await
        .optional())
}

/// An active (pending or accepted) hop of the same task that continues `parent_id`, if any.
pub async fn active_child(
    conn: &mut Conn,
    parent_id: &str,
    task_id: &str,
) -> QueryResult<Option<Delegation>> {
    with_conn!(conn, |c| td::table
        .filter(td::parent_delegation_id.eq(parent_id))
        .filter(td::task_id.eq(task_id))
        .filter(td::status.eq_any(DelegationStatus::ACTIVE))
        .select(Delegation::as_select())
        .first(c)
        .await
        .optional())
}

/// Applies `change` to those of `ids` whose status is one of `from` (a compare-and-set), and
/// returns the rows it changed, in no particular order.
pub async fn update(
    conn: &mut Conn,
    ids: &[&str],
    from: &[DelegationStatus],
    change: &Change<'_>,
) -> QueryResult<Vec<Delegation>> {
    with_conn!(conn, |c| diesel::update(td::table)
        .filter(td::id.eq_any(ids))
        .filter(td::status.eq_any(from))
        .set(change)
        .returning(Delegation::as_returning())
        .get_results(c)
        .await)
}

/// Walks up the parent links from an anchor row within one task. `{anchor}` selects the row.
const CHAIN_UP: &str = "
    WITH RECURSIVE chain AS (
        SELECT d.*, 0 AS depth FROM task_delegations d WHERE d.id = ({anchor})
        UNION ALL
        SELECT p.*, c.depth + 1
        FROM task_delegations p JOIN chain c
          ON p.id = c.parent_delegation_id AND p.task_id = c.task_id
    )
    SELECT * FROM chain ORDER BY depth {order}";

/// The delegation and the hops of the same task it continues, nearest first, in one query.
pub async fn lineage(conn: &mut Conn, id: &str) -> QueryResult<Vec<Delegation>> {
    let sql = CHAIN_UP.replace("{anchor}", "$1").replace("{order}", "ASC");
    with_conn!(conn, |c| diesel::sql_query(&sql)
        .bind::<Text, _>(id)
        .load(c)
        .await)
}

/// The task's current chain, origin first, in one query: from its latest live (pending,
/// accepted or completed) delegation up through the hops it continues.
pub async fn current_chain(conn: &mut Conn, task_id: &str) -> QueryResult<Vec<Delegation>> {
    let latest = "SELECT l.id FROM task_delegations l
                  WHERE l.task_id = $1 AND l.status IN ('pending', 'accepted', 'completed')
                  ORDER BY l.delegated_at DESC, l.id DESC LIMIT 1";
    let sql = CHAIN_UP
        .replace("{anchor}", latest)
        .replace("{order}", "DESC");
    with_conn!(conn, |c| diesel::sql_query(&sql)
        .bind::<Text, _>(task_id)
        .load(c)
        .await)
}

/// Every active delegation below `id` along parent links (into subtasks too), nearest first,
/// in one query.
pub async fn active_below(conn: &mut Conn, id: &str) -> QueryResult<Vec<Delegation>> {
    const BELOW: &str = "
        WITH RECURSIVE below AS (
            SELECT d.*, 1 AS depth FROM task_delegations d WHERE d.parent_delegation_id = $1
            UNION ALL
            SELECT d.*, b.depth + 1
            FROM task_delegations d JOIN below b ON d.parent_delegation_id = b.id
        )
        SELECT * FROM below WHERE status IN ('pending', 'accepted')
        ORDER BY depth, delegated_at, id";
    with_conn!(conn, |c| diesel::sql_query(BELOW)
        .bind::<Text, _>(id)
        .load(c)
        .await)
}
