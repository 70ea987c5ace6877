//! Creating delegations and moving them through their lifecycle, with bubbling and cascade.
//!
//! Every write first locks its task's family ([`tasks::lock_family`]), so the writers of one
//! family run one after another and each reads, in one statement after the lock, the state
//! its predecessor left; the rules in `domain::lifecycle` judge that snapshot, and the
//! transition itself is still a compare-and-set on the status (`UPDATE … WHERE status IN …`).

use std::time::Duration;

use chrono::SubsecRound;
use futures_util::Stream;

use super::{
    Page, PageRequest,
    access::{self, Action},
    completion::{cancel_in, complete_in},
    decode_cursor, encode_cursor, new_id, remember, replay, taken,
};
pub use crate::store::delegations::Listing;
use crate::{
    auth::Caller,
    domain::{
        DelegationDirection, DelegationStatus, DelegationType, EventKind,
        lifecycle::{self, ProposedHop, Relation, Transition},
    },
    error::Error,
    fanout::{Hub, Item, Subscription},
    store::{
        Conn, Db, Tx,
        delegations::{self, Change, Delegation},
        event_log::{self, NewEvent},
        now,
        tasks::{self, Task},
    },
};

/// A validated CreateDelegation request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewDelegation {
    /// Makes the request idempotent: a retry with the same id returns the original result.
    pub request_id: Option<String>,
    /// The caller's id for the new delegation; `None`: a generated UUID v7.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The task to delegate.
    pub task_id: String,
    /// The sending instance.
    pub source_instance_id: String,
    /// The receiving instance.
    pub target_instance_id: String,
    /// The kind of hop.
    pub delegation_type: DelegationType,
    /// Free-form notes.
    pub notes: Option<String>,
    /// Who is delegating.
    pub delegated_by: Option<String>,
    /// It must be accepted or rejected within this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_within: Option<Duration>,
    /// It must complete within this of its creation (capped by the hop above it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub complete_within: Option<Duration>,
    /// The server's defaults for a request that set no deadline. Not part of what a retry
    /// with the same `request_id` is compared on: replicas may be configured apart.
    #[serde(skip)]
    pub defaults: Deadlines,
}

/// The deadlines a new hop gets when its request leaves them out (`None`: no deadline).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deadlines {
    /// `--default-accept-within`.
    pub accept_within: Option<Duration>,
    /// `--default-complete-within`.
    pub complete_within: Option<Duration>,
}

/// A task's chain from origin to current location.
#[derive(Debug, Clone)]
pub struct Chain {
    /// The hops, origin first.
    pub delegations: Vec<Delegation>,
    /// Where the chain starts.
    pub origin_instance_id: String,
    /// Where the task is now.
    pub current_instance_id: String,
}

/// What a completion changed.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The completed delegation.
    pub delegation: Delegation,
    /// The delegations it bubbled up to, nearest first.
    pub completed_ancestors: Vec<Delegation>,
    /// The task afterwards.
    pub task: Task,
}

/// What a cancellation changed.
#[derive(Debug, Clone)]
pub struct Cancellation {
    /// The cancelled delegation.
    pub delegation: Delegation,
    /// The active delegations below it that were cancelled too, nearest first.
    pub cancelled_descendants: Vec<Delegation>,
    /// The delegation's task afterwards.
    pub task: Task,
    /// The unfinished subtasks made below it, now cancelled.
    pub cancelled_subtasks: Vec<Task>,
}

/// Opens a WatchEvents stream. The stream is the hub's, read outside any transaction, so the
/// rule is asked on a connection of its own before the hub opens it.
pub async fn watch(
    hub: &Hub,
    caller: &Caller,
    subscription: Subscription,
) -> Result<impl Stream<Item = Result<Item, Error>> + Send + 'static, Error> {
    let watched = Action::ManageInstance(&subscription.scope.instance_id);
    access::check(hub.db(), caller, watched).await?;
    hub.watch(subscription).await
}

