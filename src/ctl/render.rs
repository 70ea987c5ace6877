//! How hopperctl prints records: aligned text for people (colours only on a terminal, times
//! absolute and relative), or one JSON document per record for scripts.
//!
//! The JSON uses the proto's field names, the enums' lower-case words (the same words the
//! flags take), RFC 3339 times and `null` for what is unset, so that a script can rely on
//! every key being there.

use std::io::{IsTerminal, Write};

use chrono::{DateTime, Utc};
use prost_types::Timestamp;
use serde_json::{Value, json};

use crate::proto::{self as pb, json};

/// Text or JSON, chosen with `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Aligned text for people.
    Text,
    /// One JSON document per record, one per line.
    Json,
}

/// Writes records to standard output in the chosen format.
pub(crate) struct Printer {
    /// The chosen format.
    pub format: Format,
    /// Whether text gets ANSI colours: only on a terminal, and never with `NO_COLOR` set.
    color: bool,
    /// Set when standard output is gone (`hopperctl watch … | head -3`): `watch` then ends.
    closed: std::cell::Cell<bool>,
}

impl Printer {
    /// A printer for standard output.
    pub fn new(format: Format) -> Self {
        Self {
            format,
            color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            closed: std::cell::Cell::new(false),
        }
    }

    /// Prints one line and flushes it (a `watch` line must not wait in a buffer). A closed
    /// pipe (`hopperctl … | head`) is not an error worth reporting; [`Self::closed`] tells.
    pub fn line(&self, text: impl AsRef<str>) {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{}", text.as_ref())
            .and_then(|()| out.flush())
            .is_err()
        {
            self.closed.set(true);
        }
    }

    /// Whether standard output could not be written to.
    pub fn closed(&self) -> bool {
        self.closed.get()
    }

    /// Prints a JSON document on one line.
    pub fn json(&self, value: &Value) {
        self.line(value.to_string());
    }

    /// Prints rows as aligned columns, two spaces apart; the last column is not padded.
    pub fn table(&self, rows: &[Vec<Cell>]) {
        for line in table(rows, self.color) {
            self.line(line);
        }
    }

    /// Prints `key value` lines, the keys aligned.
    pub fn fields(&self, fields: &[(&str, Cell)]) {
        let rows: Vec<Vec<Cell>> = fields
            .iter()
            .map(|(key, value)| vec![Cell::plain(*key), value.clone()])
            .collect();
        self.table(&rows);
    }

    /// What a hop waits on: an active hop's next deadline as `2026-11-30 12:40:01 UTC (in
    /// 25s)` or `(overdue)`; an expired hop's reason (`accept deadline passed`); `-` otherwise.
    pub fn deadline(&self, d: &pb::Delegation) -> String {
        if let Some(reason) = expiry_reason(d.expiry_reason) {
            return reason.into();
        }
        let due = match pb::DelegationStatus::try_from(d.status) {
            Ok(pb::DelegationStatus::Pending) => [&d.accept_by, &d.complete_by]
                .into_iter()
                .flatten()
                .min_by_key(|at| (at.seconds, at.nanos)),
            Ok(pb::DelegationStatus::Accepted) => d.complete_by.as_ref(),
            _ => None,
        };
        self.until(due)
    }

    /// A time to come as `2026-11-30 12:40:01 UTC (in 25s)`, or `(overdue)` once past; `-` if
    /// unset.
    pub fn until(&self, at: Option<&Timestamp>) -> String {
        at.and_then(to_datetime).map_or_else(
            || "-".into(),
            |at| {
                let left = at - Utc::now();
                let when = if left <= chrono::TimeDelta::zero() {
                    "overdue".into()
                } else {
                    ago(-left)
                };
                format!("{} ({when})", at.format("%Y-%m-%d %H:%M:%S UTC"))
            },
        )
    }

    /// An instance's lease: `live until …` or `unresponsive since …`; `-` without a lease.
    pub fn lease(&self, i: &pb::Instance) -> String {
        match i.lease_expires_at.as_ref().and_then(to_datetime) {
            None => "-".into(),
            Some(at) if at <= Utc::now() => format!(
                "unresponsive since {}",
                self.time(i.lease_expires_at.as_ref())
            ),
            Some(_) => format!("live until {}", self.until(i.lease_expires_at.as_ref())),
        }
    }

