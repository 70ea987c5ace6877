//! WatchEvents through real tonic clients, on both backends: the story as parents see it,
//! resume, filters, retention, slow consumers, clients that leave, and shutdown.

mod common;

use std::time::Duration;

use common::{TestDb, TestServer};
use hopper_delegation::{
    proto::{self as pb, EventKind, Scope, watch_events_response::Payload},
    server::Config,
};
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(10);

async fn register(server: &mut TestServer, id: &str, scope: Scope, parent: &str) {
    server
        .instances
        .register_instance(pb::RegisterInstanceRequest {
            id: id.into(),
            name: id.into(),
            scope: scope.into(),
            parent_id: parent.into(),
            status: pb::InstanceStatus::Running.into(),
            config: None,
            request_id: String::new(),
        })
        .await
        .expect("register");
}

async fn setup(server: &mut TestServer) {
    register(server, "global", Scope::Global, "").await;
    register(server, "project", Scope::Project, "global").await;
    register(server, "orch", Scope::Orchestration, "project").await;
    task(server, "t").await;
}

async fn task(server: &mut TestServer, id: &str) {
    let request = pb::CreateTaskRequest {
        id: id.into(),
        title: id.into(),
        instance_id: "global".into(),
        ..Default::default()
    };
    server.tasks.create_task(request).await.expect("task");
}

async fn create(server: &mut TestServer, task: &str, source: &str, target: &str) -> String {
    let request = pb::CreateDelegationRequest {
        task_id: task.into(),
        source_instance_id: source.into(),
        target_instance_id: target.into(),
        delegation_type: pb::DelegationType::Route.into(),
        ..Default::default()
    };
    server
        .delegations
        .create_delegation(request)
        .await
        .expect("create")
        .into_inner()
        .id
}

async fn accept(server: &mut TestServer, id: &str) {
    let request = pb::AcceptDelegationRequest { id: id.into() };
    server
        .delegations
        .accept_delegation(request)
        .await
        .expect("accept");
}

async fn complete(server: &mut TestServer, id: &str) {
    let request = pb::CompleteDelegationRequest {
        id: id.into(),
        result: None,
        notes: None,
    };
    server
        .delegations
        .complete_delegation(request)
        .await
        .expect("complete");
}

async fn watch(
    server: &mut TestServer,
    instance: &str,
    include_descendants: bool,
    after_sequence: Option<u64>,
    kinds: &[EventKind],
) -> Result<Streaming<pb::WatchEventsResponse>, tonic::Status> {
    let request = pb::WatchEventsRequest {
        instance_id: instance.into(),
        include_descendants,
        after_sequence,
        kinds: kinds.iter().map(|k| *k as i32).collect(),
    };
    Ok(server.delegations.watch_events(request).await?.into_inner())
}

/// The next message, within [`WAIT`].
async fn next(stream: &mut Streaming<pb::WatchEventsResponse>) -> Payload {
    let message = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a message in time")
        .expect("no error")
        .expect("the stream is open");
    message.payload.expect("a payload")
}

/// The next event, within [`WAIT`], skipping progress marks.
async fn next_event(stream: &mut Streaming<pb::WatchEventsResponse>) -> pb::DelegationEvent {
    let skip_progress = async {
        loop {
            if let Payload::Event(event) = next(stream).await {
                return event;
            }
        }
    };
    tokio::time::timeout(WAIT, skip_progress)
        .await
        .expect("an event in time")
}

/// The next progress mark, skipping nothing: it must come before any event.
async fn next_progress(stream: &mut Streaming<pb::WatchEventsResponse>) -> u64 {
    match next(stream).await {
        Payload::Progress(progress) => progress.sequence,
        Payload::Event(event) => panic!("expected progress, got {event:?}"),
    }
}

/// (kind, delegation target, caused_by) of the next `n` events, checking sequences increase.
async fn story_of(
    stream: &mut Streaming<pb::WatchEventsResponse>,
    n: usize,
) -> Vec<(EventKind, String, String)> {
    let mut last = 0;
    let mut seen = Vec::new();
    for _ in 0..n {
        let event = next_event(stream).await;
        assert!(
            event.sequence > last,
            "sequence {} after {last}",
            event.sequence
        );
        last = event.sequence;
        let kind = event.kind();
        let delegation = event.delegation.expect("delegation");
        assert_eq!(event.task_id, delegation.task_id);
        seen.push((
            kind,
            delegation.target_instance_id,
            event.caused_by_delegation_id,
        ));
    }
    seen
}

