//! Persistence with diesel-async on PostgreSQL or embedded SQLite, chosen at run time by the
//! database URL.
//!
//! Every query is written once: [`with_conn!`] expands the same body in each arm of the
//! [`Conn`] enum, so diesel type-checks it against both backends. Only the migrations differ
//! per backend (`migrations/postgres`, `migrations/sqlite`). The table modules hold functions
//! that take a connection and return `QueryResult`; the caller (`repository`) decides where a
//! transaction starts and ends.

pub mod delegations;
pub mod events;
pub mod idempotency;
pub mod instances;
mod pg_connect;
pub mod schema;
mod sequencer;
mod sql_types;
pub mod tasks;

use std::{marker::PhantomData, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use ::deadpool::{Runtime, managed::Timeouts};
use chrono::{NaiveDateTime, SubsecRound, Utc};
use diesel::migration::{Migration, MigrationSource};
use diesel::{
    Connection, QueryResult,
    backend::Backend,
    connection::SimpleConnection,
    query_builder::{AstPass, Query, QueryFragment, QueryId},
    serialize::ToSql,
    sql_types::{HasSqlType, Untyped},
    sqlite::SqliteConnection,
};
use diesel_async::{
    AsyncConnection, AsyncPgConnection, SimpleAsyncConnection, TransactionManager,
    async_connection_wrapper::AsyncConnectionWrapper,
    pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod, deadpool},
    sync_connection_wrapper::SyncConnectionWrapper,
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;

use crate::error::Error;

/// SQLite runs its blocking calls on tokio's blocking pool through this wrapper.
pub type SqliteConn = SyncConnectionWrapper<SqliteConnection>;

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// How long a request waits by default for a pooled connection (or for a new one to be set
/// up) before it fails with UNAVAILABLE instead of hanging.
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a migration waits for another writer's SQLite lock before giving up.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 5_000;

/// Keeps other server processes off a SQLite database for as long as it lives: SQLite has
/// one writer, and a second server on the same file would only queue behind the first's locks
/// (or, on a network file system, risk the file). Holds an exclusive lock on `PATH.lock`.
#[derive(Debug)]
pub struct SqliteOwner {
    _file: std::fs::File,
}

impl SqliteOwner {
    /// Takes the lock for a SQLite URL, failing at once with a clear message if another process
    /// holds it; `None` for PostgreSQL, which several replicas share.
    pub fn acquire(url: &DatabaseUrl) -> anyhow::Result<Option<Self>> {
        let DatabaseUrl::Sqlite(path) = url else {
            return Ok(None);
        };
        let mut lock_path = path.clone().into_os_string();
        lock_path.push(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another hopper-delegation server is using {} (it holds {}); \
                 SQLite serves one process — use PostgreSQL for several replicas",
                path.display(),
                std::path::Path::new(&lock_path).display()
            ),
            Err(std::fs::TryLockError::Error(err)) => Err(err.into()),
        }
    }
}

/// Where the data lives, parsed from `--database-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `postgres://…` or `postgresql://…`, passed to the driver as given.
    Postgres(String),
    /// `sqlite://PATH`, `sqlite:PATH` or a bare path; the file is created if missing.
    Sqlite(PathBuf),
}

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_owned()));
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        if path.is_empty() || path == ":memory:" || path.contains("mode=memory") {
            // A pool would give every connection its own empty in-memory database.
            return Err(format!(
                "{url:?}: give SQLite a file path, e.g. sqlite://hopper.db"
            ));
        }
        if url.contains("://") && !url.starts_with("sqlite://") {
            return Err(format!(
                "{url:?}: use postgres://…, sqlite://PATH or a file path"
            ));
        }
        Ok(Self::Sqlite(PathBuf::from(path)))
    }
}

impl DatabaseUrl {
    fn sqlite_path(path: &std::path::Path) -> String {
        path.to_string_lossy().into_owned()
    }
}

