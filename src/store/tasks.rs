//! The `tasks` table.

use chrono::NaiveDateTime;
use diesel::{
    prelude::*,
    sql_types::{BigInt, Nullable, Text, Timestamp},
};
use diesel_async::RunQueryDsl;

use std::sync::LazyLock;

use super::{
    Bind, Conn, Cursor, literals,
    schema::tasks,
    sql,
    sql::{PG_CLOCK, SQLITE_CLOCK},
    with_conn,
};
use crate::domain::{DelegationStatus, InstanceStatus, TaskStatus};

/// One task.
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
#[diesel(table_name = tasks)]
pub struct Task {
    /// Unique id.
    pub id: String,
    /// Short title.
    pub title: String,
    /// Longer description.
    pub description: String,
    /// The instance that holds the task now.
    pub instance_id: String,
    /// The task this one is a subtask of.
    pub parent_task_id: Option<String>,
    /// Status.
    pub status: TaskStatus,
    /// Outcome, once done.
    pub result: Option<serde_json::Value>,
    /// When it was created.
    pub created_at: NaiveDateTime,
    /// When it last changed.
    pub updated_at: NaiveDateTime,
}

/// Inserts a new task.
pub async fn insert(conn: &mut Conn, task: &Task) -> QueryResult<()> {
    with_conn!(conn, |c| diesel::insert_into(tasks::table)
        .values(task)
        .execute(c)
        .await
        .map(drop))
}

/// Reads one task.
pub async fn find(conn: &mut Conn, id: &str) -> QueryResult<Option<Task>> {
    with_conn!(conn, |c| tasks::table
        .find(id)
        .select(Task::as_select())
        .first(c)
        .await
        .optional())
}

/// Locks the task's family — the root of its subtask tree — until the transaction ends, then
/// reads the task. Every change to a task, its subtasks or their delegations takes this lock
/// first, so the writers of one family run one after another and, with one lock per family,
/// cannot deadlock. `None` if there is no such task.
///
/// On PostgreSQL that is a row lock on the root. A SQLite transaction holds the database's
/// write lock from its `BEGIN IMMEDIATE`, which serialises every writer already, so nothing is
/// sent for the lock there.
pub(crate) async fn lock_family(conn: &mut Conn, id: &str) -> QueryResult<Option<Task>> {
    if !lock(conn, id).await? {
        return Ok(None);
    }
    find(conn, id).await
}

/// [`lock_family`] without reading the task. `false` if there is certainly no such task; on
/// SQLite always `true` (nothing is sent), so the reads that follow must find the task.
pub async fn lock(conn: &mut Conn, id: &str) -> QueryResult<bool> {
    lock_root(conn, "$1", id).await
}

/// [`lock`] of the delegation's task, in one statement. A delegation's task never changes, so
/// it is safe to look it up in the same statement; anything that can change is read
/// afterwards, under the lock. `false` if there is certainly no such delegation; on SQLite
/// always `true`.
pub(crate) async fn lock_family_of_delegation(
    conn: &mut Conn,
    delegation_id: &str,
) -> QueryResult<bool> {
    const TASK_OF: &str = "(SELECT task_id FROM task_delegations WHERE id = $1)";
    lock_root(conn, TASK_OF, delegation_id).await
}

/// [`lock_family_of_delegation`] for many delegations in one statement (the expiry sweeper's
/// chunks). Every lock is a row lock on a root task, taken by one UPDATE.
pub(crate) async fn lock_families_of_delegations(conn: &mut Conn, ids: &[&str]) -> QueryResult<()> {
    if matches!(conn, Conn::Sqlite(_)) {
        return Ok(());
    }
    let tasks_of = format!(
        "(SELECT task_id FROM task_delegations WHERE {})",
        super::is_member(conn, "id", "$1")
    );
    // Roots locked in id order (FOR NO KEY UPDATE conflicts with the no-op UPDATE of
    // `lock_root`), so that two sweepers locking overlapping chunks cannot deadlock.
    let text = format!(
        "WITH RECURSIVE up (id, parent_task_id) AS (
             SELECT id, parent_task_id FROM tasks WHERE id IN {tasks_of}
             UNION ALL
             SELECT t.id, t.parent_task_id FROM tasks t JOIN up ON t.id = up.parent_task_id
         )
         SELECT id FROM tasks WHERE id IN (SELECT id FROM up WHERE parent_task_id IS NULL)
         ORDER BY id FOR NO KEY UPDATE"
    );
    let keys = serde_json::to_string(ids).unwrap_or_default();
    with_conn!(conn, |c| sql(&text).bind::<Text, _>(&keys).execute(c).await)?;
    Ok(())
}

