//! The one error type of the request path, and its one mapping to a gRPC status.
//!
//! `anyhow` is used only at start-up (`main`). Everything a request can hit is an [`Error`]:
//! the rules produce `InvalidArgument`, `NotFound` and `FailedPrecondition` with a message that
//! names the field, the entity or the current state; [`From<diesel::result::Error>`] turns
//! database failures into `Unavailable` (the database went away, is starting or shutting down,
//! or SQLite is busy), `Aborted` (deadlock, serialization failure), `ResourceExhausted` (no
//! room to write) or `Internal` (our bugs only), by SQLSTATE and never by message text, keeping
//! the database's text in the log. The `From<Error> for tonic::Status` impl below is the only
//! place that picks gRPC codes.

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Everything that can go wrong while serving a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A request field is malformed; nothing was looked up.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field, as named in the proto.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A record the request names does not exist.
    #[error("{entity} {id} not found")]
    NotFound {
        /// What kind of record ("task", "instance", "delegation").
        entity: &'static str,
        /// The id that was asked for.
        id: String,
    },
    /// A record the request would create exists already.
    #[error("{entity} {id} already exists")]
    AlreadyExists {
        /// What kind of record.
        entity: &'static str,
        /// The taken id.
        id: String,
    },
    /// The request is well-formed but the current state forbids it; the message names the state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No credentials, or ones this server does not know.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but the rules in `repository::access` forbid the request.
    #[error("{0}")]
    PermissionDenied(String),
    /// A cursor outside what the event log holds; the message says where to resume.
    #[error("{0}")]
    OutOfRange(String),
    /// A cursor older than the retained log: the events after `after` were pruned up to and
    /// including `pruned_through`. OUT_OF_RANGE, with the sequences in an `ErrorInfo`.
    #[error(
        "events after sequence {after} were pruned; the oldest available is {}: re-read the \
         state and resume after sequence {pruned_through}",
        pruned_through + 1
    )]
    CursorExpired {
        /// The cursor asked for.
        after: i64,
        /// The last pruned sequence: where to resume after re-reading the state.
        pruned_through: i64,
    },
    /// The service or its database cannot serve now; retrying later may succeed. The message
    /// is written for the client: it never carries the database's own error text.
    #[error("{0}")]
    Unavailable(String),
    /// The database rolled the request back to resolve a conflict with a concurrent one (a
    /// deadlock or a serialization failure); nothing was written and a retry may succeed.
    #[error("{0}")]
    Aborted(String),
    /// The database has no room to write (a full disk, or SQLite's size limit); nothing was
    /// written, and reads go on.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A bug or a corrupt row; the details are logged, the client gets a short message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// An `InvalidArgument` for `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// A `NotFound` for the `entity` with this `id`.
    pub fn not_found(entity: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound {
            entity,
            id: id.into(),
        }
    }

    /// A `FailedPrecondition` with this message.
    pub(crate) fn precondition(message: impl Into<String>) -> Self {
        Self::FailedPrecondition(message.into())
    }
}

impl From<DieselError> for Error {
    /// The database's own words go to the log only: a client learns what happened and what to
    /// do, never the text of a driver or a server (which can name tables, values or hosts).
    fn from(err: DieselError) -> Self {
        match Fault::of_error(&err) {
            Fault::Unreachable => {
                tracing::warn!(error = %err, "database connection lost");
                Self::Unavailable("the database cannot be reached; retry later".into())
            }
            Fault::Busy => {
                tracing::warn!(error = %err, "database busy");
                Self::Unavailable("the database is busy; retry later".into())
            }
            Fault::Conflict => {
                tracing::warn!(error = %err, "transaction aborted by the database");
                Self::Aborted(
                    "the request conflicted with a concurrent one and changed nothing; retry it"
                        .into(),
                )
            }
            Fault::Full => {
                tracing::error!(error = %err, "the database is out of space");
                Self::ResourceExhausted(
                    "the database is out of space (its disk is full); nothing was written; \
                     retry once space is freed"
                        .into(),
                )
            }
            Fault::Bug => Self::Internal(err.to_string()),
        }
    }
}

/// What a database error means for the client.
#[derive(Debug, PartialEq, Eq)]
enum Fault {
    /// The database went away or cannot serve now: retry later, on this or another replica.
    Unreachable,
    /// SQLite's lock could not be had in time.
    Busy,
    /// The database rolled the transaction back to resolve a conflict: retry now.
    Conflict,
    /// No room to write: the disk is full.
    Full,
    /// Ours: a query or a row the code did not expect.
    Bug,
}

impl Fault {
    fn of_error(err: &DieselError) -> Self {
        match err {
            DieselError::DatabaseError(kind, info) => Self::of(kind, info.message()),
            DieselError::BrokenTransactionManager => Self::Unreachable,
            // A COMMIT that failed and a rollback that failed after it: the commit's error
            // says what happened.
            DieselError::RollbackErrorOnCommit { commit_error, .. } => Self::of_error(commit_error),
            _ => Self::Bug,
        }
    }

