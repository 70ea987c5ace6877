//! Who may do what: every authorization rule of the API, in one match ([`authorize`]).
//!
//! The rules are about places in the instance tree. An instance *manages* itself and every
//! instance below it. The open server and the admin token may do everything; an instance may:
//!
//! | Request | Allowed when the calling instance… |
//! | --- | --- |
//! | RegisterInstance | manages the new instance's parent (a root takes the admin token) |
//! | GetInstance | manages the instance, or the instance is one of its ancestors |
//! | ListInstances | always; it sees only the instances it manages |
//! | GetInstanceTree | manages the root; without a root, as ListInstances |
//! | UpdateInstanceStatus, ListPendingDelegations, WatchEvents | manages the instance |
//! | CreateTask | manages the instance the task (or subtask: its parent task) is at |
//! | GetTask, ListSubtasks, ListTaskDelegations, GetDelegationChain, GetDelegationTree, GetDelegation | manages an instance the task involves: where it is, or either end of one of its delegations |
//! | CompleteTask | is where the task is (the target of the delegation that brought it) |
//! | CancelTask | manages the instance the task started from |
//! | CreateDelegation | manages the source instance, and may read the task |
//! | CancelDelegation | manages the delegation's source instance |
//! | AcceptDelegation, RejectDelegation, CompleteDelegation | is the delegation's target instance |
//! | UpdateDelegation | is the delegation's target or manages its source |
//! | RenewInstanceLease | is the instance |
//!
//! A refusal is PERMISSION_DENIED and names the rule, but no instance other than those the
//! request itself named. A record the request names that does not exist is NOT_FOUND, as it
//! would be without authentication.
//!
//! **One pattern.** Every operation of the repository takes its caller and asks [`authorize`]
//! itself, on the connection it reads with or inside the transaction it writes in, before it
//! reads anything else. CreateTask and CompleteTask ask once the task family is locked,
//! because where a task is can change. The one exception is WatchEvents
//! (`delegations::watch`): its stream is the fan-out's, read outside any transaction, so it
//! asks [`check`] on a connection of its own first; what it checks (an instance's place in the
//! tree) never changes.

use std::fmt;

use crate::{
    auth::Caller,
    error::Error,
    store::{self, Conn, Db, tasks::Task},
};

