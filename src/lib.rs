//! The Hopper delegation service: a gRPC server that records how tasks travel between Hopper
//! instances (Global -> Project -> Orchestration, …) and bubbles completions back up the chain.
//!
//! # Layout
//!
//! Requests flow `rpc` -> `repository` -> (`domain` rules, `store` queries):
//!
//! - `proto/hopper/delegation/v1/*.proto`, compiled by `build.rs` into [`proto`].
//! - [`server`]: assembles the services, health and reflection; owns shutdown.
//! - [`auth`]: who is calling (bearer tokens, client certificates); the rules of what each
//!   caller may do are in [`repository::access`].
//! - [`rpc`]: one file per gRPC service; parses requests, converts records. No database here.
//! - [`fanout`]: WatchEvents' fan-out: one live tail per process reading the event log, and
//!   each subscriber's stream.
//! - [`repository`]: one function per operation; each write is one transaction.
//! - [`domain`]: the vocabulary and the lifecycle state machine ([`domain::lifecycle`]); pure.
//! - [`store`]: diesel-async on PostgreSQL or SQLite; one query body for both backends.
//! - [`error`]: the one error type and its one mapping to gRPC status codes.
//! - [`telemetry`]: Prometheus metrics (`serve --metrics-listen`) and a tracing span per RPC.
//! - [`service_config`]: the gRPC service config shipped for clients (retries, waiting for a
//!   connection) and a tower layer that applies it to a tonic channel.
//! - [`ctl`]: `hopperctl`, the operator's client (`src/bin/hopperctl.rs` runs it).
//! - `src/main.rs`: the server's command line (`serve`, `migrate`).
//!
//! `docs/ARCHITECTURE.md` explains the design choices.

pub mod auth;
pub mod ctl;
pub mod domain;
pub mod error;
pub mod fanout;
pub mod repository;
pub mod rpc;
pub mod server;
pub mod service_config;
pub mod store;
pub mod telemetry;

/// Code generated from `proto/hopper/delegation/v1`.
#[expect(
    clippy::large_enum_variant,
    reason = "prost generates the oneof of WatchEventsResponse"
)]
pub mod proto {
    tonic::include_proto!("hopper.delegation.v1");

    pub mod json;

    /// The generated servers, sending `WatchEventsResponse` pre-encoded ([`crate::rpc::Encoded`]).
    pub mod server {
        include!(concat!(env!("OUT_DIR"), "/server/hopper.delegation.v1.rs"));
    }

    /// The descriptors of every Hopper proto, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("hopper_descriptor");
}
