//! The fault suite: two replicas of the server binary on one private PostgreSQL cluster, with
//! writers on both and 48 subscribers (live at the head, replaying from 0 over a log several
//! live windows long, filtering kinds; tonic clients and `hopperctl watch` processes), while
//! PostgreSQL restarts five times, stops for longer than `--db-timeout`, and each replica is
//! killed (SIGKILL) or stopped (SIGTERM) and started again. Afterwards every subscriber holds
//! exactly the log's matching events once, in order; nobody saw INTERNAL; the database is
//! consistent; health went NOT_SERVING during the outage and SERVING after it.
//!
//! Also each fault on its own: a deadlock and a terminated session on a real PostgreSQL told
//! apart by SQLSTATE; SQLite on a full disk and under another program's lock; and a client
//! carrying the shipped service config riding through a replica restart.

mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Backend, TestDb, cluster::Cluster, rpc, text_rows};
use hopper_delegation::{
    error::Error,
    proto::{self as pb, watch_events_response::Payload},
    service_config::{RetryLayer, ServiceConfig},
    store::{self, Conn, DatabaseUrl, Db, Migrate},
};
use tokio::{sync::watch, task::JoinHandle};
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

type Tasks = pb::task_service_client::TaskServiceClient<Channel>;
type Delegations = pb::delegation_service_client::DelegationServiceClient<Channel>;
type Shared<T> = Arc<Mutex<T>>;

/// Every replica: a one-second database timeout (the outage below is longer), a live window
/// of 128 events (the log grows to many times that), progress marks every 200 ms.
const REPLICA_ARGS: &[&str] = &[
    "--db-timeout",
    "1s",
    "--progress-interval",
    "200ms",
    "--watch-window-events",
    "128",
    "--max-connections",
    "8",
    "--drain-timeout",
    "2s",
];

/// The server binary on the cluster; every line it logs is kept, across restarts.
struct Replica {
    child: Child,
    addr: String,
    database_url: String,
    /// Arguments beyond [`REPLICA_ARGS`].
    extra: Vec<String>,
    log: Shared<Vec<String>>,
}

impl Replica {
    fn start(database_url: &str) -> Self {
        Self::start_with(database_url, &[])
    }

    fn start_with(database_url: &str, extra: &[&str]) -> Self {
        let log = Arc::default();
        let extra: Vec<String> = extra.iter().map(|&arg| arg.to_owned()).collect();
        let mut replica = Self {
            child: launch(database_url, "127.0.0.1:0", &extra, &log),
            addr: String::new(),
            database_url: database_url.into(),
            extra,
            log,
        };
        replica.addr = serving_address(&replica.log, 0, "serving gRPC");
        replica
    }

