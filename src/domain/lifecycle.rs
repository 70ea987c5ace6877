//! The delegation lifecycle: the one place that says which transitions exist, where a task may
//! be delegated, how far a completion bubbles, and what a cancellation reaches.
//!
//! ```text
//!            accept            complete
//!  pending ──────────► accepted ─────────► completed
//!     │  │                │  │
//!     │  │ reject         │  │ cancel (also cascades to every active hop below)
//!     │  ▼                │  ▼
//!     │ rejected          │ cancelled ◄── cancel ── pending
//!     │                   │
//!     └── a deadline ─────┴──► expired (cascades like a cancel; the task goes back to the
//!         passes (expire)                source, as after a reject)
//! ```
//!
//! The store enforces each transition as a compare-and-set on the statuses returned by
//! [`Transition::from`], so concurrent callers cannot both win. Which deadline has passed is
//! [`due`]'s to say, from the database's clock.

use chrono::NaiveDateTime;

use super::{
    DelegationStatus::{self, Accepted},
    DelegationType, EventKind, ExpiryReason, InstanceStatus, TaskStatus,
};
use crate::error::Error;

/// A change of a delegation's status requested by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// The target takes the task on.
    Accept,
    /// The target refuses the task.
    Reject,
    /// The work is done.
    Complete,
    /// The delegation is called off.
    Cancel,
    /// A deadline passed.
    Expire,
}

impl Transition {
    /// The statuses this transition may start from.
    pub fn from(self) -> &'static [DelegationStatus] {
        use DelegationStatus::*;
        match self {
            Self::Accept | Self::Reject => &[Pending],
            Self::Complete => &[Accepted],
            Self::Cancel | Self::Expire => &DelegationStatus::ACTIVE,
        }
    }

    /// The status this transition leads to.
    pub fn to(self) -> DelegationStatus {
        match self {
            Self::Accept => DelegationStatus::Accepted,
            Self::Reject => DelegationStatus::Rejected,
            Self::Complete => DelegationStatus::Completed,
            Self::Cancel => DelegationStatus::Cancelled,
            Self::Expire => DelegationStatus::Expired,
        }
    }

    /// The event this transition records.
    pub fn event(self) -> EventKind {
        match self {
            Self::Accept => EventKind::DelegationAccepted,
            Self::Reject => EventKind::DelegationRejected,
            Self::Complete => EventKind::DelegationCompleted,
            Self::Cancel => EventKind::DelegationCancelled,
            Self::Expire => EventKind::DelegationExpired,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Accept => "accept",
            Self::Reject => "reject",
            Self::Complete => "complete",
            Self::Cancel => "cancel",
            Self::Expire => "expire",
        }
    }

    /// Checks that a delegation in `current` may take this transition; the error names the
    /// current status, and for a hop ended by an expiry (`expiry`), when and why.
    pub fn check(
        self,
        id: &str,
        current: DelegationStatus,
        expiry: Option<Expiry>,
    ) -> Result<DelegationStatus, Error> {
        if self.from().contains(&current) {
            return Ok(self.to());
        }
        if let Some(expiry) = expiry {
            return Err(fenced(id, current, expiry, self.verb()));
        }
        let allowed: Vec<_> = self.from().iter().map(|s| s.as_str()).collect();
        Err(Error::precondition(format!(
            "delegation {id} is {current}; it must be {} to {}",
            allowed.join(" or "),
            self.verb()
        )))
    }
}

/// When and why a delegation expired; on a hop cancelled by that expiry, the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// When it expired, by the database's clock.
    pub at: NaiveDateTime,
    /// Which deadline passed.
    pub reason: ExpiryReason,
}

impl Expiry {
    /// The expiry recorded on a delegation, if both its columns are set.
    pub fn of(at: Option<NaiveDateTime>, reason: Option<ExpiryReason>) -> Option<Self> {
        Some(Self {
            at: at?,
            reason: reason?,
        })
    }
}

