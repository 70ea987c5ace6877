//! The completion and cancellation machinery that completing or cancelling a delegation and
//! completing or cancelling a task share, all under the task family's lock: completing a hop and
//! bubbling it up its task's chain, completing parent tasks from their subtasks, finishing a
//! task in place, cancelling a cascade, and sending cancelled tasks back.

use std::collections::HashSet;

use super::delegations::{Cancellation, Completion, transition};
use crate::{
    domain::{
        DelegationStatus, EventKind,
        lifecycle::{self, Completing, Expiry, Transition},
    },
    error::Error,
    store::{
        Conn, Tx,
        delegations::{self, Change, Delegation},
        event_log::{self, NewEvent},
        now,
        tasks::{self, Task},
    },
};

/// Completes delegation `id` (under its family's lock), bubbles up its task's chain, and then
/// keeps going up through parent tasks whose last open subtask this finished: each such parent
/// completes with the aggregated result, through the delegation that brought it to where it
/// is (bubbling on from there) or, if it is at its origin, in place.
pub(super) async fn complete_in(
    conn: &mut Tx,
    id: &str,
    result: Option<&serde_json::Value>,
    notes: Option<&str>,
) -> Result<Completion, Error> {
    let (delegation, mut completed_ancestors, finished) =
        complete_and_bubble(conn, id, result, notes, None).await?;
    let task = match finished {
        Some(task) => task,
        None => tasks::find(conn, &delegation.task_id)
            .await?
            .ok_or_else(|| Error::not_found("task", &delegation.task_id))?,
    };
    let cause = completed_ancestors.last().unwrap_or(&delegation).id.clone();
    complete_parents(conn, &task, Some(&cause), &mut completed_ancestors).await?;
    Ok(Completion {
        delegation,
        completed_ancestors,
        task,
    })
}

/// Completes one hop and the hops of the same task it bubbles to, as the rules in
/// [`lifecycle::check_completion`] allow them seen from one snapshot; returns the hop, the
/// bubbled hops nearest first, and the task if the completion reached its origin.
async fn complete_and_bubble(
    conn: &mut Tx,
    id: &str,
    result: Option<&serde_json::Value>,
    notes: Option<&str>,
    cause: Option<&str>,
) -> Result<(Delegation, Vec<Delegation>, Option<Task>), Error> {
    let snapshot = delegations::completion_snapshot(conn, id).await?;
    let Some(first) = snapshot.lineage.first() else {
        return Err(Error::not_found("delegation", id));
    };
    let task_id = first.task_id.clone();
    let chain: Vec<_> = snapshot
        .lineage
        .iter()
        .map(|d| (d.id.as_str(), d.status, d.delegation_type))
        .collect();
    let reach = lifecycle::check_completion(&Completing {
        task_id: &task_id,
        chain: &chain,
        expiry: first.expiry(),
        active_child: snapshot
            .active_child
            .as_ref()
            .map(|(child, status, target)| (child.as_str(), *status, target.as_str())),
        open_subtasks: snapshot.open_subtasks,
    })?;

    let at = now();
    let completed = Change {
        status: Some(DelegationStatus::Completed),
        completed_at: Some(at),
        result,
        ..Change::at(at)
    };
    let ids: Vec<&str> = chain[..=reach.ancestors].iter().map(|hop| hop.0).collect();
    let from = Transition::Complete.from();
    // One compare-and-set for the whole chain, unless the completed hop also takes notes.
    let mut changed = match notes {
        None => delegations::update(conn, &ids, from, &completed).await?,
        Some(_) => {
            let own = Change { notes, ..completed };
            let mut rows = delegations::update(conn, &ids[..1], from, &own).await?;
            if ids.len() > 1 {
                rows.extend(delegations::update(conn, &ids[1..], from, &completed).await?);
            }
            rows
        }
    };
    if changed.len() != ids.len() {
        return Err(Error::Internal(format!(
            "the chain of delegation {id} changed under the family lock"
        )));
    }
    changed = in_order(changed, &ids);
    let completed_ancestors = changed.split_off(1);
    let delegation = changed.remove(0);
    // One event per completed hop, each bubbled one naming the hop below it that caused it.
    let mut log = vec![NewEvent::of(
        EventKind::DelegationCompleted,
        &delegation,
        cause,
    )];
    let mut below = &delegation;
    for ancestor in &completed_ancestors {
        log.push(NewEvent::of(
            EventKind::DelegationCompleted,
            ancestor,
            Some(&below.id),
        ));
        below = ancestor;
    }
    let finished = if reach.task_done {
        log.push(NewEvent::task_completed(below));
        let origin = below.source_instance_id.as_str();
        Some(tasks::finish(conn, &task_id, origin, result, at).await?)
    } else {
        None
    };
    event_log::append(conn, &log).await?;
    Ok((delegation, completed_ancestors, finished))
}

