//! Idempotent creation with `request_id`, on both backends: retries get the original result
//! (also from a fresh pool, as after a restart), a reused id with another body is refused,
//! concurrent duplicates create one record, and a client that retries after its own timeout
//! ends up with exactly one record.

mod common;

use std::time::Duration;

use common::{Backend, TestServer, hierarchy, hop, race, task};
use hopper_delegation::{
    auth::Caller,
    domain::{DelegationType, InstanceStatus, Scope},
    error::Error,
    proto as pb,
    repository::{
        PageRequest,
        delegations::{self, Listing},
        instances::{self, NewInstance},
        tasks::{self, NewTask},
    },
};

fn new_instance(request_id: &str, name: &str) -> NewInstance {
    NewInstance {
        request_id: Some(request_id.into()),
        id: None,
        name: name.into(),
        scope: Scope::Project,
        parent_id: Some("global".into()),
        status: InstanceStatus::Running,
        config: serde_json::json!({}),
        lease: None,
    }
}

async fn a_retried_create_returns_the_original_result(backend: Backend) {
    let server = TestServer::start(backend).await;
    let db = server.db.pool();
    hierarchy(&db).await;
    let first = instances::register(&db, &Caller::Admin, new_instance("req-1", "P9"))
        .await
        .unwrap();
    let again = instances::register(&db, &Caller::Admin, new_instance("req-1", "P9"))
        .await
        .unwrap();
    assert_eq!(
        again, first,
        "the generated id and timestamps come back unchanged"
    );

    let new_task = NewTask {
        request_id: Some("req-2".into()),
        id: None,
        title: "t".into(),
        description: String::new(),
        instance_id: Some("global".into()),
        parent_task_id: None,
    };
    let t = tasks::create(&db, &Caller::Admin, new_task.clone())
        .await
        .unwrap();
    let d = delegations::create(
        &db,
        &Caller::Admin,
        common::NewDelegationExt::with_request_id(
            hop(&t.id, "global", "project", DelegationType::Route),
            "req-3",
        ),
    )
    .await
    .unwrap();
    delegations::accept(&db, &Caller::Admin, &d.id)
        .await
        .unwrap();

    // A fresh pool, as after a restart: still the originals, as they were created.
    let restarted = server.db.pool();
    assert_eq!(
        tasks::create(&restarted, &Caller::Admin, new_task)
            .await
            .unwrap(),
        t
    );
    let replayed = delegations::create(
        &restarted,
        &Caller::Admin,
        common::NewDelegationExt::with_request_id(
            hop(&t.id, "global", "project", DelegationType::Route),
            "req-3",
        ),
    )
    .await
    .unwrap();
    assert_eq!(replayed, d);
    let all = delegations::list(
        &db,
        &Caller::Admin,
        Listing::OfTask(&t.id),
        &PageRequest {
            size: 50,
            token: String::new(),
        },
    )
    .await
    .unwrap();
    assert_eq!(all.items.len(), 1);
    server.stop().await;
}