/// Sends a task from its current instance to another one.
pub async fn create(db: &Db, caller: &Caller, new: NewDelegation) -> Result<Delegation, Error> {
    let created = db
        .write(async |conn| {
            let action = Action::CreateDelegation {
                task_id: &new.task_id,
                source: &new.source_instance_id,
            };
            access::authorize(conn, caller, action).await?;
            // Locks in the one order every write takes them: the task family, then the request id.
            let not_found = || Error::not_found("task", &new.task_id);
            if !tasks::lock(conn, &new.task_id).await? {
                return Err(not_found());
            }
            let source = &new.source_instance_id;
            let target = &new.target_instance_id;
            let snapshot = tasks::snapshot(conn, &new.task_id, Some(source), Some(target))
                .await?
                .ok_or_else(not_found)?;
            let request_id = new.request_id.as_deref();
            if let Some(original) = replay(conn, request_id, "CreateDelegation", &new).await? {
                return Ok(original);
            }
            let source_lineage = db.lineages().get(conn, source).await?;
            if source_lineage.is_empty() {
                return Err(Error::not_found("source instance", source));
            }
            let target_lineage = db.lineages().get(conn, target).await?;
            let target_status = snapshot
                .target_status
                .filter(|_| !target_lineage.is_empty())
                .ok_or_else(|| Error::not_found("target instance", target))?;
            let task = &snapshot.task;
            lifecycle::check_new_hop(&ProposedHop {
                task_id: &task.id,
                task_status: task.status,
                task_location: &task.instance_id,
                is_subtask: task.parent_task_id.is_some(),
                pending_delegation: snapshot.pending_delegation.as_deref(),
                open_subtasks: usize::try_from(snapshot.open_subtasks).unwrap_or(usize::MAX),
                arrived_by_delegation: snapshot.arrival.is_some(),
                source,
                target,
                target_status,
                target_lapsed: snapshot
                    .target_lease_expires_at
                    .filter(|at| *at <= snapshot.db_now),
                kind: new.delegation_type,
                relation: Relation::between(&source_lineage, &target_lineage),
            })?;
            let at = now();
            // Deadlines from the database's clock, the one every replica shares.
            let after =
                |within: Option<Duration>| within.map(|w| (snapshot.db_now + w).trunc_subsecs(6));
            let delegation = Delegation {
                id: new.id.clone().unwrap_or_else(new_id),
                task_id: task.id.clone(),
                // The hop continues the one that brought the task (or its parent task) here.
                parent_delegation_id: snapshot.arrival.or(snapshot.parent_arrival),
                source_instance_id: new.source_instance_id.clone(),
                target_instance_id: new.target_instance_id.clone(),
                delegation_type: new.delegation_type,
                status: DelegationStatus::Pending,
                delegated_at: at,
                accepted_at: None,
                completed_at: None,
                result: None,
                rejection_reason: None,
                notes: new.notes.clone(),
                delegated_by: new.delegated_by.clone(),
                created_at: at,
                updated_at: at,
                accept_by: after(new.accept_within.or(new.defaults.accept_within)),
                complete_by: lifecycle::capped_complete_by(
                    after(new.complete_within.or(new.defaults.complete_within)),
                    snapshot.arrival_complete_by,
                ),
                expired_at: None,
                expiry_reason: None,
            };
            // Under the family lock no second pending hop can race this one: a unique
            // violation is a caller-chosen id that is taken.
            delegations::insert(conn, &delegation)
                .await
                .map_err(|err| match new.id {
                    Some(_) => taken("delegation", &delegation.id)(err),
                    None => err.into(),
                })?;
            remember(conn, request_id, &delegation).await?;
            let created = NewEvent::of(EventKind::DelegationCreated, &delegation, None);
            event_log::append(conn, &[created]).await?;
            tasks::move_to(conn, &delegation.task_id, target, at).await?;
            Ok(delegation)
        })
        .await?;
    // The sweeper may be sleeping past this hop's deadline.
    if let Some(due) = created
        .accept_by
        .into_iter()
        .chain(created.complete_by)
        .min()
    {
        db.signal_deadline(due);
    }
    Ok(created)
}

