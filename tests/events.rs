//! WatchEvents through real tonic clients, on both backends: the story as parents see it,
//! resume, filters, retention, slow consumers, clients that leave, and shutdown; the live
//! tail's hand-off from the log, detached slow consumers, and replicas.

mod common;

use std::time::Duration;

use common::{Backend, TestDb, TestServer, rpc};
use futures::StreamExt;
use hopper_delegation::{
    auth::Caller,
    domain::EventKind as DomainKind,
    fanout::TailLimits,
    proto::{
        self as pb, EventKind, Scope, delegation_service_client::DelegationServiceClient,
        watch_events_response::Payload,
    },
    repository::delegations::NewDelegation,
    server::Config,
    store::{Db, event_log},
};
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(10);

async fn setup(server: &mut TestServer) {
    server.register("global", Scope::Global, "").await;
    server.register("project", Scope::Project, "global").await;
    server
        .register("orch", Scope::Orchestration, "project")
        .await;
    server.new_task("t", "global").await;
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

async fn parents_see_the_story_in_order_with_its_causes(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    setup(&mut server).await;
    let mut global = watch(&mut server, "global", true, None, &[]).await.unwrap();
    let mut global_only = watch(&mut server, "global", false, None, &[])
        .await
        .unwrap();
    let mut project = watch(&mut server, "project", false, None, &[])
        .await
        .unwrap();
    for stream in [&mut global, &mut global_only, &mut project] {
        next_progress(stream).await;
    }

    let d1 = server
        .delegate(rpc::route("t", "global", "project"))
        .await
        .id;
    server.accept(&d1).await;
    let d2 = server.delegate(rpc::route("t", "project", "orch")).await.id;
    server.accept(&d2).await;
    server.complete(&d2).await;

    use EventKind::*;
    let hop = |kind, target: &str, cause: &str| (kind, target.to_owned(), cause.to_owned());
    let first_hop = [
        hop(DelegationCreated, "project", ""),
        hop(DelegationAccepted, "project", ""),
    ];
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
    let d1 = server
        .delegate(rpc::route("t", "global", "project"))
        .await
        .id;
    server.accept(&d1).await;
    next_event(&mut stream).await;
    let last_seen = next_event(&mut stream).await.sequence;
    drop(stream);

    let d2 = server.delegate(rpc::route("t", "project", "orch")).await.id;
    server.accept(&d2).await;
    server.complete(&d2).await;

    let mut resumed = watch(&mut server, "global", true, Some(last_seen), &[])
        .await
        .unwrap();
    let missed: Vec<_> = story_of(&mut resumed, 5)
        .await
        .into_iter()
        .map(|(kind, ..)| kind)
        .collect();
    use EventKind::*;
    assert_eq!(
        missed,
        [
            DelegationCreated,
            DelegationAccepted,
            DelegationCompleted,
            DelegationCompleted,
            TaskCompleted
        ]
    );
    let head = next_progress(&mut resumed).await;
    assert_eq!(head, last_seen + 5);

    server.new_task("t2", "global").await;
    server.delegate(rpc::route("t2", "global", "project")).await;
    let live = next_event(&mut resumed).await;
    assert_eq!(
        (live.kind(), live.sequence, live.task_id.as_str()),
        (DelegationCreated, head + 1, "t2")
    );
    server.stop().await;
}

async fn a_subtree_stream_covers_instances_registered_later(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    setup(&mut server).await;
    let mut stream = watch(&mut server, "project", true, None, &[])
        .await
        .unwrap();
    next_progress(&mut stream).await;
    server.register("late", Scope::Orchestration, "orch").await;
    let d1 = server
        .delegate(rpc::route("t", "global", "project"))
        .await
        .id;
    server.accept(&d1).await;
    server.delegate(rpc::route("t", "project", "late")).await;
    let targets: Vec<_> = story_of(&mut stream, 3)
        .await
        .into_iter()
        .map(|(_, target, _)| target)
        .collect();
    assert_eq!(targets, ["project", "project", "late"]);
    server.stop().await;
}

async fn a_filtered_subscriber_still_advances_its_cursor(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    setup(&mut server).await;
    let d1 = server
        .delegate(rpc::route("t", "global", "project"))
        .await
        .id;
    server.accept(&d1).await;
    server.complete(&d1).await;
    server.new_task("t2", "global").await;
    server.delegate(rpc::route("t2", "global", "project")).await;
    // On PostgreSQL the sequencer numbers committed events a moment later; the replay
    // below is to end at the head with all five.
    log_head(&server.db.pool()).await;

    let mut stream = watch(
        &mut server,
        "global",
        true,
        Some(0),
        &[EventKind::TaskCompleted],
    )
    .await
    .unwrap();
    let done = next_event(&mut stream).await;
    assert_eq!(
        (
            done.kind(),
            done.sequence,
            done.caused_by_delegation_id.as_str()
        ),
        (EventKind::TaskCompleted, 4, d1.as_str())
    );
    // Replay is over: progress to the head (5), past the unmatched creation of t2's hop.
    assert_eq!(next_progress(&mut stream).await, 5);
    // Idle: more progress, still at the head.
    assert_eq!(next_progress(&mut stream).await, 5);
    server.stop().await;
}

async fn bad_watch_requests_are_refused_clearly(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    setup(&mut server).await;
    let unknown = watch(&mut server, "ghost", false, None, &[])
        .await
        .unwrap_err();
    assert_eq!(
        (unknown.code(), unknown.message()),
        (Code::NotFound, "instance ghost not found")
    );
    let empty = watch(&mut server, "", false, None, &[]).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    let kind = watch(
        &mut server,
        "global",
        false,
        None,
        &[EventKind::Unspecified],
    )
    .await
    .unwrap_err();
    assert!(kind.message().starts_with("kinds: "), "{kind:?}");
    let ahead = watch(&mut server, "global", false, Some(99), &[])
        .await
        .unwrap_err();
    assert_eq!(ahead.code(), Code::OutOfRange);
    assert!(
        ahead.message().contains("ahead of the event log's head 0"),
        "{ahead:?}"
    );
    let huge = watch(&mut server, "global", false, Some(u64::MAX), &[])
        .await
        .unwrap_err();
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
    let d1 = server
        .delegate(rpc::route("t", "global", "project"))
        .await
        .id;
    server.accept(&d1).await;
    // The pruner runs every 50 ms; wait until it has taken both events.
    let status = tokio::time::timeout(WAIT, async {
        loop {
            match watch(&mut server, "global", true, Some(0), &[]).await {
                Err(status) if status.message().contains("the oldest available is 3") => {
                    break status;
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("retention prunes the log");
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(
        status.message().contains("resume after sequence 2"),
        "{status:?}"
    );
    // The same, for programs: an ErrorInfo with the sequences.
    let info = tonic_types::StatusExt::get_error_details(&status)
        .error_info()
        .cloned()
        .expect("ErrorInfo");
    assert_eq!(info.reason, "CURSOR_EXPIRED");
    assert_eq!(info.metadata["resume_after_sequence"], "2");
    assert_eq!(info.metadata["oldest_available_sequence"], "3");
    // Resuming from the watermark is accepted.
    let mut stream = watch(&mut server, "global", true, Some(2), &[])
        .await
        .unwrap();
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
        let hop = common::hop(
            "t",
            "global",
            "project",
            hopper_delegation::domain::DelegationType::Route,
        );
        let d = hopper_delegation::repository::delegations::create(&db, &Caller::Admin, hop)
            .await
            .unwrap();
        hopper_delegation::repository::delegations::reject(
            &db,
            &Caller::Admin,
            &d.id,
            &format!("round {round}"),
        )
        .await
        .unwrap();
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
    assert!(
        freed.is_ok(),
        "{} streams still open",
        server.hub.active_streams()
    );
    server.stop().await;
}

async fn shutdown_ends_streams_with_a_status_to_resume_elsewhere(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    setup(&mut server).await;
    let mut stream = watch(&mut server, "global", true, None, &[]).await.unwrap();
    next_progress(&mut stream).await;
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(server.stop());
    let status = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("in time")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("resume from your last sequence"),
        "{status:?}"
    );
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the server stops")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

on_both_backends!(
    parents_see_the_story_in_order_with_its_causes,
    a_subscriber_that_reconnects_gets_exactly_what_it_missed_then_live,
    a_subtree_stream_covers_instances_registered_later,
    a_filtered_subscriber_still_advances_its_cursor,
    bad_watch_requests_are_refused_clearly,
    a_cursor_older_than_retention_is_out_of_range,
    a_slow_consumer_loses_nothing,
    streams_of_clients_that_leave_are_freed,
    shutdown_ends_streams_with_a_status_to_resume_elsewhere
);

/// Writes `rounds` hops of each kind of pair (Global → Project, Project → Orchestration), each
/// created (with `notes` bytes of notes) then rejected: four events a round.
async fn write_hops(db: Db, rounds: usize, notes: usize) {
    use hopper_delegation::{domain::DelegationType::Route, repository::delegations};
    for round in 0..rounds {
        for (task, source, target) in [("t", "global", "project"), ("p", "project", "orch")] {
            let hop = NewDelegation {
                notes: Some("n".repeat(notes)).filter(|n| !n.is_empty()),
                ..common::hop(task, source, target, Route)
            };
            let d = delegations::create(&db, &Caller::Admin, hop).await.unwrap();
            delegations::reject(&db, &Caller::Admin, &d.id, &format!("round {round}"))
                .await
                .unwrap();
        }
    }
}

/// The log's head, once every event written is numbered.
async fn log_head(db: &Db) -> i64 {
    db.sequence_events().await.unwrap();
    event_log::bounds(&mut db.conn().await.unwrap())
        .await
        .unwrap()
        .head
}

/// Waits until the live tail has read the log up to `head`.
async fn tail_reaches(server: &TestServer, head: i64) {
    let reached = tokio::time::timeout(WAIT, async {
        while server.hub.window().1 < head {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    reached.await.expect("the tail reads the log");
}

/// The sequences a stream delivers until a progress mark reaches `head`, checking the order.
async fn sequences_until(stream: &mut Streaming<pb::WatchEventsResponse>, head: i64) -> Vec<i64> {
    let mut seen: Vec<i64> = Vec::new();
    loop {
        match next(stream).await {
            Payload::Event(event) => {
                let sequence = i64::try_from(event.sequence).unwrap();
                assert!(seen.last() < Some(&sequence), "{sequence} after {seen:?}");
                seen.push(sequence);
            }
            Payload::Progress(progress) if i64::try_from(progress.sequence).unwrap() >= head => {
                return seen;
            }
            Payload::Progress(_) => {}
        }
    }
}

/// The sequences of the log's events of `scope` and `kinds` after `after`, up to `head`.
async fn logged(
    db: &Db,
    instance: &str,
    descendants: bool,
    kinds: &[EventKind],
    after: i64,
    head: i64,
) -> Vec<i64> {
    let scope = event_log::Watched {
        instance_id: instance.into(),
        include_descendants: descendants,
    };
    let wanted = |kind: DomainKind| {
        kinds.is_empty() || kinds.iter().any(|k| *k == pb::EventKind::from(kind))
    };
    event_log::read(&mut db.conn().await.unwrap(), Some(&scope), after, i64::MAX)
        .await
        .unwrap()
        .into_iter()
        .filter(|event| event.sequence <= head && wanted(event.kind))
        .map(|event| event.sequence)
        .collect()
}

/// A server whose window holds 40 events and whose subscribers may fall 8 events behind.
async fn small_window(backend: Backend) -> TestServer {
    let config = Config {
        progress_interval: Duration::from_millis(200),
        watch: TailLimits {
            window_events: 40,
            window_bytes: usize::MAX,
            buffer: 8,
        },
        ..Config::default()
    };
    let mut server = TestServer::start_with(TestDb::migrated(backend).await, config).await;
    setup(&mut server).await;
    common::task(&server.db.pool(), "p", "project").await;
    server
}

async fn streams_opened_before_inside_and_at_the_edge_of_the_window_get_exactly_the_log(
    backend: Backend,
) {
    let mut server = small_window(backend).await;
    let db = server.db.pool();
    // The first stream starts the tail; 200 events later the window has moved on.
    let mut first = watch(&mut server, "global", true, None, &[]).await.unwrap();
    let start = i64::try_from(next_progress(&mut first).await).unwrap();
    write_hops(db.clone(), 50, 0).await;
    tail_reaches(&server, log_head(&db).await).await;
    let (floor, head) = server.hub.window();
    assert!(
        floor > start && head - floor >= 40,
        "the window ({floor}, {head}] holds 40 events"
    );

    // Streams open with every kind of cursor and filter while the window stands still,
    // each getting its first message (so it has joined or is reading the log); then
    // writers move the window on while they read.
    let filters = [
        ("global", true, vec![]),
        ("project", false, vec![]),
        ("orch", true, vec![EventKind::DelegationRejected]),
    ];
    let mut streams = Vec::new();
    for after in [0, floor - 1, floor, floor + 1, (floor + head) / 2, head] {
        for (instance, descendants, kinds) in &filters {
            let mut stream = watch(
                &mut server,
                instance,
                *descendants,
                Some(u64::try_from(after).unwrap()),
                kinds,
            )
            .await
            .unwrap();
            let first_message = next(&mut stream).await;
            streams.push((
                after,
                *instance,
                *descendants,
                kinds.clone(),
                stream,
                first_message,
            ));
        }
    }
    assert_eq!(
        server.hub.window(),
        (floor, head),
        "nothing was written meanwhile"
    );
    write_hops(db.clone(), 25, 0).await;
    let head = log_head(&db).await;
    for (after, instance, descendants, kinds, mut stream, first_message) in streams {
        let expected = logged(&db, instance, descendants, &kinds, after, head).await;
        assert!(!expected.is_empty());
        let mut got = match first_message {
            Payload::Event(event) => vec![i64::try_from(event.sequence).unwrap()],
            Payload::Progress(_) => Vec::new(),
        };
        got.extend(sequences_until(&mut stream, head).await);
        assert_eq!(got, expected, "{instance} after {after}");
    }
    assert_eq!(
        sequences_until(&mut first, head).await,
        logged(&db, "global", true, &[], start, head).await
    );
    server.stop().await;
}

async fn a_slow_consumer_is_detached_then_rejoins_with_nothing_lost(backend: Backend) {
    let mut server = small_window(backend).await;
    let db = server.db.pool();
    // Its own connection, with HTTP/2's smallest windows: the server can send it only
    // 64 KiB it has not read.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let request = pb::WatchEventsRequest {
        instance_id: "global".into(),
        include_descendants: true,
        ..Default::default()
    };
    let mut slow = DelegationServiceClient::new(channel)
        .watch_events(request)
        .await
        .unwrap()
        .into_inner();
    let start = i64::try_from(next_progress(&mut slow).await).unwrap();
    let mut prompt = watch(&mut server, "orch", false, None, &[]).await.unwrap();
    next_progress(&mut prompt).await;
    assert_eq!(server.hub.live_subscribers(), 2);

    // The slow one reads nothing while 2,000 events of over 1 KiB are written: once the
    // connection and its 8 buffered events are full, it is detached. The prompt one keeps
    // up, live.
    let writing = tokio::spawn(write_hops(db.clone(), 500, 1024));
    let mut received = Vec::new();
    while !writing.is_finished() {
        if let Payload::Event(event) = next(&mut prompt).await {
            received.push(i64::try_from(event.sequence).unwrap());
        }
    }
    writing.await.unwrap();
    let head = log_head(&db).await;
    received.extend(sequences_until(&mut prompt, head).await);
    assert_eq!(received, logged(&db, "orch", false, &[], start, head).await);
    assert_eq!(
        server.hub.live_subscribers(),
        1,
        "the slow consumer is detached"
    );

    // Now it reads: everything, in order, then it is live again.
    let all = sequences_until(&mut slow, head).await;
    assert_eq!(all, (start + 1..=head).collect::<Vec<_>>());
    assert_eq!(
        server.hub.live_subscribers(),
        2,
        "the slow consumer rejoined"
    );
    write_hops(db.clone(), 1, 0).await;
    assert_eq!(
        next_event(&mut slow).await.sequence,
        u64::try_from(head).unwrap() + 1
    );
    server.stop().await;
}

async fn ten_thousand_open_and_close_cycles_leave_nothing_behind(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    setup(&mut server).await;
    let cycles = |n: usize| {
        let client = server.delegations.clone();
        async move {
            let streams = (0..n).map(|i| {
                let mut client = client.clone();
                async move {
                    let request = pb::WatchEventsRequest {
                        instance_id: ["global", "project", "orch"][i % 3].into(),
                        include_descendants: i % 2 == 0,
                        ..Default::default()
                    };
                    let mut stream = client.watch_events(request).await.unwrap().into_inner();
                    next_progress(&mut stream).await;
                }
            });
            futures::stream::iter(streams)
                .buffer_unordered(64)
                .collect::<Vec<()>>()
                .await;
        }
    };
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    cycles(1_000).await; // warm-up: pools, allocator
    let (tasks_before, memory_before) = (tasks(), resident_bytes());
    cycles(10_000).await;
    let freed = tokio::time::timeout(WAIT, async {
        while server.hub.active_streams() > 0 || tasks() > tasks_before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert!(
        freed.await.is_ok(),
        "{} streams, {} tasks (from {tasks_before})",
        server.hub.active_streams(),
        tasks()
    );
    assert_eq!(server.hub.live_subscribers(), 0);
    let grown = resident_bytes().saturating_sub(memory_before);
    // A subscriber's state is over 1 KiB: 10,000 leaked would be over 10 MiB.
    assert!(grown < 8 << 20, "resident memory grew by {grown} bytes");
    server.stop().await;
}

on_both_backends!(
    streams_opened_before_inside_and_at_the_edge_of_the_window_get_exactly_the_log,
    a_slow_consumer_is_detached_then_rejoins_with_nothing_lost,
    ten_thousand_open_and_close_cycles_leave_nothing_behind
);

/// This process's resident memory.
fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: usize = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// A subtree subscriber on replica B sees the events of an instance registered through
/// replica A after the stream opened: B's tail loads the new instance's ancestors on first
/// sight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subtree_subscriber_sees_an_instance_registered_through_another_replica() {
    if !common::postgres_available().await {
        return;
    }
    let mut replica_a = TestServer::start(Backend::Postgres).await;
    setup(&mut replica_a).await;
    let config = Config {
        progress_interval: Duration::from_millis(200),
        ..Config::default()
    };
    let mut replica_b = TestServer::start_with(TestDb::borrowed(&replica_a.db), config).await;
    let mut stream = watch(&mut replica_b, "project", true, None, &[])
        .await
        .unwrap();
    next_progress(&mut stream).await;

    // Both ends of the hop are new to B: only their ancestors, loaded on first sight, tie the
    // event to the subtree watched.
    replica_a
        .register("late", Scope::Orchestration, "orch")
        .await;
    replica_a
        .register("later", Scope::Orchestration, "late")
        .await;
    common::task(&replica_a.db.pool(), "l", "late").await;
    let mut client = replica_a.delegations.clone();
    let request = pb::CreateDelegationRequest {
        task_id: "l".into(),
        source_instance_id: "late".into(),
        target_instance_id: "later".into(),
        delegation_type: pb::DelegationType::Route.into(),
        ..Default::default()
    };
    let created = client
        .create_delegation(request)
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap();
    let event = next_event(&mut stream).await;
    assert_eq!(event.delegation.unwrap().id, created.id);
    replica_b.stop().await;
    replica_a.stop().await;
}