/// A pool of connections to one database, and the signals that a transaction committed and
/// that events became readable. Cheap to clone. On PostgreSQL each `Db` runs a sequencer
/// (`store::sequencer`) for as long as a clone of it lives.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    url: DatabaseUrl,
    signals: Arc<Signals>,
    /// SQLite: writers take this before `BEGIN IMMEDIATE`, so they queue here in order instead
    /// of polling SQLite's lock from the busy handler (which sleeps up to 100 ms a try).
    sqlite_writer: Arc<tokio::sync::Mutex<()>>,
    /// Instance lineages, which never change.
    lineages: Arc<instances::Lineages>,
    /// PostgreSQL: the sequencer's connection, apart from the pool requests share.
    sequencer: Option<deadpool::Pool<AsyncPgConnection>>,
    /// How long a request waits for a connection, or on SQLite for its writer turn.
    timeout: Duration,
    /// PostgreSQL: this handle's writers number their events at insert, with no sequencer
    /// ([`Db::numbering_at_insert`]).
    number_at_insert: bool,
}

/// A [`Db`] that its background tasks hold: once every `Db` clone is gone, [`WeakDb::upgrade`]
/// fails and the receivers it handed out end, so the tasks stop.
struct WeakDb {
    pool: Pool,
    url: DatabaseUrl,
    signals: std::sync::Weak<Signals>,
    sqlite_writer: Arc<tokio::sync::Mutex<()>>,
    lineages: Arc<instances::Lineages>,
    sequencer: Option<deadpool::Pool<AsyncPgConnection>>,
    timeout: Duration,
}

impl WeakDb {
    fn upgrade(&self) -> Option<Db> {
        Some(Db {
            pool: self.pool.clone(),
            url: self.url.clone(),
            signals: self.signals.upgrade()?,
            sqlite_writer: self.sqlite_writer.clone(),
            lineages: self.lineages.clone(),
            sequencer: self.sequencer.clone(),
            timeout: self.timeout,
            number_at_insert: false,
        })
    }
}

/// On SQLite, this process's turn to write (`None` on PostgreSQL, whose writers need none).
pub type WriterTurn = Option<tokio::sync::OwnedMutexGuard<()>>;

/// What the background tasks and the event streams wait on.
struct Signals {
    /// PostgreSQL: bumped after every commit through this pool that appended events; wakes the
    /// sequencer.
    commits: watch::Sender<u64>,
    /// Bumped whenever events may have become readable: after a commit on SQLite, after the
    /// sequencer numbered events on PostgreSQL, and on a notification that another replica's
    /// sequencer did ([`listen_for_events`]). Event streams wait on it instead of polling.
    appended: watch::Sender<u64>,
}

/// A snapshot of the connection pool, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// Connections open.
    pub size: usize,
    /// Open connections not checked out.
    pub available: usize,
    /// The most connections the pool opens.
    pub max_size: usize,
}

#[derive(Clone)]
enum Pool {
    /// PostgreSQL through diesel-async's native driver.
    Pg(deadpool::Pool<AsyncPgConnection>),
    /// SQLite through diesel's sync connection on the blocking pool.
    Sqlite(deadpool::Pool<SqliteConn>),
}

/// One pooled connection, of either backend. Returned to the pool on drop; a connection dropped
/// inside a transaction (say, the request was cancelled) is discarded, which rolls it back.
#[expect(
    clippy::large_enum_variant,
    reason = "one per request, on the request's own future; boxing would allocate per checkout"
)]
pub enum Conn {
    /// A PostgreSQL connection.
    Pg(deadpool::Object<AsyncPgConnection>),
    /// A SQLite connection.
    Sqlite(deadpool::Object<SqliteConn>),
}

/// Runs the same query body on whichever backend `$conn` (a `&mut Conn`) holds: `$c` is bound
/// to the backend's connection in each arm.
macro_rules! with_conn {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::store::Conn::Pg(pooled) => {
                let $c = &mut **pooled;
                $body
            }
            $crate::store::Conn::Sqlite(pooled) => {
                let $c = &mut **pooled;
                $body
            }
        }
    };
}
pub(crate) use with_conn;

pub(crate) use pg_connect::sqlstate;

/// Whether a write failed on a unique constraint (a taken id, a second pending delegation).
pub fn is_unique_violation(err: &diesel::result::Error) -> bool {
    matches!(
        err,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}

/// Raw SQL, like `diesel::sql_query`, but kept as a prepared statement per connection (keyed by
/// its text). Diesel never caches `sql_query`, so PostgreSQL plans it again on every call, which
/// for the recursive queries here costs more than running them.
///
/// Write `$N` for the N-th `.bind::<SqlType, _>(value)`, as often and in any order: each one
/// is rendered as a placeholder of its own (`$k` on PostgreSQL, `?` on SQLite) with the value
/// bound again, so SQLite's numbering of `$N` by first appearance does not matter.
#[derive(Debug, Clone, Copy)]
pub struct Sql<'a>(&'a str);

