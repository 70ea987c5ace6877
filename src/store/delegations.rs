//! The `task_delegations` table, including the recursive walks along parent links.

use chrono::NaiveDateTime;
use diesel::{
    prelude::*,
    sql_types::{BigInt, Jsonb, Nullable, Text, Timestamp},
};
use diesel_async::RunQueryDsl;

use std::sync::LazyLock;

use super::{
    Bind, Conn, Cursor, is_member, literals, schema::task_delegations as td, sql, with_conn,
};
use crate::domain::{
    DelegationDirection, DelegationStatus, DelegationType, ExpiryReason, TaskStatus,
    lifecycle::Expiry,
};

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
    /// Unique id (a UUID v7, or the creator's choice).
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
    /// It must be accepted or rejected by then (the database's clock).
    #[serde(default)]
    pub accept_by: Option<NaiveDateTime>,
    /// It must complete by then.
    #[serde(default)]
    pub complete_by: Option<NaiveDateTime>,
    /// When it expired, or when the expiry of a hop above it cancelled it.
    #[serde(default)]
    pub expired_at: Option<NaiveDateTime>,
    /// Why it, or the hop above it, expired.
    #[serde(default)]
    pub expiry_reason: Option<ExpiryReason>,
}

impl Delegation {
    /// The expiry that ended it, if one did.
    pub fn expiry(&self) -> Option<Expiry> {
        Expiry::of(self.expired_at, self.expiry_reason)
    }
}

/// The columns a change sets; `None` leaves a column as it is.
#[derive(Debug, Clone, Copy)]
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
    /// Set when an expiry ends it.
    pub expired_at: Option<NaiveDateTime>,
    /// Set when an expiry ends it.
    pub expiry_reason: Option<ExpiryReason>,
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
            expired_at: None,
            expiry_reason: None,
            updated_at: now,
        }
    }
}

