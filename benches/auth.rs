//! What the authorization rules cost, through a real server: the same requests sent with the
//! admin token (which skips the rules and the database) and with instance tokens (one or two
//! recursive lineage queries each; reads by `global`, an ancestor of where the task went), alternating rounds, on each backend. Printed as the ratio
//! instance / admin of the total time of each kind of request; one run on a shared machine.
//!
//! Run with `cargo bench --bench auth` (PostgreSQL as for the tests).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Backend, Clients, TestDb, TestServer, hierarchy, postgres_available};
use common::{test_tokens, token_of};
use hopper_delegation::{auth::Authenticator, proto as pb, server::Config};

const ROUNDS: usize = 6;
const READS: usize = 300;
const FLOWS: usize = 40;

/// `FLOWS` tasks, each created at project, routed to orch, accepted and completed there.
async fn flows(creator: &mut Clients, worker: &mut Clients, prefix: &str) {
    for i in 0..FLOWS {
        let id = format!("{prefix}-{i}");
        let task = pb::CreateTaskRequest {
            id: id.clone(),
            title: id.clone(),
            instance_id: "project".into(),
            ..Default::default()
        };
        creator.tasks.create_task(task).await.unwrap();
        let hop = pb::CreateDelegationRequest {
            task_id: id.clone(),
            source_instance_id: "project".into(),
            target_instance_id: "orch".into(),
            delegation_type: pb::DelegationType::Route.into(),
            ..Default::default()
        };
        let d = creator.delegations.create_delegation(hop).await.unwrap();
        let d = d.into_inner().delegation.unwrap().id;
        let accept = pb::AcceptDelegationRequest { id: d.clone() };
        worker.delegations.accept_delegation(accept).await.unwrap();
        let complete = pb::CompleteDelegationRequest {
            id: d,
            ..Default::default()
        };
        worker
            .delegations
            .complete_delegation(complete)
            .await
            .unwrap();
    }
}

async fn reads(reader: &mut Clients) {
    for _ in 0..READS {
        let get = pb::GetTaskRequest {
            id: "warm-up-0".into(),
        };
        reader.tasks.get_task(get).await.unwrap();
    }
}

async fn measure(backend: Backend) {
    let config = Config {
        auth: Authenticator::new(Some(test_tokens(&["global", "project", "orch"])), false),
        ..Config::default()
    };
    let server = TestServer::start_with(TestDb::migrated(backend).await, config).await;
    hierarchy(&server.db.pool()).await;
    let mut admin = server.calling_as(&token_of("admin"));
    let mut project = server.calling_as(&token_of("project"));
    let mut orch = server.calling_as(&token_of("orch"));
    // Reads are checked for an ancestor of the task's instances: the recursive query's work.
    let mut global = server.calling_as(&token_of("global"));
    flows(&mut project, &mut orch, "warm-up").await;

    let (mut as_admin, mut as_instances) = ([Duration::ZERO; 2], [Duration::ZERO; 2]);
    for round in 0..ROUNDS {
        let started = Instant::now();
        reads(&mut admin).await;
        as_admin[0] += started.elapsed();
        let started = Instant::now();
        reads(&mut global).await;
        as_instances[0] += started.elapsed();

        let started = Instant::now();
        let mut admin_too = server.calling_as(&token_of("admin"));
        flows(&mut admin, &mut admin_too, &format!("a{round}")).await;
        as_admin[1] += started.elapsed();
        let started = Instant::now();
        flows(&mut project, &mut orch, &format!("i{round}")).await;
        as_instances[1] += started.elapsed();
    }
    let ratio = |i: usize| as_instances[i].as_secs_f64() / as_admin[i].as_secs_f64();
    println!(
        "{backend:?}: GetTask x{} instance/admin = {:.2} ({:?} vs {:?}); \
         create+delegate+accept+complete x{} instance/admin = {:.2} ({:?} vs {:?})",
        ROUNDS * READS,
        ratio(0),
        as_instances[0],
        as_admin[0],
        ROUNDS * FLOWS,
        ratio(1),
        as_instances[1],
        as_admin[1],
    );
    server.stop().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    measure(Backend::Sqlite).await;
    if postgres_available().await {
        measure(Backend::Postgres).await;
    }
}
