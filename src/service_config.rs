//! The gRPC service config clients should use, and a tower layer that applies it to a tonic
//! channel (tonic reads no service config itself; grpc-go and grpcio load the same file).
//!
//! The file is `proto/hopper/delegation/v1/service_config.json`: reads and idempotent writes
//! wait for a connection (`waitForReady`) up to their `timeout` and are retried on UNAVAILABLE
//! with jittered exponential backoff, as gRPC's retry design (A6) says. Creates are not in it:
//! a create is safe to retry only with the same `request_id`, which the caller decides.

use std::{
    collections::hash_map::RandomState,
    future::Future,
    hash::BuildHasher,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Deserializer};
use tokio::time::Instant;
use tonic::{Code, body::Body};
use tower::{Service, ServiceExt};

/// The service config shipped with the protos.
pub(crate) const SERVICE_CONFIG: &str =
    include_str!("../proto/hopper/delegation/v1/service_config.json");

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A gRPC service config: its `methodConfig` entries (other keys are ignored).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceConfig {
    #[serde(default)]
    method_config: Vec<MethodConfig>,
}

/// How to call the methods it names.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MethodConfig {
    name: Vec<MethodName>,
    /// Wait for a connection instead of failing while none can be made.
    #[serde(default)]
    pub wait_for_ready: bool,
    /// The whole call's deadline, retries included.
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,
    /// When and how often to try again.
    pub retry_policy: Option<RetryPolicy>,
}

#[derive(Debug, Clone, Deserialize)]
struct MethodName {
    service: String,
    method: Option<String>,
}

/// gRPC's `retryPolicy`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The most the first pause may be (each pause is random between zero and its bound).
    #[serde(deserialize_with = "required_duration")]
    pub initial_backoff: Duration,
    /// The bound no pause exceeds.
    #[serde(deserialize_with = "required_duration")]
    pub max_backoff: Duration,
    /// How the bound grows after each attempt.
    pub backoff_multiplier: f64,
    /// The status codes to retry on, by name (`"UNAVAILABLE"`).
    #[serde(deserialize_with = "codes")]
    pub retryable_status_codes: Vec<Code>,
}

impl ServiceConfig {
    /// Parses a service config in gRPC's JSON form, with the limits of gRPC's retry design:
    /// `maxAttempts` above 1 (above 5 counts as 5), backoffs and the multiplier above zero, at
    /// least one retryable code.
    pub(crate) fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        let mut config: Self = serde_json::from_str(json)?;
        for method in &mut config.method_config {
            if let Some(policy) = &mut method.retry_policy {
                policy.validate().map_err(serde::de::Error::custom)?;
                policy.max_attempts = policy.max_attempts.min(5);
            }
        }
        Ok(config)
    }

    /// The config shipped with the protos ([`SERVICE_CONFIG`]).
    pub fn shipped() -> Self {
        Self::from_json(SERVICE_CONFIG).expect("the shipped service config parses")
    }

    /// The config of a call to `path` (`/package.Service/Method`): the entry naming the method,
    /// else one naming its whole service.
    pub fn method(&self, path: &str) -> Option<&MethodConfig> {
        let (service, method) = path.trim_start_matches('/').split_once('/')?;
        let names = |exact: bool| {
            self.method_config.iter().find(move |config| {
                config.name.iter().any(|name| {
                    name.service == service
                        && match &name.method {
                            Some(m) => exact && m == method,
                            None => !exact,
                        }
                })
            })
        };
        names(true).or_else(|| names(false))
    }

    /// For an interactive tool: at most `attempts` attempts, and no waiting for a connection
    /// (a person wants to hear at once that the server is down).
    pub(crate) fn interactive(mut self, attempts: u32) -> Self {
        for config in &mut self.method_config {
            config.wait_for_ready = false;
            if let Some(policy) = &mut config.retry_policy {
                policy.max_attempts = policy.max_attempts.min(attempts);
            }
        }
        self
    }
}

impl RetryPolicy {
    fn validate(&self) -> Result<(), &'static str> {
        if self.max_attempts < 2 {
            return Err("retryPolicy.maxAttempts must be above 1");
        }
        if self.initial_backoff.is_zero() || self.max_backoff.is_zero() {
            return Err("retryPolicy backoffs must be above zero");
        }
        if !(self.backoff_multiplier > 0.0 && self.backoff_multiplier.is_finite()) {
            return Err("retryPolicy.backoffMultiplier must be above zero");
        }
        if self.retryable_status_codes.is_empty() {
            return Err("retryPolicy.retryableStatusCodes must name a code");
        }
        Ok(())
    }
}