    /// A time as `2026-11-30 12:40:01 UTC (3m ago)`, or `-` if unset.
    pub fn time(&self, at: Option<&Timestamp>) -> String {
        at.and_then(to_datetime).map_or_else(
            || "-".into(),
            |at| {
                format!(
                    "{} ({})",
                    at.format("%Y-%m-%d %H:%M:%S UTC"),
                    ago(Utc::now() - at)
                )
            },
        )
    }
}

/// One cell of a table: its text, and the colour it gets on a terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    text: String,
    color: Option<&'static str>,
}

impl Cell {
    /// A cell without colour.
    pub fn plain(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            color: None,
        }
    }

    /// A status word, coloured by what it means: waiting, working, done or stopped.
    pub fn status(word: impl Into<String>) -> Self {
        let text = word.into();
        let color = match text.as_str() {
            "pending" | "created" | "starting" | "paused" | "blocked" | "claimed" => "33",
            "accepted" | "running" | "in_progress" => "36",
            "completed" | "done" | "task_completed" | "delegation_completed" => "32",
            "rejected"
            | "cancelled"
            | "error"
            | "stopping"
            | "stopped"
            | "terminated"
            | "delegation_rejected"
            | "delegation_cancelled" => "31",
            _ => return Self::plain(text),
        };
        Self {
            text,
            color: Some(color),
        }
    }

    /// The same cell, padded with spaces to `width` characters.
    pub fn padded(mut self, width: usize) -> Self {
        let len = self.text.chars().count();
        self.text.push_str(&" ".repeat(width.saturating_sub(len)));
        self
    }

    /// A cell in a dim colour, for secondary detail.
    pub(crate) fn dim(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            color: Some("2"),
        }
    }
}

/// Lays out rows as aligned columns (padding counts characters, not bytes; colours are added
/// after padding so that they do not count).
fn table(rows: &[Vec<Cell>], color: bool) -> Vec<String> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|row| row.get(c))
                .map(|cell| cell.text.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c > 0 {
                    line.push_str("  ");
                }
                let pad = if c + 1 == row.len() {
                    0
                } else {
                    widths[c] - cell.text.chars().count()
                };
                match (color, cell.color) {
                    (true, Some(code)) => {
                        line.push_str(&format!("\x1b[{code}m{}\x1b[0m", cell.text))
                    }
                    _ => line.push_str(&cell.text),
                }
                line.push_str(&" ".repeat(pad));
            }
            line.trim_end().to_owned()
        })
        .collect()
}

fn to_datetime(at: &Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(at.seconds, u32::try_from(at.nanos).ok()?)
}

