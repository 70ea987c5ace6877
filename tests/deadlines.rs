//! Deadlines on a hop and instance leases, on both backends through a real server and client:
//! an unaccepted hop expires and its source hears why on its stream, then sends the task
//! elsewhere; an accepted hop past its complete deadline expires and takes everything below it
//! along; late workers are refused and change nothing; a child's deadline never outlives its
//! parent's; hostile durations are refused naming the field; two sweepers on one database
//! expire each hop once; a completion racing its own deadline has one outcome; a lapsed lease
//! expires only the hops where the task is at the instance; renewals keep an instance
//! responsive; the restart brake gives leases a period after the service was down.

mod common;

use std::time::Duration;

use common::{Backend, TestDb, TestServer, rpc, snapshot, text_rows};
use hopper_delegation::{
    proto::{
        self as pb, DelegationStatus, EventKind, ExpiryReason, Scope,
        watch_events_response::Payload,
    },
    server::Config,
};
use tonic::{Code, Streaming};

/// How long a test waits for what must happen (deadlines here are a fraction of it).
const WAIT: Duration = Duration::from_secs(20);

fn within(millis: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: i64::try_from(millis / 1000).unwrap(),
        nanos: i32::try_from(millis % 1000 * 1_000_000).unwrap(),
    })
}

/// Global -> project -> orch, and project2 beside project.
async fn tree(server: &mut TestServer) {
    server.hierarchy().await;
}

async fn watch(server: &mut TestServer, instance: &str) -> Streaming<pb::WatchEventsResponse> {
    let request = rpc::watch(instance, true);
    let stream = server.delegations.watch_events(request).await;
    stream.expect("watch").into_inner()
}

/// The next event of `stream`, skipping progress marks.
async fn next_event(stream: &mut Streaming<pb::WatchEventsResponse>) -> pb::DelegationEvent {
    let event = async {
        loop {
            let message = stream
                .message()
                .await
                .expect("stream")
                .expect("open stream");
            if let Some(Payload::Event(event)) = message.payload {
                return event;
            }
        }
    };
    tokio::time::timeout(WAIT, event)
        .await
        .expect("an event in time")
}

fn kind(event: &pb::DelegationEvent) -> EventKind {
    EventKind::try_from(event.kind).unwrap()
}

async fn get(server: &mut TestServer, id: &str) -> pb::Delegation {
    let request = pb::GetDelegationRequest { id: id.into() };
    let response = server.delegations.get_delegation(request).await;
    response.unwrap().into_inner().delegation.unwrap()
}

async fn task_at(server: &mut TestServer, id: &str) -> pb::Task {
    let request = pb::GetTaskRequest { id: id.into() };
    server
        .tasks
        .get_task(request)
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
}

