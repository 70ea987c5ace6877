//! Transactions: [`Db::write`], where every multi-statement write of the service runs, and
//! the [`Tx`] it hands the work, which commits or rolls back once and rolls itself back if
//! dropped; on SQLite, this process's writer turn.

use diesel_async::{
    AsyncConnection, AsyncPgConnection, TransactionManager, pooled_connection::deadpool,
};

use super::{Conn, Db, pool::Pool, with_conn};
use crate::error::Error;

/// On SQLite, this process's turn to write (`None` on PostgreSQL, whose writers need none).
pub(crate) type WriterTurn = Option<tokio::sync::OwnedMutexGuard<()>>;

impl Db {
    /// A pooled connection for one writing statement outside a transaction, with this
    /// process's SQLite writer turn held for as long as the pair lives (see [`Db::begin`]).
    pub(crate) async fn conn_for_write(&self) -> Result<(Conn, WriterTurn), Error> {
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

    /// Runs `work` in one transaction: committed if it returns `Ok`, rolled back otherwise (or
    /// if the request is dropped half-way); the outcome, or the commit's error, is returned.
    /// Every write of the service of more than one statement goes through here (a single
    /// statement runs on its own, through [`Db::conn_for_write`]).
    pub async fn write<T>(
        &self,
        work: impl AsyncFnOnce(&mut Tx) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut tx = self.begin().await?;
        let outcome = work(&mut tx).await;
        tx.finish(outcome).await
    }

    /// Starts a transaction on a pooled connection; end it with [`Tx::finish`]. The service
    /// writes through [`Db::write`]; tests that must hold two transactions open at once (to
    /// interleave their commits) start them here.
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
    pub(super) conn: Option<Conn>,
    pub(super) db: Db,
    /// SQLite: this process's writers' turn, held until the transaction ends.
    pub(super) writer: WriterTurn,
    /// Whether events were appended, so that committing must wake the sequencer.
    pub(super) appended: bool,
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