impl ExpiryReason {
    /// What happened, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::AcceptDeadline => "it was neither accepted nor rejected by its accept_by",
            Self::CompleteDeadline => "it was not completed by its complete_by",
            Self::TargetUnresponsive => "its target instance's lease lapsed",
        }
    }
}

/// The refusal of a late worker: the hop expired, or was cancelled by an expiry above it.
fn fenced(id: &str, current: DelegationStatus, expiry: Expiry, verb: &str) -> Error {
    let when = expiry.at.and_utc().format("%Y-%m-%dT%H:%M:%S%.3fZ");
    let why = expiry.reason.describe();
    Error::precondition(if current == DelegationStatus::Expired {
        format!("delegation {id} expired at {when} ({why}); it can no longer {verb}")
    } else {
        format!(
            "delegation {id} is {current}: a hop above it expired at {when} ({why}); \
             it can no longer {verb}"
        )
    })
}

/// Which deadline of an active hop has passed at `now` (the database's clock), if any: the
/// accept deadline while it is pending, the complete deadline while pending or accepted; the
/// earlier one when both have.
pub fn due(
    status: DelegationStatus,
    accept_by: Option<NaiveDateTime>,
    complete_by: Option<NaiveDateTime>,
    now: NaiveDateTime,
) -> Option<ExpiryReason> {
    let accept = accept_by.filter(|_| status == DelegationStatus::Pending);
    let complete = complete_by.filter(|_| status.is_active());
    let passed = |deadline: Option<NaiveDateTime>| deadline.filter(|d| *d <= now);
    match (passed(accept), passed(complete)) {
        (Some(a), Some(c)) if c < a => Some(ExpiryReason::CompleteDeadline),
        (Some(_), _) => Some(ExpiryReason::AcceptDeadline),
        (None, Some(_)) => Some(ExpiryReason::CompleteDeadline),
        (None, None) => None,
    }
}

/// Whether an active hop expires because its target instance is unresponsive (its lease
/// lapsed): only where the task is at that instance, pending to it or accepted by it and not
/// delegated onward. Work it passed further down goes on, and its completion still bubbles
/// through this hop.
pub fn abandoned(status: DelegationStatus, target_lapsed: bool, delegated_onward: bool) -> bool {
    target_lapsed
        && match status {
            DelegationStatus::Pending => true,
            DelegationStatus::Accepted => !delegated_onward,
            _ => false,
        }
}

/// The `complete_by` of a new hop: its own deadline, never later than the hop above it (a
/// parent that has given up cannot be kept waiting by its children).
pub fn capped_complete_by(
    own: Option<NaiveDateTime>,
    above: Option<NaiveDateTime>,
) -> Option<NaiveDateTime> {
    match (own, above) {
        (Some(own), Some(above)) => Some(own.min(above)),
        (own, above) => own.or(above),
    }
}

/// Where the target of a delegation lies, seen from its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Relation {
    /// The target is the source itself.
    Same,
    /// The target is below the source.
    Descendant,
    /// The target is above the source.
    Ancestor,
    /// Neither above nor below: a sibling, a cousin, or another tree.
    Unrelated,
}

impl Relation {
    /// Works the relation out from the ancestor chains of both instances (each starting with the
    /// instance itself).
    pub fn between(source_lineage: &[String], target_lineage: &[String]) -> Self {
        match (source_lineage.first(), target_lineage.first()) {
            (Some(source), Some(target)) if source == target => Self::Same,
            (Some(source), _) if target_lineage.contains(source) => Self::Descendant,
            (_, Some(target)) if source_lineage.contains(target) => Self::Ancestor,
            _ => Self::Unrelated,
        }
    }
}

