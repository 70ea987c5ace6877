//! Assembles the gRPC server: the three Hopper services, `grpc.health.v1.Health`, and server
//! reflection (v1 for current clients, v1alpha for grpcurl 1.8.6 and other older ones); runs
//! the background tasks (event-log retention, and on PostgreSQL the LISTEN connection that
//! wakes event streams for writes made by other replicas); owns shutdown.
//!
//! Every request to the Hopper services passes the [`Authenticator`] first; health and
//! reflection stay open, for probes and for grpcurl. TLS, when configured, is rustls.
//!
//! [`run`] takes a bound listener and a shutdown future, so tests bind `127.0.0.1:0` and stop
//! the server without signals.

use std::{future::Future, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, bail};

use chrono::TimeDelta;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
pub use tonic::transport::ServerTlsConfig as TlsConfig;
use tonic::{
    Code, Status,
    body::Body,
    transport::{Certificate, Identity, Server, server::TcpIncoming},
};
use tower::util::MapResponseLayer;

use crate::{
    auth::Authenticator,
    fanout::{Hub, TailLimits},
    proto::{
        self,
        server::{
            delegation_service_server::DelegationServiceServer,
            instance_service_server::InstanceServiceServer, task_service_server::TaskServiceServer,
        },
    },
    repository,
    rpc::{Deadlines, DelegationApi, InstanceApi, TaskApi},
    store::{self, Db, event_log, now},
    telemetry::{self, RpcLayer},
};

/// Tunables of a running server.
#[derive(Debug, Clone)]
pub struct Config {
    /// A silent event stream gets a progress mark this often.
    pub progress_interval: Duration,
    /// The live tail's window and each subscriber's buffer.
    pub watch: TailLimits,
    /// Events older than this are deleted.
    pub event_retention: Duration,
    /// How often retention runs.
    pub prune_interval: Duration,
    /// How long shutdown waits for running requests before giving up on them.
    pub drain_timeout: Duration,
    /// Who may call: [`Authenticator::open`] lets everyone in.
    pub auth: Authenticator,
    /// TLS for every connection; `None` serves plaintext HTTP/2.
    pub tls: Option<TlsConfig>,
    /// Deadlines for hops whose requests set none.
    pub deadlines: Deadlines,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            progress_interval: Duration::from_secs(5),
            watch: TailLimits::default(),
            event_retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            auth: Authenticator::open(),
            tls: None,
            deadlines: Deadlines::default(),
        }
    }
}

/// Aborts a background task when dropped, so none outlives the server.
pub struct Background(pub JoinHandle<()>);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves until `shutdown` resolves; then event streams end with UNAVAILABLE, no new requests
/// are taken, and running ones get `drain_timeout` to finish.
pub async fn run(
    listener: TcpListener,
    hub: Hub,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let db = hub.db().clone();
    let _listener = Background(tokio::spawn(store::listen_for_events(db.clone())));
    let _retention = Background(tokio::spawn(retention(db.clone(), config.clone())));
    let _sweeper = Background(tokio::spawn(repository::expiry::sweeper(db.clone())));

    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health {
        reporter,
        draining: Arc::default(),
    };
    health.set(true).await;
    let _probe = Background(tokio::spawn(probe_database(db.clone(), health.clone())));

    // The builder is not Clone, so each reflection version gets its own.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.BadRequest, so grpcurl can show the field violations.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };

    let (draining, mut drain_started) = watch::channel(false);
    let streams = hub.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: no new requests, ending event streams");
        health.drain().await;
        streams.stop_streams();
        let _ = draining.send(true);
    };

    let mut builder = Server::builder();
    if let Some(tls) = config.tls.clone() {
        builder = builder.tls_config(tls)?;
    }
    let auth = config.auth.clone();
    let server = builder
        // Notice peers that vanished without closing their connection.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(RpcLayer)
        .layer(MapResponseLayer::new(reclassify_transport_errors))
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(InstanceServiceServer::with_interceptor(
            InstanceApi::new(db.clone()),
            auth.clone(),
        ))
        .add_service(TaskServiceServer::with_interceptor(
            TaskApi::new(db),
            auth.clone(),
        ))
        .add_service(DelegationServiceServer::with_interceptor(
            DelegationApi::new(hub, config.deadlines),
            auth,
        ))
        .serve_with_incoming_shutdown(accepted(listener), shutdown);
    let drain_deadline = async {
        let _ = drain_started.wait_for(|started| *started).await;
        tokio::time::sleep(config.drain_timeout).await;
    };
    tokio::select! {
        served = server => served?,
        () = drain_deadline => {
            tracing::warn!(timeout = ?config.drain_timeout, "requests still running at the drain deadline; stopping anyway");
        }
    }
    Ok(())
}