/// Which delegations [`list`] reads.
#[derive(Debug, Clone, Copy)]
pub enum Listing<'a> {
    /// Every delegation of a task.
    OfTask(&'a str),
    /// The pending delegations sent to an instance.
    PendingFor(&'a str),
    /// The delegations an instance sent or received (`None`: either) in one of `statuses`
    /// (empty: any).
    OfInstance {
        /// The instance.
        instance_id: &'a str,
        /// Which side of the delegations it is on.
        direction: Option<DelegationDirection>,
        /// The statuses to list.
        statuses: &'a [DelegationStatus],
    },
}

/// `task_delegations.status IN (…)`, with the statuses as literals (see [`super::literals`]).
fn status_in(
    statuses: &[DelegationStatus],
) -> diesel::expression::SqlLiteral<diesel::sql_types::Bool> {
    let texts: Vec<&'static str> = statuses.iter().map(|s| s.as_str()).collect();
    diesel::dsl::sql(&format!(
        "task_delegations.status IN ({})",
        literals(&texts)
    ))
}

/// `task_delegations.status = '<status>'`, with the status as a literal (see
/// [`super::literals`] for why not a parameter).
fn status_is(status: DelegationStatus) -> diesel::expression::SqlLiteral<diesel::sql_types::Bool> {
    diesel::dsl::sql(&format!(
        "task_delegations.status = {}",
        literals(&[status.as_str()])
    ))
}

/// The delegations with `instance_id` on `direction`'s side: their target, their source, or
/// (`None`) either.
fn on_side(
    instance_id: &str,
    direction: Option<DelegationDirection>,
) -> diesel::expression::SqlLiteral<
    diesel::sql_types::Bool,
    diesel::expression::UncheckedBind<
        diesel::expression::SqlLiteral<diesel::sql_types::Bool>,
        <String as diesel::expression::AsExpression<Text>>::Expression,
    >,
> {
    let columns = match direction {
        Some(DelegationDirection::Incoming) => " = task_delegations.target_instance_id",
        Some(DelegationDirection::Outgoing) => " = task_delegations.source_instance_id",
        None => " IN (task_delegations.source_instance_id, task_delegations.target_instance_id)",
    };
    diesel::dsl::sql::<diesel::sql_types::Bool>("")
        .bind::<Text, _>(instance_id.to_owned())
        .sql(columns)
}

/// Inserts a new delegation.
pub async fn insert(conn: &mut Conn, delegation: &Delegation) -> QueryResult<()> {
    with_conn!(conn, |c| diesel::insert_into(td::table)
        .values(delegation)
        .execute(c)
        .await
        .map(drop))
}

/// Reads the delegations of `ids` that exist, in no particular order: one statement.
pub(crate) async fn find_many(conn: &mut Conn, ids: &[&str]) -> QueryResult<Vec<Delegation>> {
    let text = format!(
        "SELECT * FROM task_delegations WHERE {}",
        is_member(conn, "id", "$1")
    );
    let keys = serde_json::to_string(ids).unwrap_or_default();
    with_conn!(conn, |c| sql(&text).bind::<Text, _>(&keys).load(c).await)
}

/// The latest hop of a task sent to `target`, if any.
pub(crate) async fn latest_to(
    conn: &mut Conn,
    task_id: &str,
    target: &str,
) -> QueryResult<Option<Delegation>> {
    with_conn!(conn, |c| td::table
        .filter(td::task_id.eq(task_id))
        .filter(td::target_instance_id.eq(target))
        .order((td::delegated_at.desc(), td::id.desc()))
        .select(Delegation::as_select())
        .first(c)
        .await
        .optional())
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
                .filter(status_is(DelegationStatus::Pending)),
            Listing::OfInstance {
                instance_id,
                direction,
                statuses,
            } => {
                query = query.filter(on_side(instance_id, direction));
                if statuses.is_empty() {
                    query
                } else {
                    query.filter(status_in(statuses))
                }
            }
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

/// How many of `instance_id`'s delegations on `direction`'s side (`None`: either) are in each
/// status; statuses with none are left out.
pub(crate) async fn count_by_status(
    conn: &mut Conn,
    instance_id: &str,
    direction: Option<DelegationDirection>,
) -> QueryResult<Vec<(DelegationStatus, i64)>> {
    with_conn!(conn, |c| td::table
        .filter(on_side(instance_id, direction))
        .group_by(td::status)
        .select((td::status, diesel::dsl::count_star()))
        .load(c)
        .await)
}

/// The task's pending delegation, if it has one.
pub(crate) async fn pending_of_task(conn: &mut Conn, task_id: &str) -> QueryResult<Option<String>> {
    with_conn!(conn, |c| td::table
        .filter(td::task_id.eq(task_id))
        .filter(status_is(DelegationStatus::Pending))
        .select(td::id)
        .first(c)
        .await
        .optional())
}

/// How many delegations each instance has waiting (PENDING) and in hand (ACCEPTED), as
/// `(target instance, status, count)`; instances with neither are left out.
pub(crate) async fn active_load(
    conn: &mut Conn,
) -> QueryResult<Vec<(String, DelegationStatus, i64)>> {
    with_conn!(conn, |c| td::table
        .filter(status_is(DelegationStatus::Pending).or(status_is(DelegationStatus::Accepted)))
        .group_by((td::target_instance_id, td::status))
        .select((
            td::target_instance_id,
            td::status,
            diesel::dsl::count_star()
        ))
        .load(c)
        .await)
}

/// The source of the task's first delegation: the instance it started from.
pub(crate) async fn first_source(conn: &mut Conn, task_id: &str) -> QueryResult<Option<String>> {
    with_conn!(conn, |c| td::table
        .filter(td::task_id.eq(task_id))
        .order((td::delegated_at, td::id))
        .select(td::source_instance_id)
        .first(c)
        .await
        .optional())
}

/// The most recent accepted delegation that brought the task to `instance_id`.
pub(crate) async fn accepted_into(
    conn: &mut Conn,
    task_id: &str,
    instance_id: &str,
) -> QueryResult<Option<String>> {
    with_conn!(conn, |c| td::table
        .filter(td::task_id.eq(task_id))
        .filter(td::target_instance_id.eq(instance_id))
        .filter(status_is(DelegationStatus::Accepted))
        .order((td::delegated_at.desc(), td::id.desc()))
        .select(td::id)
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
    set(conn, "id", ids, from, change).await
}

/// Applies `change` to the delegations of `task_ids` whose status is one of `from`; returns
/// the rows it changed, oldest first.
pub(crate) async fn update_of_tasks(
    conn: &mut Conn,
    task_ids: &[&str],
    from: &[DelegationStatus],
    change: &Change<'_>,
) -> QueryResult<Vec<Delegation>> {
    let mut changed = set(conn, "task_id", task_ids, from, change).await?;
    changed.sort_by(|a, b| (a.delegated_at, &a.id).cmp(&(b.delegated_at, &b.id)));
    Ok(changed)
}

/// The compare-and-set behind [`update`] and [`update_of_tasks`]: one statement text whatever
/// the number of keys and statuses, so it stays prepared on every connection.
async fn set(
    conn: &mut Conn,
    key: &'static str,
    keys: &[&str],
    from: &[DelegationStatus],
    change: &Change<'_>,
) -> QueryResult<Vec<Delegation>> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    // SQLite, without statistics, prefers the status index to the key: with many pending hops
    // each compare-and-set scanned them all (45 ms at 100,000). `+status` keeps it off that
    // index; the key or task index finds the rows.
    let status = match conn {
        Conn::Pg(_) => "status",
        Conn::Sqlite(_) => "+status",
    };
    let text = format!(
        "UPDATE task_delegations SET
             status = COALESCE($1, status), accepted_at = COALESCE($2, accepted_at),
             completed_at = COALESCE($3, completed_at), result = COALESCE($4, result),
             rejection_reason = COALESCE($5, rejection_reason), notes = COALESCE($6, notes),
             expired_at = COALESCE($7, expired_at), expiry_reason = COALESCE($8, expiry_reason),
             updated_at = $9
         WHERE {} AND {status} IN ({})
         RETURNING *",
        is_member(conn, key, "$10"),
        literals(&from),
    );
    let keys = serde_json::to_string(keys).unwrap_or_default();
    with_conn!(conn, |c| sql(&text)
        .bind::<Nullable<Text>, _>(change.status)
        .bind::<Nullable<Timestamp>, _>(change.accepted_at)
        .bind::<Nullable<Timestamp>, _>(change.completed_at)
        .bind::<Nullable<Jsonb>, _>(change.result)
        .bind::<Nullable<Text>, _>(change.rejection_reason)
        .bind::<Nullable<Text>, _>(change.notes)
        .bind::<Nullable<Timestamp>, _>(change.expired_at)
        .bind::<Nullable<Text>, _>(change.expiry_reason)
        .bind::<Timestamp, _>(change.updated_at)
        .bind::<Text, _>(&keys)
        .load(c)
        .await)
}

/// The active hops whose accept or complete deadline has passed by the database's clock,
/// earliest deadline first, at most `limit` rows (a hop past both may come twice). Each half
/// reads its own partial index of due hops.
pub(crate) async fn due(conn: &mut Conn, limit: i64) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Due {
        #[diesel(sql_type = Text)]
        id: String,
    }
    let text = format!(
        "SELECT id FROM (
             SELECT id, accept_by AS due FROM task_delegations
             WHERE status = {pending} AND accept_by IS NOT NULL AND accept_by <= {now}
             UNION ALL
             SELECT id, complete_by AS due FROM task_delegations
             WHERE status IN ({active}) AND complete_by IS NOT NULL AND complete_by <= {now}
         ) AS due_hops
         ORDER BY due LIMIT $1",
        pending = literals(&[DelegationStatus::Pending.as_str()]),
        active = literals(&DelegationStatus::ACTIVE.map(DelegationStatus::as_str)),
        now = super::clock(conn),
    );
    let rows: Vec<Due> = with_conn!(conn, |c| sql(&text).bind::<BigInt, _>(limit).load(c).await)?;
    Ok(rows.into_iter().map(|row| row.id).collect())
}