/// What the rules need to know about a proposed delegation.
#[derive(Debug)]
pub(crate) struct ProposedHop<'a> {
    /// The task being delegated.
    pub task_id: &'a str,
    /// The task's status.
    pub task_status: TaskStatus,
    /// Where the task is now.
    pub task_location: &'a str,
    /// Whether the task is a subtask of another task.
    pub is_subtask: bool,
    /// The id of a pending delegation of the task, if it has one.
    pub pending_delegation: Option<&'a str>,
    /// How many of the task's subtasks are not finished.
    pub open_subtasks: usize,
    /// Whether a hop of the task itself brought it to the source.
    pub arrived_by_delegation: bool,
    /// The sending instance.
    pub source: &'a str,
    /// The receiving instance.
    pub target: &'a str,
    /// The receiving instance's run state.
    pub target_status: InstanceStatus,
    /// When the receiving instance's lease lapsed, if it has: it is unresponsive.
    pub target_lapsed: Option<NaiveDateTime>,
    /// The kind of hop.
    pub kind: DelegationType,
    /// Where the target lies from the source.
    pub relation: Relation,
}

/// Checks every rule for creating a delegation. The error names the offending state.
pub(crate) fn check_new_hop(hop: &ProposedHop<'_>) -> Result<(), Error> {
    if hop.relation == Relation::Same {
        return Err(Error::invalid(
            "target_instance_id",
            "must differ from source_instance_id",
        ));
    }
    if hop.task_status.is_final() {
        return Err(Error::precondition(format!(
            "task {} is {}; a finished task cannot be delegated",
            hop.task_id, hop.task_status
        )));
    }
    if let Some(pending) = hop.pending_delegation {
        return Err(Error::precondition(format!(
            "task {} already has a pending delegation {pending}",
            hop.task_id
        )));
    }
    if hop.open_subtasks > 0 {
        return Err(Error::precondition(format!(
            "task {} has {} open subtasks; it stays where they were made until they finish",
            hop.task_id, hop.open_subtasks
        )));
    }
    if hop.task_location != hop.source {
        return Err(Error::precondition(format!(
            "task {} is at instance {}, not at the source {}",
            hop.task_id, hop.task_location, hop.source
        )));
    }
    if let Some(lapsed) = hop.target_lapsed {
        return Err(Error::precondition(format!(
            "target instance {} is unresponsive: its lease lapsed at {}",
            hop.target,
            lapsed.and_utc().format("%Y-%m-%dT%H:%M:%S%.3fZ")
        )));
    }
    if !hop.target_status.takes_work() {
        return Err(Error::precondition(format!(
            "target instance {} is {}; only created, starting or running instances take work",
            hop.target, hop.target_status
        )));
    }
    if hop.kind == DelegationType::Decompose && !hop.is_subtask {
        return Err(Error::precondition(format!(
            "task {} is not a subtask; only subtasks are delegated with decompose",
            hop.task_id
        )));
    }
    if hop.kind == DelegationType::Decompose && hop.arrived_by_delegation {
        return Err(Error::precondition(format!(
            "subtask {} was delegated to {} already; decompose only starts a subtask's chain, \
             use route from here",
            hop.task_id, hop.source
        )));
    }
    let (expected, wanted) = match hop.kind {
        DelegationType::Route | DelegationType::Decompose => (Relation::Descendant, "a descendant"),
        DelegationType::Escalate => (Relation::Ancestor, "an ancestor"),
        DelegationType::Reassign => (Relation::Unrelated, "neither an ancestor nor a descendant"),
    };
    if hop.relation != expected {
        return Err(Error::precondition(format!(
            "a {} delegation goes to {wanted} of the source, and {} is {} of {}",
            hop.kind,
            hop.target,
            describe(hop.relation),
            hop.source
        )));
    }
    Ok(())
}

fn describe(relation: Relation) -> &'static str {
    match relation {
        Relation::Same => "the same instance as",
        Relation::Descendant => "a descendant",
        Relation::Ancestor => "an ancestor",
        Relation::Unrelated => "neither an ancestor nor a descendant",
    }
}

/// How far a completion bubbles. `chain` holds the kinds of the completed delegation and of its
/// ancestors within the same task, nearest first. Returns how many ancestors complete with it,
/// and whether the task itself is done (the completion reached the origin of its chain).
///
/// A completed hop completes its parent, unless it is a `decompose` hop: a subtask's completion
/// does not finish its parent task on its own.
pub fn bubbling(chain: &[DelegationType]) -> (usize, bool) {
    let reach = chain
        .iter()
        .position(|kind| *kind == DelegationType::Decompose)
        .unwrap_or(chain.len().saturating_sub(1));
    let task_done = reach + 1 >= chain.len();
    (reach, task_done)
}