async fn a_request_id_reused_for_another_request_is_refused(backend: Backend) {
    let server = TestServer::start(backend).await;
    let db = server.db.pool();
    hierarchy(&db).await;
    instances::register(&db, &Caller::Admin, new_instance("req-1", "P9"))
        .await
        .unwrap();
    let before = common::snapshot(&db).await;
    let other = instances::register(&db, &Caller::Admin, new_instance("req-1", "P10"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            other,
            Error::AlreadyExists {
                entity: "request",
                ..
            }
        ),
        "{other:?}"
    );
    assert!(
        other
            .to_string()
            .contains("used for a different RegisterInstance request"),
        "{other}"
    );
    task(&db, "t", "global").await;
    let across = delegations::create(
        &db,
        &Caller::Admin,
        common::NewDelegationExt::with_request_id(
            hop("t", "global", "project", DelegationType::Route),
            "req-1",
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(across, Error::AlreadyExists { .. }), "{across:?}");
    let after = common::snapshot(&db).await;
    assert_eq!(
        after
            .iter()
            .filter(|l| l.starts_with("instances "))
            .collect::<Vec<_>>(),
        before
            .iter()
            .filter(|l| l.starts_with("instances "))
            .collect::<Vec<_>>()
    );
    server.stop().await;
}

async fn concurrent_duplicates_create_one_record(backend: Backend) {
    let server = TestServer::start(backend).await;
    let db = server.db.pool();
    hierarchy(&db).await;
    let outcomes = race(8, |_| {
        let db = db.clone();
        let new = new_instance("req-race", "P9");
        async move { instances::register(&db, &Caller::Admin, new).await }
    })
    .await;
    let ids: std::collections::HashSet<_> = outcomes
        .iter()
        .map(|o| o.as_ref().unwrap().id.clone())
        .collect();
    assert_eq!(ids.len(), 1, "{outcomes:?}");
    let listed = instances::list(
        &db,
        &Caller::Admin,
        &Default::default(),
        &PageRequest {
            size: 50,
            token: String::new(),
        },
    )
    .await
    .unwrap();
    assert_eq!(listed.items.iter().filter(|i| i.name == "P9").count(), 1);
    server.stop().await;
}

async fn a_client_retrying_after_its_timeout_gets_one_record(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let db = server.db.pool();
    hierarchy(&db).await;
    task(&db, "t", "global").await;
    let request = pb::CreateDelegationRequest {
        task_id: "t".into(),
        source_instance_id: "global".into(),
        target_instance_id: "project".into(),
        delegation_type: pb::DelegationType::Route.into(),
        request_id: "retry-me".into(),
        ..Default::default()
    };
    // Attempts that give up sooner and sooner later, as a client with a short timeout
    // retrying would: some never reach the server, some are cut off while it works, some
    // are written and only the answer is lost. Then one without a timeout.
    let mut answers = Vec::new();
    for micros in [1, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000] {
        let mut hurried = tonic::Request::new(request.clone());
        hurried.set_timeout(Duration::from_micros(micros));
        match server.delegations.create_delegation(hurried).await {
            Ok(answer) => answers.push(answer.into_inner().delegation.unwrap()),
            Err(status) => assert!(
                matches!(
                    status.code(),
                    tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                ),
                "{status:?}"
            ),
        }
    }
    let retried = server
        .delegations
        .create_delegation(request)
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap();
    assert!(answers.iter().all(|a| *a == retried), "{answers:?}");
    let all = delegations::list(
        &db,
        &Caller::Admin,
        Listing::OfTask("t"),
        &PageRequest {
            size: 50,
            token: String::new(),
        },
    )
    .await
    .unwrap();
    assert_eq!(all.items.len(), 1);
    assert_eq!(all.items[0].id, retried.id);
    server.stop().await;
}

on_both_backends!(
    a_retried_create_returns_the_original_result,
    a_request_id_reused_for_another_request_is_refused,
    concurrent_duplicates_create_one_record,
    a_client_retrying_after_its_timeout_gets_one_record
);

/// CreateTask (of a subtask) and CreateDelegation take the family lock and then the
/// request id, in that order: one id sent to both at once cannot deadlock them.
async fn one_request_id_raced_across_two_rpcs_has_one_winner(backend: Backend) {
    let server = TestServer::start(backend).await;
    let db = server.db.pool();
    hierarchy(&db).await;
    for round in 0..20 {
        let root = format!("root-{round}");
        task(&db, &root, "global").await;
        let request_id = format!("shared-{round}");
        let outcomes = race(2, |i| {
            let (db, root, request_id) = (db.clone(), root.clone(), request_id.clone());
            async move {
                if i == 0 {
                    let new = NewTask {
                        request_id: Some(request_id),
                        id: None,
                        title: "sub".into(),
                        description: String::new(),
                        instance_id: None,
                        parent_task_id: Some(root),
                    };
                    tasks::create(&db, &Caller::Admin, new).await.map(drop)
                } else {
                    let new = hop(&root, "global", "project", DelegationType::Route);
                    let new = common::NewDelegationExt::with_request_id(new, &request_id);
                    delegations::create(&db, &Caller::Admin, new)
                        .await
                        .map(drop)
                }
            }
        })
        .await;
        let won = outcomes.iter().filter(|o| o.is_ok()).count();
        let refused = outcomes
            .iter()
            .filter(|o| matches!(o, Err(Error::AlreadyExists { .. })))
            .count();
        assert_eq!((won, refused), (1, 1), "round {round}: {outcomes:?}");
    }
}

on_both_backends!(one_request_id_raced_across_two_rpcs_has_one_winner);