/// Locks the roots of task families: `{start}` names the tasks whose families.
/// A no-op UPDATE rather than `SELECT … FOR UPDATE`, so that the statement reads the same as
/// the other writes (and would run on SQLite too).
const LOCK_ROOT: &str = "
    WITH RECURSIVE up (id, parent_task_id) AS (
        SELECT id, parent_task_id FROM tasks WHERE id = {start}
        UNION ALL
        SELECT t.id, t.parent_task_id FROM tasks t JOIN up ON t.id = up.parent_task_id
    )
    UPDATE tasks SET updated_at = updated_at
    WHERE id IN (SELECT id FROM up WHERE parent_task_id IS NULL)";

/// Moves tasks back to `instance_id` (expired hops' tasks to their common source): one
/// statement.
pub(crate) async fn move_all_to(
    conn: &mut Conn,
    ids: &[&str],
    instance_id: &str,
    now: NaiveDateTime,
) -> QueryResult<()> {
    let text = format!(
        "UPDATE tasks SET instance_id = $1, updated_at = $2 WHERE {}",
        super::is_member(conn, "id", "$3")
    );
    let keys = serde_json::to_string(ids).unwrap_or_default();
    with_conn!(conn, |c| sql(&text)
        .bind::<Text, _>(instance_id)
        .bind::<Timestamp, _>(now)
        .bind::<Text, _>(&keys)
        .execute(c)
        .await)?;
    Ok(())
}

/// Locks the root of the family of the task `start` selects (with `$1` bound to `key`).
async fn lock_root(conn: &mut Conn, start: &'static str, key: &str) -> QueryResult<bool> {
    if matches!(conn, Conn::Sqlite(_)) {
        return Ok(true); // BEGIN IMMEDIATE holds the write lock
    }
    let text = LOCK_ROOT.replace("{start}", start);
    let locked = with_conn!(conn, |c| sql(&text).bind::<Text, _>(key).execute(c).await)?;
    Ok(locked > 0)
}

/// What the rules read about a task before changing it, in one statement, under the family
/// lock: for a new hop (`domain::lifecycle::check_new_hop`) or a completion where it is
/// (`check_local_completion`).
#[derive(Debug, QueryableByName)]
pub struct TaskSnapshot {
    /// The task.
    #[diesel(embed)]
    pub task: Task,
    /// Its pending delegation, if it has one.
    #[diesel(sql_type = Nullable<Text>)]
    pub pending_delegation: Option<String>,
    /// The latest accepted delegation of the task into the instance asked about (by default
    /// where it is): the hop that brought it there.
    #[diesel(sql_type = Nullable<Text>)]
    pub arrival: Option<String>,
    /// The same for its parent task, if it is a subtask.
    #[diesel(sql_type = Nullable<Text>)]
    pub parent_arrival: Option<String>,
    /// How many of its subtasks are not finished.
    #[diesel(sql_type = BigInt)]
    pub open_subtasks: i64,
    /// The run state of the target instance asked about; `None` if none was, or if there is no
    /// such instance.
    #[diesel(sql_type = Nullable<Text>)]
    pub target_status: Option<InstanceStatus>,
    /// The `complete_by` of the hop that [`Self::arrival`] names, or else of
    /// [`Self::parent_arrival`]: the deadline a new hop from here is capped by.
    #[diesel(sql_type = Nullable<Timestamp>)]
    pub arrival_complete_by: Option<NaiveDateTime>,
    /// When the lease of the target instance asked about lapses (or lapsed).
    #[diesel(sql_type = Nullable<Timestamp>)]
    pub target_lease_expires_at: Option<NaiveDateTime>,
    /// The database's clock when the snapshot was read.
    #[diesel(sql_type = Timestamp)]
    pub db_now: NaiveDateTime,
}