/// Waits until delegation `id` is no longer active.
async fn ended(server: &mut TestServer, id: &str) -> pb::Delegation {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let hop = get(server, id).await;
        let active = [DelegationStatus::Pending, DelegationStatus::Accepted];
        if !active.iter().any(|s| *s as i32 == hop.status) {
            return hop;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn seconds(at: &Option<prost_types::Timestamp>) -> f64 {
    let at = at.as_ref().expect("a timestamp");
    at.seconds as f64 + f64::from(at.nanos) / 1e9
}

async fn an_unaccepted_hop_expires_and_its_source_hears_why(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    tree(&mut server).await;
    server.new_task("t", "global").await;
    let mut global = watch(&mut server, "global").await;
    let request = pb::CreateDelegationRequest {
        accept_within: within(300),
        ..rpc::route("t", "global", "project")
    };
    let hop = server.delegate(request).await;
    assert!(
        hop.accept_by.is_some() && hop.complete_by.is_none(),
        "{hop:?}"
    );
    assert!(seconds(&hop.accept_by) - seconds(&hop.created_at) < 5.0);

    assert_eq!(
        kind(&next_event(&mut global).await),
        EventKind::DelegationCreated
    );
    let expired = next_event(&mut global).await;
    assert_eq!(kind(&expired), EventKind::DelegationExpired);
    let d = expired.delegation.unwrap();
    assert_eq!(
        (d.id.as_str(), d.status),
        (hop.id.as_str(), DelegationStatus::Expired as i32)
    );
    assert_eq!(d.expiry_reason, ExpiryReason::AcceptDeadline as i32);
    assert!(seconds(&d.expired_at) >= seconds(&hop.accept_by));
    // Back at the source, as after a rejection: it goes elsewhere and completes there.
    assert_eq!(task_at(&mut server, "t").await.instance_id, "global");
    let again = server.delegate(rpc::route("t", "global", "project2")).await;
    server.accept(&again.id).await;
    let done = server.complete(&again.id).await;
    assert_eq!(done.task.unwrap().status, pb::TaskStatus::Done as i32);
    server.stop().await;
}

async fn an_accepted_hop_past_complete_by_takes_everything_below_along(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    tree(&mut server).await;
    server.new_task("t", "global").await;
    let request = pb::CreateDelegationRequest {
        complete_within: within(1500),
        ..rpc::route("t", "global", "project")
    };
    let top = server.delegate(request).await;
    server.accept(&top.id).await;
    // At project: a subtask sent down to orch, and taken on there.
    let subtask = pb::CreateTaskRequest {
        id: "t.1".into(),
        title: "t.1".into(),
        parent_task_id: "t".into(),
        ..Default::default()
    };
    server.tasks.create_task(subtask).await.unwrap();
    let split = rpc::hop("t.1", "project", "orch", pb::DelegationType::Decompose);
    let below = server.delegate(split).await;
    assert_eq!(
        below.complete_by, top.complete_by,
        "capped by the hop above"
    );
    server.accept(&below.id).await;

    let expired = ended(&mut server, &top.id).await;
    assert_eq!(expired.status, DelegationStatus::Expired as i32);
    assert_eq!(expired.expiry_reason, ExpiryReason::CompleteDeadline as i32);
    let cancelled = get(&mut server, &below.id).await;
    assert_eq!(cancelled.status, DelegationStatus::Cancelled as i32);
    assert_eq!(
        cancelled.expiry_reason,
        ExpiryReason::CompleteDeadline as i32
    );
    assert_eq!(
        task_at(&mut server, "t.1").await.status,
        pb::TaskStatus::Cancelled as i32
    );
    assert_eq!(task_at(&mut server, "t").await.instance_id, "global");
    // The log: the expiry, then the cancellation it caused.
    let log = server.delegations.watch_events(pb::WatchEventsRequest {
        after_sequence: Some(0),
        ..rpc::watch("global", true)
    });
    let mut log = log.await.unwrap().into_inner();
    let mut story = Vec::new();
    while story.len() < 6 {
        let event = next_event(&mut log).await;
        story.push((
            kind(&event),
            event.delegation.unwrap().id,
            event.caused_by_delegation_id,
        ));
    }
    assert_eq!(
        story[4..],
        [
            (EventKind::DelegationExpired, top.id.clone(), String::new()),
            (
                EventKind::DelegationCancelled,
                below.id.clone(),
                top.id.clone()
            ),
        ]
    );
    server.stop().await;
}

async fn late_workers_are_refused_and_change_nothing(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    tree(&mut server).await;
    server.new_task("t", "global").await;
    let request = pb::CreateDelegationRequest {
        complete_within: within(800),
        ..rpc::route("t", "global", "project")
    };
    let top = server.delegate(request).await;
    server.accept(&top.id).await;
    let below = server.delegate(rpc::route("t", "project", "orch")).await;
    server.accept(&below.id).await;
    ended(&mut server, &top.id).await;

    let db = server.db.pool();
    let before = snapshot(&db).await;
    let d = &mut server.delegations;
    let refusals = [
        d.accept_delegation(pb::AcceptDelegationRequest { id: top.id.clone() })
            .await,
        d.complete_delegation(rpc::complete(&top.id))
            .await
            .map(|_| tonic::Response::new(pb::AcceptDelegationResponse::default())),
        d.complete_delegation(rpc::complete(&below.id))
            .await
            .map(|_| tonic::Response::new(pb::AcceptDelegationResponse::default())),
    ];
    let messages: Vec<String> = refusals
        .into_iter()
        .map(|refusal| {
            let status = refusal.unwrap_err();
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            status.message().to_owned()
        })
        .collect();
    let reason = "(it was not completed by its complete_by)";
    assert!(messages[0].starts_with(&format!("delegation {} expired at ", top.id)));
    assert!(messages[0].ends_with(&format!("{reason}; it can no longer accept")));
    assert!(messages[1].ends_with(&format!("{reason}; it can no longer complete")));
    assert!(
        messages[2].starts_with(&format!(
            "delegation {} is cancelled: a hop above it expired at ",
            below.id
        )),
        "{}",
        messages[2]
    );
    let reject = pb::RejectDelegationRequest {
        id: top.id.clone(),
        reason: "too late".into(),
    };
    let status = server
        .delegations
        .reject_delegation(reject)
        .await
        .unwrap_err();
    assert!(status.message().contains("expired at"), "{status:?}");
    assert_eq!(snapshot(&db).await, before);
    server.stop().await;
}

async fn a_childs_deadline_never_outlives_its_parents(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    tree(&mut server).await;
    server.new_task("t", "global").await;
    let hour = 3_600_000;
    let top = server
        .delegate(pb::CreateDelegationRequest {
            complete_within: within(hour),
            accept_within: within(hour),
            ..rpc::route("t", "global", "project")
        })
        .await;
    server.accept(&top.id).await;
    // Asking for more gets the parent's; asking for nothing too; asking for less gets less.
    for (asked, capped) in [
        (Some(2 * hour), true),
        (None, true),
        (Some(hour / 6), false),
    ] {
        let below = server
            .delegate(pb::CreateDelegationRequest {
                complete_within: asked.and_then(within),
                ..rpc::route("t", "project", "orch")
            })
            .await;
        if capped {
            assert_eq!(below.complete_by, top.complete_by);
        } else {
            assert!(seconds(&below.complete_by) < seconds(&top.complete_by) - 2000.0);
        }
        assert_eq!(below.accept_by, None, "only complete_by propagates");
        let reject = pb::RejectDelegationRequest {
            id: below.id,
            reason: "next".into(),
        };
        server.delegations.reject_delegation(reject).await.unwrap();
    }
    server.stop().await;
}

async fn hostile_durations_are_refused_naming_the_field(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    tree(&mut server).await;
    server.new_task("t", "global").await;
    let before = snapshot(&server.db.pool()).await;
    let duration = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
    let hostile = [
        duration(0, 0),
        duration(-1, 0),
        duration(0, -5),
        duration(1, 1_000_000_000),
        duration(366 * 24 * 3600, 1),
        duration(i64::MAX, 0),
    ];
    for bad in hostile {
        for field in ["accept_within", "complete_within"] {
            let mut request = rpc::route("t", "global", "project");
            match field {
                "accept_within" => request.accept_within = bad,
                _ => request.complete_within = bad,
            }
            let status = server
                .delegations
                .create_delegation(request)
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
            assert!(status.message().contains(field), "{bad:?}: {status:?}");
        }
    }
    // The longest allowed is fine.
    let longest = pb::CreateDelegationRequest {
        accept_within: duration(366 * 24 * 3600, 0),
        ..rpc::route("t", "global", "project")
    };
    let before_ok = snapshot(&server.db.pool()).await;
    assert_eq!(before_ok, before);
    server.delegate(longest).await;
    server.stop().await;
}

/// Two servers on one database, both sweeping: each of many hops due at once expires exactly
/// once, with exactly one event.
async fn two_sweepers_expire_each_hop_once(backend: Backend) {
    const HOPS: usize = 40;
    let db = TestDb::migrated(backend).await;
    let mut a = TestServer::start_with(TestDb::borrowed(&db), Config::default()).await;
    let b = TestServer::start_with(TestDb::borrowed(&db), Config::default()).await;
    tree(&mut a).await;
    for round in 0..5 {
        let mut ids = Vec::new();
        for i in 0..HOPS {
            let task = format!("r{round}-{i}");
            a.new_task(&task, "global").await;
            let request = pb::CreateDelegationRequest {
                accept_within: within(200),
                ..rpc::route(&task, "global", "project")
            };
            ids.push(a.delegate(request).await.id);
        }
        for id in &ids {
            assert_eq!(
                ended(&mut a, id).await.status,
                DelegationStatus::Expired as i32
            );
        }
    }
    db.pool().sequence_events().await.unwrap();
    let counts = text_rows(
        &mut db.pool().conn().await.unwrap(),
        "SELECT delegation_id || ' ' || COUNT(*) AS line FROM delegation_events
         WHERE kind = 'delegation_expired' GROUP BY delegation_id",
    )
    .await;
    assert_eq!(counts.len(), 5 * HOPS);
    assert!(counts.iter().all(|row| row.ends_with(" 1")), "{counts:?}");
    b.stop().await;
    a.stop().await;
}

/// A completion sent as its hop's deadline passes: either it wins (COMPLETED, no expiry) or the
/// expiry does (EXPIRED, the completion refused); the log holds one outcome.
async fn a_completion_racing_its_deadline_has_one_outcome(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    tree(&mut server).await;
    let mut outcomes = [0, 0];
    for round in 0..20 {
        let task = format!("t{round}");
        server.new_task(&task, "global").await;
        let request = pb::CreateDelegationRequest {
            complete_within: within(150),
            ..rpc::route(&task, "global", "project")
        };
        let hop = server.delegate(request).await;
        server.accept(&hop.id).await;
        tokio::time::sleep(Duration::from_millis(140 + round % 4 * 5)).await;
        let answer = server
            .delegations
            .complete_delegation(rpc::complete(&hop.id))
            .await;
        let end = ended(&mut server, &hop.id).await;
        match answer {
            Ok(_) => {
                assert_eq!(end.status, DelegationStatus::Completed as i32);
                outcomes[0] += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(end.status, DelegationStatus::Expired as i32);
                outcomes[1] += 1;
            }
        }
        server.db.pool().sequence_events().await.unwrap();
        let ends = text_rows(
            &mut server.db.pool().conn().await.unwrap(),
            &format!(
                "SELECT kind AS line FROM delegation_events WHERE delegation_id = '{}'
                 AND kind IN ('delegation_completed', 'delegation_expired')",
                hop.id
            ),
        )
        .await;
        assert_eq!(ends.len(), 1, "{ends:?}");
    }
    // Both outcomes happen in practice; which one a round gets is the race's to decide.
    eprintln!(
        "completed first: {}, expired first: {}",
        outcomes[0], outcomes[1]
    );
    server.stop().await;
}

/// Registers `id` under `parent` with a lease of `millis`.
async fn leased(server: &mut TestServer, id: &str, parent: &str, millis: u64) -> pb::Instance {
    let request = pb::RegisterInstanceRequest {
        lease: within(millis),
        ..rpc::register(id, Scope::Project, parent)
    };
    let response = server.instances.register_instance(request).await;
    response.expect("register").into_inner().instance.unwrap()
}

async fn renew(server: &mut TestServer, id: &str) -> Result<pb::RenewInstanceLeaseResponse, Code> {
    let request = pb::RenewInstanceLeaseRequest {
        instance_id: id.into(),
    };
    let response = server.instances.renew_instance_lease(request).await;
    response
        .map(tonic::Response::into_inner)
        .map_err(|s| s.code())
}

async fn status_of(server: &mut TestServer, id: &str) -> DelegationStatus {
    DelegationStatus::try_from(get(server, id).await.status).unwrap()
}

async fn a_lapsed_lease_expires_only_the_hops_where_the_task_is(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    server.register("global", Scope::Global, "").await;
    leased(&mut server, "project", "global", 1500).await;
    server
        .register("orch", Scope::Orchestration, "project")
        .await;
    for task in ["waiting", "working", "passed"] {
        server.new_task(task, "global").await;
    }
    renew(&mut server, "project").await.unwrap();
    let waiting = server
        .delegate(rpc::route("waiting", "global", "project"))
        .await;
    let working = server
        .delegate(rpc::route("working", "global", "project"))
        .await;
    server.accept(&working.id).await;
    let passed = server
        .delegate(rpc::route("passed", "global", "project"))
        .await;
    server.accept(&passed.id).await;
    let below = server
        .delegate(rpc::route("passed", "project", "orch"))
        .await;
    server.accept(&below.id).await;

    // project stops renewing: where a task is at project, its hop expires.
    for hop in [&waiting, &working] {
        let ended = ended(&mut server, &hop.id).await;
        assert_eq!(ended.status, DelegationStatus::Expired as i32);
        assert_eq!(ended.expiry_reason, ExpiryReason::TargetUnresponsive as i32);
    }
    assert_eq!(task_at(&mut server, "waiting").await.instance_id, "global");
    assert_eq!(task_at(&mut server, "working").await.instance_id, "global");
    // Work passed further down goes on, and bubbles through project's hop.
    assert_eq!(
        status_of(&mut server, &passed.id).await,
        DelegationStatus::Accepted
    );
    let done = server.complete(&below.id).await;
    assert_eq!(done.task.unwrap().status, pb::TaskStatus::Done as i32);
    assert_eq!(
        status_of(&mut server, &passed.id).await,
        DelegationStatus::Completed
    );
    // No new work for an unresponsive instance, until it renews.
    let refused = server
        .delegations
        .create_delegation(rpc::route("waiting", "global", "project"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .starts_with("target instance project is unresponsive: its lease lapsed at "),
        "{refused:?}"
    );
    renew(&mut server, "project").await.unwrap();
    server
        .delegate(rpc::route("waiting", "global", "project"))
        .await;
    // Expired hops stay expired.
    assert_eq!(
        status_of(&mut server, &waiting.id).await,
        DelegationStatus::Expired
    );
    server.stop().await;
}

async fn renewals_keep_an_instance_responsive(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    server.register("global", Scope::Global, "").await;
    leased(&mut server, "project", "global", 1000).await;
    server.new_task("t", "global").await;
    let hop = server.delegate(rpc::route("t", "global", "project")).await;
    for _ in 0..16 {
        let renewed = renew(&mut server, "project").await.unwrap();
        let instance = renewed.instance.unwrap();
        assert_eq!(renewed.live_until, instance.lease_expires_at);
        assert_eq!(instance.lease, within(1000));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            status_of(&mut server, &hop.id).await,
            DelegationStatus::Pending
        );
    }
    // Four periods later it is still waiting; then the renewals stop.
    let ended = ended(&mut server, &hop.id).await;
    assert_eq!(ended.expiry_reason, ExpiryReason::TargetUnresponsive as i32);
    // Without a lease there is nothing to renew; an unknown instance is not found.
    assert_eq!(
        renew(&mut server, "global").await.unwrap_err(),
        Code::FailedPrecondition
    );
    assert_eq!(
        renew(&mut server, "nowhere").await.unwrap_err(),
        Code::NotFound
    );
    for bad in [
        within(500),
        within(3_600_001),
        Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        }),
    ] {
        let request = pb::RegisterInstanceRequest {
            lease: bad,
            ..rpc::register("p2", Scope::Project, "global")
        };
        let status = server
            .instances
            .register_instance(request)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert!(status.message().contains("lease"), "{status:?}");
    }
    server.stop().await;
}