/// Reads one delegation.
pub async fn get(db: &Db, caller: &Caller, id: &str) -> Result<Delegation, Error> {
    let mut conn = db.conn().await?;
    access::authorize(&mut conn, caller, Action::ReadDelegation(id)).await?;
    find(&mut conn, id).await
}

async fn find(conn: &mut Conn, id: &str) -> Result<Delegation, Error> {
    delegations::find(conn, id)
        .await?
        .ok_or_else(|| Error::not_found("delegation", id))
}

/// Replaces a delegation's notes.
pub async fn update_notes(
    db: &Db,
    caller: &Caller,
    id: &str,
    notes: &str,
) -> Result<Delegation, Error> {
    let (mut conn, _turn) = db.conn_for_write().await?;
    access::authorize(&mut conn, caller, Action::AnnotateDelegation(id)).await?;
    let change = Change {
        notes: Some(notes),
        ..Change::at(now())
    };
    let updated = delegations::update(&mut conn, &[id], DelegationStatus::ALL, &change).await?;
    updated
        .into_iter()
        .next()
        .ok_or_else(|| Error::not_found("delegation", id))
}

/// Lists a task's delegations or an instance's, oldest first, a page at a time.
/// NOT_FOUND if the task or instance does not exist.
pub async fn list(
    db: &Db,
    caller: &Caller,
    listing: Listing<'_>,
    page: &PageRequest,
) -> Result<Page<Delegation>, Error> {
    let after = decode_cursor(&page.token)?;
    let mut conn = db.conn().await?;
    match listing {
        Listing::OfTask(id) => {
            access::authorize(&mut conn, caller, Action::ReadTask(id)).await?;
            if tasks::find(&mut conn, id).await?.is_none() {
                return Err(Error::not_found("task", id));
            }
        }
        Listing::PendingFor(id)
        | Listing::OfInstance {
            instance_id: id, ..
        } => {
            access::authorize(&mut conn, caller, Action::ManageInstance(id)).await?;
            instance_exists(db, &mut conn, id).await?;
        }
    }
    let limit = i64::try_from(page.size + 1).unwrap_or(i64::MAX);
    let rows = delegations::list(&mut conn, listing, after.as_ref(), limit).await?;
    Ok(Page::cut(rows, page.size, cursor_of))
}

/// Counts an instance's delegations on one side (`None`: either) by status, every status
/// listed in declaration order, zeros included. NOT_FOUND if the instance does not exist.
pub async fn count_by_status(
    db: &Db,
    caller: &Caller,
    instance_id: &str,
    direction: Option<DelegationDirection>,
) -> Result<Vec<(DelegationStatus, u64)>, Error> {
    let mut conn = db.conn().await?;
    access::authorize(&mut conn, caller, Action::ManageInstance(instance_id)).await?;
    instance_exists(db, &mut conn, instance_id).await?;
    let counted = delegations::count_by_status(&mut conn, instance_id, direction).await?;
    Ok(DelegationStatus::ALL
        .iter()
        .map(|&status| {
            let n = counted
                .iter()
                .find(|(s, _)| *s == status)
                .map_or(0, |(_, n)| *n);
            (status, u64::try_from(n).unwrap_or_default())
        })
        .collect())
}

/// NOT_FOUND unless the instance exists.
async fn instance_exists(db: &Db, conn: &mut Conn, id: &str) -> Result<(), Error> {
    if db.lineages().get(conn, id).await?.is_empty() {
        return Err(Error::not_found("instance", id));
    }
    Ok(())
}

fn cursor_of(delegation: &Delegation) -> String {
    encode_cursor(&(delegation.delegated_at, delegation.id.clone()))
}

