//! hopperctl's connection to the server: the channel (plain, TLS or mTLS), the bearer token on
//! every call, and what a failure means for the exit code.

use std::{fmt, path::PathBuf};

use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    proto::{
        delegation_service_client::DelegationServiceClient,
        instance_service_client::InstanceServiceClient, task_service_client::TaskServiceClient,
    },
    service_config::{Retry, RetryLayer, ServiceConfig},
};

/// Attempts of an idempotent read on UNAVAILABLE (the first and two retries), following the
/// shipped service config's backoff: a person waits, so fewer than a program would make.
const READ_ATTEMPTS: u32 = 3;

/// Where and how to connect: the global options.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The server's URL; `https://` uses TLS.
    #[arg(
        long,
        env = "HOPPER_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// A bearer token (an instance's or the admin's), sent on every call.
    #[arg(long, env = "HOPPER_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's certificate (default: the system's roots).
    #[arg(long, global = true)]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate, for mTLS (with `--key`).
    #[arg(long, requires = "key", global = true)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `--cert`.
    #[arg(long, requires = "cert", global = true)]
    pub key: Option<PathBuf>,
}

/// Why a command failed, which decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// The server refused the request (exit code 1).
    Refused(String),
    /// The command line or a file it names is wrong (exit code 2).
    Usage(String),
    /// The server cannot be reached, or cannot serve now (exit code 3).
    Unreachable(String),
}

impl Failure {
    /// The process exit code.
    pub fn code(&self) -> u8 {
        match self {
            Self::Refused(_) => 1,
            Self::Usage(_) => 2,
            Self::Unreachable(_) => 3,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused(m) | Self::Usage(m) | Self::Unreachable(m) => f.write_str(m),
        }
    }
}

impl From<Status> for Failure {
    /// The server's message is already one sentence naming the field, the entity or the state;
    /// a transport failure is told as such.
    fn from(status: Status) -> Self {
        if is_transient(&status) {
            let detail = with_causes(status.message(), std::error::Error::source(&status));
            return Self::Unreachable(format!("the server cannot serve the request: {detail}"));
        }
        Self::Refused(status.message().to_owned())
    }
}

/// Whether a status means "the server cannot serve now": UNAVAILABLE, a deadline, or a broken
/// connection (tonic reports a reset or a GOAWAY with the transport error as the status's
/// source, under several codes). A command reports it as "unreachable" (exit code 3).
pub(crate) fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    ) || std::error::Error::source(status).is_some()
}

/// Whether a status is a refusal that no retry can change: the request, the caller, the state
/// or the cursor is wrong (the README's table of codes). `watch` ends on these only and
/// resumes after anything else (UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED, a reset connection, a
/// GOAWAY, even INTERNAL).
pub(crate) fn is_refusal(status: &Status) -> bool {
    std::error::Error::source(status).is_none()
        && matches!(
            status.code(),
            Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::PermissionDenied
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::Unauthenticated
                | Code::Unimplemented
        )
}

/// A message followed by the chain of causes, in one line.
fn with_causes(message: &str, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut text = message.to_owned();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// Adds `authorization: Bearer TOKEN` to every call when a token is given.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// A channel with the service config's retries and the bearer token.
pub(super) type Authed = InterceptedService<Retry<Channel>, Bearer>;

/// The three service clients over one connection.
pub struct Clients {
    /// InstanceService.
    pub instances: InstanceServiceClient<Authed>,
    /// TaskService.
    pub tasks: TaskServiceClient<Authed>,
    /// DelegationService.
    pub delegations: DelegationServiceClient<Authed>,
}

impl Target {
    /// Connects: UNREACHABLE if the server does not answer, USAGE if the options are wrong.
    pub async fn connect(&self) -> Result<Clients, Failure> {
        let endpoint = self.endpoint()?;
        let bearer = Bearer(
            self.token
                .as_deref()
                .map(|token| {
                    format!("Bearer {token}").parse().map_err(|_| {
                        Failure::Usage("--token holds characters a header cannot carry".into())
                    })
                })
                .transpose()?,
        );
        let channel = endpoint.connect().await.map_err(|e| {
            let detail = with_causes(&e.to_string(), std::error::Error::source(&e));
            Failure::Unreachable(format!(
                "cannot reach the server at {}: {detail}",
                self.server
            ))
        })?;
        let layer = RetryLayer::new(ServiceConfig::shipped().interactive(READ_ATTEMPTS));
        let channel = tower::Layer::layer(&layer, channel);
        Ok(Clients {
            instances: InstanceServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            tasks: TaskServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            delegations: DelegationServiceClient::with_interceptor(channel, bearer),
        })
    }

    fn endpoint(&self) -> Result<Endpoint, Failure> {
        let invalid =
            |e: &dyn fmt::Display| Failure::Usage(format!("--server {}: {e}", self.server));
        let endpoint = Endpoint::from_shared(self.server.clone()).map_err(|e| invalid(&e))?;
        let tls = self.server.starts_with("https://");
        if !tls {
            if self.ca_cert.is_some() || self.cert.is_some() {
                return Err(Failure::Usage(
                    "--ca-cert, --cert and --key need an https:// --server".into(),
                ));
            }
            return Ok(endpoint.tcp_nodelay(true));
        }
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_cert {
            Some(path) => config.ca_certificate(Certificate::from_pem(read(path)?)),
            None => config.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint
            .tls_config(config)
            .map(|e| e.tcp_nodelay(true))
            .map_err(|e| invalid(&e))
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_ends_only_on_refusals_a_retry_cannot_change() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::FailedPrecondition,
            Code::PermissionDenied,
            Code::OutOfRange,
            Code::Unauthenticated,
            Code::Unimplemented,
        ] {
            assert!(is_refusal(&Status::new(code, "no")), "{code:?}");
        }
        for code in [
            Code::Unavailable,
            Code::Aborted,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::Unknown,
            Code::ResourceExhausted,
        ] {
            assert!(!is_refusal(&Status::new(code, "later")), "{code:?}");
        }
        // A broken connection is never a refusal, whatever code tonic gives it.
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let broken = Status::from_error(Box::new(reset));
        assert!(!is_refusal(&broken) && is_transient(&broken), "{broken:?}");
        assert!(is_transient(&Status::deadline_exceeded("slow")));
        assert!(!is_transient(&Status::not_found("task t not found")));
    }
}