/// The active hops sent to an instance whose lease has lapsed and not passed further down
/// (no active hop continues them), at most `limit`: candidates for an expiry for
/// unresponsiveness (the rules decide again under the lock). Work passed down is left out
/// here, so that it is not read again on every pass.
pub(crate) async fn at_unresponsive(conn: &mut Conn, limit: i64) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Hop {
        #[diesel(sql_type = Text)]
        id: String,
    }
    let text = format!(
        "SELECT d.id FROM task_delegations d
         WHERE d.status IN ({active}) AND d.target_instance_id IN (
             SELECT i.id FROM hopper_instances i
             WHERE i.lease_expires_at IS NOT NULL AND i.lease_expires_at <= {now})
           AND NOT EXISTS (SELECT 1 FROM task_delegations c
                           WHERE c.parent_delegation_id = d.id AND c.status IN ({active}))
         ORDER BY d.id LIMIT $1",
        active = literals(&DelegationStatus::ACTIVE.map(DelegationStatus::as_str)),
        now = super::clock(conn),
    );
    let rows: Vec<Hop> = with_conn!(conn, |c| sql(&text).bind::<BigInt, _>(limit).load(c).await)?;
    Ok(rows.into_iter().map(|row| row.id).collect())
}

/// The earliest deadline of any active hop (`None` if no active hop has one), and the
/// database's clock: two probes of the partial indexes of due hops.
pub(crate) async fn next_due(
    conn: &mut Conn,
) -> QueryResult<(Option<NaiveDateTime>, NaiveDateTime)> {
    #[derive(QueryableByName)]
    struct Next {
        #[diesel(sql_type = Nullable<Timestamp>)]
        accept: Option<NaiveDateTime>,
        #[diesel(sql_type = Nullable<Timestamp>)]
        complete: Option<NaiveDateTime>,
        #[diesel(sql_type = Timestamp)]
        now: NaiveDateTime,
    }
    let text = format!(
        "SELECT (SELECT MIN(accept_by) FROM task_delegations
                 WHERE status = {pending} AND accept_by IS NOT NULL) AS accept,
                (SELECT MIN(complete_by) FROM task_delegations
                 WHERE status IN ({active}) AND complete_by IS NOT NULL) AS complete,
                {now} AS now",
        pending = literals(&[DelegationStatus::Pending.as_str()]),
        active = literals(&DelegationStatus::ACTIVE.map(DelegationStatus::as_str)),
        now = super::clock(conn),
    );
    let next: Next = with_conn!(conn, |c| sql(&text).get_result(c).await)?;
    let earliest = match (next.accept, next.complete) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    };
    Ok((earliest, next.now))
}