/// A [`Sql`] query.
pub fn sql(text: &str) -> Sql<'_> {
    Sql(text)
}

/// A [`Sql`] query with its parameters so far; the last one bound is `value`.
#[derive(Debug, Clone, Copy)]
pub struct Bound<Q, V, ST> {
    earlier: Q,
    value: V,
    sql_type: PhantomData<ST>,
}

/// Binding the next parameter, for [`Sql`] and [`Bound`].
pub trait Bind: Sized {
    /// Binds `value` as the next `$N` parameter, of SQL type `ST`.
    fn bind<ST, V>(self, value: V) -> Bound<Self, V, ST> {
        Bound {
            earlier: self,
            value,
            sql_type: PhantomData,
        }
    }
}

impl Bind for Sql<'_> {}
impl<Q, V, ST> Bind for Bound<Q, V, ST> {}

/// The text and the parameters of a [`Sql`] query.
pub trait Params<DB: Backend> {
    /// The SQL text, with `$N` placeholders.
    fn text(&self) -> &str;
    /// How many parameters are bound.
    fn count(&self) -> usize;
    /// Pushes parameter `n` (from 1) as a placeholder and its value.
    fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<()>;
}

impl<DB: Backend> Params<DB> for Sql<'_> {
    fn text(&self) -> &str {
        self.0
    }

    fn count(&self) -> usize {
        0
    }

    fn push<'b>(&'b self, n: usize, _: &mut AstPass<'_, 'b, DB>) -> QueryResult<()> {
        Err(diesel::result::Error::QueryBuilderError(
            format!("${n} has no bound value").into(),
        ))
    }
}

impl<DB, Q, V, ST> Params<DB> for Bound<Q, V, ST>
where
    DB: Backend + HasSqlType<ST>,
    Q: Params<DB>,
    V: ToSql<ST, DB>,
{
    fn text(&self) -> &str {
        self.earlier.text()
    }

    fn count(&self) -> usize {
        self.earlier.count() + 1
    }

    fn push<'b>(&'b self, n: usize, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<()> {
        if n == self.count() {
            out.push_bind_param::<ST, V>(&self.value)
        } else {
            self.earlier.push(n, out)
        }
    }
}

/// Renders `text`, replacing each `$N` with parameter N.
fn walk_params<'b, DB: Backend, P: Params<DB>>(
    params: &'b P,
    mut out: AstPass<'_, 'b, DB>,
) -> QueryResult<()> {
    let mut rest = params.text();
    let mut highest = 0;
    while let Some(dollar) = rest.find('$') {
        out.push_sql(&rest[..dollar]);
        let digits = rest[dollar + 1..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len() - dollar - 1);
        let n = rest[dollar + 1..dollar + 1 + digits].parse().map_err(|_| {
            diesel::result::Error::QueryBuilderError("a `$` without a parameter number".into())
        })?;
        params.push(n, &mut out)?;
        highest = highest.max(n);
        rest = &rest[dollar + 1 + digits..];
    }
    out.push_sql(rest);
    if highest < params.count() {
        return Err(diesel::result::Error::QueryBuilderError(
            format!("{} values bound, ${highest} used", params.count()).into(),
        ));
    }
    Ok(())
}

impl QueryId for Sql<'_> {
    type QueryId = ();
    // Not static: the statement cache keys the query by its text and bind types instead.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q, V, ST> QueryId for Bound<Q, V, ST> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Sql<'_> {
    type SqlType = Untyped;
}

impl<Q, V, ST> Query for Bound<Q, V, ST> {
    type SqlType = Untyped;
}

impl<DB: Backend> QueryFragment<DB> for Sql<'_> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        walk_params(self, out)
    }
}

impl<DB, Q, V, ST> QueryFragment<DB> for Bound<Q, V, ST>
where
    DB: Backend,
    Self: Params<DB>,
{
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        walk_params(self, out)
    }
}

