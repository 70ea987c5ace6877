//! What the server tells its operators: Prometheus metrics (served at `/metrics` by
//! `server::serve_metrics` with `serve --metrics-listen`) and a tracing span around every RPC.
//! A leaf: it depends on the proto descriptors only, on no layer above.
//!
//! Counters and histograms are process-wide ([`metrics`]): one server per process in
//! production, and a process-wide registry is what a scrape sees. Gauges (subscribers, the
//! log's head, pool connections) are read by the server at scrape time and handed to
//! [`Metrics::render`], so they cost the request path nothing.
//!
//! The RPC span carries `method`, and, once known, `caller` (set by [`crate::auth`]) and the
//! `task_id` / `delegation_id` the request names (set by [`crate::rpc`]). Never a token or a
//! result body.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
    time::Instant,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tonic::{Code, Status};
use tracing::{Instrument, field::Empty};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rpc {
    method: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<Rpc, Counter>,
    durations: Family<Method, Histogram, fn() -> Histogram>,
    subscribers: Gauge,
    head: Gauge,
    delivered: Counter,
    pool: Family<State, Gauge>,
    bubbled: Histogram,
    expired: Family<Reason, Counter>,
    expiry_lag: Histogram,
    unresponsive: Gauge,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

fn duration_histogram() -> Histogram {
    // 100 µs to about 1.6 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 15))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Rpc, Counter>::default();
        let durations = Family::<Method, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        let (subscribers, head, pool) = (Gauge::default(), Gauge::default(), Family::default());
        let delivered = Counter::default();
        let bubbled = Histogram::new([0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0, 64.0]);
        let expired = Family::<Reason, Counter>::default();
        // 1 ms to about 33 s.
        let expiry_lag = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let unresponsive = Gauge::default();
        registry.register(
            "hopper_rpc_requests",
            "gRPC requests answered, by method and the status code in the response headers \
             (a stream that opened counts as OK)",
            requests.clone(),
        );
        registry.register(
            "hopper_rpc_duration_seconds",
            "Time to answer a gRPC request (for WatchEvents: to open the stream), by method",
            durations.clone(),
        );
        registry.register(
            "hopper_watch_subscribers",
            "Open WatchEvents streams",
            subscribers.clone(),
        );
        registry.register(
            "hopper_event_log_head_sequence",
            "The newest event sequence in the log",
            head.clone(),
        );
        registry.register(
            "hopper_events_delivered",
            "Events sent to WatchEvents subscribers (one per subscriber per event)",
            delivered.clone(),
        );
        registry.register(
            "hopper_db_pool_connections",
            "Database pool connections, by state (idle, in_use, max)",
            pool.clone(),
        );
        registry.register(
            "hopper_bubbled_hops",
            "Delegations a completion bubbled up to, beyond the one completed",
            bubbled.clone(),
        );
        registry.register(
            "hopper_delegations_expired",
            "Delegations that expired, by reason (accept_deadline, complete_deadline, \
             target_unresponsive)",
            expired.clone(),
        );
        registry.register(
            "hopper_expiry_lag_seconds",
            "When an expiry happened minus when it was due (the database's clock)",
            expiry_lag.clone(),
        );
        registry.register(
            "hopper_unresponsive_instances",
            "Instances whose lease has lapsed, as the last sweep saw them",
            unresponsive.clone(),
        );
        Self {
            registry,
            requests,
            durations,
            subscribers,
            head,
            delivered,
            pool,
            bubbled,
            expired,
            expiry_lag,
            unresponsive,
        }
    }

    /// One answered request.
    fn answered(&self, method: &'static str, code: Code, elapsed: std::time::Duration) {
        let code = code_name(code);
        self.requests.get_or_create(&Rpc { method, code }).inc();
        self.durations
            .get_or_create(&Method { method })
            .observe(elapsed.as_secs_f64());
    }

    /// One event sent to one subscriber.
    pub fn delivered(&self) {
        self.delivered.inc();
    }

    /// One delegation expired for `reason`, `lag` after it was due.
    pub fn expired(&self, reason: &'static str, lag: std::time::Duration) {
        self.expired.get_or_create(&Reason { reason }).inc();
        self.expiry_lag.observe(lag.as_secs_f64());
    }

    /// How many instances are unresponsive now.
    pub fn unresponsive(&self, instances: i64) {
        self.unresponsive.set(instances);
    }

    /// A completion that bubbled up to `hops` further delegations.
    pub fn bubbled(&self, hops: usize) {
        self.bubbled.observe(hops as f64);
    }

    /// The exposition text, with the gauges as the server read them at scrape time.
    pub fn render(&self, gauges: &Gauges) -> String {
        self.subscribers
            .set(i64::try_from(gauges.subscribers).unwrap_or(i64::MAX));
        if let Some(head) = gauges.log_head {
            self.head.set(head);
        }
        for (state, count) in [
            ("idle", gauges.pool_idle),
            ("in_use", gauges.pool_in_use),
            ("max", gauges.pool_max),
        ] {
            self.pool
                .get_or_create(&State { state })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The gauges, which the server reads from its state when `/metrics` is scraped (so they cost
/// requests nothing).
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Open WatchEvents streams.
    pub subscribers: usize,
    /// The newest event sequence; `None` keeps the last value (the database did not answer).
    pub log_head: Option<i64>,
    /// Database pool connections not checked out.
    pub pool_idle: usize,
    /// Database pool connections checked out.
    pub pool_in_use: usize,
    /// The most connections the pool opens.
    pub pool_max: usize,
}

/// A tower layer around the whole gRPC server: a span per request, and its count and duration
/// once the response headers are out (the code is read from them; a successful unary call
/// carries its status in the trailers, so no status in the headers means OK).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RpcLayer;

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService(inner)
    }
}

/// The service [`RpcLayer`] makes.
#[derive(Debug, Clone)]
pub(crate) struct RpcService<S>(S);

impl<S, B, R> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let method = method_name(request.uri().path());
        let span = tracing::info_span!(
            "rpc",
            method = %method,
            caller = Empty,
            task_id = Empty,
            delegation_id = Empty,
        );
        // Entered while the inner service is called: the auth interceptor runs here.
        let answer = span.in_scope(|| self.0.call(request));
        Box::pin(
            async move {
                let response = answer.await?;
                let code = Status::from_header_map(response.headers())
                    .map_or(Code::Ok, |status| status.code());
                metrics().answered(method, code, started.elapsed());
                tracing::debug!(?code, elapsed = ?started.elapsed(), "answered");
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// The method a request path names (`/hopper.delegation.v1.TaskService/GetTask` ->
/// `GetTask`), or `unknown` for a path the server does not serve: a label per path a client
/// invents would grow the metrics without bound (and auth refuses before routing does).
fn method_name(path: &str) -> &'static str {
    static KNOWN: LazyLock<HashSet<String>> = LazyLock::new(|| {
        use prost::Message;
        let mut paths = HashSet::from(
            [
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            ]
            .map(str::to_owned),
        );
        for set in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let set = prost_types::FileDescriptorSet::decode(set).unwrap_or_default();
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        paths.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        paths
    });
    KNOWN
        .get(path)
        .and_then(|known| known.rsplit('/').next())
        .unwrap_or("unknown")
}

/// A status code as gRPC names it in metrics (`OK`, `NotFound`, …).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Records the task and delegation a request names on its RPC span.
pub(crate) fn record_ids(task_id: Option<&str>, delegation_id: Option<&str>) {
    let span = tracing::Span::current();
    if let Some(task_id) = task_id {
        span.record("task_id", task_id);
    }
    if let Some(delegation_id) = delegation_id {
        span.record("delegation_id", delegation_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_get_a_label_of_their_own() {
        let name = method_name;
        assert_eq!(name("/hopper.delegation.v1.TaskService/GetTask"), "GetTask");
        assert_eq!(name("/grpc.health.v1.Health/Check"), "Check");
        let v1alpha = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
        assert_eq!(name(v1alpha), "ServerReflectionInfo");
        assert_eq!(
            name("/hopper.delegation.v1.TaskService/Invented"),
            "unknown"
        );
        assert_eq!(name("/anything/at/all"), "unknown");
        assert_eq!(code_name(Code::NotFound), "NotFound");
        assert_eq!(code_name(Code::Ok), "OK");
    }
}