/// All replicas down for longer than a lease: nobody could renew, so the instance gets a full
/// period after the service is back before its hops expire; a hop deadline that passed
/// meanwhile fires at once.
async fn the_restart_brake_gives_leases_a_period(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let mut server = TestServer::start_with(TestDb::borrowed(&db), Config::default()).await;
    server.register("global", Scope::Global, "").await;
    leased(&mut server, "project", "global", 2000).await;
    server.register("project2", Scope::Project, "global").await;
    for task in ["leased", "deadline"] {
        server.new_task(task, "global").await;
    }
    let leased_hop = server
        .delegate(rpc::route("leased", "global", "project"))
        .await;
    let deadline = server
        .delegate(pb::CreateDelegationRequest {
            accept_within: within(1000),
            ..rpc::route("deadline", "global", "project2")
        })
        .await;
    server.stop().await;

    // Down for longer than the lease and the deadline.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut server = TestServer::start_with(TestDb::borrowed(&db), Config::default()).await;
    assert_eq!(
        ended(&mut server, &deadline.id).await.status,
        DelegationStatus::Expired as i32
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        status_of(&mut server, &leased_hop.id).await,
        DelegationStatus::Pending
    );
    let project = server
        .instances
        .get_instance(pb::GetInstanceRequest {
            id: "project".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap();
    assert!(seconds(&project.lease_expires_at) > seconds(&leased_hop.created_at) + 4.0);
    // Not renewed within that period, it lapses after all.
    let ended = ended(&mut server, &leased_hop.id).await;
    assert_eq!(ended.expiry_reason, ExpiryReason::TargetUnresponsive as i32);
    server.stop().await;
}

/// With authentication, the worker whose hop expired calls CompleteTask on the task that went
/// back: it is told its hop expired, not just refused, and nothing changes.
async fn a_late_complete_task_is_told_its_hop_expired(backend: Backend) {
    use common::{test_tokens, token_of};
    use hopper_delegation::auth::Authenticator;
    let config = Config {
        auth: Authenticator::new(Some(test_tokens(&["global", "project"])), false),
        ..Config::default()
    };
    let server = TestServer::start_with(TestDb::migrated(backend).await, config).await;
    let mut admin = server.calling_as(&token_of("admin"));
    for (id, scope, parent) in [
        ("global", Scope::Global, ""),
        ("project", Scope::Project, "global"),
    ] {
        admin
            .instances
            .register_instance(rpc::register(id, scope, parent))
            .await
            .unwrap();
    }
    let mut global = server.calling_as(&token_of("global"));
    global
        .tasks
        .create_task(rpc::new_task("t", "global"))
        .await
        .unwrap();
    let request = pb::CreateDelegationRequest {
        accept_within: within(300),
        ..rpc::route("t", "global", "project")
    };
    let hop = global.delegations.create_delegation(request).await.unwrap();
    let hop = hop.into_inner().delegation.unwrap();
    let get = pb::GetDelegationRequest { id: hop.id.clone() };
    let deadline = tokio::time::Instant::now() + WAIT;
    while admin
        .delegations
        .get_delegation(get.clone())
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap()
        .status
        != DelegationStatus::Expired as i32
    {
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = snapshot(&server.db.pool()).await;
    let mut worker = server.calling_as(&token_of("project"));
    let complete = pb::CompleteTaskRequest {
        task_id: "t".into(),
        ..Default::default()
    };
    let status = worker.tasks.complete_task(complete).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .starts_with(&format!("delegation {} expired at ", hop.id)),
        "{status:?}"
    );
    assert_eq!(snapshot(&server.db.pool()).await, before);
    server.stop().await;
}

/// A lease is renewed by its own instance or an admin, nobody else.
async fn only_the_instance_itself_renews_its_lease(backend: Backend) {
    use common::{test_tokens, token_of};
    use hopper_delegation::auth::Authenticator;
    let config = Config {
        auth: Authenticator::new(Some(test_tokens(&["global", "project"])), false),
        ..Config::default()
    };
    let server = TestServer::start_with(TestDb::migrated(backend).await, config).await;
    let mut admin = server.calling_as(&token_of("admin"));
    let root = rpc::register("global", Scope::Global, "");
    admin.instances.register_instance(root).await.unwrap();
    let project = pb::RegisterInstanceRequest {
        lease: within(60_000),
        ..rpc::register("project", Scope::Project, "global")
    };
    admin.instances.register_instance(project).await.unwrap();
    let renew = || pb::RenewInstanceLeaseRequest {
        instance_id: "project".into(),
    };
    let mut parent = server.calling_as(&token_of("global"));
    let refused = parent
        .instances
        .renew_instance_lease(renew())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(
        refused.message(),
        "instance global may not renew the lease of instance project; only the instance \
         itself may"
    );
    let mut itself = server.calling_as(&token_of("project"));
    itself
        .instances
        .renew_instance_lease(renew())
        .await
        .unwrap();
    admin.instances.renew_instance_lease(renew()).await.unwrap();
    server.stop().await;
}

/// `--default-accept-within` and `--default-complete-within` apply to hops whose request sets
/// no deadline; a request's own deadline wins.
async fn server_defaults_apply_when_a_request_sets_none(backend: Backend) {
    use hopper_delegation::rpc::Deadlines;
    let config = Config {
        deadlines: Deadlines {
            accept_within: Some(Duration::from_secs(60)),
            complete_within: Some(Duration::from_secs(3600)),
        },
        ..Config::default()
    };
    let mut server = TestServer::start_with(TestDb::migrated(backend).await, config).await;
    tree(&mut server).await;
    server.new_task("t", "global").await;
    let hop = server.delegate(rpc::route("t", "global", "project")).await;
    let created = seconds(&hop.created_at);
    assert!(
        (seconds(&hop.accept_by) - created - 60.0).abs() < 5.0,
        "{hop:?}"
    );
    assert!(
        (seconds(&hop.complete_by) - created - 3600.0).abs() < 5.0,
        "{hop:?}"
    );
    let reject = pb::RejectDelegationRequest {
        id: hop.id,
        reason: "again".into(),
    };
    server.delegations.reject_delegation(reject).await.unwrap();
    let own = pb::CreateDelegationRequest {
        accept_within: within(10_000),
        ..rpc::route("t", "global", "project")
    };
    let hop = server.delegate(own).await;
    assert!((seconds(&hop.accept_by) - seconds(&hop.created_at) - 10.0).abs() < 5.0);
    server.stop().await;
}

on_both_backends!(
    only_the_instance_itself_renews_its_lease,
    server_defaults_apply_when_a_request_sets_none,
    a_late_complete_task_is_told_its_hop_expired,
    a_lapsed_lease_expires_only_the_hops_where_the_task_is,
    renewals_keep_an_instance_responsive,
    the_restart_brake_gives_leases_a_period,
    an_unaccepted_hop_expires_and_its_source_hears_why,
    an_accepted_hop_past_complete_by_takes_everything_below_along,
    late_workers_are_refused_and_change_nothing,
    a_childs_deadline_never_outlives_its_parents,
    hostile_durations_are_refused_naming_the_field,
    two_sweepers_expire_each_hop_once,
    a_completion_racing_its_deadline_has_one_outcome
);