fn parse_duration(text: &str) -> Option<Duration> {
    let seconds: f64 = text.strip_suffix('s')?.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|text| {
            parse_duration(&text)
                .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a duration")))
        })
        .transpose()
}

fn required_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(d)?.ok_or_else(|| serde::de::Error::custom("a duration is required"))
}

/// gRPC's code names, indexed by code number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn codes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Code>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|name| {
            let number = CODE_NAMES.iter().position(|n| n == name);
            number
                .and_then(|n| i32::try_from(n).ok())
                .map(Code::from)
                .ok_or_else(|| serde::de::Error::custom(format!("{name:?} is not a status code")))
        })
        .collect()
}

/// A tower layer applying a [`ServiceConfig`] to the calls it names; other calls pass through
/// untouched. A named call is buffered whole to be sent again, so name unary methods only; and
/// as `waitForReady` here also resends a call whose connection broke before any answer came,
/// name only methods that are safe to repeat (the shipped config does).
#[derive(Debug, Clone)]
pub struct RetryLayer(Arc<ServiceConfig>);

impl RetryLayer {
    /// Applies `config`.
    pub fn new(config: ServiceConfig) -> Self {
        Self(Arc::new(config))
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            config: self.0.clone(),
        }
    }
}

/// The service [`RetryLayer`] makes, for example around a `tonic::transport::Channel`.
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    config: Arc<ServiceConfig>,
}

impl<S, B> Service<http::Request<Body>> for Retry<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The instance polled ready serves the first attempt; later ones wait on the clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let method = self.config.method(request.uri().path()).cloned();
        Box::pin(async move {
            let Some(method) = method else {
                return inner.call(request).await.map_err(Into::into);
            };
            let Some(timeout) = method.timeout else {
                return with_retries(inner, method, request).await;
            };
            match tokio::time::timeout(timeout, with_retries(inner, method, request)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Box::new(tonic::Status::deadline_exceeded(format!(
                    "no answer within the service config's timeout of {timeout:?}"
                ))) as BoxError),
            }
        })
    }
}

/// Calls `inner` with `request` as `method` says: again after a retryable status or, while
/// waiting for ready, after a failed connection, pausing a random time up to a growing bound.
async fn with_retries<S, B>(
    mut inner: S,
    method: MethodConfig,
    request: http::Request<Body>,
) -> Result<http::Response<B>, BoxError>
where
    S: Service<http::Request<Body>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
{
    let deadline = method.timeout.map(|timeout| Instant::now() + timeout);
    let (parts, body) = request.into_parts();
    let body: Bytes = body.collect().await?.to_bytes();
    let policy = method.retry_policy.as_ref();
    let mut attempts = 0;
    // Without a policy, waiting for ready still pauses between connection attempts.
    let mut bound = policy.map_or(Duration::from_millis(100), |p| p.initial_backoff);
    let mut first = true;
    loop {
        let request = http::Request::from_parts(parts.clone(), Body::new(Full::new(body.clone())));
        let outcome = if first {
            first = false;
            inner.call(request).await.map_err(Into::into)
        } else {
            let ready = inner.ready().await.map_err(Into::into);
            match ready {
                Ok(ready) => ready.call(request).await.map_err(Into::into),
                Err(err) => Err(err),
            }
        };
        let retryable = |code| policy.is_some_and(|p| p.retryable_status_codes.contains(&code));
        let (again, counts) = match &outcome {
            // No answer: the connection failed or broke, which a client sees as UNAVAILABLE.
            // Waiting for ready, it does not use up an attempt while a deadline bounds it.
            Err(_) if method.wait_for_ready && deadline.is_some() => (true, false),
            Err(_) => (retryable(Code::Unavailable), true),
            Ok(response) => (status_of(response).is_some_and(retryable), true),
        };
        attempts += u32::from(counts);
        let max_attempts = policy.map_or(1, |p| p.max_attempts.max(1));
        let pause = jittered(bound);
        let in_time = deadline.is_none_or(|d| Instant::now() + pause < d);
        if !again || attempts >= max_attempts || !in_time {
            return outcome;
        }
        tokio::time::sleep(pause).await;
        if let Some(p) = policy {
            bound = bound.mul_f64(p.backoff_multiplier).min(p.max_backoff);
        }
    }
}

