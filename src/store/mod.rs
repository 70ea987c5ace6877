//! Persistence: diesel-async on PostgreSQL or embedded SQLite, chosen at run time by the
//! database URL. This layer is the queries and the connections; the rules and the transaction
//! boundaries are the caller's (`repository`).
//!
//! - `url.rs`: `--database-url` ([`DatabaseUrl`]) and SQLite's lock file ([`SqliteOwner`]).
//! - `pool.rs`: [`Db`], the pools, [`Conn`] and `with_conn!`, which expands one query body in
//!   each arm of [`Conn`], so diesel type-checks it against both backends.
//! - `tx.rs`: transactions ([`Db::write`], [`Tx`]) and SQLite's writer turn.
//! - `sql.rs`: raw SQL written once for both backends ([`sql`]), list literals, the paging
//!   [`Cursor`], the stored [`now`].
//! - One file per table: [`delegations`], [`tasks`], [`instances`], [`idempotency`]; the event
//!   log in [`event_log`], numbered on PostgreSQL by `sequencer.rs`; [`schema`] declares them.
//! - `listen.rs`: LISTEN / NOTIFY between replicas; `migrate.rs`: the embedded migrations, the
//!   only code that differs per backend (`migrations/postgres`, `migrations/sqlite`).
//! - `pg_connect.rs`: PostgreSQL connections whose errors carry their SQLSTATE.

pub mod delegations;
pub mod event_log;
pub mod idempotency;
pub mod instances;
mod listen;
mod migrate;
mod pg_connect;
mod pool;
pub mod schema;
mod sequencer;
mod sql;
mod sql_types;
pub mod tasks;
mod tx;
mod url;

pub(crate) use listen::listen_for_events;
pub use migrate::{Migrate, migrate};
pub(crate) use pg_connect::sqlstate;
pub use pool::{Conn, Db, SqliteConn};
pub(crate) use pool::{is_unique_violation, with_conn};
pub use sql::{Bind, Bound, Sql, now, sql};
pub(crate) use sql::{Cursor, clock, is_member, literals};
pub use tx::Tx;
pub use url::{DatabaseUrl, SqliteOwner};