/// The health of the three Hopper services, which change together.
#[derive(Clone)]
struct Health {
    reporter: tonic_health::server::HealthReporter,
    /// Set at shutdown, after which nothing reports SERVING again.
    draining: Arc<tokio::sync::Mutex<bool>>,
}

impl Health {
    /// SERVING or NOT_SERVING, unless the server is draining.
    async fn set(&self, serving: bool) {
        let draining = self.draining.lock().await;
        if !*draining {
            self.report(serving).await;
        }
    }

    /// NOT_SERVING from now on.
    async fn drain(&self) {
        let mut draining = self.draining.lock().await;
        *draining = true;
        self.report(false).await;
    }

    async fn report(&self, serving: bool) {
        let r = &self.reporter;
        if serving {
            r.set_serving::<InstanceServiceServer<InstanceApi>>().await;
            r.set_serving::<TaskServiceServer<TaskApi>>().await;
            r.set_serving::<DelegationServiceServer<DelegationApi>>()
                .await;
        } else {
            r.set_not_serving::<InstanceServiceServer<InstanceApi>>()
                .await;
            r.set_not_serving::<TaskServiceServer<TaskApi>>().await;
            r.set_not_serving::<DelegationServiceServer<DelegationApi>>()
                .await;
        }
    }
}

/// How often the database is probed for the health service.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Probes the database every [`PROBE_INTERVAL`]: the services are NOT_SERVING while it cannot
/// be reached, SERVING again once it can (load balancers and `grpc_health_probe` act on it).
async fn probe_database(db: Db, health: Health) {
    let mut serving = true;
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let reachable = db.ping().await;
        if reachable.is_ok() == serving {
            continue;
        }
        serving = reachable.is_ok();
        match reachable {
            Ok(()) => tracing::info!("the database answers again: SERVING"),
            Err(err) => tracing::warn!(error = %err, "the database cannot be reached: NOT_SERVING"),
        }
        health.set(serving).await;
    }
}