    /// PostgreSQL errors by their SQLSTATE, which `store::pg_connect` writes in front of the
    /// message (diesel-async hides it otherwise), never by their text, which follows the
    /// server's `lc_messages`. SQLite has no SQLSTATE and diesel passes on only its message
    /// (`sqlite3_errmsg`), which SQLite writes in English only; each starts with the words of
    /// its result code, sometimes followed by details.
    fn of(kind: &DatabaseErrorKind, message: &str) -> Self {
        if let Some(code) = crate::store::sqlstate(message) {
            return Self::of_sqlstate(code);
        }
        match kind {
            DatabaseErrorKind::SerializationFailure => return Self::Conflict,
            DatabaseErrorKind::ClosedConnection
            | DatabaseErrorKind::UnableToSendCommand
            | DatabaseErrorKind::ReadOnlyTransaction => return Self::Unreachable,
            _ => {}
        }
        let starts = |prefixes: &[&str]| prefixes.iter().any(|p| message.starts_with(p));
        if starts(&[
            "database is locked",
            "database table is locked",
            "database schema is locked",
        ]) {
            Self::Busy
        } else if starts(&["database or disk is full"]) {
            Self::Full
        } else if starts(&[
            "disk I/O error",
            "unable to open database file",
            "attempt to write a readonly database",
        ]) {
            Self::Unreachable
        } else {
            Self::Bug
        }
    }

