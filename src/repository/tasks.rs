//! Tasks: creating them (and subtasks, under the rules of `lifecycle::check_new_subtask`),
//! reading them, and completing or cancelling one where it is, through the machinery shared
//! with the delegation operations (`completion.rs`).

use std::collections::HashSet;

use chrono::DateTime;
use diesel::result::{DatabaseErrorKind, Error::DatabaseError};

use super::{
    Page, PageRequest,
    access::{self, Action},
    completion::{cancel_in, complete_in, complete_parents, finish_in_place, return_tasks},
    decode_cursor,
    delegations::Cancellation,
    encode_cursor, new_id, remember, replay, taken,
};
use crate::{
    auth::Caller,
    domain::{
        DelegationStatus, TaskStatus,
        lifecycle::{self, LocalCompletion, NewSubtask, Transition},
    },
    error::Error,
    store::{
        Conn, Db,
        delegations::{self, Change, Delegation, Tree},
        event_log::{self, NewEvent},
        instances, now,
        tasks::{self, Task},
    },
};

/// What a local completion changed.
#[derive(Debug, Clone)]
pub struct TaskCompletion {
    /// The task, DONE.
    pub task: Task,
    /// The delegations that completed with it (the one that brought it, those that one bubbled
    /// to, and those of parents it completed), nearest first.
    pub completed_delegations: Vec<Delegation>,
}

/// What cancelling a task changed.
#[derive(Debug, Clone)]
pub struct TaskCancellation {
    /// The task, CANCELLED.
    pub task: Task,
    /// Every delegation cancelled with it, its own and its subtasks'.
    pub cancelled_delegations: Vec<Delegation>,
    /// Its unfinished subtasks, at any depth, now cancelled.
    pub cancelled_subtasks: Vec<Task>,
}

/// A validated CreateTask request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewTask {
    /// Makes the request idempotent: a retry with the same id returns the original result.
    pub request_id: Option<String>,
    /// Caller-chosen id; `None` for a generated one.
    pub id: Option<String>,
    /// Short title.
    pub title: String,
    /// Longer description.
    pub description: String,
    /// Where the task starts; may be left out for a subtask.
    pub instance_id: Option<String>,
    /// The task this one is a subtask of.
    pub parent_task_id: Option<String>,
}

/// Creates a task, PENDING, at its instance. A subtask is created where its parent task is,
/// and only while the parent is not finished. Where a subtask's parent is decides who may
/// create it, so the parent's family is locked before the rule is asked: the parent cannot
/// move away between the check and the insert.
pub async fn create(db: &Db, caller: &Caller, new: NewTask) -> Result<Task, Error> {
    if let (None, None, Some(at)) = (&new.parent_task_id, &new.request_id, &new.instance_id) {
        // A task at the top of its own family, created once: one INSERT, which the instance's
        // foreign key checks.
        let (mut conn, _turn) = db.conn_for_write().await?;
        let action = Action::CreateTask {
            at,
            subtask_of: None,
        };
        access::authorize(&mut conn, caller, action).await?;
        let task = new_task(&new, at.clone());
        tasks::insert(&mut conn, &task)
            .await
            .map_err(|err| match err {
                DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _) => {
                    Error::not_found("instance", at)
                }
                err => taken("task", &task.id)(err),
            })?;
        return Ok(task);
    }
    db.write(async |tx| {
        let parent = match &new.parent_task_id {
            Some(parent_id) => Some(
                tasks::lock_family(tx, parent_id)
                    .await?
                    .ok_or_else(|| Error::not_found("parent task", parent_id))?,
            ),
            None => None,
        };
        // Where the task is created: a subtask where its parent task is.
        let instance_id = match (&parent, &new.instance_id) {
            (Some(parent), _) => parent.instance_id.clone(),
            (None, Some(id)) => id.clone(),
            (None, None) => return Err(Error::invalid("instance_id", "is required")),
        };
        let action = Action::CreateTask {
            at: &instance_id,
            subtask_of: new.parent_task_id.as_deref(),
        };
        access::authorize(tx, caller, action).await?;
        let request_id = new.request_id.as_deref();
        if let Some(original) = replay(tx, request_id, "CreateTask", &new).await? {
            return Ok(original);
        }
        match &parent {
            Some(parent) => {
                // A finished parent is refused before anything else is read.
                let pending = if parent.status.is_final() {
                    None
                } else {
                    delegations::pending_of_task(tx, &parent.id).await?
                };
                lifecycle::check_new_subtask(&NewSubtask {
                    parent_id: &parent.id,
                    parent_status: parent.status,
                    parent_at: &instance_id,
                    pending_delegation: pending.as_deref(),
                    wanted_at: new.instance_id.as_deref(),
                })?;
            }
            None => {
                if instances::find(tx, &instance_id).await?.is_none() {
                    return Err(Error::not_found("instance", instance_id));
                }
            }
        }
        let task = new_task(&new, instance_id);
        tasks::insert(tx, &task)
            .await
            .map_err(taken("task", &task.id))?;
        remember(tx, request_id, &task).await?;
        Ok(task)
    })
    .await
}