/// The connections accepted on `listener`, with Nagle's algorithm off. The builder's
/// `tcp_nodelay` applies only to listeners tonic binds itself; without this a small response
/// written in two segments waits about 40 ms for the client's delayed ACK. TLS runs over these
/// same sockets, so it is covered too.
fn accepted(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Refuses to expose an unauthenticated server beyond this machine unless `insecure`, and
/// warns when bearer tokens would cross the network without TLS.
pub fn check_exposure(
    listen: SocketAddr,
    auth: &Authenticator,
    tls: bool,
    insecure: bool,
) -> anyhow::Result<()> {
    if listen.ip().is_loopback() {
        return Ok(());
    }
    if !auth.is_open() && !tls {
        tracing::warn!("bearer tokens travel in plaintext: give --tls-cert and --tls-key");
    }
    if auth.is_open() && !insecure {
        bail!(
            "refusing to serve {listen} without authentication: anyone who can reach it could \
             accept, complete or watch any task. Give --auth-tokens and/or --tls-client-ca, \
             listen on a loopback address, or pass --insecure to serve it open anyway"
        );
    }
    Ok(())
}

/// Server TLS from PEM files: the server's certificate chain and key, and optionally the CA
/// that signs client certificates (mTLS). With a client CA, a client may still connect
/// without a certificate and authenticate with a bearer token instead.
pub fn tls_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<TlsConfig> {
    let read = |path: &Path, what: &str| {
        std::fs::read(path).with_context(|| format!("could not read the {what} {}", path.display()))
    };
    let identity = Identity::from_pem(read(cert, "TLS certificate")?, read(key, "TLS key")?);
    let mut tls = TlsConfig::new()
        .identity(identity)
        .timeout(Duration::from_secs(10));
    if let Some(ca) = client_ca {
        tls = tls
            .client_ca_root(Certificate::from_pem(read(ca, "client CA certificate")?))
            .client_auth_optional(true);
    }
    // Parse the PEM now, so that a bad file stops start-up with a clear message.
    Server::builder()
        .tls_config(tls.clone())
        .context("could not use the TLS certificate, key or client CA")?;
    Ok(tls)
}

/// tonic answers two client mistakes with codes that blame the server or mislead: a message
/// over the size limit gets OUT_OF_RANGE, and one it cannot decode (say, nested past prost's
/// recursion limit) gets INTERNAL. Both are rewritten here, where the status travels in the
/// headers of a trailers-only response: RESOURCE_EXHAUSTED and INVALID_ARGUMENT.
fn reclassify_transport_errors(mut response: http::Response<Body>) -> http::Response<Body> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    let message = status.message();
    let code = match status.code() {
        Code::OutOfRange if message.starts_with("Error, decoded message length too large") => {
            Code::ResourceExhausted
        }
        Code::Internal if message.starts_with("failed to decode Protobuf message") => {
            Code::InvalidArgument
        }
        _ => return response,
    };
    if Status::new(code, message)
        .add_header(response.headers_mut())
        .is_err()
    {
        tracing::warn!(%message, "could not rewrite a transport error's status");
    }
    response
}

/// Deletes events older than the retention period, every prune interval.
async fn retention(db: Db, config: Config) {
    let retention = TimeDelta::from_std(config.event_retention).unwrap_or(TimeDelta::MAX);
    let mut ticks = tokio::time::interval(config.prune_interval);
    loop {
        ticks.tick().await;
        let cutoff = now().checked_sub_signed(retention).unwrap_or_default();
        match prune(&db, cutoff).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, %cutoff, "pruned old events"),
            Err(err) => tracing::warn!(error = %err, "could not prune old events"),
        }
    }
}

async fn prune(db: &Db, cutoff: chrono::NaiveDateTime) -> Result<usize, crate::error::Error> {
    db.write(async |tx| Ok(event_log::prune(tx, cutoff).await?))
        .await
}

/// Serves `/metrics` over HTTP/1.1 on `listener` until the task is dropped: the process's
/// counters, and gauges read from `hub` and its database at each scrape.
pub async fn serve_metrics(listener: tokio::net::TcpListener, hub: Hub) -> std::io::Result<()> {
    use axum::{Router, http::header::CONTENT_TYPE, routing::get};
    let app = Router::new().route(
        "/metrics",
        get(move || async move {
            let text = telemetry::metrics().render(&gauges(&hub).await);
            let openmetrics = "application/openmetrics-text; version=1.0.0; charset=utf-8";
            ([(CONTENT_TYPE, openmetrics)], text)
        }),
    );
    axum::serve(listener, app).await
}

/// The gauges now. If the database cannot be reached, the log's head is left unknown.
async fn gauges(hub: &Hub) -> telemetry::Gauges {
    let mut log_head = None;
    if let Ok(mut conn) = hub.db().conn().await
        && let Ok(log) = event_log::bounds(&mut conn).await
    {
        log_head = Some(log.head);
    }
    let pool = hub.db().pool_status();
    telemetry::Gauges {
        subscribers: hub.active_streams(),
        log_head,
        pool_idle: pool.available,
        pool_in_use: pool.size.saturating_sub(pool.available),
        pool_max: pool.max_size,
    }
}
