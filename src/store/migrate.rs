//! The schema's migrations, embedded in the binary per backend, applied or reverted.

use diesel::{
    Connection,
    connection::SimpleConnection,
    migration::{Migration, MigrationSource},
    sqlite::SqliteConnection,
};
use diesel_async::{AsyncPgConnection, async_connection_wrapper::AsyncConnectionWrapper};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use super::DatabaseUrl;

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// How long a migration waits for another writer's SQLite lock before giving up.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 5_000;

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