/// The database's clock.
pub(crate) async fn clock_now(conn: &mut Conn) -> QueryResult<NaiveDateTime> {
    #[derive(QueryableByName)]
    struct Now {
        #[diesel(sql_type = Timestamp)]
        now: NaiveDateTime,
    }
    let text = format!("SELECT {} AS now", super::clock(conn));
    let now: Now = with_conn!(conn, |c| sql(&text).get_result(c).await)?;
    Ok(now.now)
}

/// What the completion rules read about a delegation, in one statement, under the family lock.
#[derive(Debug, Clone)]
pub(crate) struct CompletionSnapshot {
    /// The delegation and the hops of the same task it continues, nearest first.
    pub lineage: Vec<Delegation>,
    /// An active hop of the same task that continues the delegation: (id, status, target).
    pub active_child: Option<(String, DelegationStatus, String)>,
    /// How many subtasks of the task are not finished.
    pub open_subtasks: usize,
}

#[derive(QueryableByName)]
struct CompletionRow {
    #[diesel(embed)]
    delegation: Delegation,
    #[diesel(sql_type = Nullable<Text>)]
    child_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    child_status: Option<DelegationStatus>,
    #[diesel(sql_type = Nullable<Text>)]
    child_target: Option<String>,
    #[diesel(sql_type = BigInt)]
    open_subtasks: i64,
}