/// After `task` finished (done or cancelled), completes its parent if that was the parent's
/// last open subtask, and so on up the subtask tree. Delegations completed on the way are
/// added to `completed`; `cause` is the hop whose completion set this off, if any.
pub(super) async fn complete_parents(
    conn: &mut Tx,
    task: &Task,
    cause: Option<&str>,
    completed: &mut Vec<Delegation>,
) -> Result<(), Error> {
    let mut cause = cause.map(str::to_owned);
    let mut parent_id = task.parent_task_id.clone();
    while let Some(id) = parent_id.take() {
        let parent = tasks::find(conn, &id)
            .await?
            .ok_or_else(|| Error::not_found("task", &id))?;
        // A finished parent stops the climb before anything else is read.
        let pending = if parent.status.is_final() {
            None
        } else {
            delegations::pending_of_task(conn, &id).await?
        };
        if !lifecycle::completes_from_subtasks(parent.status, pending.as_deref()) {
            break;
        }
        let subtasks = tasks::children(conn, &id, None, i64::MAX).await?;
        let outcomes = subtasks
            .iter()
            .map(|t| (t.id.as_str(), t.status, t.result.as_ref()));
        let Some(aggregated) = lifecycle::aggregate(outcomes) else {
            break;
        };
        let finished = match delegations::accepted_into(conn, &id, &parent.instance_id).await? {
            Some(hop) => {
                let (hop, bubbled, finished) =
                    complete_and_bubble(conn, &hop, Some(&aggregated), None, cause.as_deref())
                        .await?;
                cause = Some(bubbled.last().unwrap_or(&hop).id.clone());
                completed.push(hop);
                completed.extend(bubbled);
                finished
            }
            None => Some(finish_in_place(conn, &parent, Some(&aggregated)).await?),
        };
        parent_id = finished.and_then(|done| done.parent_task_id);
    }
    Ok(())
}

/// Sends each task of `hops` (cancelled, in cascade order) back to the source of its topmost
/// cancelled hop, except the tasks in `skip`.
pub(super) async fn return_tasks<'a>(
    conn: &mut Conn,
    hops: &'a [Delegation],
    mut skip: HashSet<&'a str>,
    at: chrono::NaiveDateTime,
) -> Result<(), Error> {
    for hop in hops {
        if skip.insert(hop.task_id.as_str()) {
            tasks::move_to(conn, &hop.task_id, &hop.source_instance_id, at).await?;
        }
    }
    Ok(())
}

/// Marks a task that holds no delegation DONE where it is.
pub(super) async fn finish_in_place(
    conn: &mut Tx,
    task: &Task,
    result: Option<&serde_json::Value>,
) -> Result<Task, Error> {
    let done = tasks::finish(conn, &task.id, &task.instance_id, result, now()).await?;
    event_log::append(conn, &[NewEvent::task_completed_in_place(&done)]).await?;
    Ok(done)
}

/// `delegations::cancel` under the family lock; with an `expiry`, the same for a hop whose
/// deadline passed: it ends EXPIRED instead of CANCELLED, and the hops it cancels below it
/// carry the expiry too (so that their late workers are told why).
pub(super) async fn cancel_in(
    conn: &mut Tx,
    delegation: &Delegation,
    expiry: Option<Expiry>,
) -> Result<Cancellation, Error> {
    let how = if expiry.is_some() {
        Transition::Expire
    } else {
        Transition::Cancel
    };
    how.check(&delegation.id, delegation.status, delegation.expiry())?;
    let at = now();
    let ended = Change {
        expired_at: expiry.map(|e| e.at),
        expiry_reason: expiry.map(|e| e.reason),
        ..Change::at(at)
    };
    let below = delegations::active_below(conn, &delegation.id).await?;
    let delegation = transition(conn, &delegation.id, how, ended, None).await?;
    let ids: Vec<&str> = below.iter().map(|d| d.id.as_str()).collect();
    let cancelled = Change {
        status: Some(DelegationStatus::Cancelled),
        ..ended
    };
    let from = Transition::Cancel.from();
    let mut cancelled_descendants = if ids.is_empty() {
        Vec::new()
    } else {
        in_order(
            delegations::update(conn, &ids, from, &cancelled).await?,
            &ids,
        )
    };
    // Subtasks made while the task was down there are called off, with their hops.
    let cancelled_subtasks =
        tasks::cancel_below(conn, &delegation.task_id, delegation.delegated_at, at).await?;
    let subtask_ids: Vec<&str> = cancelled_subtasks.iter().map(|t| t.id.as_str()).collect();
    if !subtask_ids.is_empty() {
        cancelled_descendants
            .extend(delegations::update_of_tasks(conn, &subtask_ids, from, &cancelled).await?);
    }
    let own_task = HashSet::from([delegation.task_id.as_str()]);
    return_tasks(conn, &cancelled_descendants, own_task, at).await?;
    let task = tasks::move_to(
        conn,
        &delegation.task_id,
        &delegation.source_instance_id,
        at,
    )
    .await?;
    let log: Vec<_> = cancelled_descendants
        .iter()
        .map(|hop| NewEvent::of(EventKind::DelegationCancelled, hop, Some(&delegation.id)))
        .collect();
    event_log::append(conn, &log).await?;
    Ok(Cancellation {
        delegation,
        cancelled_descendants,
        task,
        cancelled_subtasks,
    })
}

/// Puts rows returned by an UPDATE (in no particular order) in the order of `ids`.
fn in_order(mut rows: Vec<Delegation>, ids: &[&str]) -> Vec<Delegation> {
    rows.sort_by_key(|row| ids.iter().position(|id| *id == row.id));
    rows
}