/// The task `new` asks for, PENDING at `instance_id`.
fn new_task(new: &NewTask, instance_id: String) -> Task {
    let at = now();
    Task {
        id: new.id.clone().unwrap_or_else(new_id),
        title: new.title.clone(),
        description: new.description.clone(),
        instance_id,
        parent_task_id: new.parent_task_id.clone(),
        status: TaskStatus::Pending,
        result: None,
        created_at: at,
        updated_at: at,
    }
}

/// Reads one task.
pub async fn get(db: &Db, caller: &Caller, id: &str) -> Result<Task, Error> {
    let mut conn = db.conn().await?;
    access::authorize(&mut conn, caller, Action::ReadTask(id)).await?;
    tasks::find(&mut conn, id)
        .await?
        .ok_or_else(|| Error::not_found("task", id))
}

/// Lists the direct subtasks of a task, oldest first.
pub async fn list_subtasks(
    db: &Db,
    caller: &Caller,
    id: &str,
    page: &PageRequest,
) -> Result<Page<Task>, Error> {
    let after = decode_cursor(&page.token)?;
    let mut conn = db.conn().await?;
    access::authorize(&mut conn, caller, Action::ReadTask(id)).await?;
    if tasks::find(&mut conn, id).await?.is_none() {
        return Err(Error::not_found("task", id));
    }
    let limit = i64::try_from(page.size + 1).unwrap_or(i64::MAX);
    let rows = tasks::children(&mut conn, id, after.as_ref(), limit).await?;
    Ok(Page::cut(rows, page.size, |t| {
        encode_cursor(&(t.created_at, t.id.clone()))
    }))
}

/// Reads a task, every task below it and all their delegations, in one query.
pub async fn tree(db: &Db, caller: &Caller, id: &str) -> Result<Tree, Error> {
    let mut conn = db.conn().await?;
    access::authorize(&mut conn, caller, Action::ReadTask(id)).await?;
    let tree = delegations::tree(&mut conn, id).await?;
    if tree.tasks.is_empty() {
        return Err(Error::not_found("task", id));
    }
    Ok(tree)
}