    /// Class 40 (transaction rollback: serialization failure, deadlock) and 55P03 (a lock not
    /// granted in time) are a conflict, except 40003 (the outcome of the statement is
    /// unknown); 08 (connection exception), 57 (operator intervention: shutdown, crash,
    /// starting up), 58 (system error) and 25006 (a read-only standby) mean the database
    /// cannot serve now; 53300 (too many connections) too, and the rest of 53 (insufficient
    /// resources: disk full, out of memory) is no room.
    fn of_sqlstate(code: &str) -> Self {
        match code {
            "40003" | "53300" | "25006" => Self::Unreachable,
            // 55P03: a lock not granted within `lock_timeout` (or NOWAIT); nothing written.
            "55P03" => Self::Conflict,
            _ if code.starts_with("40") => Self::Conflict,
            _ if code.starts_with("53") => Self::Full,
            _ if ["08", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class)) =>
            {
                Self::Unreachable
            }
            _ => Self::Bug,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err {
            Error::InvalidArgument { field, reason } => Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request_violation(field, reason),
            ),
            Error::NotFound { .. } => Status::not_found(message),
            Error::AlreadyExists { .. } => Status::already_exists(message),
            Error::FailedPrecondition(_) => Status::failed_precondition(message),
            Error::Unauthenticated(_) => Status::unauthenticated(message),
            Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::OutOfRange(_) => Status::out_of_range(message),
            Error::CursorExpired { pruned_through, .. } => Status::with_error_details(
                Code::OutOfRange,
                message,
                ErrorDetails::with_error_info(
                    "CURSOR_EXPIRED",
                    "hopper.delegation.v1",
                    [
                        ("resume_after_sequence".into(), pruned_through.to_string()),
                        (
                            "oldest_available_sequence".into(),
                            (pruned_through + 1).to_string(),
                        ),
                    ],
                ),
            ),
            Error::Unavailable(_) => Status::unavailable(message),
            Error::Aborted(_) => Status::aborted(message),
            Error::ResourceExhausted(_) => Status::resource_exhausted(message),
            Error::Internal(_) => {
                tracing::error!(error = %message, "internal error");
                Status::internal("internal error; see the server log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_its_code() {
        let cases = [
            (
                Error::invalid("title", "is required"),
                Code::InvalidArgument,
                "title: is required",
            ),
            (
                Error::not_found("task", "t1"),
                Code::NotFound,
                "task t1 not found",
            ),
            (
                Error::AlreadyExists {
                    entity: "instance",
                    id: "g".into(),
                },
                Code::AlreadyExists,
                "instance g already exists",
            ),
            (
                Error::precondition("task t is done"),
                Code::FailedPrecondition,
                "task t is done",
            ),
            (
                Error::Unauthenticated("no token".into()),
                Code::Unauthenticated,
                "no token",
            ),
            (
                Error::PermissionDenied("not yours".into()),
                Code::PermissionDenied,
                "not yours",
            ),
            (Error::Unavailable("gone".into()), Code::Unavailable, "gone"),
            (Error::Aborted("retry".into()), Code::Aborted, "retry"),
            (
                Error::ResourceExhausted("full".into()),
                Code::ResourceExhausted,
                "full",
            ),
            (
                Error::Internal("bug".into()),
                Code::Internal,
                "internal error; see the server log",
            ),
        ];
        for (err, code, message) in cases {
            let status = Status::from(err);
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }

    #[test]
    fn an_expired_cursor_says_where_history_begins() {
        let status = Status::from(Error::CursorExpired {
            after: 0,
            pruned_through: 2,
        });
        assert_eq!(status.code(), Code::OutOfRange);
        assert_eq!(
            status.message(),
            "events after sequence 0 were pruned; the oldest available is 3: re-read the state \
             and resume after sequence 2"
        );
        let info = status.get_error_details().error_info().cloned().unwrap();
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("CURSOR_EXPIRED", "hopper.delegation.v1")
        );
        assert_eq!(info.metadata["resume_after_sequence"], "2");
        assert_eq!(info.metadata["oldest_available_sequence"], "3");
    }

    #[test]
    fn invalid_argument_carries_a_field_violation() {
        let status = Status::from(Error::invalid("reason", "is required"));
        let details = status.get_error_details();
        let violations = &details
            .bad_request()
            .expect("bad request details")
            .field_violations;
        assert_eq!(violations[0].field, "reason");
        assert_eq!(violations[0].description, "is required");
    }

    #[test]
    fn database_failures_map_to_unavailable_or_internal() {
        assert!(matches!(
            Error::from(DieselError::BrokenTransactionManager),
            Error::Unavailable(_)
        ));
        assert!(matches!(
            Error::from(DieselError::NotFound),
            Error::Internal(_)
        ));
        let db_error = |kind, text: &str| {
            Error::from(DieselError::DatabaseError(kind, Box::new(text.to_owned())))
        };
        let lost = db_error(
            DatabaseErrorKind::UnableToSendCommand,
            "connection to 10.0.0.7 closed",
        );
        assert_eq!(
            lost,
            Error::Unavailable("the database cannot be reached; retry later".into())
        );
        // PostgreSQL's errors by the SQLSTATE the connection's tap puts in front, whatever
        // the language of the words after it.
        let deadlock = db_error(
            DatabaseErrorKind::Unknown,
            "SQLSTATE 40P01: deadlock detected: process 12 waits for ShareLock on transaction 99",
        );
        assert!(matches!(&deadlock, Error::Aborted(m) if !m.contains("process")));
        let lock_timeout = db_error(
            DatabaseErrorKind::Unknown,
            "SQLSTATE 55P03: canceling statement due to lock timeout",
        );
        assert!(matches!(lock_timeout, Error::Aborted(_)));
        for code in [
            "57P01", "57P02", "57P03", "08006", "08P01", "58030", "53300", "25006",
        ] {
            let message = format!("SQLSTATE {code}: Verbindung wird abgebrochen");
            let err = db_error(DatabaseErrorKind::Unknown, &message);
            assert!(matches!(err, Error::Unavailable(_)), "{code}");
        }
        let full = db_error(DatabaseErrorKind::Unknown, "SQLSTATE 53100: kein Platz");
        assert!(matches!(full, Error::ResourceExhausted(_)));
        let ours = db_error(
            DatabaseErrorKind::Unknown,
            "SQLSTATE 42P01: relation missing",
        );
        assert!(matches!(ours, Error::Internal(_)));
        // Without the tap's prefix the English text means nothing.
        let untapped = db_error(DatabaseErrorKind::Unknown, "deadlock detected");
        assert!(matches!(untapped, Error::Internal(_)));
        let serialization = db_error(DatabaseErrorKind::SerializationFailure, "could not");
        assert!(matches!(serialization, Error::Aborted(_)));
        let busy = db_error(DatabaseErrorKind::Unknown, "database is locked");
        assert!(matches!(busy, Error::Unavailable(m) if m.contains("busy")));
        let schema = db_error(
            DatabaseErrorKind::Unknown,
            "database schema is locked: main",
        );
        assert!(matches!(schema, Error::Unavailable(m) if m.contains("busy")));
        let read_only = db_error(
            DatabaseErrorKind::Unknown,
            "attempt to write a readonly database",
        );
        assert!(matches!(read_only, Error::Unavailable(_)));
        let failed_commit = DieselError::RollbackErrorOnCommit {
            rollback_error: Box::new(DieselError::BrokenTransactionManager),
            commit_error: Box::new(DieselError::DatabaseError(
                DatabaseErrorKind::SerializationFailure,
                Box::new("could not serialize access".to_owned()),
            )),
        };
        assert!(matches!(Error::from(failed_commit), Error::Aborted(_)));
        let sqlite_full = db_error(DatabaseErrorKind::Unknown, "database or disk is full");
        assert!(matches!(sqlite_full, Error::ResourceExhausted(m) if m.contains("out of space")));
    }
}
