//! The `tasks` table.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::{Conn, schema::tasks, with_conn};
use crate::domain::TaskStatus;

/// One task.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable)]
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

/// Reads a task and locks its row until the transaction ends, so that every change to a task
/// and its delegations is serialised (PostgreSQL takes a row lock; SQLite's `BEGIN IMMEDIATE`
/// already holds the write lock). `None` if there is no such task.
pub async fn lock(conn: &mut Conn, id: &str) -> QueryResult<Option<Task>> {
    // A no-op UPDATE rather than `SELECT … FOR UPDATE`, which SQLite does not have.
    with_conn!(conn, |c| diesel::update(tasks::table.find(id))
        .set(tasks::updated_at.eq(tasks::updated_at))
        .returning(Task::as_returning())
        .get_result(c)
        .await
        .optional())
}

/// Like [`lock`], for the task of a delegation; `None` if there is no such delegation.
pub async fn lock_by_delegation(conn: &mut Conn, delegation_id: &str) -> QueryResult<Option<Task>> {
    use super::schema::task_delegations as td;
    let task_id = td::table
        .find(delegation_id)
        .select(td::task_id)
        .single_value();
    with_conn!(conn, |c| diesel::update(tasks::table)
        .filter(tasks::id.nullable().eq(task_id))
        .set(tasks::updated_at.eq(tasks::updated_at))
        .returning(Task::as_returning())
        .get_result(c)
        .await
        .optional())
}

/// Moves a task to another instance.
pub async fn move_to(
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