/// Completes a task where it is. Refused while it is on its way somewhere (a pending
/// delegation) or has open subtasks. If it arrived by a delegation, that delegation completes
/// and bubbles exactly as CompleteDelegation does; otherwise the task is DONE in place. Either
/// way, a parent whose last open subtask this was completes too. `caller` must be where the
/// task is: checked under the task's lock, so that the task cannot move on between the check
/// and the completion.
pub async fn complete(
    db: &Db,
    caller: &Caller,
    id: &str,
    result: Option<&serde_json::Value>,
) -> Result<TaskCompletion, Error> {
    db.write(async |conn| {
        if !tasks::lock(conn, id).await? {
            return Err(Error::not_found("task", id));
        }
        let snapshot = tasks::snapshot(conn, id, None, None)
            .await?
            .ok_or_else(|| Error::not_found("task", id))?;
        let task = snapshot.task;
        // A late worker: the task left it because its hop expired. Told so, not just refused.
        if let Caller::Instance(me) = caller
            && task.instance_id != *me
            && let Some(hop) = delegations::latest_to(conn, id, me).await?
            && let Some(expiry) = hop.expiry()
        {
            Transition::Complete.check(&hop.id, hop.status, Some(expiry))?;
        }
        access::authorize(conn, caller, Action::CompleteTask(&task)).await?;
        lifecycle::check_local_completion(&LocalCompletion {
            task_id: id,
            status: task.status,
            pending_delegation: snapshot.pending_delegation.as_deref(),
            open_subtasks: usize::try_from(snapshot.open_subtasks).unwrap_or(usize::MAX),
        })?;
        match snapshot.arrival {
            Some(arrival) => {
                let done = complete_in(conn, &arrival, result, None).await?;
                let mut completed_delegations = vec![done.delegation];
                completed_delegations.extend(done.completed_ancestors);
                Ok(TaskCompletion {
                    task: done.task,
                    completed_delegations,
                })
            }
            None => {
                let task = finish_in_place(conn, &task, result).await?;
                let mut completed_delegations = Vec::new();
                complete_parents(conn, &task, None, &mut completed_delegations).await?;
                Ok(TaskCompletion {
                    task,
                    completed_delegations,
                })
            }
        }
    })
    .await
}

/// Cancels a task: its active delegations (cascading down its chain and into its subtasks),
/// and every unfinished subtask at any depth, with one event per cancelled delegation. A
/// parent whose last open subtask this was completes with the others' results.
pub async fn cancel(db: &Db, caller: &Caller, id: &str) -> Result<TaskCancellation, Error> {
    db.write(async |conn| {
        access::authorize(conn, caller, Action::CancelTask(id)).await?;
        let task = locked(conn, id).await?;
        lifecycle::check_unfinished(id, task.status)?;
        let chain = delegations::current_chain(conn, id).await?;
        let mut cancelled_delegations = Vec::new();
        let mut cancelled_subtasks = Vec::new();
        let mut cause = None;
        if let Some(active) = chain.iter().find(|d| d.status.is_active()) {
            let Cancellation {
                delegation,
                cancelled_descendants,
                cancelled_subtasks: subs,
                ..
            } = cancel_in(conn, active, None).await?;
            cause = Some(delegation.id.clone());
            cancelled_delegations.push(delegation);
            cancelled_delegations.extend(cancelled_descendants);
            cancelled_subtasks.extend(subs);
        }
        let at = now();
        let rest = tasks::cancel_below(conn, id, DateTime::UNIX_EPOCH.naive_utc(), at).await?;
        let rest_ids: Vec<&str> = rest.iter().map(|t| t.id.as_str()).collect();
        if !rest_ids.is_empty() {
            let change = Change {
                status: Some(DelegationStatus::Cancelled),
                ..Change::at(at)
            };
            let hops =
                delegations::update_of_tasks(conn, &rest_ids, &DelegationStatus::ACTIVE, &change)
                    .await?;
            let log: Vec<_> = hops
                .iter()
                .map(|hop| {
                    NewEvent::of(
                        crate::domain::EventKind::DelegationCancelled,
                        hop,
                        cause.as_deref(),
                    )
                })
                .collect();
            event_log::append(conn, &log).await?;
            return_tasks(conn, &hops, HashSet::new(), at).await?;
            cancelled_delegations.extend(hops);
        }
        cancelled_subtasks.extend(rest);
        let task = tasks::set_status(conn, id, TaskStatus::Cancelled, at).await?;
        complete_parents(conn, &task, None, &mut Vec::new()).await?;
        Ok(TaskCancellation {
            task,
            cancelled_delegations,
            cancelled_subtasks,
        })
    })
    .await
}

/// Locks the task's family and reads the task.
async fn locked(conn: &mut Conn, id: &str) -> Result<Task, Error> {
    tasks::lock_family(conn, id)
        .await?
        .ok_or_else(|| Error::not_found("task", id))
}