/// One hop of the chain a completion reads: its id, status and kind.
pub(crate) type Hop<'a> = (&'a str, DelegationStatus, DelegationType);

/// What the completion rules need to know about a delegation, read under its family's lock.
#[derive(Debug)]
pub(crate) struct Completing<'a> {
    /// The task of the delegation.
    pub task_id: &'a str,
    /// The delegation, then the hops of the same task it continues, nearest first.
    pub chain: &'a [Hop<'a>],
    /// The delegation's expiry, if one ended it.
    pub expiry: Option<Expiry>,
    /// An active hop of the same task that continues the delegation: (id, status, target).
    pub active_child: Option<(&'a str, DelegationStatus, &'a str)>,
    /// How many subtasks of the task are not finished.
    pub open_subtasks: usize,
}

/// How far an allowed completion reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reach {
    /// How many hops above the delegation complete with it.
    pub ancestors: usize,
    /// Whether the task itself is done.
    pub task_done: bool,
}

/// Checks every rule for completing the first hop of `completing.chain`: it must be accepted,
/// the task must not be delegated onward from it, and a completion that finishes the task
/// needs every subtask finished. Says how far the completion bubbles (see [`bubbling`]).
pub(crate) fn check_completion(completing: &Completing<'_>) -> Result<Reach, Error> {
    let Some(&(id, status, _)) = completing.chain.first() else {
        return Err(Error::Internal("no delegation to complete".into()));
    };
    Transition::Complete.check(id, status, completing.expiry)?;
    let task = completing.task_id;
    if let Some((child, child_status, target)) = completing.active_child {
        return Err(Error::precondition(format!(
            "task {task} is delegated onward by delegation {child} ({child_status}, to {target}); \
             delegation {id} completes when that one does"
        )));
    }
    let kinds: Vec<_> = completing.chain.iter().map(|hop| hop.2).collect();
    let (ancestors, task_done) = bubbling(&kinds);
    if task_done && completing.open_subtasks > 0 {
        return Err(still_open(task, completing.open_subtasks));
    }
    let above = &completing.chain[1..=ancestors];
    if let Some((stuck, stuck_status, _)) = above.iter().find(|hop| hop.1 != Accepted) {
        // Every hop above an accepted one was accepted before it could continue, and only
        // completes with the hops below it: a broken chain is a bug, not a user mistake.
        return Err(Error::Internal(format!(
            "delegation {stuck} above {id} is {stuck_status}, not accepted"
        )));
    }
    Ok(Reach {
        ancestors,
        task_done,
    })
}

/// What the rules for completing a task where it is (CompleteTask) read, under its family's
/// lock.
#[derive(Debug)]
pub(crate) struct LocalCompletion<'a> {
    /// The task.
    pub task_id: &'a str,
    /// Its status.
    pub status: TaskStatus,
    /// Its pending delegation, if it has one.
    pub pending_delegation: Option<&'a str>,
    /// How many of its subtasks are not finished.
    pub open_subtasks: usize,
}

/// Checks the rules for completing a task where it is: it is unfinished, not on its way
/// elsewhere (no pending delegation), and has no open subtasks (it completes when they do).
pub(crate) fn check_local_completion(task: &LocalCompletion<'_>) -> Result<(), Error> {
    let id = task.task_id;
    check_unfinished(id, task.status)?;
    if let Some(pending) = task.pending_delegation {
        return Err(on_its_way(id, pending));
    }
    if task.open_subtasks > 0 {
        return Err(still_open(id, task.open_subtasks));
    }
    Ok(())
}

/// A task that a pending delegation is taking elsewhere.
fn on_its_way(task_id: &str, pending: &str) -> Error {
    Error::precondition(format!(
        "task {task_id} is on its way: delegation {pending} is pending"
    ))
}