/// A request, reduced to what its authorization depends on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Action<'a> {
    /// RegisterInstance under this parent (`None`: a new root).
    RegisterInstance {
        /// The parent of the new instance.
        parent_id: Option<&'a str>,
    },
    /// GetInstance.
    ReadInstance(&'a str),
    /// UpdateInstanceStatus, ListPendingDelegations, WatchEvents (with or without
    /// descendants) of this instance.
    ManageInstance(&'a str),
    /// CreateTask, asked inside the creating transaction once the parent (if any) is locked.
    CreateTask {
        /// Where the task is created: for a subtask, where its parent task is.
        at: &'a str,
        /// The task it is a subtask of.
        subtask_of: Option<&'a str>,
    },
    /// Any read of this task, its subtasks or its delegations.
    ReadTask(&'a str),
    /// CompleteTask of this task, as read under its family's lock.
    CompleteTask(&'a Task),
    /// CancelTask.
    CancelTask(&'a str),
    /// CreateDelegation of this task from this source instance.
    CreateDelegation {
        /// The task sent.
        task_id: &'a str,
        /// The instance the task leaves.
        source: &'a str,
    },
    /// GetDelegation.
    ReadDelegation(&'a str),
    /// UpdateDelegation (its notes).
    AnnotateDelegation(&'a str),
    /// AcceptDelegation, RejectDelegation, CompleteDelegation.
    AnswerDelegation(&'a str),
    /// CancelDelegation.
    CancelDelegation(&'a str),
    /// RenewInstanceLease.
    RenewLease(&'a str),
}

/// [`authorize`] on a pooled connection of its own. Open and admin callers need no database.
pub(crate) async fn check(db: &Db, caller: &Caller, action: Action<'_>) -> Result<(), Error> {
    if matches!(caller, Caller::Instance(_)) {
        authorize(&mut db.conn().await?, caller, action).await?;
    }
    Ok(())
}

/// Refuses `action` with PERMISSION_DENIED unless `caller` may do it, reading on `conn` (the
/// operation's own connection or transaction). Open and admin callers need no database; an
/// instance's check is one or two reads.
pub(crate) async fn authorize(
    conn: &mut Conn,
    caller: &Caller,
    action: Action<'_>,
) -> Result<(), Error> {
    let Caller::Instance(me) = caller else {
        return Ok(());
    };
    let me = me.as_str();
    let verdict = match action {
        Action::RegisterInstance { parent_id: None } => {
            Err(Rule::Admin("register a root instance"))
        }
        Action::RegisterInstance {
            parent_id: Some(parent),
        } => manages(conn, me, "parent instance", parent).await?,
        Action::ReadInstance(id) => {
            let lineage = lineage(conn, "instance", id).await?;
            let mine = store::instances::lineage(conn, me).await?;
            if lineage.iter().any(|i| i == me) || mine.iter().any(|i| i == id) {
                Ok(())
            } else {
                Err(Rule::Related("instance", id.into()))
            }
        }
        Action::ManageInstance(id) => manages(conn, me, "instance", id).await?,
        Action::CreateTask {
            at,
            subtask_of: Some(parent),
        } => (manages(conn, me, "instance", at).await?)
            .map_err(|_| Rule::Managing("create a subtask of task", parent.into(), "it is")),
        Action::CreateTask {
            at,
            subtask_of: None,
        } => manages(conn, me, "instance", at).await?,
        Action::ReadTask(id) => involved(conn, me, id).await?,
        Action::CompleteTask(task) => {
            if task.instance_id == me {
                Ok(())
            } else {
                Err(Rule::Holder(task.id.clone()))
            }
        }
        Action::CancelTask(id) => {
            let at = task(conn, id).await?.instance_id;
            let origin = store::delegations::first_source(conn, id).await?;
            (manages(conn, me, "instance", origin.as_deref().unwrap_or(&at)).await?)
                .map_err(|_| Rule::Managing("cancel task", id.into(), "it started"))
        }
        // The task too, so that the refusals of the lifecycle rules tell nothing about a task
        // the caller may not read (normally the task is at the source, which settles both).
        Action::CreateDelegation { task_id, source } => {
            match manages(conn, me, "source instance", source).await? {
                Ok(()) => involved(conn, me, task_id).await?,
                refused => refused,
            }
        }
        Action::ReadDelegation(id) => {
            let task_id = delegation(conn, id).await?.task_id;
            involved(conn, me, &task_id).await?
        }
        Action::AnnotateDelegation(id) => {
            let d = delegation(conn, id).await?;
            if d.target_instance_id == me {
                Ok(())
            } else {
                (manages(conn, me, "source instance", &d.source_instance_id).await?).map_err(|_| {
                    Rule::Managing("annotate delegation", id.into(), "it was sent from")
                })
            }
        }
        Action::AnswerDelegation(id) => {
            let d = delegation(conn, id).await?;
            if d.target_instance_id == me {
                Ok(())
            } else {
                Err(Rule::Target(id.into()))
            }
        }
        Action::RenewLease(id) => {
            lineage(conn, "instance", id).await?;
            if id == me {
                Ok(())
            } else {
                Err(Rule::Itself("renew the lease of instance", id.into()))
            }
        }
        Action::CancelDelegation(id) => {
            let d = delegation(conn, id).await?;
            (manages(conn, me, "source instance", &d.source_instance_id).await?)
                .map_err(|_| Rule::Managing("cancel delegation", id.into(), "it was sent from"))
        }
    };
    verdict.map_err(|rule| Error::PermissionDenied(format!("instance {me} may not {rule}")))
}

/// Which rule refused a request, for the PERMISSION_DENIED message.
#[derive(Debug)]
enum Rule {
    /// Only the admin token may.
    Admin(&'static str),
    /// The instance is neither at nor above this one, which the request named.
    Manages(&'static str, String),
    /// The instance does not manage where a record is, which the message does not say:
    /// (what it may not do, the record, where).
    Managing(&'static str, String, &'static str),
    /// Neither manages the instance nor is below it.
    Related(&'static str, String),
    /// Not involved in the task.
    Involved(String),
    /// The task is elsewhere. The messages name no instance the caller may not know of.
    Holder(String),
    /// Not the delegation's target.
    Target(String),
    /// Only the instance itself may (what, the instance).
    Itself(&'static str, String),
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Admin(what) => write!(f, "{what}; that takes the admin token"),
            Self::Manages(entity, id) => {
                write!(f, "act for {entity} {id}, which is outside its subtree")
            }
            Self::Managing(what, id, place) => write!(
                f,
                "{what} {id}; only an instance managing where {place} may"
            ),
            Self::Related(entity, id) => write!(
                f,
                "read {entity} {id}, which is neither in its subtree nor one of its ancestors"
            ),
            Self::Involved(task) => write!(
                f,
                "read task {task}, which involves no instance in its subtree"
            ),
            Self::Holder(task) => {
                write!(f, "complete task {task}; only the instance it is at may")
            }
            Self::Itself(what, id) => write!(f, "{what} {id}; only the instance itself may"),
            Self::Target(delegation) => write!(
                f,
                "answer delegation {delegation}; only its target instance may accept, reject \
                 or complete it"
            ),
        }
    }
}

/// Ok if `me` is `id` or one of its ancestors.
async fn manages(
    conn: &mut Conn,
    me: &str,
    entity: &'static str,
    id: &str,
) -> Result<Result<(), Rule>, Error> {
    let lineage = lineage(conn, entity, id).await?;
    Ok(if lineage.iter().any(|i| i == me) {
        Ok(())
    } else {
        Err(Rule::Manages(entity, id.into()))
    })
}

/// The instance and its ancestors; NOT_FOUND if there is no such instance.
async fn lineage(conn: &mut Conn, entity: &'static str, id: &str) -> Result<Vec<String>, Error> {
    let lineage = store::instances::lineage(conn, id).await?;
    if lineage.is_empty() {
        return Err(Error::not_found(entity, id));
    }
    Ok(lineage)
}

/// Ok if `me` manages an instance the task involves. NOT_FOUND if there is no such task: looked
/// up only on refusal, so that the allowed path is one query.
async fn involved(conn: &mut Conn, me: &str, task_id: &str) -> Result<Result<(), Rule>, Error> {
    if store::instances::involved_in_task(conn, task_id, me).await? {
        return Ok(Ok(()));
    }
    task(conn, task_id).await?;
    Ok(Err(Rule::Involved(task_id.into())))
}

async fn task(conn: &mut Conn, id: &str) -> Result<Task, Error> {
    store::tasks::find(conn, id)
        .await?
        .ok_or_else(|| Error::not_found("task", id))
}

async fn delegation(conn: &mut Conn, id: &str) -> Result<store::delegations::Delegation, Error> {
    store::delegations::find(conn, id)
        .await?
        .ok_or_else(|| Error::not_found("delegation", id))
}

/// The instance whose subtree `caller` may list: `None` for everything.
pub(crate) fn visible_subtree(caller: &Caller) -> Option<String> {
    match caller {
        Caller::Instance(me) => Some(me.clone()),
        Caller::Open | Caller::Admin => None,
    }
}