/// The gRPC status of a response that carries it in its headers (a trailers-only response,
/// which is how servers answer a failed unary call).
fn status_of<B>(response: &http::Response<B>) -> Option<Code> {
    let value = response.headers().get("grpc-status")?.to_str().ok()?;
    Some(Code::from(value.parse::<i32>().ok()?))
}

/// A random duration between zero and `bound`.
fn jittered(bound: Duration) -> Duration {
    let random = RandomState::new().hash_one(std::time::Instant::now());
    // The top 53 bits as a fraction in [0, 1).
    #[expect(
        clippy::cast_precision_loss,
        reason = "53 bits fit an f64's mantissa exactly"
    )]
    let fraction = (random >> 11) as f64 / (1_u64 << 53) as f64;
    bound.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_names_reads_and_idempotent_writes_only() {
        let config = ServiceConfig::shipped();
        let get = config
            .method("/hopper.delegation.v1.TaskService/GetTask")
            .expect("GetTask is retried");
        let policy = get.retry_policy.as_ref().expect("a retry policy");
        assert_eq!(policy.retryable_status_codes, [Code::Unavailable]);
        assert_eq!(policy.max_attempts, 5);
        assert_eq!(policy.initial_backoff, Duration::from_millis(200));
        assert_eq!(get.timeout, Some(Duration::from_secs(10)));
        assert!(get.wait_for_ready);
        for create in [
            "/hopper.delegation.v1.TaskService/CreateTask",
            "/hopper.delegation.v1.DelegationService/CreateDelegation",
            "/hopper.delegation.v1.DelegationService/CompleteDelegation",
            "/hopper.delegation.v1.DelegationService/WatchEvents",
        ] {
            assert!(config.method(create).is_none(), "{create}");
        }
        let interactive = ServiceConfig::shipped().interactive(3);
        let get = interactive
            .method("/hopper.delegation.v1.TaskService/GetTask")
            .unwrap();
        assert_eq!(get.retry_policy.as_ref().unwrap().max_attempts, 3);
        assert!(!get.wait_for_ready);
    }

    #[test]
    fn a_service_wide_entry_applies_to_its_methods_and_bad_configs_are_refused() {
        let config = ServiceConfig::from_json(
            r#"{"methodConfig": [{"name": [{"service": "a.S"}], "timeout": "1.5s"}]}"#,
        )
        .unwrap();
        let method = config.method("/a.S/Anything").expect("the service's entry");
        assert_eq!(method.timeout, Some(Duration::from_millis(1500)));
        assert!(config.method("/b.S/Anything").is_none());
        assert!(config.method("no-slash").is_none());
        let many = ServiceConfig::from_json(
            r#"{"methodConfig": [{"name": [{"service": "a.S"}], "retryPolicy": {"maxAttempts": 9,
                "initialBackoff": "1s", "maxBackoff": "2s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "ABORTED"]}}]}"#,
        )
        .unwrap();
        let policy = many.method("/a.S/M").unwrap().retry_policy.clone().unwrap();
        assert_eq!(policy.max_attempts, 5, "gRPC caps attempts at 5");
        assert_eq!(
            policy.retryable_status_codes,
            [Code::Unavailable, Code::Aborted]
        );
        for bad in [
            r#"{"methodConfig": [{"name": [], "timeout": "soon"}]}"#,
            r#"{"methodConfig": [{"name": [], "retryPolicy": {"maxAttempts": 2,
                "initialBackoff": "1s", "maxBackoff": "2s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["SOMETIMES"]}}]}"#,
            r#"{"methodConfig": [{"name": [], "retryPolicy": {"maxAttempts": 1,
                "initialBackoff": "1s", "maxBackoff": "2s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
            r#"{"methodConfig": [{"name": [], "retryPolicy": {"maxAttempts": 3,
                "initialBackoff": "1s", "maxBackoff": "2s", "backoffMultiplier": -2,
                "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
            r#"{"methodConfig": [{"name": [], "retryPolicy": {"maxAttempts": 3,
                "initialBackoff": "0s", "maxBackoff": "2s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
        ] {
            assert!(ServiceConfig::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pauses_stay_within_their_bound() {
        for _ in 0..100 {
            assert!(jittered(Duration::from_millis(10)) < Duration::from_millis(10));
        }
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }
}