/// Reads a [`CompletionSnapshot`]; its lineage is empty if there is no such delegation.
pub(crate) async fn completion_snapshot(
    conn: &mut Conn,
    id: &str,
) -> QueryResult<CompletionSnapshot> {
    static TEXT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "{chain}
            SELECT chain.*, child.id AS child_id, child.status AS child_status,
                   child.target_instance_id AS child_target,
                   (SELECT COUNT(*) FROM tasks s
                    WHERE s.parent_task_id = (SELECT task_id FROM task_delegations WHERE id = $1)
                      AND s.status NOT IN ({finished})) AS open_subtasks
            FROM chain LEFT JOIN (
                SELECT c.id, c.status, c.target_instance_id FROM task_delegations c
                WHERE c.parent_delegation_id = $1 AND c.status IN ({active})
                  AND c.task_id = (SELECT task_id FROM task_delegations WHERE id = $1)
                LIMIT 1
            ) child ON 1 = 1
            ORDER BY depth ASC",
            chain = CHAIN.replace("{anchor}", "$1"),
            finished = literals(&TaskStatus::FINAL.map(TaskStatus::as_str)),
            active = literals(&DelegationStatus::ACTIVE.map(DelegationStatus::as_str)),
        )
    });
    let rows: Vec<CompletionRow> =
        with_conn!(conn, |c| sql(&TEXT).bind::<Text, _>(id).load(c).await)?;
    // `<[_]>::first`: diesel's `RunQueryDsl::first` would shadow the slice's.
    let (active_child, open_subtasks) = <[_]>::first(&rows).map_or((None, 0), |row| {
        let child = match (&row.child_id, row.child_status, &row.child_target) {
            (Some(id), Some(status), Some(target)) => Some((id.clone(), status, target.clone())),
            _ => None,
        };
        (child, usize::try_from(row.open_subtasks).unwrap_or(0))
    });
    Ok(CompletionSnapshot {
        lineage: rows.into_iter().map(|row| row.delegation).collect(),
        active_child,
        open_subtasks,
    })
}

/// Walks up the parent links from an anchor row within one task. `{anchor}` selects the row.
const CHAIN: &str = "
    WITH RECURSIVE chain AS (
        SELECT d.*, 0 AS depth FROM task_delegations d WHERE d.id = ({anchor})
        UNION ALL
        SELECT p.*, c.depth + 1
        FROM task_delegations p JOIN chain c
          ON p.id = c.parent_delegation_id AND p.task_id = c.task_id
    )";

/// The task's current chain, origin first, in one query: from its latest live (pending,
/// accepted or completed) delegation up through the hops it continues.
pub(crate) async fn current_chain(conn: &mut Conn, task_id: &str) -> QueryResult<Vec<Delegation>> {
    static TEXT: LazyLock<String> = LazyLock::new(|| {
        let latest = format!(
            "SELECT l.id FROM task_delegations l
             WHERE l.task_id = $1 AND l.status IN ({})
             ORDER BY l.delegated_at DESC, l.id DESC LIMIT 1",
            literals(&DelegationStatus::IN_CHAIN.map(DelegationStatus::as_str))
        );
        let chain = CHAIN.replace("{anchor}", &latest);
        format!("{chain} SELECT * FROM chain ORDER BY depth DESC")
    });
    with_conn!(conn, |c| sql(&TEXT).bind::<Text, _>(task_id).load(c).await)
}

/// Every active delegation below `id` along parent links (into subtasks too), nearest first,
/// in one query.
pub(crate) async fn active_below(conn: &mut Conn, id: &str) -> QueryResult<Vec<Delegation>> {
    static BELOW: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH RECURSIVE below AS (
                SELECT d.*, 1 AS depth FROM task_delegations d WHERE d.parent_delegation_id = $1
                UNION ALL
                SELECT d.*, b.depth + 1
                FROM task_delegations d JOIN below b ON d.parent_delegation_id = b.id
            )
            SELECT * FROM below WHERE status IN ({})
            ORDER BY depth, delegated_at, id",
            literals(&DelegationStatus::ACTIVE.map(DelegationStatus::as_str))
        )
    });
    with_conn!(conn, |c| sql(&BELOW).bind::<Text, _>(id).load(c).await)
}

