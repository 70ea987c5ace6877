//! The vocabulary of Hopper (scopes, statuses, delegation types), the input limits, and the
//! lifecycle rules in [`lifecycle`]. Pure: no I/O, no transport, no database access.
//!
//! The enums derive diesel's `AsExpression`/`FromSqlRow` markers so that rows can carry them
//! typed; the actual text mapping lives in `store::sql_types`.

pub mod lifecycle;
pub mod limits;

use std::fmt;

/// Declares an enum stored as lower-case text, with its text form written once.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
            diesel::expression::AsExpression, diesel::deserialize::FromSqlRow,
        )]
        #[diesel(sql_type = diesel::sql_types::Text)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vmeta])* $variant,)+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &[Self] = &[$(Self::$variant,)+];

            /// The stored text form.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text,)+ }
            }

            /// Parses the stored text form.
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some(Self::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum! {
    /// Where an instance sits in the Hopper tree.
    Scope {
        Global = "global",
        Project = "project",
        Orchestration = "orchestration",
        Personal = "personal",
        Family = "family",
        Event = "event",
        Federated = "federated",
    }
}

text_enum! {
    /// Run state of an instance.
    InstanceStatus {
        Created = "created",
        Starting = "starting",
        Running = "running",
        Stopping = "stopping",
        Stopped = "stopped",
        Paused = "paused",
        Error = "error",
        Terminated = "terminated",
    }
}

text_enum! {
    /// Status of a task.
    TaskStatus {
        Pending = "pending",
        Claimed = "claimed",
        InProgress = "in_progress",
        Blocked = "blocked",
        Done = "done",
        Cancelled = "cancelled",
    }
}

text_enum! {
    /// How a delegation moves a task.
    DelegationType {
        /// Down the tree, to a descendant.
        Route = "route",
        /// A subtask sent down to a descendant.
        Decompose = "decompose",
        /// Up the tree, to an ancestor.
        Escalate = "escalate",
        /// Sideways, to an instance that is neither ancestor nor descendant.
        Reassign = "reassign",
    }
}

text_enum! {
    /// Where a delegation is in its lifecycle (see [`lifecycle`]).
    DelegationStatus {
        Pending = "pending",
        Accepted = "accepted",
        Rejected = "rejected",
        Completed = "completed",
        Cancelled = "cancelled",
        Expired = "expired",
    }
}

text_enum! {
    /// Which side of a delegation an instance is on.
    DelegationDirection {
        /// The instance is the delegation's target.
        Incoming = "incoming",
        /// The instance is the delegation's source.
        Outgoing = "outgoing",
    }
}

text_enum! {
    /// Why a delegation expired.
    ExpiryReason {
        /// Neither accepted nor rejected by its `accept_by`.
        AcceptDeadline = "accept_deadline",
        /// Not completed by its `complete_by`.
        CompleteDeadline = "complete_deadline",
        /// The target instance's lease lapsed while the task was at it.
        TargetUnresponsive = "target_unresponsive",
    }
}

text_enum! {
    /// What an entry of the event log records.
    EventKind {
        /// A delegation was made.
        DelegationCreated = "delegation_created",
        /// A delegation was accepted.
        DelegationAccepted = "delegation_accepted",
        /// A delegation was rejected.
        DelegationRejected = "delegation_rejected",
        /// A delegation completed, directly or by bubbling.
        DelegationCompleted = "delegation_completed",
        /// A delegation was cancelled, directly or by cascade.
        DelegationCancelled = "delegation_cancelled",
        /// A task's origin delegation completed: the task is done.
        TaskCompleted = "task_completed",
        /// A delegation's deadline passed: it expired and its task went back to the source.
        DelegationExpired = "delegation_expired",
    }
}

impl DelegationStatus {
    /// Pending and accepted delegations are active: they can still change.
    pub(crate) const ACTIVE: [Self; 2] = [Self::Pending, Self::Accepted];

    /// The statuses of the hops that make up a task's current chain: rejected, cancelled and
    /// expired hops drop out of it.
    pub(crate) const IN_CHAIN: [Self; 3] = [Self::Pending, Self::Accepted, Self::Completed];

    /// Whether the delegation can still change.
    pub(crate) fn is_active(self) -> bool {
        Self::ACTIVE.contains(&self)
    }
}

impl InstanceStatus {
    /// Whether an instance in this state may receive delegations.
    pub(crate) fn takes_work(self) -> bool {
        matches!(self, Self::Created | Self::Starting | Self::Running)
    }
}

impl TaskStatus {
    /// Finished tasks: nothing changes them any more.
    pub(crate) const FINAL: [Self; 2] = [Self::Done, Self::Cancelled];

    /// Whether the task is finished for good.
    pub(crate) fn is_final(self) -> bool {
        Self::FINAL.contains(&self)
    }
}