/// `column` is one of the text values of the JSON array bound as `param` (`$N`): one statement
/// text whatever the number of values, so it stays prepared on each connection (diesel
/// prepares an `eq_any` query afresh on every call). On PostgreSQL the array is unpacked once
/// (`ARRAY(…)`) and compared with `= ANY`, which the planner answers from the column's index.
pub(crate) fn is_member(conn: &Conn, column: &str, param: &str) -> String {
    match conn {
        Conn::Pg(_) => format!(
            "{column} = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST({param} AS jsonb))))"
        ),
        Conn::Sqlite(_) => format!("{column} IN (SELECT value FROM json_each({param}))"),
    }
}

/// Enum values as a list of SQL literals (`'pending', 'accepted'`), for statement texts built
/// from the domain's constants. Literals rather than parameters: SQLite re-prepares a
/// statement every time a parameter compared with the column of a partial index
/// (`task_delegations.status`) is bound, and a literal lets either planner use that index.
/// The values are the enums' own fixed words, never input.
pub(crate) fn literals(values: &[&'static str]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("'{v}'")).collect();
    quoted.join(", ")
}

/// The current time as stored: UTC, truncated to microseconds, which both backends keep exactly.
pub fn now() -> NaiveDateTime {
    Utc::now().naive_utc().trunc_subsecs(6)
}

impl Db {
    /// Opens a pool; nothing is checked until the first connection is needed.
    pub fn open(url: &DatabaseUrl, max_connections: usize) -> Result<Self, Error> {
        Self::open_with_timeout(url, max_connections, DEFAULT_CONNECTION_TIMEOUT)
    }

    /// Like [`Db::open`]; a request that cannot get a connection within `timeout` fails with
    /// UNAVAILABLE.
    pub fn open_with_timeout(
        url: &DatabaseUrl,
        max_connections: usize,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let pool = match url {
            DatabaseUrl::Postgres(url) => Pool::Pg(postgres_pool(url, max_connections, timeout)?),
            DatabaseUrl::Sqlite(path) => {
                let mut config = fast_recycling::<SqliteConn>();
                // A lock another program holds beyond the timeout makes a write UNAVAILABLE.
                let busy = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
                config.custom_setup = Box::new(move |url| setup_sqlite(url, busy).boxed());
                let manager = AsyncDieselConnectionManager::new_with_config(
                    DatabaseUrl::sqlite_path(path),
                    config,
                );
                Pool::Sqlite(pool(manager, max_connections, timeout)?)
            }
        };
        // The sequencer's own connection: numbering must not queue behind requests for the
        // shared pool, or every event would wait for a busy pool to reach subscribers.
        let sequencer = match url {
            DatabaseUrl::Postgres(url) => Some(postgres_pool(url, 1, timeout)?),
            DatabaseUrl::Sqlite(_) => None,
        };
        let signals = Arc::new(Signals {
            commits: watch::channel(0).0,
            appended: watch::channel(0).0,
        });
        let db = Self {
            pool,
            url: url.clone(),
            signals,
            sqlite_writer: Arc::default(),
            lineages: Arc::default(),
            sequencer,
            timeout,
            number_at_insert: false,
        };
        if let (Pool::Pg(_), Ok(runtime)) = (&db.pool, tokio::runtime::Handle::try_current()) {
            runtime.spawn(sequencer::run(db.downgrade()));
        }
        Ok(db)
    }

    /// The same database, but on PostgreSQL this handle's writers number their events at
    /// insert instead of queueing them for the sequencer: the design before the queue, whose
    /// hole (a reader skips an event that commits late) `tests/event_ordering.rs` shows and
    /// whose cost `benches/events.rs` compares. Never for serving.
    pub fn numbering_at_insert(mut self) -> Self {
        self.number_at_insert = true;
        self
    }

    /// A handle that does not keep the `Db` alive (for its own background tasks).
    fn downgrade(&self) -> WeakDb {
        WeakDb {
            pool: self.pool.clone(),
            url: self.url.clone(),
            signals: Arc::downgrade(&self.signals),
            sqlite_writer: self.sqlite_writer.clone(),
            lineages: self.lineages.clone(),
            sequencer: self.sequencer.clone(),
            timeout: self.timeout,
        }
    }

    /// Instance lineages, read once per instance and kept.
    pub fn lineages(&self) -> &instances::Lineages {
        &self.lineages
    }

    /// The URL this pool connects to.
    pub fn url(&self) -> &DatabaseUrl {
        &self.url
    }

    /// A receiver that changes whenever events may have become readable.
    pub fn appended(&self) -> watch::Receiver<u64> {
        self.signals.appended.subscribe()
    }

    /// After a commit that appended events: on PostgreSQL they wait for the sequencer, on
    /// SQLite (numbered at insert) they are readable now.
    fn signal_commit(&self) {
        match self.pool {
            Pool::Pg(_) => self.signals.commits.send_modify(|n| *n = n.wrapping_add(1)),
            Pool::Sqlite(_) => self.signal_appended(),
        }
    }

    fn signal_appended(&self) {
        self.signals
            .appended
            .send_modify(|n| *n = n.wrapping_add(1));
    }

    /// PostgreSQL: numbers every committed event that waits in the queue, now; the sequencer
    /// does this after every commit that appended events. Tests call it before reading the log
    /// directly. Nothing on SQLite.
    pub async fn sequence_events(&self) -> Result<(), Error> {
        let Some(sequencer) = &self.sequencer else {
            return Ok(());
        };
        let mut conn = Conn::Pg(sequencer.get().await.map_err(unavailable)?);
        loop {
            let moved = events::sequence(&mut conn).await?;
            if moved > 0 {
                self.signal_appended();
            }
            if moved < events::SEQUENCE_BATCH {
                return Ok(());
            }
        }
    }

    /// Checks a connection out of the pool; UNAVAILABLE if none can be had in time.
    pub async fn conn(&self) -> Result<Conn, Error> {
        Ok(match &self.pool {
            Pool::Pg(pool) => Conn::Pg(pool.get().await.map_err(unavailable)?),
            Pool::Sqlite(pool) => Conn::Sqlite(pool.get().await.map_err(unavailable)?),
        })
    }

    /// The pool's connections now: open, idle, and the most it opens.
    pub fn pool_status(&self) -> PoolStatus {
        let status = match &self.pool {
            Pool::Pg(pool) => pool.status(),
            Pool::Sqlite(pool) => pool.status(),
        };
        PoolStatus {
            size: status.size,
            available: status.available,
            max_size: status.max_size,
        }
    }

    /// Whether the database answers: one `SELECT 1` through the pool.
    pub async fn ping(&self) -> Result<(), Error> {
        use diesel_async::RunQueryDsl;
        let mut conn = self.conn().await?;
        with_conn!(&mut conn, |c| diesel::sql_query("SELECT 1")
            .execute(c)
            .await)?;
        Ok(())
    }

    /// A pooled connection for one writing statement outside a transaction, with this
    /// process's SQLite writer turn held for as long as the pair lives (see [`Db::begin`]).
    pub async fn conn_for_write(&self) -> Result<(Conn, WriterTurn), Error> {
        let turn = self.writer_turn().await?;
        Ok((self.conn().await?, turn))
    }

    /// On SQLite, waits for this process's turn to write, at most the connection timeout
    /// (UNAVAILABLE after it, as for a connection): writers queue here, in order.
    async fn writer_turn(&self) -> Result<WriterTurn, Error> {
        let Pool::Sqlite(_) = self.pool else {
            return Ok(None);
        };
        let turn = self.sqlite_writer.clone().lock_owned();
        match tokio::time::timeout(self.timeout, turn).await {
            Ok(turn) => Ok(Some(turn)),
            Err(_) => {
                tracing::warn!(timeout = ?self.timeout, "no turn to write to SQLite in time");
                Err(Error::Unavailable(
                    "the database is busy; retry later".into(),
                ))
            }
        }
    }

    /// Starts a transaction on a pooled connection; end it with [`Tx::finish`].
    ///
    /// SQLite transactions start with `BEGIN IMMEDIATE`, taking the write lock up front: a
    /// deferred `BEGIN` that reads and then writes fails with "database is locked" under
    /// concurrency instead of waiting for the lock. PostgreSQL runs READ COMMITTED; the
    /// repository serialises the writers of one task family by locking its root row first.
    pub async fn begin(&self) -> Result<Tx, Error> {
        let writer = self.writer_turn().await?;
        let mut conn = self.conn().await?;
        conn.begin().await?;
        Ok(Tx {
            conn: Some(conn),
            db: self.clone(),
            writer,
            appended: false,
        })
    }
}

/// An open transaction. Dropped without [`Tx::finish`] — say, the client went away and tonic
/// dropped the request mid-way — it is rolled back on a task of its own before its connection
/// goes back to the pool, so no connection is handed out inside a stale transaction (on
/// SQLite that would hold the write lock and stall every writer).
pub struct Tx {
    /// `None` only once finished or dropped.
    conn: Option<Conn>,
    db: Db,
    /// SQLite: this process's writers' turn, held until the transaction ends.
    writer: WriterTurn,
    /// Whether events were appended, so that committing must wake the sequencer.
    appended: bool,
}

impl Tx {
    /// Commits if `outcome` is `Ok`, rolls back otherwise, and passes `outcome` on (or the
    /// commit's error).
    pub async fn finish<T>(mut self, outcome: Result<T, Error>) -> Result<T, Error> {
        let Some(mut conn) = self.conn.take() else {
            return Err(Error::Internal("transaction finished twice".into()));
        };
        match outcome {
            Ok(value) => match conn.commit().await {
                Ok(()) => {
                    if self.appended {
                        self.db.signal_commit();
                    }
                    Ok(value)
                }
                Err(err) => {
                    // A failed COMMIT may leave the transaction open: close it.
                    conn.rollback_or_discard().await;
                    Err(err.into())
                }
            },
            Err(err) => {
                conn.rollback_or_discard().await;
                Err(err)
            }
        }
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // The SQLite writer's turn ends only once the rollback has released the lock.
            let writer = self.writer.take();
            runtime.spawn(async move {
                conn.rollback_or_discard().await;
                drop(writer);
            });
        }
    }
}

