//! The handle on the database: [`Db`], its pool of connections of either backend, the [`Conn`]
//! one request checks out, and [`with_conn!`], which runs one query body on either.

use std::{sync::Arc, time::Duration};

use ::deadpool::{Runtime, managed::Timeouts};
use diesel::sqlite::SqliteConnection;
use diesel_async::{
    AsyncConnection, AsyncPgConnection, SimpleAsyncConnection,
    pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod, deadpool},
    sync_connection_wrapper::SyncConnectionWrapper,
};
use futures_util::FutureExt;
use tokio::sync::watch;

use super::{DatabaseUrl, event_log, instances, pg_connect, sequencer};
use crate::error::Error;

/// SQLite runs its blocking calls on tokio's blocking pool through this wrapper.
pub type SqliteConn = SyncConnectionWrapper<SqliteConnection>;

/// How long a request waits by default for a pooled connection (or for a new one to be set
/// up) before it fails with UNAVAILABLE instead of hanging.
pub(crate) const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool of connections to one database, and the signals that a transaction committed and
/// that events became readable. Cheap to clone. On PostgreSQL each `Db` runs a sequencer
/// (`store::sequencer`) for as long as a clone of it lives.
#[derive(Clone)]
pub struct Db {
    pub(super) pool: Pool,
    pub(super) url: DatabaseUrl,
    pub(super) signals: Arc<Signals>,
    /// SQLite: writers take this before `BEGIN IMMEDIATE`, so they queue here in order instead
    /// of polling SQLite's lock from the busy handler (which sleeps up to 100 ms a try).
    pub(super) sqlite_writer: Arc<tokio::sync::Mutex<()>>,
    /// Instance lineages, which never change.
    pub(super) lineages: Arc<instances::Lineages>,
    /// PostgreSQL: the sequencer's connection, apart from the pool requests share.
    pub(super) sequencer: Option<deadpool::Pool<AsyncPgConnection>>,
    /// How long a request waits for a connection, or on SQLite for its writer turn.
    pub(super) timeout: Duration,
    /// PostgreSQL: this handle's writers number their events at insert, with no sequencer
    /// ([`Db::numbering_at_insert`]).
    pub(super) number_at_insert: bool,
}

/// A [`Db`] that its background tasks hold: once every `Db` clone is gone, [`WeakDb::upgrade`]
/// fails and the receivers it handed out end, so the tasks stop.
pub(super) struct WeakDb {
    pub(super) pool: Pool,
    pub(super) url: DatabaseUrl,
    pub(super) signals: std::sync::Weak<Signals>,
    pub(super) sqlite_writer: Arc<tokio::sync::Mutex<()>>,
    pub(super) lineages: Arc<instances::Lineages>,
    pub(super) sequencer: Option<deadpool::Pool<AsyncPgConnection>>,
    pub(super) timeout: Duration,
}

impl WeakDb {
    pub(super) fn upgrade(&self) -> Option<Db> {
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

/// What the background tasks and the event streams wait on.
pub(super) struct Signals {
    /// PostgreSQL: bumped after every commit through this pool that appended events; wakes the
    /// sequencer.
    pub(super) commits: watch::Sender<u64>,
    /// Bumped whenever events may have become readable: after a commit on SQLite, after the
    /// sequencer numbered events on PostgreSQL, and on a notification that another replica's
    /// sequencer did ([`listen_for_events`]). Event streams wait on it instead of polling.
    pub(super) appended: watch::Sender<u64>,
    /// The earliest deadline written through this process since the expiry sweeper last
    /// looked, and the wake-up that tells it: it may be sleeping past that deadline. (Other
    /// replicas' deadlines reach it within its heartbeat.)
    pub(super) deadlines: (
        std::sync::Mutex<Option<chrono::NaiveDateTime>>,
        tokio::sync::Notify,
    ),
}

/// A snapshot of the connection pool, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolStatus {
    /// Connections open.
    pub size: usize,
    /// Open connections not checked out.
    pub available: usize,
    /// The most connections the pool opens.
    pub max_size: usize,
}

#[derive(Clone)]
pub(super) enum Pool {
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

/// Whether a write failed on a unique constraint (a taken id, a second pending delegation).
pub(crate) fn is_unique_violation(err: &diesel::result::Error) -> bool {
    matches!(
        err,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
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
            deadlines: Default::default(),
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
    pub(super) fn downgrade(&self) -> WeakDb {
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
    pub(crate) fn lineages(&self) -> &instances::Lineages {
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
    pub(super) fn signal_commit(&self) {
        match self.pool {
            Pool::Pg(_) => self.signals.commits.send_modify(|n| *n = n.wrapping_add(1)),
            Pool::Sqlite(_) => self.signal_appended(),
        }
    }

    /// After a hop with a deadline `due` was written: wakes the sweeper if that is earlier
    /// than anything it was told since it last looked.
    pub(crate) fn signal_deadline(&self, due: chrono::NaiveDateTime) {
        let (earliest, wake) = &self.signals.deadlines;
        let mut earliest = earliest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if earliest.is_none_or(|at| due < at) {
            *earliest = Some(due);
            wake.notify_one();
        }
    }

    /// Waits for [`Db::signal_deadline`], then takes the earliest deadline it was given.
    pub(crate) async fn deadline_written(&self) -> Option<chrono::NaiveDateTime> {
        let (earliest, wake) = &self.signals.deadlines;
        wake.notified().await;
        earliest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    pub(super) fn signal_appended(&self) {
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
            let moved = event_log::sequence(&mut conn).await?;
            if moved > 0 {
                self.signal_appended();
            }
            if moved < event_log::SEQUENCE_BATCH {
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
    pub(crate) fn pool_status(&self) -> PoolStatus {
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
    pub(crate) async fn ping(&self) -> Result<(), Error> {
        use diesel_async::RunQueryDsl;
        let mut conn = self.conn().await?;
        with_conn!(&mut conn, |c| diesel::sql_query("SELECT 1")
            .execute(c)
            .await)?;
        Ok(())
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
