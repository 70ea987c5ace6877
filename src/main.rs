//! The `hopper-delegation` binary: parses the command line, sets up logging, and runs the
//! server or the migrations.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hopper_delegation::{
    auth::{Authenticator, Tokens},
    fanout::{Hub, TailLimits},
    rpc::{Deadlines, MAX_DEADLINE},
    server,
    store::{self, DatabaseUrl, Db, Migrate},
};
use tokio::net::TcpListener;

/// Records how tasks travel between Hopper instances and bubbles completions back up.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines as text for people, or as JSON objects for a log pipeline (to stderr).
    #[arg(long, env = "HOPPER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// One line per event, coloured on a terminal.
    Text,
    /// One JSON object per event, with the span's fields (method, caller, task and delegation).
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate the database, then serve gRPC until SIGTERM or Ctrl-C.
    Serve(Box<ServeArgs>),
    /// Apply pending migrations and exit.
    Migrate(DatabaseArgs),
}

#[derive(Args)]
struct DatabaseArgs {
    /// postgres://… or postgresql://… for PostgreSQL; sqlite://PATH or a bare path for SQLite.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://hopper.db")]
    database_url: DatabaseUrl,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HOPPER_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Size of the database connection pool.
    #[arg(long, env = "HOPPER_MAX_CONNECTIONS", default_value_t = 16)]
    max_connections: usize,
    /// A request that cannot get a database connection within this fails with UNAVAILABLE.
    #[arg(long, env = "HOPPER_DB_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    db_timeout: Duration,
    /// A silent WatchEvents stream gets a progress message this often.
    #[arg(long, env = "HOPPER_PROGRESS_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    progress_interval: Duration,
    /// Events the live tail keeps in memory for streams that join or fall behind.
    #[arg(long, env = "HOPPER_WATCH_WINDOW_EVENTS", default_value_t = TailLimits::default().window_events)]
    watch_window_events: usize,
    /// Bytes (approximate) the live tail keeps in memory at most.
    #[arg(long, env = "HOPPER_WATCH_WINDOW_BYTES", default_value_t = TailLimits::default().window_bytes)]
    watch_window_bytes: usize,
    /// Events waiting for one WatchEvents client before its stream is detached from the live
    /// tail and catches up from the log on its own.
    #[arg(long, env = "HOPPER_WATCH_BUFFER", default_value_t = TailLimits::default().buffer)]
    watch_buffer: usize,
    /// Hops created without `accept_within` must be accepted or rejected within this (off by
    /// default: no deadline).
    #[arg(long, env = "HOPPER_DEFAULT_ACCEPT_WITHIN", value_parser = deadline)]
    default_accept_within: Option<Duration>,
    /// Hops created without `complete_within` must complete within this (off by default).
    #[arg(long, env = "HOPPER_DEFAULT_COMPLETE_WITHIN", value_parser = deadline)]
    default_complete_within: Option<Duration>,
    /// Events older than this are pruned from the event log.
    #[arg(long, env = "HOPPER_EVENT_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    event_retention: Duration,
    /// How often the event log is pruned.
    #[arg(long, env = "HOPPER_PRUNE_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    prune_interval: Duration,
    /// On shutdown, how long running requests get to finish.
    #[arg(long, env = "HOPPER_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long, env = "HOPPER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    security: SecurityArgs,
}

/// Authentication and TLS; see "Security" in the README.
#[derive(Args)]
struct SecurityArgs {
    /// TOML file of SHA-256 token digests: `admin = [...]` and `[instances] ID = [...]`.
    /// Requests then need `authorization: Bearer <token>` (or a client certificate).
    #[arg(long, env = "HOPPER_AUTH_TOKENS")]
    auth_tokens: Option<PathBuf>,
    /// PEM certificate chain: serve TLS (needs --tls-key).
    #[arg(long, env = "HOPPER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "HOPPER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate: accept client certificates it signed, whose subject CN is the
    /// calling instance's id (mTLS). Needs --tls-cert.
    #[arg(long, env = "HOPPER_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve a non-loopback address without authentication.
    #[arg(long)]
    insecure: bool,
}