impl std::ops::Deref for Tx {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("only a finished transaction has no connection")
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("only a finished transaction has no connection")
    }
}

impl Conn {
    async fn begin(&mut self) -> diesel::QueryResult<()> {
        match self {
            Self::Pg(c) => {
                <AsyncPgConnection as AsyncConnection>::TransactionManager::begin_transaction(
                    &mut **c,
                )
                .await
            }
            Self::Sqlite(c) => {
                c.spawn_blocking(|c| {
                    diesel::connection::AnsiTransactionManager::begin_transaction_sql(
                        c,
                        "BEGIN IMMEDIATE",
                    )
                })
                .await
            }
        }
    }

    async fn commit(&mut self) -> diesel::QueryResult<()> {
        with_conn!(self, |c| commit_transaction(c).await)
    }

    async fn rollback(&mut self) -> diesel::QueryResult<()> {
        with_conn!(self, |c| rollback_transaction(c).await)
    }

    /// Rolls the open transaction back; if that fails, takes the connection out of the pool
    /// and closes it, which ends the transaction on the server side.
    async fn rollback_or_discard(mut self) {
        if self.rollback().await.is_err() {
            match self {
                Self::Pg(object) => drop(deadpool::Object::take(object)),
                Self::Sqlite(object) => drop(deadpool::Object::take(object)),
            }
        }
    }
}

