//! A private PostgreSQL cluster (initdb and pg_ctl on a free port, run as the `postgres` user),
//! for tests that stop, restart or crash the database without touching the shared server.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn pg_bin(tool: &str) -> Option<PathBuf> {
    let versions = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    versions
        .filter_map(Result::ok)
        .map(|v| v.path().join("bin").join(tool))
        .find(|p| p.exists())
}

fn as_postgres(program: &Path, args: &[&str]) -> bool {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(program)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// A throwaway cluster, stopped and deleted on drop.
pub struct Cluster {
    pg_ctl: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Cluster {
    /// A new cluster, started; `None` where initdb, pg_ctl or root are missing. Under CI that
    /// is a failure, not a skip.
    pub fn create() -> Option<Self> {
        let cluster = Self::init();
        let required = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            cluster.is_some() || !required,
            "CI needs initdb, pg_ctl and root to run a private PostgreSQL cluster"
        );
        if cluster.is_none() {
            eprintln!("SKIPPED: cannot start a private PostgreSQL cluster here");
        }
        cluster
    }

    fn init() -> Option<Self> {
        let (Some(initdb), Some(pg_ctl)) = (pg_bin("initdb"), pg_bin("pg_ctl")) else {
            return None;
        };
        let dir = tempfile::tempdir().ok()?;
        Command::new("chown")
            .args(["postgres", dir.path().to_str()?])
            .status()
            .ok()?
            .success()
            .then_some(())?;
        let data = dir.path().to_str()?;
        let created = as_postgres(
            &initdb,
            &["-D", data, "--auth=trust", "--username=root", "-E", "UTF8"],
        );
        if !created {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let cluster = Self { pg_ctl, dir, port };
        cluster.start();
        Some(cluster)
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://root@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> &str {
        self.dir.path().to_str().expect("a UTF-8 temporary path")
    }

    /// Starts it and waits until it accepts connections.
    pub fn start(&self) {
        let dir = self.data();
        let options = format!("-p {} -k {dir} -c listen_addresses=127.0.0.1", self.port);
        let log = format!("{dir}/log");
        assert!(as_postgres(
            &self.pg_ctl,
            &["-D", dir, "-o", &options, "-l", &log, "-w", "start"]
        ));
    }

    /// Stops it in fast mode: sessions are terminated (57P01) and it shuts down cleanly.
    pub fn stop(&self) {
        assert!(as_postgres(
            &self.pg_ctl,
            &["-D", self.data(), "-m", "fast", "-w", "stop"]
        ));
    }

    /// `pg_ctl restart -m fast`, as an operator's maintenance restart.
    pub fn restart(&self) {
        self.stop();
        self.start();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        as_postgres(
            &self.pg_ctl,
            &["-D", self.data(), "-m", "immediate", "-w", "stop"],
        );
    }
}