/// Whether a parent task may complete from its subtasks now: a finished one, or one on its way
/// elsewhere (a pending delegation), does not, and completion bubbles no further up the
/// subtask tree; otherwise [`aggregate`] says whether every subtask has finished, and how.
pub(crate) fn completes_from_subtasks(
    status: TaskStatus,
    pending_delegation: Option<&str>,
) -> bool {
    !status.is_final() && pending_delegation.is_none()
}

/// What the subtask rules need to know about the parent task, read under its family's lock.
#[derive(Debug)]
pub(crate) struct NewSubtask<'a> {
    /// The parent task.
    pub parent_id: &'a str,
    /// Its status.
    pub parent_status: TaskStatus,
    /// The instance where it is.
    pub parent_at: &'a str,
    /// Its pending delegation, if it has one.
    pub pending_delegation: Option<&'a str>,
    /// The instance the request names for the subtask, if any.
    pub wanted_at: Option<&'a str>,
}

/// Checks the rules for creating a subtask: its parent is unfinished (a finished task takes no
/// subtasks), not on its way elsewhere, and the subtask is made where the parent is.
pub(crate) fn check_new_subtask(new: &NewSubtask<'_>) -> Result<(), Error> {
    let (parent, at) = (new.parent_id, new.parent_at);
    if new.parent_status.is_final() {
        return Err(Error::precondition(format!(
            "parent task {parent} is {}; a finished task takes no subtasks",
            new.parent_status
        )));
    }
    if let Some(pending) = new.pending_delegation {
        return Err(on_its_way(parent, pending));
    }
    if let Some(wanted) = new.wanted_at.filter(|wanted| *wanted != at) {
        return Err(Error::precondition(format!(
            "parent task {parent} is at instance {at}, not {wanted}; \
             a subtask is created where its parent task is"
        )));
    }
    Ok(())
}

/// Checks that a task is not finished (done or cancelled): nothing completes or cancels it
/// again.
pub(crate) fn check_unfinished(task_id: &str, status: TaskStatus) -> Result<(), Error> {
    if status.is_final() {
        return Err(Error::precondition(format!("task {task_id} is {status}")));
    }
    Ok(())
}

/// The refusal of a completion while subtasks are open.
fn still_open(task: &str, open: usize) -> Error {
    Error::precondition(format!(
        "task {task} has {open} open subtasks; it completes when they do"
    ))
}

