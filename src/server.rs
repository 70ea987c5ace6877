//! Assembles the gRPC server: the three Hopper services, `grpc.health.v1.Health`, and server
//! reflection (v1 for current clients, v1alpha for grpcurl 1.8.6 and other older ones).
//!
//! [`run`] takes a bound listener and a shutdown future, so tests bind `127.0.0.1:0` and stop
//! the server without signals.

use std::{future::Future, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::{
    proto::{
        self, delegation_service_server::DelegationServiceServer,
        instance_service_server::InstanceServiceServer, task_service_server::TaskServiceServer,
    },
    rpc::{DelegationApi, InstanceApi, TaskApi},
    store::Db,
};

/// Serves until `shutdown` resolves, then stops taking requests and lets running ones finish.
pub async fn run(
    listener: TcpListener,
    db: Db,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<InstanceServiceServer<InstanceApi>>()
        .await;
    health.set_serving::<TaskServiceServer<TaskApi>>().await;
    health
        .set_serving::<DelegationServiceServer<DelegationApi>>()
        .await;

    // The builder is not Clone, so each reflection version gets its own.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.BadRequest, so grpcurl can show the field violations.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };

    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: no new requests, waiting for running ones");
        health
            .set_not_serving::<DelegationServiceServer<DelegationApi>>()
            .await;
    };

    Server::builder()
        // Notice peers that vanished without closing their connection.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(InstanceServiceServer::new(InstanceApi::new(db.clone())))
        .add_service(TaskServiceServer::new(TaskApi::new(db.clone())))
        .add_service(DelegationServiceServer::new(DelegationApi::new(db)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