on_both_backends! {
    async fn parents_see_the_story_in_order_with_its_causes(backend: Backend) {
        let mut server = TestServer::start(backend).await;
        setup(&mut server).await;
        let mut global = watch(&mut server, "global", true, None, &[]).await.unwrap();
        let mut global_only = watch(&mut server, "global", false, None, &[]).await.unwrap();
        let mut project = watch(&mut server, "project", false, None, &[]).await.unwrap();
        for stream in [&mut global, &mut global_only, &mut project] {
            next_progress(stream).await;
        }

        let d1 = create(&mut server, "t", "global", "project").await;
        accept(&mut server, &d1).await;
        let d2 = create(&mut server, "t", "project", "orch").await;
        accept(&mut server, &d2).await;
        complete(&mut server, &d2).await;

        use EventKind::*;
        let hop = |kind, target: &str, cause: &str| (kind, target.to_owned(), cause.to_owned());
        let first_hop = [hop(DelegationCreated, "project", ""), hop(DelegationAccepted, "project", "")];
        let second_hop = [
            hop(DelegationCreated, "orch", ""),
            hop(DelegationAccepted, "orch", ""),
            hop(DelegationCompleted, "orch", ""),
        ];
        let bubbled = hop(DelegationCompleted, "project", &d2);
        let task_done = hop(TaskCompleted, "project", &d1);

        let mut expected: Vec<_> = first_hop.to_vec();
        expected.extend(second_hop.clone());
        expected.push(bubbled.clone());
        expected.push(task_done.clone());
        assert_eq!(story_of(&mut global, 7).await, expected);

        // Without descendants, Global sees the hop it sent and the task it started.
        let mut expected: Vec<_> = first_hop.to_vec();
        expected.extend([bubbled.clone(), task_done]);
        assert_eq!(story_of(&mut global_only, 4).await, expected);

        // Project is target of the first hop and source of the second; the task is Global's.
        let mut expected: Vec<_> = first_hop.to_vec();
        expected.extend(second_hop);
        expected.push(bubbled);
        assert_eq!(story_of(&mut project, 6).await, expected);
        // Nothing else arrives: the next message is an idle progress mark.
        next_progress(&mut project).await;
        server.stop().await;
    }

    async fn a_subscriber_that_reconnects_gets_exactly_what_it_missed_then_live(backend: Backend) {
        let mut server = TestServer::start(backend).await;
        setup(&mut server).await;
        let mut stream = watch(&mut server, "global", true, None, &[]).await.unwrap();
        next_progress(&mut stream).await;
        let d1 = create(&mut server, "t", "global", "project").await;
        accept(&mut server, &d1).await;
        next_event(&mut stream).await;
        let last_seen = next_event(&mut stream).await.sequence;
        drop(stream);

        let d2 = create(&mut server, "t", "project", "orch").await;
        accept(&mut server, &d2).await;
        complete(&mut server, &d2).await;

        let mut resumed = watch(&mut server, "global", true, Some(last_seen), &[]).await.unwrap();
        let missed: Vec<_> = story_of(&mut resumed, 5).await.into_iter().map(|(kind, ..)| kind).collect();
        use EventKind::*;
        assert_eq!(missed, [DelegationCreated, DelegationAccepted, DelegationCompleted, DelegationCompleted, TaskCompleted]);
        let head = next_progress(&mut resumed).await;
        assert_eq!(head, last_seen + 5);

        task(&mut server, "t2").await;
        create(&mut server, "t2", "global", "project").await;
        let live = next_event(&mut resumed).await;
        assert_eq!((live.kind(), live.sequence, live.task_id.as_str()), (DelegationCreated, head + 1, "t2"));
        server.stop().await;
    }

    async fn a_subtree_stream_covers_instances_registered_later(backend: Backend) {
        let mut server = TestServer::start(backend).await;
        setup(&mut server).await;
        let mut stream = watch(&mut server, "project", true, None, &[]).await.unwrap();
        next_progress(&mut stream).await;
        register(&mut server, "late", Scope::Orchestration, "orch").await;
        let d1 = create(&mut server, "t", "global", "project").await;
        accept(&mut server, &d1).await;
        create(&mut server, "t", "project", "late").await;
        let targets: Vec<_> = story_of(&mut stream, 3).await.into_iter().map(|(_, target, _)| target).collect();
        assert_eq!(targets, ["project", "project", "late"]);
        server.stop().await;
    }

    async fn a_filtered_subscriber_still_advances_its_cursor(backend: Backend) {
        let mut server = TestServer::start(backend).await;
        setup(&mut server).await;
        let d1 = create(&mut server, "t", "global", "project").await;
        accept(&mut server, &d1).await;
        complete(&mut server, &d1).await;
        task(&mut server, "t2").await;
        create(&mut server, "t2", "global", "project").await;

        let mut stream = watch(&mut server, "global", true, Some(0), &[EventKind::TaskCompleted]).await.unwrap();
        let done = next_event(&mut stream).await;
        assert_eq!((done.kind(), done.sequence, done.caused_by_delegation_id.as_str()), (EventKind::TaskCompleted, 4, d1.as_str()));
        // Replay is over: progress to the head (5), past the unmatched creation of t2's hop.
        assert_eq!(next_progress(&mut stream).await, 5);
        // Idle: more progress, still at the head.
        assert_eq!(next_progress(&mut stream).await, 5);
        server.stop().await;
    }

    async fn bad_watch_requests_are_refused_clearly(backend: Backend) {
        let mut server = TestServer::start(backend).await;
        setup(&mut server).await;
        let unknown = watch(&mut server, "ghost", false, None, &[]).await.unwrap_err();
        assert_eq!((unknown.code(), unknown.message()), (Code::NotFound, "instance ghost not found"));
        let empty = watch(&mut server, "", false, None, &[]).await.unwrap_err();
        assert_eq!(empty.code(), Code::InvalidArgument);
        let kind = watch(&mut server, "global", false, None, &[EventKind::Unspecified]).await.unwrap_err();
        assert!(kind.message().starts_with("kinds: "), "{kind:?}");
        let ahead = watch(&mut server, "global", false, Some(99), &[]).await.unwrap_err();
        assert_eq!(ahead.code(), Code::OutOfRange);
        assert!(ahead.message().contains("ahead of the event log's head 0"), "{ahead:?}");
        let huge = watch(&mut server, "global", false, Some(u64::MAX), &[]).await.unwrap_err();
        assert_eq!(huge.code(), Code::InvalidArgument);
        server.stop().await;
    }

    async fn a_cursor_older_than_retention_is_out_of_range(backend: Backend) {
        let config = Config {
            progress_interval: Duration::from_millis(200),
            event_retention: Duration::ZERO,
            prune_interval: Duration::from_millis(50),
            ..Config::default()
        };
        let mut server = TestServer::start_with(TestDb::migrated(backend).await, config).await;
        setup(&mut server).await;
        let d1 = create(&mut server, "t", "global", "project").await;
        accept(&mut server, &d1).await;
        // The pruner runs every 50 ms; wait until it has taken both events.
        let status = tokio::time::timeout(WAIT, async {
            loop {
                match watch(&mut server, "global", true, Some(0), &[]).await {
                    Err(status) if status.message().contains("the oldest available is 3") => break status,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .expect("retention prunes the log");
        assert_eq!(status.code(), Code::OutOfRange);
        assert!(status.message().contains("resume after sequence 2"), "{status:?}");
        // Resuming from the watermark is accepted.
        let mut stream = watch(&mut server, "global", true, Some(2), &[]).await.unwrap();
        assert_eq!(next_progress(&mut stream).await, 2);
        server.stop().await;
    }

    async fn a_slow_consumer_loses_nothing(backend: Backend) {
        let mut server = TestServer::start(backend).await;
        setup(&mut server).await;
        let mut stream = watch(&mut server, "global", true, None, &[]).await.unwrap();
        next_progress(&mut stream).await;
        // The subscriber reads nothing while 2,000 events are written.
        let db = server.db.pool();
        for round in 0..1000 {
            let hop = common::hop("t", "global", "project", hopper_delegation::domain::DelegationType::Route);
            let d = hopper_delegation::repository::delegations::create(&db, hop).await.unwrap();
            hopper_delegation::repository::delegations::reject(&db, &d.id, &format!("round {round}")).await.unwrap();
        }
        let mut previous = 0;
        for i in 0..2000 {
            let event = next_event(&mut stream).await;
            assert_eq!(event.sequence, previous + 1, "event {i}");
            previous = event.sequence;
        }
        server.stop().await;
    }

    async fn streams_of_clients_that_leave_are_freed(backend: Backend) {
        let mut server = TestServer::start(backend).await;
        setup(&mut server).await;
        for _ in 0..1000 {
            let mut stream = watch(&mut server, "global", true, None, &[]).await.unwrap();
            next_progress(&mut stream).await;
        }
        let freed = tokio::time::timeout(WAIT, async {
            while server.hub.active_streams() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(freed.is_ok(), "{} streams still open", server.hub.active_streams());
        server.stop().await;
    }

    async fn shutdown_ends_streams_with_a_status_to_resume_elsewhere(backend: Backend) {
        let mut server = TestServer::start(backend).await;
        setup(&mut server).await;
        let mut stream = watch(&mut server, "global", true, None, &[]).await.unwrap();
        next_progress(&mut stream).await;
        let started = std::time::Instant::now();
        let stopping = tokio::spawn(server.stop());
        let status = tokio::time::timeout(WAIT, stream.message()).await.expect("in time").unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("resume from your last sequence"), "{status:?}");
        tokio::time::timeout(WAIT, stopping).await.expect("the server stops").unwrap();
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }
}