/// A duration as people say it: `just now`, `42s ago`, `3m ago`, `5h ago`, `2d ago`, or `in 3s`
/// for a clock that runs behind the server's.
fn ago(elapsed: chrono::TimeDelta) -> String {
    let seconds = elapsed.num_seconds();
    let (amount, future) = (seconds.unsigned_abs(), seconds < 0);
    let text = match amount {
        0..=1 => return "just now".into(),
        2..=59 => format!("{amount}s"),
        60..=3_599 => format!("{}m", amount / 60),
        3_600..=86_399 => format!("{}h", amount / 3_600),
        _ => format!("{}d", amount / 86_400),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// Why a hop expired, as a phrase; `None` if it did not.
pub(crate) fn expiry_reason(reason: i32) -> Option<&'static str> {
    match pb::ExpiryReason::try_from(reason).ok()? {
        pb::ExpiryReason::Unspecified => None,
        pb::ExpiryReason::AcceptDeadline => Some("accept deadline passed"),
        pb::ExpiryReason::CompleteDeadline => Some("complete deadline passed"),
        pb::ExpiryReason::TargetUnresponsive => Some("target unresponsive"),
    }
}

/// The lower-case word of a proto enum value: `DELEGATION_STATUS_PENDING` -> `pending`.
pub(crate) fn word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// `fn NAME(value: i32) -> String`: the word of a proto enum number (the number itself if
/// this client does not know it, say from a newer server).
macro_rules! enum_words {
    ($($(#[$doc:meta])* $name:ident: $enum:ident, $prefix:literal;)+) => {$(
        $(#[$doc])*
        pub fn $name(value: i32) -> String {
            pb::$enum::try_from(value)
                .map_or_else(|_| value.to_string(), |v| word(v.as_str_name(), $prefix))
        }
    )+};
}

enum_words! {
    /// The word of a scope.
    scope: Scope, "SCOPE_";
    /// The word of an instance status.
    instance_status: InstanceStatus, "INSTANCE_STATUS_";
    /// The word of a task status.
    task_status: TaskStatus, "TASK_STATUS_";
    /// The word of a delegation type.
    delegation_type: DelegationType, "DELEGATION_TYPE_";
    /// The word of a delegation status.
    delegation_status: DelegationStatus, "DELEGATION_STATUS_";
    /// The word of an event kind.
    event_kind: EventKind, "EVENT_KIND_";
}

fn time_json(at: Option<&Timestamp>) -> Value {
    at.and_then(to_datetime).map_or(Value::Null, |at| {
        Value::String(at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
    })
}

fn optional(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_owned())
    }
}

fn document(value: Option<&prost_types::Struct>) -> Value {
    value
        .cloned()
        .and_then(|s| json::from_struct("result", s).ok())
        .unwrap_or(Value::Null)
}

/// A result or config document as compact JSON, `-` if unset.
pub(crate) fn document_text(value: Option<&prost_types::Struct>) -> String {
    match document(value) {
        Value::Null => "-".into(),
        value => value.to_string(),
    }
}

/// An instance as JSON.
pub(crate) fn instance_json(i: &pb::Instance) -> Value {
    json!({
        "id": i.id,
        "name": i.name,
        "scope": scope(i.scope),
        "parent_id": optional(&i.parent_id),
        "status": instance_status(i.status),
        "config": document(i.config.as_ref()),
        "created_at": time_json(i.created_at.as_ref()),
        "updated_at": time_json(i.updated_at.as_ref()),
        "lease_seconds": i.lease.as_ref().map_or(Value::Null, |l| {
            (l.seconds as f64 + f64::from(l.nanos) / 1e9).into()
        }),
        "lease_expires_at": time_json(i.lease_expires_at.as_ref()),
    })
}

/// A task as JSON.
pub(crate) fn task_json(t: &pb::Task) -> Value {
    json!({
        "id": t.id,
        "title": t.title,
        "description": t.description,
        "instance_id": t.instance_id,
        "parent_task_id": optional(&t.parent_task_id),
        "status": task_status(t.status),
        "result": document(t.result.as_ref()),
        "created_at": time_json(t.created_at.as_ref()),
        "updated_at": time_json(t.updated_at.as_ref()),
    })
}

/// A delegation as JSON.
pub(crate) fn delegation_json(d: &pb::Delegation) -> Value {
    json!({
        "id": d.id,
        "task_id": d.task_id,
        "parent_delegation_id": optional(&d.parent_delegation_id),
        "source_instance_id": d.source_instance_id,
        "target_instance_id": d.target_instance_id,
        "delegation_type": delegation_type(d.delegation_type),
        "status": delegation_status(d.status),
        "delegated_by": optional(&d.delegated_by),
        "notes": optional(&d.notes),
        "rejection_reason": optional(&d.rejection_reason),
        "result": document(d.result.as_ref()),
        "delegated_at": time_json(d.delegated_at.as_ref()),
        "accepted_at": time_json(d.accepted_at.as_ref()),
        "completed_at": time_json(d.completed_at.as_ref()),
        "created_at": time_json(d.created_at.as_ref()),
        "updated_at": time_json(d.updated_at.as_ref()),
        "accept_by": time_json(d.accept_by.as_ref()),
        "complete_by": time_json(d.complete_by.as_ref()),
        "expired_at": time_json(d.expired_at.as_ref()),
        "expiry_reason": pb::ExpiryReason::try_from(d.expiry_reason)
            .ok()
            .filter(|r| *r != pb::ExpiryReason::Unspecified)
            .map_or(Value::Null, |r| word(r.as_str_name(), "EXPIRY_REASON_").into()),
    })
}

/// A list of delegations as JSON.
pub(crate) fn delegations_json(ds: &[pb::Delegation]) -> Value {
    Value::Array(ds.iter().map(delegation_json).collect())
}

/// An event as JSON.
pub(crate) fn event_json(e: &pb::DelegationEvent) -> Value {
    json!({
        "sequence": e.sequence,
        "kind": event_kind(e.kind),
        "occurred_at": time_json(e.occurred_at.as_ref()),
        "task_id": e.task_id,
        "delegation": e.delegation.as_ref().map_or(Value::Null, delegation_json),
        "caused_by_delegation_id": optional(&e.caused_by_delegation_id),
    })
}

pub(super) fn header(names: &[&str]) -> Vec<Cell> {
    names.iter().map(|name| Cell::dim(*name)).collect()
}

pub(super) fn show_instance(i: &pb::Instance, p: &Printer) {
    if p.format == Format::Json {
        return p.json(&instance_json(i));
    }
    p.fields(&[
        ("instance", Cell::plain(&i.id)),
        ("name", Cell::plain(&i.name)),
        ("scope", Cell::plain(scope(i.scope))),
        ("status", Cell::status(instance_status(i.status))),
        (
            "parent",
            Cell::plain(if i.parent_id.is_empty() {
                "-"
            } else {
                &i.parent_id
            }),
        ),
        ("config", Cell::plain(document_text(i.config.as_ref()))),
        ("lease", Cell::plain(p.lease(i))),
        ("registered", Cell::plain(p.time(i.created_at.as_ref()))),
    ]);
}

pub(super) fn show_task(t: &pb::Task, p: &Printer) {
    if p.format == Format::Json {
        return p.json(&task_json(t));
    }
    let mut fields = vec![
        ("task", Cell::plain(&t.id)),
        ("title", Cell::plain(&t.title)),
        ("status", Cell::status(task_status(t.status))),
        ("at", Cell::plain(&t.instance_id)),
    ];
    if !t.parent_task_id.is_empty() {
        fields.push(("parent", Cell::plain(&t.parent_task_id)));
    }
    if !t.description.is_empty() {
        fields.push(("description", Cell::plain(&t.description)));
    }
    fields.extend([
        ("result", Cell::plain(document_text(t.result.as_ref()))),
        ("created", Cell::plain(p.time(t.created_at.as_ref()))),
        ("updated", Cell::plain(p.time(t.updated_at.as_ref()))),
    ]);
    p.fields(&fields);
}

/// One line for a delegation that just changed: `delegation ID accepted: a → b (route, task T)`.
pub(super) fn changed(d: &pb::Delegation, p: &Printer) {
    if p.format == Format::Json {
        return p.json(&delegation_json(d));
    }
    p.table(&[hop_row("delegation", d)]);
}

pub(super) fn hop_row(label: &str, d: &pb::Delegation) -> Vec<Cell> {
    vec![
        Cell::plain(format!("{label} {}", d.id)),
        Cell::status(delegation_status(d.status)),
        Cell::plain(format!(
            "{} → {}",
            d.source_instance_id, d.target_instance_id
        )),
        Cell::plain(format!(
            "({}, task {})",
            delegation_type(d.delegation_type),
            d.task_id
        )),
    ]
}

/// The delegations a completion or cancellation took with it, one line each.
pub(super) fn hops_done(label: &str, ds: &[pb::Delegation], p: &Printer) {
    let rows: Vec<Vec<Cell>> = ds
        .iter()
        .map(|d| hop_row(&format!("  {label}"), d))
        .collect();
    p.table(&rows);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_by_characters_and_colours_do_not_count() {
        let rows = vec![
            vec![
                Cell::plain("└── web"),
                Cell::status("running"),
                Cell::plain("x"),
            ],
            vec![
                Cell::plain("global"),
                Cell::status("accepted"),
                Cell::plain("y"),
            ],
        ];
        assert_eq!(
            table(&rows, false),
            ["└── web  running   x", "global   accepted  y"]
        );
        let colored = table(&rows, true);
        assert_eq!(colored[0], "└── web  \x1b[36mrunning\x1b[0m   x");
    }

    #[test]
    fn relative_times_read_like_speech() {
        let s = chrono::TimeDelta::seconds;
        assert_eq!(ago(s(0)), "just now");
        assert_eq!(ago(s(42)), "42s ago");
        assert_eq!(ago(s(3 * 60 + 5)), "3m ago");
        assert_eq!(ago(s(5 * 3600)), "5h ago");
        assert_eq!(ago(s(2 * 86_400)), "2d ago");
        assert_eq!(ago(s(-3)), "in 3s");
    }

    #[test]
    fn enum_words_are_the_flags_words() {
        assert_eq!(
            delegation_status(pb::DelegationStatus::Accepted as i32),
            "accepted"
        );
        assert_eq!(
            event_kind(pb::EventKind::TaskCompleted as i32),
            "task_completed"
        );
        assert_eq!(
            task_status(pb::TaskStatus::InProgress as i32),
            "in_progress"
        );
        assert_eq!(scope(99), "99");
    }
}