impl SecurityArgs {
    fn load(
        &self,
        listen: SocketAddr,
    ) -> anyhow::Result<(Authenticator, Option<server::TlsConfig>)> {
        let tokens = self.auth_tokens.as_deref().map(Tokens::load).transpose()?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(server::tls_config(
                cert,
                key,
                self.tls_client_ca.as_deref(),
            )?),
            _ => None,
        };
        let auth = Authenticator::new(tokens, self.tls_client_ca.is_some());
        server::check_exposure(listen, &auth, tls.is_some(), self.insecure)?;
        Ok((auth, tls))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        );
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    match cli.command {
        Command::Migrate(args) => {
            let applied = store::migrate(&args.database_url, Migrate::Latest).await?;
            tracing::info!(?applied, "database is up to date");
        }
        Command::Serve(args) => {
            let (auth, tls) = args.security.load(args.listen)?;
            raise_open_file_limit();
            let shutdown = shutdown_signal()?;
            let url = &args.database.database_url;
            let _owner = store::SqliteOwner::acquire(url)?;
            let applied = store::migrate(url, Migrate::Latest)
                .await
                .context("could not migrate the database")?;
            tracing::info!(?applied, "database is up to date");
            let db = Db::open_with_timeout(url, args.max_connections, args.db_timeout)?;
            let listener = TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("could not listen on {}", args.listen))?;
            tracing::info!(address = %listener.local_addr()?, "serving gRPC");
            let config = server::Config {
                progress_interval: args.progress_interval,
                watch: TailLimits {
                    window_events: args.watch_window_events,
                    window_bytes: args.watch_window_bytes,
                    buffer: args.watch_buffer,
                },
                event_retention: args.event_retention,
                prune_interval: args.prune_interval,
                drain_timeout: args.drain_timeout,
                auth,
                tls,
                deadlines: Deadlines {
                    accept_within: args.default_accept_within,
                    complete_within: args.default_complete_within,
                },
            };
            let hub = Hub::with_limits(db, config.progress_interval, config.watch);
            let _metrics = match args.metrics_listen {
                Some(addr) => Some(serve_metrics(addr, hub.clone()).await?),
                None => None,
            };
            server::run(listener, hub, config, shutdown).await?;
        }
    }
    Ok(())
}

/// A default deadline: a positive duration of at most 366 days, as a request's own.
fn deadline(text: &str) -> Result<Duration, String> {
    let within = humantime::parse_duration(text).map_err(|err| err.to_string())?;
    if within.is_zero() || within > MAX_DEADLINE {
        return Err("must be positive and at most 366 days".into());
    }
    Ok(within)
}

/// Binds `addr` and serves `/metrics` there until the returned task is dropped.
async fn serve_metrics(addr: SocketAddr, hub: Hub) -> anyhow::Result<server::Background> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("could not listen for metrics on {addr}"))?;
    tracing::info!(address = %listener.local_addr()?, "serving metrics at /metrics");
    Ok(server::Background(tokio::spawn(async move {
        if let Err(err) = server::serve_metrics(listener, hub).await {
            tracing::warn!(error = %err, "the metrics listener stopped");
        }
    })))
}

/// Raises the soft limit on open files to the hard limit: every WatchEvents subscriber on its
/// own connection holds a socket, and the usual soft limit of 1,024 would refuse the rest.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(err) => tracing::warn!(error = %err, "could not raise the open-file limit"),
    }
}

/// Installs the SIGTERM and SIGINT handlers now, so that a signal that comes before the server
/// is running still shuts it down cleanly, and resolves on the first of them.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {},
            _ = interrupt.recv() => {},
        }
    })
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
