//! hopperctl's command line: the clap tree of commands and flags, and the flag parsers.

use clap::{Parser, Subcommand};
use serde_json::Value;

use super::{connect::Target, render::Format, watch};
use crate::{
    domain::{DelegationType, InstanceStatus, Scope},
    proto::json::to_struct,
};

/// The Hopper delegation service's command line client.
#[derive(Debug, Parser)]
#[command(name = "hopperctl", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub(super) target: Target,
    /// Output: `text` for people, `json` for scripts (one document per record, per line).
    #[arg(short, long, value_enum, default_value_t = Format::Text, global = true)]
    pub(super) output: Format,
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Debug, Subcommand)]
pub(super) enum Command {
    /// Register, list and draw instances.
    #[command(subcommand)]
    Instances(Instances),
    /// Create, show, complete and cancel tasks.
    #[command(subcommand)]
    Tasks(Tasks),
    #[command(flatten)]
    Delegations(Delegations),
    /// Print an instance's events as they arrive; reconnects and resumes by itself.
    Watch(watch::WatchArgs),
}

#[derive(Debug, Subcommand)]
pub(super) enum Delegations {
    /// Delegate a task from one instance to another; prints the new delegation's id.
    Delegate {
        /// The task to delegate; it must be at the source.
        task: String,
        /// The instance sending the task.
        #[arg(long = "from")]
        source: String,
        /// The instance receiving it.
        #[arg(long = "to")]
        target: String,
        /// How the task moves.
        #[arg(long = "type", default_value = "route", value_parser = parse_word::<DelegationType>)]
        delegation_type: DelegationType,
        /// Who is delegating (a user, a service, an agent).
        #[arg(long = "by")]
        delegated_by: Option<String>,
        /// Free-form notes.
        #[arg(long)]
        notes: Option<String>,
        /// The hop must be accepted or rejected within this (e.g. `30s`), or it expires and
        /// the task goes back.
        #[arg(long, value_parser = humantime::parse_duration)]
        accept_within: Option<std::time::Duration>,
        /// The hop must complete within this (e.g. `1h`), or it expires.
        #[arg(long, value_parser = humantime::parse_duration)]
        complete_within: Option<std::time::Duration>,
    },
    /// Accept a pending delegation (as its target).
    Accept {
        /// The delegation's id.
        id: String,
    },
    /// Reject a pending delegation (as its target); the task goes back to the source.
    Reject {
        /// The delegation's id.
        id: String,
        /// Why the task is refused.
        #[arg(long)]
        reason: String,
    },
    /// Complete an accepted delegation; the completion bubbles up the chain.
    Complete {
        /// The delegation's id.
        id: String,
        /// The outcome, a JSON object.
        #[arg(long, value_parser = parse_object)]
        result: Option<prost_types::Struct>,
    },
    /// Cancel a pending or accepted delegation and everything delegated below it.
    Cancel {
        /// The delegation's id.
        id: String,
    },
    /// A task's hops from its origin to where it is now, one line per hop.
    Chain {
        /// The task's id.
        task: String,
    },
    /// A task, its subtasks at any depth and their hops, drawn as a tree.
    Tree {
        /// The task's id.
        task: String,
    },
    /// The delegations waiting for an instance to accept or reject them (every page).
    Pending {
        /// The target instance.
        instance: String,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum Instances {
    /// Register an instance.
    Register {
        /// Its id, e.g. `global`.
        id: String,
        /// A human-readable name.
        #[arg(long)]
        name: String,
        /// Where it sits in the tree.
        #[arg(long, value_parser = parse_word::<Scope>)]
        scope: Scope,
        /// Its parent instance; none for a root.
        #[arg(long)]
        parent: Option<String>,
        /// Its run state (default: created).
        #[arg(long, value_parser = parse_word::<InstanceStatus>)]
        status: Option<InstanceStatus>,
        /// A lease (1s to 1h, e.g. `30s`) it must renew (`instances renew`) at least once per
        /// period, or it becomes unresponsive and the hops where its tasks are expire.
        #[arg(long, value_parser = humantime::parse_duration)]
        lease: Option<std::time::Duration>,
    },
    /// Renew an instance's lease for one more period; prints until when it is live.
    Renew {
        /// The instance's id.
        id: String,
    },
    /// List every instance (every page), ordered by id.
    List,
    /// Draw the hierarchy with each instance's scope, status, pending and accepted delegations.
    Tree {
        /// Draw only the subtree below this instance.
        root: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum Tasks {
    /// Create a task at an instance (a subtask: where its parent is).
    Create {
        /// A short title.
        #[arg(long)]
        title: String,
        /// The instance the task starts at; a subtask (`--parent`) starts where its parent is.
        #[arg(long = "at", required_unless_present = "parent")]
        instance: Option<String>,
        /// Its id (default: a generated UUID).
        #[arg(long)]
        id: Option<String>,
        /// Make it a subtask of this task.
        #[arg(long)]
        parent: Option<String>,
        /// A longer description.
        #[arg(long)]
        description: Option<String>,
    },
    /// Show a task.
    Show {
        /// The task's id.
        id: String,
    },
    /// Complete a task where it is; the delegation that brought it completes and bubbles up.
    Complete {
        /// The task's id.
        id: String,
        /// The outcome, a JSON object.
        #[arg(long, value_parser = parse_object)]
        result: Option<prost_types::Struct>,
    },
    /// Cancel a task, its delegations and its unfinished subtasks.
    Cancel {
        /// The task's id.
        id: String,
    },
}

/// The domain enums that flags take by their lower-case word.
pub(super) trait Word: Sized + Copy + 'static {
    const ALL: &'static [Self];
    fn word(self) -> &'static str;
}

macro_rules! words {
    ($($name:ty),+) => {$(
        impl Word for $name {
            const ALL: &'static [Self] = <$name>::ALL;
            fn word(self) -> &'static str {
                self.as_str()
            }
        }
    )+};
}
words!(
    Scope,
    InstanceStatus,
    DelegationType,
    crate::domain::EventKind
);

/// Parses a flag's word (`route`, `running`, …); the error lists the words allowed.
pub(super) fn parse_word<T: Word>(text: &str) -> Result<T, String> {
    T::ALL
        .iter()
        .copied()
        .find(|value| value.word() == text)
        .ok_or_else(|| {
            let words: Vec<&str> = T::ALL.iter().map(|v| v.word()).collect();
            format!("expected one of: {}", words.join(", "))
        })
}

/// Parses `--result`: a JSON object.
fn parse_object(text: &str) -> Result<prost_types::Struct, String> {
    match serde_json::from_str(text) {
        Ok(value @ Value::Object(_)) => Ok(to_struct(value)),
        Ok(_) => Err("must be a JSON object, e.g. '{\"pages\": 12}'".into()),
        Err(e) => Err(format!("is not JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::proto::json::from_struct;

    #[test]
    fn flags_take_the_domain_words_and_list_them_when_wrong() {
        assert_eq!(
            parse_word::<DelegationType>("escalate"),
            Ok(DelegationType::Escalate)
        );
        assert_eq!(
            parse_word::<Scope>("galaxy"),
            Err("expected one of: global, project, orchestration, personal, family, event, federated".into())
        );
    }

    #[test]
    fn results_must_be_json_objects() {
        let parsed = parse_object(r#"{"pages": 12}"#).unwrap();
        assert_eq!(from_struct("result", parsed).unwrap(), json!({"pages": 12}));
        assert!(parse_object("[1]").unwrap_err().contains("JSON object"));
        assert!(parse_object("{").unwrap_err().contains("not JSON"));
    }
}
