//! The Hopper delegation service: a gRPC server that records how tasks travel between Hopper
//! instances (Global -> Project -> Orchestration, …) and bubbles completions back up the chain.
//!
//! # Layout
//!
//! Requests flow `rpc` -> `repository` -> (`domain` rules, `store` queries); events flow
//! `repository` (appended in the change's transaction) -> `store::event_log` -> `fanout` (one
//! live tail per process) -> each subscriber's WatchEvents stream.
//!
//! - `proto/hopper/delegation/v1/*.proto`, compiled by `build.rs` into [`proto`]; beside it
//!   [`proto::json`] (Struct <-> JSON) and `service_config.json`, the retries clients use.
//! - [`server`]: assembles the services, health, reflection and the `/metrics` scrape; owns
//!   shutdown.
//! - [`auth`]: who is calling (bearer tokens, client certificates); the rules of what each
//!   caller may do are in [`repository::access`].
//! - [`rpc`]: one file per gRPC service; parses requests, converts records. No database here.
//! - [`fanout`]: WatchEvents' fan-out: one live tail per process reading the event log, and
//!   each subscriber's stream (one that falls behind is detached and catches up from the log
//!   by itself).
//! - [`repository`]: one function per operation, taking the caller; each authorizes itself
//!   first ([`repository::access`], on its own connection or transaction) and each write is
//!   one transaction ([`store::Db::write`]) or a single statement. [`repository::expiry`]
//!   expires hops whose deadline passed or whose target's lease lapsed, exactly once, and runs
//!   each replica's sweeper.
//! - [`domain`]: the vocabulary and the lifecycle state machine ([`domain::lifecycle`]: which
//!   transitions exist, e.g. that a completed hop cannot be cancelled); pure.
//! - [`store`]: the queries and the connections, one job per file (`url`, `pool`, `tx` where
//!   a transaction starts and ends, `sql`, a file per table, `event_log` and `sequencer`,
//!   which numbers PostgreSQL's events in commit order, `listen`, `migrate`, `pg_connect`).
//! - [`error`]: the one error type and its one mapping to gRPC status codes (database faults
//!   by SQLSTATE).
//! - [`telemetry`]: Prometheus metrics and a tracing span per RPC; a leaf.
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
    pub(crate) const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("hopper_descriptor");
}
