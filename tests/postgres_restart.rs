//! A private PostgreSQL cluster (initdb/pg_ctl on a free port, as the `postgres` user, so the
//! shared server is untouched) is stopped and started while the service runs and a subscriber
//! streams: RPCs during the outage fail with UNAVAILABLE promptly, the service recovers without
//! a restart, the health service says NOT_SERVING during the outage and SERVING after it, and
//! the subscriber resumes from its cursor with nothing lost or repeated.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use hopper_delegation::{
    fanout::Hub,
    proto::{self as pb, watch_events_response::Payload},
    server::{self, Config},
    store::{self, Db, Migrate, event_log},
};
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

type DelegationClient = pb::delegation_service_client::DelegationServiceClient<Channel>;

type HealthClient = tonic_health::pb::health_client::HealthClient<Channel>;

/// What the health service says of TaskService.
async fn serving_status(health: &HealthClient) -> ServingStatus {
    let request = tonic_health::pb::HealthCheckRequest {
        service: "hopper.delegation.v1.TaskService".into(),
    };
    let response = health.clone().check(request).await.unwrap().into_inner();
    ServingStatus::try_from(response.status).unwrap()
}

/// Waits (at most 20 s) for the health service to say `wanted`.
async fn health_becomes(health: &HealthClient, wanted: ServingStatus) {
    let reached = tokio::time::timeout(Duration::from_secs(20), async {
        while serving_status(health).await != wanted {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    reached
        .await
        .unwrap_or_else(|_| panic!("health never became {wanted:?}"));
}

/// Two hops of `t` before the outage (created and accepted: 4 events); after it, two hops of
/// `t2` (4) and the completion of the second, bubbled to the first and to the task (3).
const EVENTS: usize = 11;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_service_rides_out_a_postgres_restart() {
    let Some(cluster) = Cluster::create() else {
        return;
    };
    let url: store::DatabaseUrl = cluster.url().parse().unwrap();
    store::migrate(&url, Migrate::Latest).await.unwrap();
    let db = Db::open(&url, 8).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config {
        progress_interval: Duration::from_millis(200),
        ..Config::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server::run(
        listener,
        Hub::new(db.clone(), config.progress_interval),
        config,
        async {
            let _ = stopped.await;
        },
    ));
    common::hierarchy(&db).await;
    common::task(&db, "t", "global").await;
    let endpoint = format!("http://{addr}");
    let mut tasks = pb::task_service_client::TaskServiceClient::connect(endpoint.clone())
        .await
        .unwrap();
    let mut delegations = pb::delegation_service_client::DelegationServiceClient::connect(endpoint)
        .await
        .unwrap();

    // A subscriber that reads everything and, when its stream ends, resumes from its cursor.
    let subscriber = {
        let mut client = delegations.clone();
        tokio::spawn(async move {
            let mut delivered: Vec<u64> = Vec::new();
            let mut resumes = 0;
            loop {
                let request = pb::WatchEventsRequest {
                    instance_id: "global".into(),
                    include_descendants: true,
                    after_sequence: Some(delivered.last().copied().unwrap_or(0)),
                    kinds: vec![],
                };
                let Ok(stream) = client.watch_events(request).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let mut stream = stream.into_inner();
                while let Ok(Some(message)) = stream.message().await {
                    if let Some(Payload::Event(event)) = message.payload {
                        delivered.push(event.sequence);
                        if delivered.len() == EVENTS {
                            return (delivered, resumes);
                        }
                    }
                }
                resumes += 1;
            }
        })
    };

    let route = |task: &str, source: &str, target: &str| pb::CreateDelegationRequest {
        task_id: task.into(),
        source_instance_id: source.into(),
        target_instance_id: target.into(),
        delegation_type: pb::DelegationType::Route.into(),
        ..Default::default()
    };
    // Routes a task global -> project -> orch, each hop accepted.
    let two_hops = async |delegations: &mut DelegationClient, task: &str| {
        for (source, target) in [("global", "project"), ("project", "orch")] {
            let d = delegations
                .create_delegation(route(task, source, target))
                .await
                .unwrap();
            let accept = pb::AcceptDelegationRequest {
                id: d.into_inner().delegation.unwrap().id,
            };
            delegations.accept_delegation(accept).await.unwrap();
        }
    };
    two_hops(&mut delegations, "t").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let health_channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(health_channel);
    assert_eq!(serving_status(&health).await, ServingStatus::Serving);

    cluster.stop();
    let started = Instant::now();
    let outage = tasks
        .get_task(pb::GetTaskRequest { id: "t".into() })
        .await
        .unwrap_err();
    assert_eq!(outage.code(), Code::Unavailable, "{outage:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let write = delegations
        .create_delegation(route("t", "orch", "orch2"))
        .await
        .unwrap_err();
    assert_eq!(write.code(), Code::Unavailable, "{write:?}");
    // Probes see the outage: health says NOT_SERVING.
    health_becomes(&health, ServingStatus::NotServing).await;

    cluster.start();
    // The service recovers by itself.
    let recovered = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match tasks.get_task(pb::GetTaskRequest { id: "t".into() }).await {
                Ok(answer) => break answer.into_inner().task.unwrap(),
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    })
    .await
    .expect("the service recovers without a restart");
    assert_eq!(recovered.instance_id, "orch");
    health_becomes(&health, ServingStatus::Serving).await;

    // More events after the outage: the subscriber must get them all, once, in order.
    common::task(&db, "t2", "global").await;
    two_hops(&mut delegations, "t2").await;
    let mut completing = delegations.clone();
    let chain = completing
        .get_delegation_chain(pb::GetDelegationChainRequest {
            task_id: "t2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let last = chain.delegations.last().unwrap().id.clone();
    completing
        .complete_delegation(pb::CompleteDelegationRequest {
            id: last,
            result: None,
            notes: None,
        })
        .await
        .unwrap();

    let (delivered, resumes) = tokio::time::timeout(Duration::from_secs(30), subscriber)
        .await
        .expect("all events delivered")
        .unwrap();
    let scope = event_log::Watched {
        instance_id: "global".into(),
        include_descendants: true,
    };
    db.sequence_events().await.unwrap();
    let logged: Vec<u64> =
        event_log::read(&mut db.conn().await.unwrap(), Some(&scope), 0, i64::MAX)
            .await
            .unwrap()
            .iter()
            .map(|e| u64::try_from(e.sequence).unwrap())
            .collect();
    assert_eq!(delivered, logged);
    eprintln!(
        "PostgreSQL restarted; the subscriber resumed {resumes} times \
         and got all {} events once, in order",
        delivered.len()
    );
    stop.send(()).unwrap();
    served.await.unwrap().unwrap();
}