async fn commit_transaction<C: AsyncConnection>(conn: &mut C) -> diesel::QueryResult<()> {
    C::TransactionManager::commit_transaction(conn).await
}

async fn rollback_transaction<C: AsyncConnection>(conn: &mut C) -> diesel::QueryResult<()> {
    C::TransactionManager::rollback_transaction(conn).await
}

/// Keeps a LISTEN connection to PostgreSQL and signals [`Db::appended`] whenever a sequencer of
/// any replica numbers events, reconnecting after failures. A lost notification only delays a
/// stream: the streams also re-read the log when idle. Returns at once on SQLite (one process).
pub async fn listen_for_events(db: Db) {
    let DatabaseUrl::Postgres(url) = &db.url else {
        return;
    };
    loop {
        match AsyncPgConnection::establish(url).await {
            Ok(mut conn) => match conn
                .batch_execute(&format!("LISTEN {}", events::CHANNEL))
                .await
            {
                Ok(()) => {
                    // Whatever was numbered while not listening is read now.
                    db.signal_appended();
                    let mut notifications = std::pin::pin!(conn.notifications_stream());
                    while let Some(Ok(_)) = notifications.next().await {
                        db.signal_appended();
                    }
                    tracing::warn!("event notification connection lost; reconnecting");
                }
                Err(err) => tracing::warn!(error = %err, "LISTEN failed; retrying"),
            },
            Err(err) => tracing::warn!(error = %err, "cannot open the LISTEN connection; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// UNAVAILABLE for a connection the pool could not hand out in time; the reason is logged.
fn unavailable(err: deadpool::PoolError) -> Error {
    tracing::warn!(error = %err, "no database connection");
    Error::Unavailable("no database connection could be had in time; retry later".into())
}

/// PostgreSQL connections as the service needs them: READ COMMITTED whatever the database's or
/// role's default, because the family lock and the sequencer rely on each statement taking a
/// fresh snapshot after the locks before it (see docs/ARCHITECTURE.md).
async fn setup_postgres(url: &str) -> diesel::ConnectionResult<AsyncPgConnection> {
    let mut conn = pg_connect::connect(url).await?;
    conn.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .await
        .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
    Ok(conn)
}

/// A PostgreSQL pool of `max_size` connections set up by [`setup_postgres`].
fn postgres_pool(
    url: &str,
    max_size: usize,
    timeout: Duration,
) -> Result<deadpool::Pool<AsyncPgConnection>, Error> {
    let mut config = fast_recycling::<AsyncPgConnection>();
    config.custom_setup = Box::new(|url| setup_postgres(url).boxed());
    pool(
        AsyncDieselConnectionManager::new_with_config(url, config),
        max_size,
        timeout,
    )
}

/// Hands out pooled connections without the `SELECT 1` round trip diesel-async makes on
/// every checkout by default. A connection the server closed is still noticed: the pool drops
/// one whose socket has closed or whose transaction state is broken, and a failure on first use
/// ends that request with UNAVAILABLE (`error.rs`), as the ping would have.
fn fast_recycling<C: AsyncConnection + 'static>() -> ManagerConfig<C> {
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    config
}

/// A pool whose waits, connects and recycles give up after `timeout`.
fn pool<C>(
    manager: AsyncDieselConnectionManager<C>,
    max_size: usize,
    timeout: Duration,
) -> Result<deadpool::Pool<C>, Error>
where
    AsyncDieselConnectionManager<C>: ::deadpool::managed::Manager,
{
    let timeouts = Timeouts {
        wait: Some(timeout),
        create: Some(timeout),
        recycle: Some(timeout),
    };
    deadpool::Pool::builder(manager)
        .max_size(max_size)
        .timeouts(timeouts)
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| Error::Internal(e.to_string()))
}

/// Opens one SQLite connection the way the service needs it: WAL so readers never block the
/// writer, a busy timeout (`--db-timeout`) so writers wait for a lock another program holds
/// instead of failing at once, and foreign keys enforced.
async fn setup_sqlite(path: &str, busy_timeout_ms: i32) -> diesel::ConnectionResult<SqliteConn> {
    let mut conn = SqliteConn::establish(path).await?;
    conn.batch_execute(&format!(
        "PRAGMA busy_timeout = {busy_timeout_ms};
         PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA foreign_keys = ON;"
    ))
    .await
    .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
    Ok(conn)
}

/// What to do with the embedded migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrate {
    /// Apply every pending migration.
    Latest,
    /// Apply at most this many pending migrations, oldest first.
    Steps(usize),
    /// Revert this many applied migrations, newest first.
    Revert(usize),
}

/// Applies or reverts the migrations embedded in the binary; returns the versions touched.
///
/// On PostgreSQL a session advisory lock makes replicas that start together migrate one at a
/// time; the second finds nothing pending.
pub async fn migrate(url: &DatabaseUrl, action: Migrate) -> anyhow::Result<Vec<String>> {
    let url = url.clone();
    tokio::task::spawn_blocking(move || match url {
        DatabaseUrl::Postgres(url) => {
            let mut conn =
                <AsyncConnectionWrapper<AsyncPgConnection> as Connection>::establish(&url)?;
            SimpleConnection::batch_execute(&mut conn, "SELECT pg_advisory_lock(7243001)")?;
            run_migrations(&mut conn, PG_MIGRATIONS, action)
        }
        DatabaseUrl::Sqlite(path) => {
            let mut conn = SqliteConnection::establish(&DatabaseUrl::sqlite_path(&path))?;
            // WAL is a property of the file. Switching to it takes an exclusive lock, which a
            // pool opening several connections at once can fail to get without waiting, so the
            // migrating connection, alone on the file, switches it first.
            conn.batch_execute(&format!(
                "PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}; PRAGMA journal_mode = WAL;"
            ))?;
            run_migrations(&mut conn, SQLITE_MIGRATIONS, action)
        }
    })
    .await?
}

fn run_migrations<DB: diesel::backend::Backend>(
    conn: &mut impl MigrationHarness<DB>,
    source: EmbeddedMigrations,
    action: Migrate,
) -> anyhow::Result<Vec<String>> {
    let fail = |e| anyhow::anyhow!("migration failed: {e}");
    let owned = MigrationSource::<DB>::migrations(&source).map_err(fail)?;
    let all: Vec<&dyn Migration<DB>> = owned.iter().map(|m| &**m).collect();
    let applied: Vec<String> = conn
        .applied_migrations()
        .map_err(fail)?
        .iter()
        .map(ToString::to_string)
        .collect();
    let is_applied = |m: &dyn Migration<DB>| applied.contains(&m.name().version().to_string());
    let mut touched = Vec::new();
    match action {
        Migrate::Latest | Migrate::Steps(_) => {
            let limit = if let Migrate::Steps(n) = action {
                n
            } else {
                usize::MAX
            };
            for migration in all.iter().filter(|m| !is_applied(**m)).take(limit) {
                touched.push(conn.run_migration(*migration).map_err(fail)?.to_string());
            }
        }
        Migrate::Revert(n) => {
            for migration in all.iter().rev().filter(|m| is_applied(**m)).take(n) {
                touched.push(conn.revert_migration(*migration).map_err(fail)?.to_string());
            }
        }
    }
    Ok(touched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_renders_each_placeholder_with_its_own_value() {
        use diesel::sql_types::{BigInt, Text};
        let query = sql("SELECT $2, $1 WHERE x = $1")
            .bind::<Text, _>("a")
            .bind::<BigInt, _>(7_i64);
        assert_eq!(
            diesel::debug_query::<diesel::pg::Pg, _>(&query).to_string(),
            r#"SELECT $1, $2 WHERE x = $3 -- binds: [7, "a", "a"]"#
        );
        assert_eq!(
            diesel::debug_query::<diesel::sqlite::Sqlite, _>(&query).to_string(),
            r#"SELECT ?, ? WHERE x = ? -- binds: [7, "a", "a"]"#
        );
        let mut builder = diesel::pg::PgQueryBuilder::default();
        let unused = sql("SELECT $1").bind::<Text, _>("a").bind::<Text, _>("b");
        assert!(unused.to_sql(&mut builder, &diesel::pg::Pg).is_err());
        let missing = sql("SELECT $2").bind::<Text, _>("a");
        assert!(missing.to_sql(&mut builder, &diesel::pg::Pg).is_err());
    }

    #[test]
    fn urls_pick_the_backend() {
        let pg = "postgres://root@127.0.0.1/test";
        assert_eq!(pg.parse(), Ok(DatabaseUrl::Postgres(pg.into())));
        let pg = "postgresql://h/db";
        assert_eq!(pg.parse(), Ok(DatabaseUrl::Postgres(pg.into())));
        let sqlite = |p: &str| Ok(DatabaseUrl::Sqlite(PathBuf::from(p)));
        assert_eq!("sqlite://hopper.db".parse(), sqlite("hopper.db"));
        assert_eq!("sqlite:///var/lib/h.db".parse(), sqlite("/var/lib/h.db"));
        assert_eq!("sqlite:h.db".parse(), sqlite("h.db"));
        assert_eq!("data/h.db".parse(), sqlite("data/h.db"));
        for bad in [
            "",
            "sqlite://",
            "sqlite://:memory:",
            ":memory:",
            "mysql://x/y",
        ] {
            assert!(bad.parse::<DatabaseUrl>().is_err(), "{bad}");
        }
    }
}