/// Reads a [`TaskSnapshot`]: arrivals into `at` (`None`: where the task is), and the status of
/// `target`, if given. `None` if there is no such task.
pub async fn snapshot(
    conn: &mut Conn,
    id: &str,
    at: Option<&str>,
    target: Option<&str>,
) -> QueryResult<Option<TaskSnapshot>> {
    fn text(clock: &str) -> String {
        let accepted = literals(&[DelegationStatus::Accepted.as_str()]);
        // The latest accepted hop of `task` into the instance asked about.
        let arrival = |column: &str, task: &str| {
            format!(
                "(SELECT d.{column} FROM task_delegations d
                  WHERE d.task_id = {task} AND d.target_instance_id = COALESCE($2, t.instance_id)
                    AND d.status = {accepted}
                  ORDER BY d.delegated_at DESC, d.id DESC LIMIT 1)"
            )
        };
        format!(
            "SELECT t.*,
                (SELECT d.id FROM task_delegations d
                 WHERE d.task_id = t.id AND d.status = {pending} LIMIT 1) AS pending_delegation,
                {own} AS arrival,
                {parent} AS parent_arrival,
                (SELECT COUNT(*) FROM tasks s
                 WHERE s.parent_task_id = t.id AND s.status NOT IN ({finished})) AS open_subtasks,
                (SELECT i.status FROM hopper_instances i WHERE i.id = $3) AS target_status,
                CASE WHEN {own} IS NOT NULL THEN {own_by} ELSE {parent_by} END
                    AS arrival_complete_by,
                (SELECT i.lease_expires_at FROM hopper_instances i WHERE i.id = $3)
                    AS target_lease_expires_at,
                {clock} AS db_now
            FROM tasks t WHERE t.id = $1",
            pending = literals(&[DelegationStatus::Pending.as_str()]),
            own = arrival("id", "t.id"),
            parent = arrival("id", "t.parent_task_id"),
            own_by = arrival("complete_by", "t.id"),
            parent_by = arrival("complete_by", "t.parent_task_id"),
            finished = literals(&TaskStatus::FINAL.map(TaskStatus::as_str)),
        )
    }
    static PG: LazyLock<String> = LazyLock::new(|| text(PG_CLOCK));
    static SQLITE: LazyLock<String> = LazyLock::new(|| text(SQLITE_CLOCK));
    let snapshot = match conn {
        Conn::Pg(_) => &PG,
        Conn::Sqlite(_) => &SQLITE,
    };
    with_conn!(conn, |c| sql(snapshot)
        .bind::<Text, _>(id)
        .bind::<Nullable<Text>, _>(at)
        .bind::<Nullable<Text>, _>(target)
        .get_result(c)
        .await
        .optional())
}

/// The direct subtasks of a task, oldest first, after `after`, at most `limit`.
pub async fn children(
    conn: &mut Conn,
    parent_id: &str,
    after: Option<&Cursor>,
    limit: i64,
) -> QueryResult<Vec<Task>> {
    with_conn!(conn, |c| {
        let mut query = tasks::table
            .filter(tasks::parent_task_id.eq(parent_id))
            .select(Task::as_select())
            .into_boxed();
        if let Some((at, id)) = after {
            query = query.filter(
                tasks::created_at
                    .gt(at)
                    .or(tasks::created_at.eq(at).and(tasks::id.gt(id))),
            );
        }
        query
            .order((tasks::created_at, tasks::id))
            .limit(limit)
            .load(c)
            .await
    })
}

/// Cancels every unfinished task below `root` in the subtask tree, at any depth, whose branch
/// was created at or after `since`; returns them.
pub(crate) async fn cancel_below(
    conn: &mut Conn,
    root: &str,
    since: NaiveDateTime,
    now: NaiveDateTime,
) -> QueryResult<Vec<Task>> {
    static CANCEL_BELOW: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH RECURSIVE below (id) AS (
                SELECT id FROM tasks WHERE parent_task_id = $1 AND created_at >= $2
                UNION ALL
                SELECT t.id FROM tasks t JOIN below b ON t.parent_task_id = b.id
            )
            UPDATE tasks SET status = {cancelled}, updated_at = $3
            WHERE id IN (SELECT id FROM below) AND status NOT IN ({finished})
            RETURNING *",
            cancelled = literals(&[TaskStatus::Cancelled.as_str()]),
            finished = literals(&TaskStatus::FINAL.map(TaskStatus::as_str)),
        )
    });
    with_conn!(conn, |c| sql(&CANCEL_BELOW)
        .bind::<Text, _>(root)
        .bind::<Timestamp, _>(since)
        .bind::<Timestamp, _>(now)
        .load(c)
        .await)
}

/// Sets a task's status.
pub async fn set_status(
    conn: &mut Conn,
    id: &str,
    status: TaskStatus,
    now: NaiveDateTime,
) -> QueryResult<Task> {
    with_conn!(conn, |c| diesel::update(tasks::table.find(id))
        .set((tasks::status.eq(status), tasks::updated_at.eq(now)))
        .returning(Task::as_returning())
        .get_result(c)
        .await)
}

/// Moves a task to another instance.
pub(crate) async fn move_to(
    conn: &mut Conn,
    id: &str,
    instance_id: &str,
    now: NaiveDateTime,
) -> QueryResult<Task> {
    with_conn!(conn, |c| diesel::update(tasks::table.find(id))
        .set((
            tasks::instance_id.eq(instance_id),
            tasks::updated_at.eq(now)
        ))
        .returning(Task::as_returning())
        .get_result(c)
        .await)
}

/// Marks a task done with its result, back at `instance_id`.
pub async fn finish(
    conn: &mut Conn,
    id: &str,
    instance_id: &str,
    result: Option<&serde_json::Value>,
    now: NaiveDateTime,
) -> QueryResult<Task> {
    with_conn!(conn, |c| diesel::update(tasks::table.find(id))
        .set((
            tasks::status.eq(TaskStatus::Done),
            tasks::result.eq(result),
            tasks::instance_id.eq(instance_id),
            tasks::updated_at.eq(now),
        ))
        .returning(Task::as_returning())
        .get_result(c)
        .await)
}