/// One row of [`tree`]: a task of the family, and one of its delegations if it has any.
#[derive(Debug, QueryableByName)]
struct TreeRow {
    #[diesel(embed)]
    task: super::tasks::Task,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    d_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    d_parent_delegation_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    d_source_instance_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    d_target_instance_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    d_delegation_type: Option<DelegationType>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    d_status: Option<DelegationStatus>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamp>)]
    d_delegated_at: Option<NaiveDateTime>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamp>)]
    d_accepted_at: Option<NaiveDateTime>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamp>)]
    d_completed_at: Option<NaiveDateTime>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Jsonb>)]
    d_result: Option<serde_json::Value>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    d_rejection_reason: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    d_notes: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    d_delegated_by: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamp>)]
    d_created_at: Option<NaiveDateTime>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamp>)]
    d_updated_at: Option<NaiveDateTime>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamp>)]
    d_accept_by: Option<NaiveDateTime>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamp>)]
    d_complete_by: Option<NaiveDateTime>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamp>)]
    d_expired_at: Option<NaiveDateTime>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    d_expiry_reason: Option<ExpiryReason>,
}

impl TreeRow {
    fn delegation(&self) -> Option<Delegation> {
        Some(Delegation {
            id: self.d_id.clone()?,
            task_id: self.task.id.clone(),
            parent_delegation_id: self.d_parent_delegation_id.clone(),
            source_instance_id: self.d_source_instance_id.clone()?,
            target_instance_id: self.d_target_instance_id.clone()?,
            delegation_type: self.d_delegation_type?,
            status: self.d_status?,
            delegated_at: self.d_delegated_at?,
            accepted_at: self.d_accepted_at,
            completed_at: self.d_completed_at,
            result: self.d_result.clone(),
            rejection_reason: self.d_rejection_reason.clone(),
            notes: self.d_notes.clone(),
            delegated_by: self.d_delegated_by.clone(),
            created_at: self.d_created_at?,
            updated_at: self.d_updated_at?,
            accept_by: self.d_accept_by,
            complete_by: self.d_complete_by,
            expired_at: self.d_expired_at,
            expiry_reason: self.d_expiry_reason,
        })
    }
}

/// A task, every task below it in the subtask tree, and all their delegations.
#[derive(Debug, Clone, PartialEq)]
pub struct Tree {
    /// The task asked for first, then the others by depth, oldest first.
    pub tasks: Vec<super::tasks::Task>,
    /// Every delegation of those tasks, grouped by task in the same order, oldest first.
    pub delegations: Vec<Delegation>,
}

/// Reads the tree below a task in one query; empty if there is no such task.
pub async fn tree(conn: &mut Conn, task_id: &str) -> QueryResult<Tree> {
    const TREE: &str = "
        WITH RECURSIVE family (id, depth) AS (
            SELECT id, 0 FROM tasks WHERE id = $1
            UNION ALL
            SELECT t.id, f.depth + 1 FROM tasks t JOIN family f ON t.parent_task_id = f.id
        )
        SELECT t.*,
               d.id AS d_id, d.parent_delegation_id AS d_parent_delegation_id,
               d.source_instance_id AS d_source_instance_id,
               d.target_instance_id AS d_target_instance_id,
               d.delegation_type AS d_delegation_type, d.status AS d_status,
               d.delegated_at AS d_delegated_at, d.accepted_at AS d_accepted_at,
               d.completed_at AS d_completed_at, d.result AS d_result,
               d.rejection_reason AS d_rejection_reason, d.notes AS d_notes,
               d.delegated_by AS d_delegated_by, d.created_at AS d_created_at,
               d.updated_at AS d_updated_at, d.accept_by AS d_accept_by,
               d.complete_by AS d_complete_by, d.expired_at AS d_expired_at,
               d.expiry_reason AS d_expiry_reason
        FROM family f
        JOIN tasks t ON t.id = f.id
        LEFT JOIN task_delegations d ON d.task_id = t.id
        ORDER BY f.depth, t.created_at, t.id, d.delegated_at, d.id";
    let rows: Vec<TreeRow> =
        with_conn!(conn, |c| sql(TREE).bind::<Text, _>(task_id).load(c).await)?;
    let mut tree = Tree {
        tasks: Vec::new(),
        delegations: Vec::new(),
    };
    for row in rows {
        if let Some(delegation) = row.delegation() {
            tree.delegations.push(delegation);
        }
        if tree.tasks.last().is_none_or(|last| last.id != row.task.id) {
            tree.tasks.push(row.task);
        }
    }
    Ok(tree)
}