/// Reads a task's chain, origin first.
pub async fn chain(db: &Db, caller: &Caller, task_id: &str) -> Result<Chain, Error> {
    let mut conn = db.conn().await?;
    access::authorize(&mut conn, caller, Action::ReadTask(task_id)).await?;
    let task = tasks::find(&mut conn, task_id)
        .await?
        .ok_or_else(|| Error::not_found("task", task_id))?;
    let delegations = delegations::current_chain(&mut conn, task_id).await?;
    let origin_instance_id = delegations.first().map_or_else(
        || task.instance_id.clone(),
        |d| d.source_instance_id.clone(),
    );
    Ok(Chain {
        delegations,
        origin_instance_id,
        current_instance_id: task.instance_id,
    })
}

/// Locks the family of the delegation's task; NOT_FOUND if there is no such delegation.
async fn lock(conn: &mut Conn, id: &str) -> Result<(), Error> {
    if tasks::lock_family_of_delegation(conn, id).await? {
        Ok(())
    } else {
        Err(Error::not_found("delegation", id))
    }
}

/// Applies `transition` to one delegation (under its family's lock) as a compare-and-set,
/// records its event (naming `cause`, the delegation that set it off, if any), and returns the
/// delegation changed. If the delegation's status does not allow it, the refusal names the
/// status, read afresh.
pub(super) async fn transition(
    conn: &mut Tx,
    id: &str,
    transition: Transition,
    change: Change<'_>,
    cause: Option<&str>,
) -> Result<Delegation, Error> {
    let change = Change {
        status: Some(transition.to()),
        ..change
    };
    let updated = delegations::update(conn, &[id], transition.from(), &change).await?;
    let Some(changed) = updated.into_iter().next() else {
        let current = find(conn, id).await?;
        transition.check(id, current.status, current.expiry())?;
        return Err(Error::Internal(format!(
            "delegation {id} changed under the family lock"
        )));
    };
    event_log::append(conn, &[NewEvent::of(transition.event(), &changed, cause)]).await?;
    Ok(changed)
}

/// The target takes the task on.
pub async fn accept(db: &Db, caller: &Caller, id: &str) -> Result<Delegation, Error> {
    db.write(async |conn| {
        access::authorize(conn, caller, Action::AnswerDelegation(id)).await?;
        lock(conn, id).await?;
        let at = now();
        let change = Change {
            accepted_at: Some(at),
            ..Change::at(at)
        };
        transition(conn, id, Transition::Accept, change, None).await
    })
    .await
}

/// The target refuses the task, which goes back to the source.
pub async fn reject(db: &Db, caller: &Caller, id: &str, reason: &str) -> Result<Delegation, Error> {
    db.write(async |conn| {
        access::authorize(conn, caller, Action::AnswerDelegation(id)).await?;
        lock(conn, id).await?;
        let at = now();
        let change = Change {
            rejection_reason: Some(reason),
            ..Change::at(at)
        };
        let rejected = transition(conn, id, Transition::Reject, change, None).await?;
        tasks::move_to(conn, &rejected.task_id, &rejected.source_instance_id, at).await?;
        Ok(rejected)
    })
    .await
}

/// Completes a delegation and bubbles the completion up its chain; when the origin completes,
/// the task is DONE with the result, back at the origin's source, and if it was the last open
/// subtask of its parent, the parent completes too (see [`complete_in`]).
pub async fn complete(
    db: &Db,
    caller: &Caller,
    id: &str,
    result: Option<&serde_json::Value>,
    notes: Option<&str>,
) -> Result<Completion, Error> {
    db.write(async |conn| {
        access::authorize(conn, caller, Action::AnswerDelegation(id)).await?;
        lock(conn, id).await?;
        complete_in(conn, id, result, notes).await
    })
    .await
}

/// Cancels a delegation, every active delegation below it (along route chains and into
/// subtasks), and every unfinished subtask created below it; each task concerned goes back to
/// the source of its topmost cancelled hop.
pub async fn cancel(db: &Db, caller: &Caller, id: &str) -> Result<Cancellation, Error> {
    db.write(async |conn| {
        access::authorize(conn, caller, Action::CancelDelegation(id)).await?;
        lock(conn, id).await?;
        let delegation = find(conn, id).await?;
        cancel_in(conn, &delegation, None).await
    })
    .await
}