    fn restart(&mut self) {
        let from = self.log.lock().unwrap().len();
        self.child = launch(&self.database_url, &self.addr, &self.extra, &self.log);
        self.addr = serving_address(&self.log, from, "serving gRPC");
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn signal(&mut self, name: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([name, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// SIGKILL, then the same binary on the same address.
    fn kill_and_restart(&mut self) {
        self.signal("-KILL");
        self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        self.restart();
    }

    /// SIGTERM (a clean exit is required), then after `pause` the same binary on the same
    /// address.
    fn stop_and_restart(&mut self, pause: Duration) {
        self.signal("-TERM");
        assert!(
            self.child.wait().unwrap().success(),
            "a clean exit on SIGTERM"
        );
        std::thread::sleep(pause);
        self.restart();
    }
}

/// Starts the binary on `addr`, its log lines appended to `log`.
fn launch(database_url: &str, addr: &str, extra: &[String], log: &Shared<Vec<String>>) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hopper-delegation"))
        .args(["serve", "--listen", addr, "--database-url", database_url])
        .args(REPLICA_ARGS)
        .args(extra)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
    child
}

/// Waits until a line of `log` after the first `from` says where the server serves `what`.
fn serving_address(log: &Shared<Vec<String>>, from: usize, what: &str) -> String {
    let started = Instant::now();
    loop {
        let serving = log.lock().unwrap()[from..]
            .iter()
            .find(|line| line.contains(what))
            .cloned();
        if let Some(line) = serving {
            let address = line.split("address=").nth(1).unwrap();
            return address.split_whitespace().next().unwrap().to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the replica starts"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn channel(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_owned())
        .unwrap()
        .connect_lazy()
}

/// What clients saw: status codes sent by a server (a transport failure, which tonic reports
/// with the transport error as the status's source, is counted apart), and the times from a
/// stream breaking to the first message of the stream that resumed it.
#[derive(Default)]
struct Observed {
    codes: BTreeMap<String, usize>,
    /// Broken connections, by the code tonic gave them.
    transport_failures: BTreeMap<String, usize>,
    /// How streams ended: code and message.
    stream_endings: BTreeMap<String, usize>,
    resumes: Vec<Duration>,
}

impl Observed {
    fn saw(&mut self, status: &Status) {
        if std::error::Error::source(status).is_some() {
            let code = format!("{:?}", status.code());
            *self.transport_failures.entry(code).or_default() += 1;
        } else {
            *self
                .codes
                .entry(format!("{:?}", status.code()))
                .or_default() += 1;
        }
    }

    fn ended(&mut self, status: &Status) {
        self.saw(status);
        let ending = format!("{:?}: {}", status.code(), status.message());
        *self.stream_endings.entry(ending).or_default() += 1;
    }
}

/// The codes a writer retries after: the database or the replica is away (a broken
/// connection included, whatever code tonic gives it), or a conflict.
fn retryable(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
        || matches!(status.code(), Code::Unavailable | Code::Aborted)
}

/// Calls until the answer is not retryable (at most a minute), noting every failure; says
/// whether a failure preceded the answer (a write may then have happened already).
async fn retried<T, F>(
    observed: &Shared<Observed>,
    mut call: impl FnMut() -> F,
) -> (Result<T, Status>, bool)
where
    F: Future<Output = Result<T, Status>>,
{
    let started = Instant::now();
    let mut failed = false;
    loop {
        match call().await {
            Err(status) if retryable(&status) && started.elapsed() < Duration::from_secs(60) => {
                observed.lock().unwrap().saw(&status);
                failed = true;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            outcome => return (outcome, failed),
        }
    }
}

/// One writer: whole lifecycles (a task at Global, routed to a Project and on to its
/// Orchestration, each hop accepted, the last completed, which bubbles up) until told to stop,
/// through one replica, retrying what the faults interrupt as a client should: creates with
/// the same `request_id`, accepts and completions checked by a read when a retry is refused.
/// Returns the tasks it completed.
async fn writer(
    number: usize,
    endpoint: String,
    stop: watch::Receiver<bool>,
    observed: Shared<Observed>,
) -> Vec<String> {
    let channel = channel(&endpoint);
    let tasks = Tasks::new(channel.clone());
    let mut delegations = Delegations::new(channel);
    let mut completed = Vec::new();
    let project = ["p1", "p2"][number % 2];
    let orch = ["o1", "o2"][number % 2];
    while !*stop.borrow() {
        let task = format!("w{number}-{}", completed.len());
        let request = pb::CreateTaskRequest {
            id: task.clone(),
            title: "Ride out the faults".into(),
            instance_id: "global".into(),
            request_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        };
        let (created, _) = retried(&observed, || {
            let (mut tasks, request) = (tasks.clone(), request.clone());
            async move { tasks.create_task(request).await }
        })
        .await;
        created.unwrap();
        let mut last = String::new();
        for (source, target) in [("global", project), (project, orch)] {
            let request = pb::CreateDelegationRequest {
                task_id: task.clone(),
                source_instance_id: source.into(),
                target_instance_id: target.into(),
                delegation_type: pb::DelegationType::Route.into(),
                request_id: uuid::Uuid::new_v4().to_string(),
                ..Default::default()
            };
            let (hop, _) = retried(&observed, || {
                let (mut delegations, request) = (delegations.clone(), request.clone());
                async move { delegations.create_delegation(request).await }
            })
            .await;
            last = hop.unwrap().into_inner().delegation.unwrap().id;
            let (accepted, failed) = retried(&observed, || {
                let (mut delegations, id) = (delegations.clone(), last.clone());
                async move {
                    let request = pb::AcceptDelegationRequest { id };
                    delegations.accept_delegation(request).await
                }
            })
            .await;
            settled(
                &mut delegations,
                accepted,
                failed,
                &last,
                pb::DelegationStatus::Accepted,
            )
            .await;
        }
        let (done, failed) = retried(&observed, || {
            let mut delegations = delegations.clone();
            let request = pb::CompleteDelegationRequest {
                id: last.clone(),
                result: None,
                notes: None,
            };
            async move { delegations.complete_delegation(request).await }
        })
        .await;
        settled(
            &mut delegations,
            done,
            failed,
            &last,
            pb::DelegationStatus::Completed,
        )
        .await;
        completed.push(task);
    }
    completed
}

/// An accept or a completion either succeeded, or was refused because an earlier attempt,
/// whose answer a fault swallowed, had already made it: then the hop must be in that state.
async fn settled<T>(
    delegations: &mut Delegations,
    outcome: Result<T, Status>,
    after_a_failure: bool,
    id: &str,
    wanted: pb::DelegationStatus,
) {
    match outcome {
        Ok(_) => {}
        Err(status) if after_a_failure && status.code() == Code::FailedPrecondition => {
            let request = pb::GetDelegationRequest { id: id.into() };
            let hop = delegations.get_delegation(request).await.unwrap();
            let status = hop.into_inner().delegation.unwrap().status;
            assert_eq!(
                status,
                i32::from(wanted),
                "{id}: the swallowed attempt had committed"
            );
        }
        Err(status) => panic!("{id}: {status:?}"),
    }
}

/// What a tonic subscriber asks for and how it reads.
#[derive(Clone)]
struct Subscription {
    /// The replica it starts on; each resume goes to the other one.
    replica: usize,
    after: Option<u64>,
    kinds: Vec<pb::EventKind>,
    /// A pause per message, so that a replay is still reading pages when a fault comes.
    throttle: Duration,
}

/// What a subscriber received: where its stream started (every matching event after it is
/// due), and every event's sequence and kind.
#[derive(Debug, Default)]
struct Received {
    after: u64,
    /// Only some kinds were asked for.
    filtered: bool,
    events: Vec<(u64, String)>,
}

/// A WatchEvents subscriber of Global and everything below it that resumes after its cursor,
/// on the other replica, whenever its stream ends, until its cursor reaches the final head.
async fn subscriber(
    endpoints: [String; 2],
    subscription: Subscription,
    mut done: watch::Receiver<Option<u64>>,
    observed: Shared<Observed>,
) -> Received {
    let clients = endpoints.map(|e| Delegations::new(channel(&e)));
    let mut received = Received::default();
    let mut start: Option<u64> = subscription.after;
    let mut cursor = subscription.after;
    let mut turn = subscription.replica;
    let mut broken: Option<Instant> = None;
    let finished = |cursor: Option<u64>, done: &watch::Receiver<Option<u64>>| {
        done.borrow()
            .is_some_and(|head| cursor.is_some_and(|c| c >= head))
    };
    while !finished(cursor, &done) {
        let request = pb::WatchEventsRequest {
            instance_id: "global".into(),
            include_descendants: true,
            after_sequence: cursor,
            kinds: subscription.kinds.iter().map(|k| i32::from(*k)).collect(),
        };
        match clients[turn % 2].clone().watch_events(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    let message = tokio::select! {
                        message = stream.message() => message,
                        _ = done.changed() => {
                            if finished(cursor, &done) { break } else { continue }
                        }
                    };
                    let message = match message {
                        Ok(Some(message)) => message,
                        Ok(None) => break,
                        Err(status) => {
                            observed.lock().unwrap().ended(&status);
                            break;
                        }
                    };
                    if let Some(at) = broken.take() {
                        observed.lock().unwrap().resumes.push(at.elapsed());
                    }
                    match message.payload {
                        Some(Payload::Event(event)) => {
                            start.get_or_insert(event.sequence - 1);
                            let kind = pb::EventKind::try_from(event.kind).unwrap();
                            let kind = kind.as_str_name().trim_start_matches("EVENT_KIND_");
                            received.events.push((event.sequence, kind.to_lowercase()));
                            cursor = Some(event.sequence);
                        }
                        Some(Payload::Progress(progress)) => {
                            start.get_or_insert(progress.sequence);
                            cursor = Some(cursor.unwrap_or(0).max(progress.sequence));
                        }
                        None => {}
                    }
                    if finished(cursor, &done) {
                        break;
                    }
                    tokio::time::sleep(subscription.throttle).await;
                }
            }
            Err(status) => observed.lock().unwrap().saw(&status),
        }
        if finished(cursor, &done) {
            break;
        }
        broken.get_or_insert_with(Instant::now);
        turn += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    received.after = start.unwrap_or(0);
    received.filtered = !subscription.kinds.is_empty();
    received
}

/// A `hopperctl watch global --descendants --since 0 -o json` process and what it printed.
struct Watcher {
    child: Child,
    sequences: Shared<Vec<u64>>,
    stderr: Shared<String>,
}

impl Watcher {
    fn start(endpoint: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hopperctl"))
            .args(["--server", endpoint, "watch", "global", "--descendants"])
            .args(["--since", "0", "-o", "json"])
            .env_remove("HOPPER_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let sequences: Shared<Vec<u64>> = Arc::default();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let printed = sequences.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let event: serde_json::Value = serde_json::from_str(&line).unwrap();
                printed
                    .lock()
                    .unwrap()
                    .push(event["sequence"].as_u64().unwrap());
            }
        });
        let stderr: Shared<String> = Arc::default();
        let text = stderr.clone();
        let err = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        Self {
            child,
            sequences,
            stderr,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every status the health service of `endpoint` reported, polled every 100 ms until `stop`.
fn health_log(endpoint: &str, stop: watch::Receiver<bool>) -> JoinHandle<Vec<(Instant, i32)>> {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(endpoint));
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !*stop.borrow() {
            let request = HealthCheckRequest {
                service: "hopper.delegation.v1.DelegationService".into(),
            };
            if let Ok(answer) = health.check(request).await {
                seen.push((Instant::now(), answer.into_inner().status));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen
    })
}

async fn register(endpoint: &str) {
    let mut instances = pb::instance_service_client::InstanceServiceClient::new(channel(endpoint));
    for (id, scope, parent) in [
        ("global", pb::Scope::Global, ""),
        ("p1", pb::Scope::Project, "global"),
        ("p2", pb::Scope::Project, "global"),
        ("o1", pb::Scope::Orchestration, "p1"),
        ("o2", pb::Scope::Orchestration, "p2"),
    ] {
        let request = rpc::register(id, scope, parent);
        instances.register_instance(request).await.unwrap();
    }
}

/// The log, in order: sequence and kind.
async fn log_of(db: &Db) -> Vec<(u64, String)> {
    db.sequence_events().await.unwrap();
    let sql = "SELECT CAST(sequence AS TEXT) || ' ' || kind AS line FROM delegation_events
               ORDER BY sequence";
    let lines = text_rows(&mut db.conn().await.unwrap(), sql).await;
    lines
        .iter()
        .map(|line| {
            let (sequence, kind) = line.split_once(' ').unwrap();
            (sequence.parse().unwrap(), kind.to_owned())
        })
        .collect()
}

async fn rows(db: &Db, sql: &str) -> Vec<String> {
    text_rows(&mut db.conn().await.unwrap(), sql).await
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_and_writer_rides_out_database_restarts_and_replica_crashes() {
    let Some(cluster) = Cluster::create() else {
        return;
    };
    let started = Instant::now();
    let url = cluster.url();
    store::migrate(&url.parse().unwrap(), Migrate::Latest)
        .await
        .unwrap();
    let db = Db::open(&url.parse().unwrap(), 2).unwrap();
    let mut replicas = [Replica::start(&url), Replica::start(&url)];
    let endpoints = replicas.each_ref().map(Replica::endpoint);
    register(&endpoints[0]).await;

    // Writers on both replicas; the log grows to several live windows before anyone watches.
    let observed: Shared<Observed> = Arc::default();
    let (stop_writers, writing) = watch::channel(false);
    let writers: Vec<JoinHandle<Vec<String>>> = (0..4)
        .map(|n| {
            let endpoint = endpoints[n % 2].clone();
            tokio::spawn(writer(n, endpoint, writing.clone(), observed.clone()))
        })
        .collect();
    while log_of(&db).await.len() < 640 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (finish, done) = watch::channel(None);
    let mut subscribers = Vec::new();
    let mut subscribe = |replica: usize, after: Option<u64>, kinds: Vec<pb::EventKind>, ms| {
        let subscription = Subscription {
            replica,
            after,
            kinds,
            throttle: Duration::from_millis(ms),
        };
        subscribers.push(tokio::spawn(subscriber(
            endpoints.clone(),
            subscription,
            done.clone(),
            observed.clone(),
        )));
    };
    let completions = vec![
        pb::EventKind::DelegationCompleted,
        pb::EventKind::TaskCompleted,
    ];
    for n in 0..12 {
        subscribe(n % 2, None, vec![], 0); // live at the head
        subscribe(n % 2, Some(0), vec![], 1); // replaying the whole log
    }
    for n in 0..4 {
        subscribe(n % 2, Some(0), completions.clone(), 1);
    }
    let watchers: Vec<Watcher> = (0..8).map(|n| Watcher::start(&endpoints[n % 2])).collect();
    let (stop_health, polling) = watch::channel(false);
    let health = endpoints.each_ref().map(|e| health_log(e, polling.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Five maintenance restarts, each while fresh subscribers replay the log in pages.
    const RESTARTS: usize = 5;
    for round in 0..RESTARTS {
        subscribe(round % 2, Some(0), vec![], 2);
        subscribe(round % 2 + 1, Some(0), vec![], 2);
        tokio::time::sleep(Duration::from_millis(400)).await;
        tokio::task::block_in_place(|| cluster.restart());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // An outage longer than --db-timeout, while two more subscribers replay the log.
    subscribe(0, Some(0), vec![], 2);
    subscribe(1, Some(0), vec![], 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    tokio::task::block_in_place(|| cluster.stop());
    let outage = (Instant::now(), Duration::from_secs(3));
    tokio::time::sleep(outage.1).await;
    tokio::task::block_in_place(|| cluster.start());
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A crash of one replica and a clean stop of the other, each started again.
    tokio::task::block_in_place(|| replicas[0].kill_and_restart());
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| replicas[1].stop_and_restart(Duration::ZERO));
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop_writers.send(true).unwrap();
    let mut completed = Vec::new();
    for writer in writers {
        completed.extend(writer.await.unwrap());
    }
    let log = log_of(&db).await;
    let head = log.last().unwrap().0;
    finish.send(Some(head)).unwrap();
    let subscribers_count = subscribers.len() + watchers.len();
    let received = tokio::time::timeout(Duration::from_secs(90), async {
        let mut received = Vec::new();
        for subscriber in subscribers {
            received.push(subscriber.await.unwrap());
        }
        received
    })
    .await
    .expect("every subscriber reaches the head");
    stop_health.send(true).unwrap();

    // Every subscriber holds exactly the log's matching events after its start, once, in
    // order (the kinds-filtered ones only their kinds).
    for (n, got) in received.iter().enumerate() {
        let filtered = got.filtered;
        let expected: Vec<(u64, String)> = log
            .iter()
            .filter(|(sequence, _)| *sequence > got.after)
            .filter(|(_, kind)| !filtered || kind.ends_with("completed"))
            .cloned()
            .collect();
        assert_eq!(got.events, expected, "subscriber {n}, after {}", got.after);
    }
    let everything: Vec<u64> = log.iter().map(|(sequence, _)| *sequence).collect();
    for mut watcher in watchers {
        let deadline = Instant::now() + Duration::from_secs(60);
        while watcher.sequences.lock().unwrap().last() != Some(&head) {
            assert!(
                Instant::now() < deadline,
                "{}",
                watcher.stderr.lock().unwrap()
            );
            assert!(
                watcher.child.try_wait().unwrap().is_none(),
                "hopperctl watch exited"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pid = watcher.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .unwrap()
                .success()
        );
        assert!(watcher.child.wait().unwrap().success());
        assert_eq!(*watcher.sequences.lock().unwrap(), everything);
        let stderr = watcher.stderr.lock().unwrap();
        assert!(!stderr.to_lowercase().contains("internal"), "{stderr}");
    }

    // Nobody saw INTERNAL: no client, no server log line. Streams reading the log when the
    // database went away ended with UNAVAILABLE and resumed (checked above).
    let observed = std::mem::take(&mut *observed.lock().unwrap());
    assert!(
        !observed.codes.contains_key("Internal"),
        "{:?}",
        observed.codes
    );
    let database_faults = observed
        .stream_endings
        .iter()
        .filter(|(ending, _)| ending.starts_with("Unavailable") && ending.contains("database"))
        .count();
    assert!(database_faults > 0, "{:#?}", observed.stream_endings);
    for replica in &replicas {
        let log = replica.log.lock().unwrap();
        let bad: Vec<&String> = log
            .iter()
            .filter(|line| line.contains("internal error") || line.contains("panicked"))
            .collect();
        assert!(bad.is_empty(), "{bad:#?}");
    }

    // The database is consistent.
    let done_tasks = rows(&db, "SELECT id AS line FROM tasks WHERE status = 'done'").await;
    let mut completed_sorted = completed.clone();
    completed_sorted.sort();
    let mut done_sorted = done_tasks.clone();
    done_sorted.sort();
    assert_eq!(
        done_sorted, completed_sorted,
        "every lifecycle a writer finished, and no other"
    );
    let violations = [
        // Each finished task once, with two hops (a retried create made no second one).
        "SELECT task_id AS line FROM task_delegations GROUP BY task_id HAVING COUNT(*) <> 2",
        "SELECT id AS line FROM tasks WHERE status <> 'done'",
        // A completed origin hop's task is done, with one task_completed event.
        "SELECT d.id AS line FROM task_delegations d JOIN tasks t ON t.id = d.task_id
         WHERE d.parent_delegation_id IS NULL AND d.status = 'completed' AND t.status <> 'done'",
        "SELECT t.id AS line FROM tasks t WHERE t.status = 'done' AND 1 <> (SELECT COUNT(*)
         FROM delegation_events e WHERE e.task_id = t.id AND e.kind = 'task_completed')",
        // No task has two pending hops; no active hop hangs under a finished task.
        "SELECT task_id AS line FROM task_delegations WHERE status = 'pending'
         GROUP BY task_id HAVING COUNT(*) > 1",
        "SELECT d.id AS line FROM task_delegations d JOIN tasks t ON t.id = d.task_id
         WHERE d.status IN ('pending', 'accepted') AND t.status IN ('done', 'cancelled')",
        // Every hop of a finished task completed (none half way).
        "SELECT id AS line FROM task_delegations WHERE status <> 'completed'",
    ];
    for sql in violations {
        assert_eq!(rows(&db, sql).await, Vec::<String>::new(), "{sql}");
    }

    // Health: NOT_SERVING during the long outage, SERVING once it was over.
    for (n, poll) in health.into_iter().enumerate() {
        let seen = poll.await.unwrap();
        let serving = i32::from(ServingStatus::Serving);
        let in_outage = seen
            .iter()
            .any(|(at, s)| *at > outage.0 && *at < back && *s != serving);
        assert!(in_outage, "replica {n} said NOT_SERVING during the outage");
        assert_eq!(
            seen.last().map(|(_, s)| *s),
            Some(serving),
            "replica {n} after"
        );
    }

    let mut resumes = observed.resumes.clone();
    resumes.sort();
    eprintln!(
        "fault suite: {subscribers_count} subscribers, {} events, {} lifecycles, {RESTARTS} \
         PostgreSQL restarts + one outage + SIGKILL + SIGTERM in {:.0?}; {} stream resumes \
         (p50 {:.0?}, p99 {:.0?}); statuses seen {:?}, transport failures {:?}; streams \
         ended by {:#?}",
        log.len(),
        completed.len(),
        started.elapsed(),
        resumes.len(),
        percentile(&resumes, 50),
        percentile(&resumes, 99),
        observed.codes,
        observed.transport_failures,
        observed.stream_endings,
    );
}

/// One statement, its error mapped as a request's would be.
async fn execute(conn: &mut Conn, sql: &str) -> Result<(), Error> {
    use diesel_async::SimpleAsyncConnection;
    let outcome = match conn {
        Conn::Pg(c) => c.batch_execute(sql).await,
        Conn::Sqlite(c) => c.batch_execute(sql).await,
    };
    outcome.map_err(Error::from)
}

/// On a real PostgreSQL server: a deadlock is ABORTED, a session the administrator terminates
/// mid-statement (57P01) is UNAVAILABLE, and only a fault of ours (a missing table) INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_faults_are_told_apart_by_their_sqlstate() {
    if !common::postgres_available().await {
        return;
    }
    let test_db = TestDb::migrated(Backend::Postgres).await;
    let db = test_db.pool();
    let (mut a, mut b) = (db.conn().await.unwrap(), db.conn().await.unwrap());
    let setup =
        "CREATE TABLE pair (id INT PRIMARY KEY, v INT); INSERT INTO pair VALUES (1, 0), (2, 0)";
    execute(&mut a, setup).await.unwrap();
    execute(&mut a, "BEGIN; UPDATE pair SET v = 1 WHERE id = 1")
        .await
        .unwrap();
    execute(&mut b, "BEGIN; UPDATE pair SET v = 1 WHERE id = 2")
        .await
        .unwrap();
    let (first, second) = tokio::join!(
        execute(&mut a, "UPDATE pair SET v = 2 WHERE id = 2"),
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            execute(&mut b, "UPDATE pair SET v = 2 WHERE id = 1").await
        }
    );
    let mut outcomes = [first, second];
    outcomes.sort_by_key(Result::is_ok);
    assert!(
        matches!(&outcomes[0], Err(Error::Aborted(_))),
        "{outcomes:?}"
    );
    assert!(outcomes[1].is_ok(), "{outcomes:?}");
    execute(&mut a, "ROLLBACK").await.unwrap();
    execute(&mut b, "ROLLBACK").await.unwrap();

    let (sleeping, terminated) = tokio::join!(execute(&mut a, "SELECT pg_sleep(30)"), async {
        let sleeper = "FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' \
                       AND state = 'active' AND pid <> pg_backend_pid()";
        let count = format!("SELECT CAST(COUNT(*) AS TEXT) AS line {sleeper}");
        while text_rows(&mut b, &count).await != ["1"] {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let terminated = "SELECT CAST(pg_terminate_backend(pid) AS TEXT) AS line";
        text_rows(&mut b, &format!("{terminated} {sleeper}")).await
    });
    assert_eq!(terminated, ["true"]);
    assert!(
        matches!(&sleeping, Err(Error::Unavailable(m)) if m.contains("cannot be reached")),
        "{sleeping:?}"
    );
    let bug = execute(&mut b, "SELECT * FROM no_such_table").await;
    assert!(matches!(bug, Err(Error::Internal(_))), "{bug:?}");
}

/// A replica (with `extra` arguments) with nothing but `global` registered and a task `t`.
async fn replica_with_a_task(database_url: &str, extra: &[&str]) -> Replica {
    let replica = Replica::start_with(database_url, extra);
    let endpoint = replica.endpoint();
    let mut instances = pb::instance_service_client::InstanceServiceClient::new(channel(&endpoint));
    let global = rpc::register("global", pb::Scope::Global, "");
    instances.register_instance(global).await.unwrap();
    Tasks::new(channel(&endpoint))
        .create_task(new_task("t", ""))
        .await
        .unwrap();
    replica
}

fn new_task(id: &str, description: &str) -> pb::CreateTaskRequest {
    pb::CreateTaskRequest {
        id: id.into(),
        title: "Fill the disk".into(),
        description: description.into(),
        instance_id: "global".into(),
        ..Default::default()
    }
}

fn get_task(id: &str) -> pb::GetTaskRequest {
    pb::GetTaskRequest { id: id.into() }
}

/// A tmpfs of `size`, unmounted on drop.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        let required = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(mounted || !required, "CI needs root to mount a small tmpfs");
        mounted.then_some(Self(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// SQLite on a 4 MiB filesystem that fills up: writes are RESOURCE_EXHAUSTED naming the cause
/// and leave nothing behind, reads and streams go on, and writes work again once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_and_keeps_reads_and_streams() {
    let Some(disk) = SmallDisk::mount("4m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here");
        return;
    };
    let path = disk.0.path().join("hopper.db");
    let url = format!("sqlite://{}", path.display());
    store::migrate(&url.parse().unwrap(), Migrate::Latest)
        .await
        .unwrap();
    let replica = replica_with_a_task(&url, &[]).await;
    let endpoint = replica.endpoint();
    let mut tasks = Tasks::new(channel(&endpoint));
    let mut delegations = Delegations::new(channel(&endpoint));
    let watch = |after| pb::WatchEventsRequest {
        instance_id: "global".into(),
        after_sequence: after,
        ..Default::default()
    };
    let mut live = delegations
        .watch_events(watch(None))
        .await
        .unwrap()
        .into_inner();

    // Ballast takes every free byte; then tasks with 8 KiB descriptions until one is refused.
    let ballast = disk.0.path().join("ballast");
    let mut file = std::fs::File::create(&ballast).unwrap();
    while std::io::Write::write_all(&mut file, &[0; 64 * 1024]).is_ok() {}
    drop(file);
    let mut refused = None;
    for n in 0..2_000 {
        let id = format!("filler-{n}");
        if let Err(status) = tasks.create_task(new_task(&id, &"x".repeat(8192))).await {
            refused = Some((id, status));
            break;
        }
    }
    let (id, status) = refused.expect("the disk fills up");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("out of space"), "{status:?}");
    let missing = tasks.get_task(get_task(&id)).await.unwrap_err();
    assert_eq!(
        missing.code(),
        Code::NotFound,
        "nothing of the refused write: {missing:?}"
    );
    // Reads and streams go on: the task is there, the live stream still sends progress marks,
    // and a replay reads the log.
    let t = tasks.get_task(get_task("t")).await.unwrap().into_inner();
    assert_eq!(t.task.unwrap().id, "t");
    let progress = tokio::time::timeout(Duration::from_secs(5), live.message()).await;
    assert!(matches!(progress, Ok(Ok(Some(_)))), "{progress:?}");
    let mut replay = delegations
        .watch_events(watch(Some(0)))
        .await
        .unwrap()
        .into_inner();
    assert!(replay.message().await.unwrap().is_some());

    std::fs::remove_file(&ballast).unwrap();
    tasks.create_task(new_task(&id, "")).await.unwrap();
    let log = replica.log.lock().unwrap();
    assert!(
        !log.iter().any(|line| line.contains("internal error")),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|line| line.contains("out of space")),
        "the cause is logged"
    );
}

/// A SQLite file that another program keeps locked for longer than `--db-timeout` (1 s): a
/// write is UNAVAILABLE and changes nothing, reads go on, and writes work once it lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_file_locked_by_another_program_makes_writes_unavailable() {
    use diesel::{Connection, connection::SimpleConnection};
    let test_db = TestDb::migrated(Backend::Sqlite).await;
    let DatabaseUrl::Sqlite(path) = &test_db.url else {
        unreachable!()
    };
    let replica = replica_with_a_task(&test_db.url_arg(), &[]).await;
    let mut tasks = Tasks::new(channel(&replica.endpoint()));
    let mut other = diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    other.batch_execute("BEGIN EXCLUSIVE").unwrap();

    let started = Instant::now();
    let busy = tasks.create_task(new_task("t2", "")).await.unwrap_err();
    assert_eq!(busy.code(), Code::Unavailable, "{busy:?}");
    assert!(busy.message().contains("busy"), "{busy:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let t = tasks.get_task(get_task("t")).await.unwrap().into_inner();
    assert_eq!(t.task.unwrap().id, "t", "reads go on");

    other.batch_execute("ROLLBACK").unwrap();
    let missing = tasks.get_task(get_task("t2")).await.unwrap_err();
    assert_eq!(
        missing.code(),
        Code::NotFound,
        "the refused write left nothing"
    );
    tasks.create_task(new_task("t2", "")).await.unwrap();
}

/// One sample of the server's `/metrics`, 0 if absent.
fn sample(metrics: &str, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut http = std::net::TcpStream::connect(metrics).unwrap();
    write!(http, "GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n\r\n").unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// While the database is down, `hopperctl tasks show` tries three times (the server counts
/// three UNAVAILABLE GetTask calls) and exits 3; a write (`tasks complete`) is tried once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hopperctl_retries_a_read_twice_and_a_write_never() {
    let Some(cluster) = Cluster::create() else {
        return;
    };
    store::migrate(&cluster.url().parse().unwrap(), Migrate::Latest)
        .await
        .unwrap();
    let metrics_listen = ["--metrics-listen", "127.0.0.1:0"];
    let replica = replica_with_a_task(&cluster.url(), &metrics_listen).await;
    let metrics = serving_address(&replica.log, 0, "serving metrics");
    tokio::task::block_in_place(|| cluster.stop());
    let ctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hopperctl"))
            .args(["--server", &replica.endpoint()])
            .args(args)
            .env_remove("HOPPER_TOKEN")
            .output()
            .unwrap()
    };
    let count = |method: &str| {
        let name = format!("hopper_rpc_requests_total{{method=\"{method}\",code=\"Unavailable\"}}");
        sample(&metrics, &name)
    };
    let shown = tokio::task::block_in_place(|| ctl(&["tasks", "show", "t"]));
    let stderr = String::from_utf8_lossy(&shown.stderr);
    assert_eq!(shown.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("retry later"), "{stderr}");
    assert_eq!(count("GetTask"), 3.0);
    let completed = tokio::task::block_in_place(|| ctl(&["tasks", "complete", "t"]));
    assert_eq!(completed.status.code(), Some(3));
    assert_eq!(count("CompleteTask"), 1.0);
    tokio::task::block_in_place(|| cluster.start());
}

/// A client whose channel carries the shipped service config calls on while its replica is
/// stopped and started again, and never sees an error; a plain client beside it does.
async fn a_client_with_the_service_config_rides_through_a_replica_restart(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let mut replica = replica_with_a_task(&db.url_arg(), &[]).await;
    let endpoint = replica.endpoint();
    let layer = RetryLayer::new(ServiceConfig::shipped());
    let mut configured = pb::task_service_client::TaskServiceClient::new(
        tower::ServiceBuilder::new()
            .layer(layer)
            .service(channel(&endpoint)),
    );
    let mut plain = Tasks::new(channel(&endpoint));
    let (stop, stopping) = watch::channel(false);
    let calls = tokio::spawn({
        let stopping = stopping.clone();
        async move {
            let (mut served, mut slowest) = (0, Duration::ZERO);
            while !*stopping.borrow() {
                let started = Instant::now();
                let task = configured.get_task(get_task("t")).await;
                let task = task.expect("no error through the config").into_inner().task;
                assert_eq!(task.unwrap().id, "t");
                slowest = slowest.max(started.elapsed());
                served += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (served, slowest)
        }
    });
    let plain_calls = tokio::spawn(async move {
        let mut failures = 0;
        while !*stopping.borrow() {
            failures += usize::from(plain.get_task(get_task("t")).await.is_err());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        failures
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Half a second without a server: long enough for the plain client to notice.
    tokio::task::block_in_place(|| replica.stop_and_restart(Duration::from_millis(500)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    let ((served, slowest), plain_failures) = (calls.await.unwrap(), plain_calls.await.unwrap());
    assert!(
        plain_failures > 0,
        "the restart was an outage a plain client saw"
    );
    assert!(
        slowest > Duration::from_millis(300),
        "a call through the config waited the outage out: {slowest:?}"
    );
    eprintln!(
        "{served} calls through the config, none failed, the slowest took {slowest:?}; \
         the plain client failed {plain_failures} times"
    );
}

on_both_backends!(a_client_with_the_service_config_rides_through_a_replica_restart);