/// A parent task's outcome once its subtasks are through, given each subtask's id, status and
/// result. The parent is done when every subtask that was not cancelled is done, and at least
/// one is; its result is `{"subtasks": {"<id>": <result or null>, …}}` over the done ones
/// (cancelled subtasks are left out). `None` while any subtask is open, or if none is done.
pub fn aggregate<'a>(
    subtasks: impl IntoIterator<Item = (&'a str, TaskStatus, Option<&'a serde_json::Value>)>,
) -> Option<serde_json::Value> {
    let mut done = serde_json::Map::new();
    for (id, status, result) in subtasks {
        match status {
            TaskStatus::Done => {
                done.insert(id.to_owned(), result.cloned().unwrap_or_default());
            }
            TaskStatus::Cancelled => {}
            _ => return None,
        }
    }
    (!done.is_empty()).then(|| serde_json::json!({ "subtasks": done }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use DelegationStatus::*;

    #[test]
    fn each_transition_starts_from_its_statuses_only() {
        let table = [
            (Transition::Accept, Pending, Some(Accepted)),
            (Transition::Accept, Accepted, None),
            (Transition::Reject, Pending, Some(Rejected)),
            (Transition::Reject, Accepted, None),
            (Transition::Complete, Accepted, Some(Completed)),
            (Transition::Complete, Pending, None),
            (Transition::Cancel, Pending, Some(Cancelled)),
            (Transition::Cancel, Accepted, Some(Cancelled)),
            (Transition::Cancel, Completed, None),
            (Transition::Cancel, Rejected, None),
            (Transition::Accept, Cancelled, None),
        ];
        for (transition, from, expected) in table {
            assert_eq!(
                transition.check("d", from, None).ok(),
                expected,
                "{transition:?} from {from}"
            );
        }
        let err = Transition::Complete.check("d1", Pending, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "delegation d1 is pending; it must be accepted to complete"
        );
    }

    fn at(seconds: i64) -> NaiveDateTime {
        chrono::DateTime::from_timestamp(1_800_000_000 + seconds, 0)
            .unwrap()
            .naive_utc()
    }

    #[test]
    fn a_deadline_is_due_once_passed_and_only_while_it_applies() {
        use ExpiryReason::*;
        let (a, c) = (Some(at(10)), Some(at(20)));
        assert_eq!(due(Pending, a, c, at(9)), None);
        assert_eq!(due(Pending, a, c, at(10)), Some(AcceptDeadline));
        assert_eq!(due(Pending, a, c, at(25)), Some(AcceptDeadline));
        // Accepted: the accept deadline no longer applies.
        assert_eq!(due(Accepted, a, c, at(15)), None);
        assert_eq!(due(Accepted, a, c, at(20)), Some(CompleteDeadline));
        // The earlier deadline names the reason.
        assert_eq!(
            due(Pending, Some(at(30)), c, at(40)),
            Some(CompleteDeadline)
        );
        assert_eq!(due(Pending, None, c, at(20)), Some(CompleteDeadline));
        for finished in [Completed, Rejected, Cancelled, Expired] {
            assert_eq!(due(finished, a, c, at(99)), None);
        }
        assert_eq!(due(Pending, None, None, at(99)), None);
    }

    #[test]
    fn only_hops_where_the_task_is_at_a_lapsed_instance_are_abandoned() {
        assert!(abandoned(Pending, true, false));
        assert!(abandoned(Accepted, true, false));
        assert!(
            !abandoned(Accepted, true, true),
            "work passed further down goes on"
        );
        assert!(!abandoned(Pending, false, false));
        assert!(!abandoned(Completed, true, false));
        let lapsed = ProposedHop {
            target_lapsed: Some(at(0)),
            ..hop()
        };
        assert_eq!(
            check_new_hop(&lapsed).unwrap_err().to_string(),
            "target instance p is unresponsive: its lease lapsed at 2027-01-15T08:00:00.000Z"
        );
    }

    #[test]
    fn a_child_never_outlives_its_parent() {
        assert_eq!(capped_complete_by(Some(at(5)), Some(at(9))), Some(at(5)));
        assert_eq!(capped_complete_by(Some(at(9)), Some(at(5))), Some(at(5)));
        assert_eq!(capped_complete_by(None, Some(at(5))), Some(at(5)));
        assert_eq!(capped_complete_by(Some(at(5)), None), Some(at(5)));
        assert_eq!(capped_complete_by(None, None), None);
    }

    #[test]
    fn late_workers_are_told_when_and_why_their_hop_expired() {
        let expiry = Some(Expiry {
            at: at(0),
            reason: ExpiryReason::AcceptDeadline,
        });
        let err = Transition::Accept.check("d", Expired, expiry).unwrap_err();
        assert_eq!(
            err.to_string(),
            "delegation d expired at 2027-01-15T08:00:00.000Z (it was neither accepted nor \
             rejected by its accept_by); it can no longer accept"
        );
        let below = Some(Expiry {
            at: at(0),
            reason: ExpiryReason::CompleteDeadline,
        });
        let err = Transition::Complete
            .check("e", Cancelled, below)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "delegation e is cancelled: a hop above it expired at 2027-01-15T08:00:00.000Z (it \
             was not completed by its complete_by); it can no longer complete"
        );
        assert_eq!(Expiry::of(Some(at(0)), None), None);
        assert!(matches!(
            Transition::Expire.check("d", Completed, None),
            Err(Error::FailedPrecondition(_))
        ));
        assert_eq!(Transition::Expire.check("d", Accepted, None), Ok(Expired));
    }

    #[test]
    fn relations_follow_lineage() {
        let lineage = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let global = lineage(&["g"]);
        let project = lineage(&["p", "g"]);
        let orch = lineage(&["o", "p", "g"]);
        let other = lineage(&["q", "g"]);
        assert_eq!(Relation::between(&global, &orch), Relation::Descendant);
        assert_eq!(Relation::between(&orch, &global), Relation::Ancestor);
        assert_eq!(Relation::between(&project, &other), Relation::Unrelated);
        assert_eq!(Relation::between(&project, &project), Relation::Same);
    }

    fn hop() -> ProposedHop<'static> {
        ProposedHop {
            task_id: "t",
            task_status: TaskStatus::Pending,
            task_location: "g",
            is_subtask: false,
            pending_delegation: None,
            open_subtasks: 0,
            arrived_by_delegation: false,
            source: "g",
            target: "p",
            target_status: InstanceStatus::Running,
            target_lapsed: None,
            kind: DelegationType::Route,
            relation: Relation::Descendant,
        }
    }

    #[test]
    fn a_hop_must_follow_every_rule() {
        assert!(check_new_hop(&hop()).is_ok());
        let refused = [
            ProposedHop {
                relation: Relation::Same,
                ..hop()
            },
            ProposedHop {
                task_status: TaskStatus::Done,
                ..hop()
            },
            ProposedHop {
                pending_delegation: Some("d0"),
                ..hop()
            },
            ProposedHop {
                task_location: "x",
                ..hop()
            },
            ProposedHop {
                target_status: InstanceStatus::Stopped,
                ..hop()
            },
            ProposedHop {
                kind: DelegationType::Decompose,
                ..hop()
            },
            ProposedHop {
                kind: DelegationType::Escalate,
                ..hop()
            },
            ProposedHop {
                kind: DelegationType::Reassign,
                ..hop()
            },
            ProposedHop {
                relation: Relation::Ancestor,
                ..hop()
            },
        ];
        for case in refused {
            assert!(check_new_hop(&case).is_err(), "{case:?}");
        }
        let fine = [
            ProposedHop {
                kind: DelegationType::Decompose,
                is_subtask: true,
                ..hop()
            },
            ProposedHop {
                kind: DelegationType::Escalate,
                relation: Relation::Ancestor,
                ..hop()
            },
            ProposedHop {
                kind: DelegationType::Reassign,
                relation: Relation::Unrelated,
                ..hop()
            },
        ];
        for case in fine {
            assert!(check_new_hop(&case).is_ok(), "{case:?}");
        }
    }

    #[test]
    fn a_parent_is_done_when_every_subtask_not_cancelled_is_done() {
        use TaskStatus::*;
        let r1 = serde_json::json!({"ok": 1});
        let all_done = [
            ("a", Done, Some(&r1)),
            ("b", Done, None),
            ("c", Cancelled, None),
        ];
        assert_eq!(
            aggregate(all_done),
            Some(serde_json::json!({"subtasks": {"a": {"ok": 1}, "b": null}}))
        );
        assert_eq!(
            aggregate([("a", Done, None), ("b", InProgress, None)]),
            None
        );
        assert_eq!(aggregate([("a", Cancelled, None)]), None);
        assert_eq!(aggregate([]), None);
    }

    #[test]
    fn completions_bubble_to_the_origin_but_not_past_a_decompose_hop() {
        use DelegationType::*;
        assert_eq!(bubbling(&[Route]), (0, true));
        assert_eq!(bubbling(&[Route, Route]), (1, true));
        assert_eq!(bubbling(&[Escalate, Route, Route]), (2, true));
        assert_eq!(bubbling(&[Decompose]), (0, true));
        assert_eq!(bubbling(&[Route, Decompose]), (1, true));
        assert_eq!(bubbling(&[Decompose, Route]), (0, false));
    }

    #[test]
    fn a_completion_is_refused_while_the_task_is_elsewhere_or_split() {
        use DelegationType::{Decompose, Route};
        let chain = [("d2", Accepted, Route), ("d1", Accepted, Route)];
        let facts = |chain, child, open| Completing {
            expiry: None,
            task_id: "t",
            chain,
            active_child: child,
            open_subtasks: open,
        };
        let reach = check_completion(&facts(&chain, None, 0)).unwrap();
        assert_eq!(
            reach,
            Reach {
                ancestors: 1,
                task_done: true
            }
        );

        let pending = [("d2", Pending, Route)];
        let err = check_completion(&facts(&pending, None, 0)).unwrap_err();
        assert!(
            err.to_string()
                .contains("d2 is pending; it must be accepted"),
            "{err}"
        );

        let onward = Some(("d3", Pending, "orch"));
        let err = check_completion(&facts(&chain, onward, 0)).unwrap_err();
        assert!(
            err.to_string()
                .contains("delegated onward by delegation d3"),
            "{err}"
        );

        let err = check_completion(&facts(&chain, None, 2)).unwrap_err();
        assert!(err.to_string().contains("has 2 open subtasks"), "{err}");
        // A subtask's chain starts with its decompose hop: completing the route below it
        // bubbles up to it and finishes the subtask.
        let subtask = [("d3", Accepted, Route), ("d2", Accepted, Decompose)];
        let reach = check_completion(&facts(&subtask, None, 0)).unwrap();
        assert_eq!(
            reach,
            Reach {
                ancestors: 1,
                task_done: true
            }
        );
        let broken = [("d2", Accepted, Route), ("d1", Completed, Route)];
        assert!(matches!(
            check_completion(&facts(&broken, None, 0)),
            Err(Error::Internal(_))
        ));
        assert!(matches!(
            check_completion(&facts(&[], None, 0)),
            Err(Error::Internal(_))
        ));
    }

    #[test]
    fn a_task_completes_where_it_is_only_when_nothing_else_is_open() {
        let facts = |status, pending, open| LocalCompletion {
            task_id: "t",
            status,
            pending_delegation: pending,
            open_subtasks: open,
        };
        assert!(check_local_completion(&facts(TaskStatus::Pending, None, 0)).is_ok());
        let refusal = |f| check_local_completion(&f).unwrap_err().to_string();
        assert_eq!(refusal(facts(TaskStatus::Done, None, 0)), "task t is done");
        assert_eq!(
            refusal(facts(TaskStatus::Pending, Some("d1"), 0)),
            "task t is on its way: delegation d1 is pending"
        );
        assert_eq!(
            refusal(facts(TaskStatus::InProgress, None, 3)),
            "task t has 3 open subtasks; it completes when they do"
        );
    }

    #[test]
    fn a_subtask_needs_an_unfinished_parent_in_place_and_is_made_where_it_is() {
        let new = |status, pending, wanted| NewSubtask {
            parent_id: "p",
            parent_status: status,
            parent_at: "project",
            pending_delegation: pending,
            wanted_at: wanted,
        };
        assert!(check_new_subtask(&new(TaskStatus::InProgress, None, None)).is_ok());
        assert!(check_new_subtask(&new(TaskStatus::Pending, None, Some("project"))).is_ok());
        let refused = |n: NewSubtask<'_>| check_new_subtask(&n).unwrap_err().to_string();
        assert_eq!(
            refused(new(TaskStatus::Done, None, None)),
            "parent task p is done; a finished task takes no subtasks"
        );
        assert_eq!(
            refused(new(TaskStatus::Cancelled, Some("d1"), None)),
            "parent task p is cancelled; a finished task takes no subtasks"
        );
        assert_eq!(
            refused(new(TaskStatus::Pending, Some("d1"), None)),
            "task p is on its way: delegation d1 is pending"
        );
        assert_eq!(
            refused(new(TaskStatus::Pending, None, Some("orch"))),
            "parent task p is at instance project, not orch; \
             a subtask is created where its parent task is"
        );
    }

    #[test]
    fn a_parent_completes_from_its_subtasks_only_when_unfinished_and_in_place() {
        assert!(completes_from_subtasks(TaskStatus::InProgress, None));
        assert!(completes_from_subtasks(TaskStatus::Blocked, None));
        assert!(!completes_from_subtasks(TaskStatus::Done, None));
        assert!(!completes_from_subtasks(TaskStatus::Cancelled, None));
        assert!(!completes_from_subtasks(TaskStatus::Pending, Some("d1")));
    }
}
