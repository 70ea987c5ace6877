//! Where the data lives: the `--database-url` parsed into a backend and its address, and the
//! lock file that keeps a second server off a SQLite database.

use std::{path::PathBuf, str::FromStr};

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
    pub(super) fn sqlite_path(path: &std::path::Path) -> String {
        path.to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
