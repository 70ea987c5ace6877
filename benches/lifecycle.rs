//! The lifecycle benchmark: the service against the database doing the same work directly.
//!
//! One lifecycle is what a Hopper deployment does for every task: CreateTask at Global;
//! CreateDelegation Global → Project; Accept; CreateDelegation Project → Orchestration; Accept;
//! CompleteDelegation (bubbling two levels, the task DONE at Global); GetDelegationChain;
//! ListPendingDelegations. Clients run lifecycles back to back, each over its own connection.
//!
//! **The limit** is the same outcome written directly in SQL on the service's own schema,
//! through the same driver, on a connection per client on PostgreSQL and on one connection all
//! clients share on SQLite (its single writer): the rows, compare-and-set transitions
//! (`UPDATE … WHERE status = … RETURNING`), one event row per change, one wake-up per writing
//! transaction (PostgreSQL `pg_notify`), the chain and pending reads — no gRPC, no service
//! logic, no ordering of events. On PostgreSQL a third side, **limit+lock**, adds the global
//! advisory lock the service used to take before its event inserts, to show what that lock
//! alone costs.
//!
//! Sides are alternated (A B A B …) at each concurrency, because disk-sync time on a shared
//! machine swings tenfold between runs; figures are medians over the runs and ratios are taken
//! within one invocation. Statements and round trips are counted on every connection of this
//! process through diesel's instrumentation; the server's CPU time is read from its own
//! threads (`hopper-server`), PostgreSQL's from its processes. Last, one service run per
//! concurrency with a subscriber of Global times each completion's event from the
//! CompleteDelegation answer to the subscriber, and counts any never delivered.
//!
//! ```sh
//! cargo bench --bench lifecycle                          # both backends, concurrency 1, 16, 64
//! cargo bench --bench lifecycle -- --backend postgres --concurrency 16 --seconds 10 --runs 3
//! cargo bench --bench lifecycle -- --show-statements     # the statements of one lifecycle
//! cargo bench --bench lifecycle -- --fanout              # WatchEvents fan-out (lifecycle/fanout.rs)
//! ```
//!
//! It prints a markdown table per backend and writes it, with the raw figures as JSON, to
//! `target/bench/lifecycle-<backend>.{md,json}`. PostgreSQL is found as for the tests
//! (`HOPPER_TEST_POSTGRES_URL`); the bench creates and drops databases of its own.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "lifecycle/fanout.rs"]
mod fanout;

#[global_allocator]
static ALLOCATOR: fanout::Counting = fanout::Counting;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use common::{Backend, TestDb, postgres_available};
use diesel::{
    connection::{Instrumentation, InstrumentationEvent},
    sql_types::{Jsonb, Text, Timestamp},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use futures::StreamExt as _;
use hopper_delegation::{
    fanout::Hub,
    proto::{
        self as pb, delegation_service_client::DelegationServiceClient,
        instance_service_client::InstanceServiceClient, task_service_client::TaskServiceClient,
    },
    server::{self, Config},
    store::{Bind, DatabaseUrl, Db, SqliteConn, delegations::Delegation, now, sql},
};
use serde::Serialize;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(about = "Lifecycles per second: the service against the database's own limit")]
struct Args {
    /// `postgres`, `sqlite` or `both`.
    #[arg(long, default_value = "both")]
    backend: String,
    /// Concurrent clients, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Length of one run.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Runs per side and concurrency, alternated.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Print the statements of one service lifecycle and one limit lifecycle, then exit.
    #[arg(long)]
    show_statements: bool,
    /// Where the tables and JSON go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Run the fan-out benchmark instead (see `lifecycle/fanout.rs`).
    #[arg(long)]
    fanout: bool,
    /// Concurrent lifecycle clients of the fan-out benchmark.
    #[arg(long, default_value_t = 16)]
    fanout_clients: usize,
    /// Worker threads of the server's runtime (default: one per core, as `serve` runs).
    #[arg(long)]
    server_threads: Option<usize>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

// ---- Counting statements and round trips on every connection of this process. ----

static ROUND_TRIPS: AtomicU64 = AtomicU64::new(0);
static STATEMENTS: AtomicU64 = AtomicU64::new(0);
static SHOW: AtomicBool = AtomicBool::new(false);

/// The value of a counter (`RunQueryDsl::load` would shadow the atomic's own `load`).
fn count(counter: &AtomicU64) -> u64 {
    AtomicU64::load(counter, Ordering::Relaxed)
}

/// Counts each query a connection sends (a multi-statement batch is one round trip and as many
/// statements as it has), and prints it while [`SHOW`] is on.
struct Counter;

/// Scans a query's text as diesel renders it, counting statements, and stops at the bind
/// values, which would cost more to render than the statement does to run.
#[derive(Default)]
struct Scan {
    statements: u64,
    in_statement: bool,
    text: Option<String>,
}

impl std::fmt::Write for Scan {
    fn write_str(&mut self, part: &str) -> std::fmt::Result {
        let (part, done) = match part.find("-- binds:") {
            Some(end) => (&part[..end], true),
            None => (part, false),
        };
        for piece in part.split_inclusive(';') {
            if !piece.trim_end_matches(';').trim().is_empty() && !self.in_statement {
                self.statements += 1;
                self.in_statement = true;
            }
            if piece.ends_with(';') {
                self.in_statement = false;
            }
        }
        if let Some(text) = &mut self.text {
            text.push_str(part);
        }
        if done { Err(std::fmt::Error) } else { Ok(()) }
    }
}

impl Instrumentation for Counter {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::StartQuery { query, .. } = event {
            let show = AtomicBool::load(&SHOW, Ordering::Relaxed);
            let mut scan = Scan {
                text: show.then(String::new),
                ..Scan::default()
            };
            let _ = write!(scan, "{query}"); // stopped at the binds on purpose
            ROUND_TRIPS.fetch_add(1, Ordering::Relaxed);
            STATEMENTS.fetch_add(scan.statements.max(1), Ordering::Relaxed);
            if let Some(text) = scan.text {
                println!(
                    "  {}",
                    text.split_whitespace().collect::<Vec<_>>().join(" ")
                );
            }
        }
    }
}

// ---- CPU time, from /proc. ----

/// Seconds of CPU (user + system) used so far by this process's threads named like `prefix`.
fn thread_cpu(prefix: &str) -> f64 {
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten() {
        let path = task.map(|t| t.path()).unwrap_or_default();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.starts_with(prefix) {
            ticks += stat_ticks(&std::fs::read_to_string(path.join("stat")).unwrap_or_default());
        }
    }
    ticks as f64 / clock_ticks()
}

/// Seconds of CPU used so far by every `postgres` process of this machine.
fn postgres_cpu() -> f64 {
    let mut ticks = 0;
    for process in std::fs::read_dir("/proc").into_iter().flatten() {
        let path = process.map(|p| p.path()).unwrap_or_default();
        if std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == "postgres") {
            ticks += stat_ticks(&std::fs::read_to_string(path.join("stat")).unwrap_or_default());
        }
    }
    ticks as f64 / clock_ticks()
}

/// utime + stime from a `/proc/…/stat` line (fields 14 and 15, after the `(comm)`).
fn stat_ticks(stat: &str) -> u64 {
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn clock_ticks() -> f64 {
    100.0 // USER_HZ on Linux
}

// ---- The workload. ----

/// The RPCs of one lifecycle, in order.
const RPCS: [&str; 8] = [
    "CreateTask",
    "CreateDelegation(G→P)",
    "AcceptDelegation(P)",
    "CreateDelegation(P→O)",
    "AcceptDelegation(O)",
    "CompleteDelegation",
    "GetDelegationChain",
    "ListPendingDelegations",
];

/// What one client measured: lifecycles done and each step's latencies.
#[derive(Default)]
struct Tally {
    lifecycles: u64,
    latencies: Vec<Vec<Duration>>,
    /// When each task's CompleteDelegation answered (service side only).
    completed: Vec<(String, Instant)>,
}

impl Tally {
    fn new() -> Self {
        Self {
            lifecycles: 0,
            latencies: vec![Vec::new(); RPCS.len()],
            completed: Vec::new(),
        }
    }

    fn merge(&mut self, other: Tally) {
        self.lifecycles += other.lifecycles;
        self.completed.extend(other.completed);
        for (mine, theirs) in self.latencies.iter_mut().zip(other.latencies) {
            mine.extend(theirs);
        }
    }
}

/// Times one step.
async fn step<T, E: std::fmt::Debug>(
    tally: &mut Tally,
    n: usize,
    call: impl Future<Output = Result<T, E>>,
) -> T {
    let started = Instant::now();
    let out = call.await.unwrap_or_else(|e| panic!("{}: {e:?}", RPCS[n]));
    tally.latencies[n].push(started.elapsed());
    out
}

struct Clients {
    tasks: TaskServiceClient<Channel>,
    delegations: DelegationServiceClient<Channel>,
    /// The Orchestration instances lifecycles go to, in turn.
    leaves: Arc<[String]>,
}

/// Which leaf the next lifecycle of any client goes to.
static NEXT_LEAF: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Clients {
    async fn connect(addr: SocketAddr, leaves: Arc<[String]>) -> Self {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect to the server");
        Self {
            tasks: TaskServiceClient::new(channel.clone()),
            delegations: DelegationServiceClient::new(channel),
            leaves,
        }
    }
}

fn route(task: &str, from: &str, to: &str) -> pb::CreateDelegationRequest {
    pb::CreateDelegationRequest {
        task_id: task.into(),
        source_instance_id: from.into(),
        target_instance_id: to.into(),
        delegation_type: pb::DelegationType::Route.into(),
        delegated_by: "bench".into(),
        ..Default::default()
    }
}

/// One lifecycle through the gRPC API.
async fn service_lifecycle(c: &mut Clients, tally: &mut Tally) {
    let leaf = c.leaves[NEXT_LEAF.fetch_add(1, Ordering::Relaxed) % c.leaves.len()].clone();
    let create = pb::CreateTaskRequest {
        title: "bench".into(),
        instance_id: "global".into(),
        ..Default::default()
    };
    let task = step(tally, 0, c.tasks.create_task(create))
        .await
        .into_inner()
        .task
        .unwrap();
    let to_project = step(
        tally,
        1,
        c.delegations
            .create_delegation(route(&task.id, "global", "project")),
    )
    .await
    .into_inner()
    .delegation
    .unwrap();
    let accept = |id: &str| pb::AcceptDelegationRequest { id: id.into() };
    step(
        tally,
        2,
        c.delegations.accept_delegation(accept(&to_project.id)),
    )
    .await;
    let to_orch = step(
        tally,
        3,
        c.delegations
            .create_delegation(route(&task.id, "project", &leaf)),
    )
    .await
    .into_inner()
    .delegation
    .unwrap();
    step(
        tally,
        4,
        c.delegations.accept_delegation(accept(&to_orch.id)),
    )
    .await;
    let complete = pb::CompleteDelegationRequest {
        id: to_orch.id.clone(),
        ..Default::default()
    };
    let done = step(tally, 5, c.delegations.complete_delegation(complete))
        .await
        .into_inner();
    tally.completed.push((task.id.clone(), Instant::now()));
    assert_eq!(done.completed_ancestors.len(), 1);
    let chain = pb::GetDelegationChainRequest { task_id: task.id };
    let chain = step(tally, 6, c.delegations.get_delegation_chain(chain))
        .await
        .into_inner();
    assert_eq!(chain.delegations.len(), 2);
    let pending = pb::ListPendingDelegationsRequest {
        instance_id: leaf,
        ..Default::default()
    };
    step(tally, 7, c.delegations.list_pending_delegations(pending)).await;
    tally.lifecycles += 1;
}

/// How the limit orders its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventOrder {
    /// Not at all: the database's own limit.
    None,
    /// The global advisory lock before the event insert, held to commit.
    Lock,
}

/// A limit client's way to the database: a PostgreSQL connection of its own, or its turn on
/// the one SQLite connection all clients share (SQLite has one writer; this is its limit).
enum Link {
    Pg(Box<AsyncPgConnection>),
    Sqlite(Arc<tokio::sync::Mutex<SqliteConn>>),
}

/// A [`Link`] in use for one operation.
enum Held<'a> {
    Pg(&'a mut AsyncPgConnection),
    Sqlite(tokio::sync::MutexGuard<'a, SqliteConn>),
}

impl Link {
    async fn hold(&mut self) -> Held<'_> {
        match self {
            Link::Pg(c) => Held::Pg(c),
            Link::Sqlite(shared) => Held::Sqlite(shared.lock().await),
        }
    }
}

/// Opens `n` limit links: PostgreSQL connections, or `n` handles on one SQLite connection set
/// up with the service's pragmas.
async fn open_links(url: &DatabaseUrl, n: usize) -> Vec<Link> {
    match url {
        DatabaseUrl::Postgres(url) => {
            let mut links = Vec::new();
            for _ in 0..n {
                links.push(Link::Pg(Box::new(
                    AsyncPgConnection::establish(url).await.unwrap(),
                )));
            }
            links
        }
        DatabaseUrl::Sqlite(path) => {
            let mut conn = SqliteConn::establish(&path.to_string_lossy())
                .await
                .unwrap();
            conn.batch_execute(
                "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
            )
            .await
            .unwrap();
            let shared = Arc::new(tokio::sync::Mutex::new(conn));
            (0..n).map(|_| Link::Sqlite(shared.clone())).collect()
        }
    }
}

/// Runs a statement on whichever backend `$held` (a `&mut Held`) holds.
macro_rules! on {
    ($held:expr, |$c:ident| $body:expr) => {
        match $held {
            Held::Pg(c) => {
                let $c = &mut **c;
                $body
            }
            Held::Sqlite(guard) => {
                let $c = &mut **guard;
                $body
            }
        }
    };
}

async fn begin(held: &mut Held<'_>) {
    match held {
        Held::Pg(c) => c.batch_execute("BEGIN").await,
        Held::Sqlite(c) => c.batch_execute("BEGIN IMMEDIATE").await,
    }
    .unwrap();
}

async fn commit(held: &mut Held<'_>) {
    on!(held, |c| c.batch_execute("COMMIT").await).unwrap();
}

const INSERT_TASK: &str =
    "INSERT INTO tasks (id, title, description, instance_id, status, created_at, updated_at)
     VALUES ($1, 'bench', '', 'global', 'pending', $2, $2)";
/// Moves the task on, if it is where the hop starts and unfinished (the compare-and-set that
/// also locks it).
const MOVE_TASK: &str = "UPDATE tasks SET instance_id = $3, updated_at = $4
     WHERE id = $1 AND instance_id = $2 AND status NOT IN ('done', 'cancelled')";
const INSERT_HOP: &str = "INSERT INTO task_delegations (id, task_id, parent_delegation_id,
         source_instance_id, target_instance_id, delegation_type, status, delegated_at,
         delegated_by, created_at, updated_at)
     VALUES ($1, $2, (SELECT id FROM task_delegations WHERE task_id = $2
                      AND target_instance_id = $3 AND status = 'accepted'
                      ORDER BY delegated_at DESC LIMIT 1),
             $3, $4, 'route', 'pending', $5, 'bench', $5, $5)
     RETURNING *";
const ACCEPT: &str =
    "UPDATE task_delegations SET status = 'accepted', accepted_at = $2, updated_at = $2
     WHERE id = $1 AND status = 'pending' RETURNING *";
/// Completes the hop and the hops it continues, as one compare-and-set.
const COMPLETE: &str = "WITH RECURSIVE up AS (
         SELECT id, parent_delegation_id, task_id FROM task_delegations WHERE id = $1
         UNION ALL
         SELECT d.id, d.parent_delegation_id, d.task_id FROM task_delegations d
         JOIN up ON d.id = up.parent_delegation_id AND d.task_id = up.task_id)
     UPDATE task_delegations SET status = 'completed', completed_at = $2, updated_at = $2
     WHERE id IN (SELECT id FROM up) AND status = 'accepted' RETURNING *";
const FINISH_TASK: &str =
    "UPDATE tasks SET status = 'done', instance_id = $2, updated_at = $3 WHERE id = $1";
const EVENT_COLUMNS: &str =
    "INSERT INTO delegation_events (kind, occurred_at, task_id, delegation_id,
     source_instance_id, target_instance_id, caused_by_delegation_id, delegation) VALUES ";
const CHAIN: &str = "WITH RECURSIVE chain AS (
         SELECT d.*, 0 AS depth FROM task_delegations d WHERE d.id = (
             SELECT l.id FROM task_delegations l
             WHERE l.task_id = $1 AND l.status IN ('pending', 'accepted', 'completed')
             ORDER BY l.delegated_at DESC, l.id DESC LIMIT 1)
         UNION ALL
         SELECT p.*, c.depth + 1 FROM task_delegations p JOIN chain c
           ON p.id = c.parent_delegation_id AND p.task_id = c.task_id)
     SELECT id, task_id, parent_delegation_id, source_instance_id, target_instance_id,
            delegation_type, status, delegated_at, accepted_at, completed_at, result,
            rejection_reason, notes, delegated_by, created_at, updated_at, accept_by,
            complete_by, expired_at, expiry_reason
     FROM chain ORDER BY depth DESC";
const PENDING: &str =
    "SELECT * FROM task_delegations WHERE target_instance_id = 'orch' AND status = 'pending'
     ORDER BY delegated_at, id LIMIT 101";

/// `n` rows of event values, `$1…` numbered from `first`.
fn event_rows(n: usize) -> String {
    let mut text = String::from(EVENT_COLUMNS);
    for row in 0..n {
        let b = row * 8;
        let sep = if row == 0 { "" } else { ", " };
        let _ = write!(
            text,
            "{sep}(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
            b + 1,
            b + 2,
            b + 3,
            b + 4,
            b + 5,
            b + 6,
            b + 7,
            b + 8
        );
    }
    text
}

/// Inserts one event per changed delegation (the first caused by `cause`, each later one by the
/// one before), and for a completion the task_completed event, then wakes the readers.
async fn events(
    conn: &mut Held<'_>,
    kind: &str,
    hops: &[Delegation],
    cause: Option<&str>,
    task_done: bool,
    ordering: EventOrder,
) {
    if let (EventOrder::Lock, Held::Pg(c)) = (ordering, &mut *conn) {
        sql("SELECT pg_advisory_xact_lock(7243002)")
            .execute(&mut **c)
            .await
            .unwrap();
    }
    let json = |d: &Delegation| serde_json::to_value(d).unwrap();
    let at = now();
    // (kind, task, delegation, source, target, cause, snapshot)
    let mut rows: Vec<(&str, &Delegation, String, Option<String>)> = Vec::new();
    let mut below = cause.map(str::to_owned);
    for hop in hops {
        rows.push((kind, hop, hop.target_instance_id.clone(), below.clone()));
        below = Some(hop.id.clone());
    }
    if task_done {
        let origin = hops.last().unwrap();
        rows.push((
            "task_completed",
            origin,
            origin.source_instance_id.clone(),
            Some(origin.id.clone()),
        ));
    }
    // One statement for up to three rows, bound in order.
    macro_rules! bind_row {
        ($q:expr, $r:expr) => {
            $q.bind::<Text, _>($r.0)
                .bind::<Timestamp, _>(at)
                .bind::<Text, _>(&$r.1.task_id)
                .bind::<Text, _>(&$r.1.id)
                .bind::<Text, _>(&$r.1.source_instance_id)
                .bind::<Text, _>(&$r.2)
                .bind::<diesel::sql_types::Nullable<Text>, _>($r.3.as_deref())
                .bind::<Jsonb, _>(json($r.1))
        };
    }
    match rows.as_slice() {
        [a] => {
            let text = event_rows(1);
            on!(conn, |c| bind_row!(sql(&text), a).execute(c).await).unwrap();
        }
        [a, b, c3] => {
            let text = event_rows(3);
            on!(conn, |c| bind_row!(
                bind_row!(bind_row!(sql(&text), a), b),
                c3
            )
            .execute(c)
            .await)
            .unwrap();
        }
        other => panic!("{} event rows", other.len()),
    };
    if let Held::Pg(c) = conn {
        sql("SELECT pg_notify('hopper_events', '')")
            .execute(&mut **c)
            .await
            .unwrap();
    }
}

/// One lifecycle written directly in SQL.
async fn limit_lifecycle(link: &mut Link, ordering: EventOrder, tally: &mut Tally) {
    let id = uuid::Uuid::now_v7().to_string();
    let task = id.as_str();
    {
        let started = Instant::now();
        let mut conn = link.hold().await;
        on!(&mut conn, |c| sql(INSERT_TASK)
            .bind::<Text, _>(task)
            .bind::<Timestamp, _>(now())
            .execute(c)
            .await)
        .unwrap();
        tally.latencies[0].push(started.elapsed());
    }
    let delegate = async |link: &mut Link, n: usize, from: &str, to: &str, tally: &mut Tally| {
        let started = Instant::now();
        let mut tx = link.hold().await;
        begin(&mut tx).await;
        let at = now();
        let moved = on!(&mut tx, |c| sql(MOVE_TASK)
            .bind::<Text, _>(task)
            .bind::<Text, _>(from)
            .bind::<Text, _>(to)
            .bind::<Timestamp, _>(at)
            .execute(c)
            .await)
        .unwrap();
        assert_eq!(moved, 1);
        let hop_id = uuid::Uuid::now_v7().to_string();
        let hop: Delegation = on!(&mut tx, |c| sql(INSERT_HOP)
            .bind::<Text, _>(&hop_id)
            .bind::<Text, _>(task)
            .bind::<Text, _>(from)
            .bind::<Text, _>(to)
            .bind::<Timestamp, _>(at)
            .get_result(c)
            .await)
        .unwrap();
        events(
            &mut tx,
            "delegation_created",
            std::slice::from_ref(&hop),
            None,
            false,
            ordering,
        )
        .await;
        commit(&mut tx).await;
        tally.latencies[n].push(started.elapsed());
        hop
    };
    let accept = async |link: &mut Link, n: usize, hop: &str, tally: &mut Tally| {
        let started = Instant::now();
        let mut tx = link.hold().await;
        begin(&mut tx).await;
        let accepted: Delegation = on!(&mut tx, |c| sql(ACCEPT)
            .bind::<Text, _>(hop)
            .bind::<Timestamp, _>(now())
            .get_result(c)
            .await)
        .unwrap();
        events(
            &mut tx,
            "delegation_accepted",
            &[accepted],
            None,
            false,
            ordering,
        )
        .await;
        commit(&mut tx).await;
        tally.latencies[n].push(started.elapsed());
    };
    let to_project = delegate(link, 1, "global", "project", tally).await;
    accept(link, 2, &to_project.id, tally).await;
    let to_orch = delegate(link, 3, "project", "orch", tally).await;
    accept(link, 4, &to_orch.id, tally).await;
    {
        let started = Instant::now();
        let mut tx = link.hold().await;
        begin(&mut tx).await;
        let at = now();
        let mut hops: Vec<Delegation> = on!(&mut tx, |c| sql(COMPLETE)
            .bind::<Text, _>(&to_orch.id)
            .bind::<Timestamp, _>(at)
            .load(c)
            .await)
        .unwrap();
        assert_eq!(hops.len(), 2);
        hops.sort_by_key(|h| h.id != to_orch.id); // the completed hop first, then the bubbled one
        on!(&mut tx, |c| sql(FINISH_TASK)
            .bind::<Text, _>(task)
            .bind::<Text, _>("global")
            .bind::<Timestamp, _>(at)
            .execute(c)
            .await)
        .unwrap();
        events(&mut tx, "delegation_completed", &hops, None, true, ordering).await;
        commit(&mut tx).await;
        tally.latencies[5].push(started.elapsed());
    }
    let mut conn = link.hold().await;
    let started = Instant::now();
    let chain: Vec<Delegation> = on!(&mut conn, |c| sql(CHAIN)
        .bind::<Text, _>(task)
        .load(c)
        .await)
    .unwrap();
    assert_eq!(chain.len(), 2);
    tally.latencies[6].push(started.elapsed());
    let started = Instant::now();
    let _: Vec<Delegation> = on!(&mut conn, |c| sql(PENDING).load(c).await).unwrap();
    tally.latencies[7].push(started.elapsed());
    tally.lifecycles += 1;
}

// ---- Runs. ----

/// One side of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Side {
    Service,
    Limit,
    LimitWithLock,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Service => "service",
            Side::Limit => "limit",
            Side::LimitWithLock => "limit+lock",
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
struct Run {
    side: Side,
    concurrency: usize,
    lifecycles: u64,
    seconds: f64,
    per_second: f64,
    statements_per_lifecycle: f64,
    round_trips_per_lifecycle: f64,
    server_cpu_us_per_lifecycle: f64,
    postgres_cpu_us_per_lifecycle: f64,
    /// Per RPC: (p50, p99) in milliseconds.
    latency_ms: BTreeMap<String, (f64, f64)>,
    /// When each task's completion was answered.
    #[serde(skip)]
    completed: Vec<(String, Instant)>,
}

struct Target {
    backend: Backend,
    addr: SocketAddr,
    /// The limit's connections, opened once for the highest concurrency.
    links: tokio::sync::Mutex<Vec<Link>>,
    /// The Orchestration instances the service's lifecycles go to.
    leaves: Arc<[String]>,
}

/// What one client drives: the service through its own gRPC connection, or the limit.
enum Driver {
    Service(Box<Clients>),
    Limit(Link, EventOrder),
}

async fn run(target: &Target, side: Side, concurrency: usize, seconds: f64) -> Run {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let tally = Arc::new(Mutex::new(Tally::new()));
    let mut drivers = Vec::new();
    {
        let mut links = target.links.lock().await;
        for _ in 0..concurrency {
            drivers.push(match side {
                Side::Service => Driver::Service(Box::new(
                    Clients::connect(target.addr, target.leaves.clone()).await,
                )),
                Side::Limit => Driver::Limit(links.pop().unwrap(), EventOrder::None),
                Side::LimitWithLock => Driver::Limit(links.pop().unwrap(), EventOrder::Lock),
            });
        }
    }
    let (statements, round_trips) = (count(&STATEMENTS), count(&ROUND_TRIPS));
    let (server_cpu, pg_cpu) = (thread_cpu("hopper-server"), postgres_cpu());
    let started = Instant::now();
    let handles: Vec<_> = drivers
        .into_iter()
        .map(|mut driver| {
            let tally = tally.clone();
            tokio::spawn(async move {
                let mut mine = Tally::new();
                while Instant::now() < deadline {
                    match &mut driver {
                        Driver::Service(clients) => service_lifecycle(clients, &mut mine).await,
                        Driver::Limit(link, order) => {
                            limit_lifecycle(link, *order, &mut mine).await
                        }
                    }
                }
                tally.lock().unwrap().merge(mine);
                driver
            })
        })
        .collect();
    for handle in handles {
        if let Driver::Limit(link, _) = handle.await.expect("client") {
            target.links.lock().await.push(link);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut tally = std::mem::take(&mut *tally.lock().unwrap());
    let completed = std::mem::take(&mut tally.completed);
    let n = tally.lifecycles.max(1) as f64;
    let per = |total: u64, before: u64| (total - before) as f64 / n;
    let latency_ms = RPCS
        .iter()
        .zip(tally.latencies)
        .map(|(name, mut samples)| {
            samples.sort();
            let at = |q: f64| {
                samples
                    .get(((samples.len() as f64 - 1.0) * q).round() as usize)
                    .map_or(0.0, |d| d.as_secs_f64() * 1e3)
            };
            (name.to_string(), (at(0.5), at(0.99)))
        })
        .collect();
    Run {
        side,
        concurrency,
        lifecycles: tally.lifecycles,
        seconds: elapsed,
        per_second: tally.lifecycles as f64 / elapsed,
        statements_per_lifecycle: per(count(&STATEMENTS), statements),
        round_trips_per_lifecycle: per(count(&ROUND_TRIPS), round_trips),
        server_cpu_us_per_lifecycle: (thread_cpu("hopper-server") - server_cpu) * 1e6 / n,
        postgres_cpu_us_per_lifecycle: if target.backend == Backend::Postgres {
            (postgres_cpu() - pg_cpu) * 1e6 / n
        } else {
            0.0
        },
        latency_ms,
        completed,
    }
}

/// What a subscriber saw during a run.
#[derive(Debug, Clone, Serialize)]
struct Delivery {
    concurrency: usize,
    completions: usize,
    /// Completions whose task_completed event never reached the subscriber.
    missing: usize,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs the service at `concurrency` with one subscriber watching Global and its descendants
/// for task_completed events, and measures from each CompleteDelegation's answer to the
/// subscriber's receipt of that task's event (on PostgreSQL this includes the sequencer).
async fn delivery(target: &Target, concurrency: usize, seconds: f64) -> Delivery {
    let channel = Channel::from_shared(format!("http://{}", target.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = pb::WatchEventsRequest {
        instance_id: "global".into(),
        include_descendants: true,
        after_sequence: None,
        kinds: vec![pb::EventKind::TaskCompleted.into()],
    };
    let mut stream = DelegationServiceClient::new(channel)
        .watch_events(request)
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap(); // the first progress mark: subscribed
    let seen = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                if let Some(pb::watch_events_response::Payload::Event(event)) = message.payload {
                    seen.lock().unwrap().insert(event.task_id, Instant::now());
                }
            }
        })
    };
    let measured = run(target, Side::Service, concurrency, seconds).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // the last events on their way
    reader.abort();
    let seen = seen.lock().unwrap();
    let mut latencies: Vec<f64> = measured
        .completed
        .iter()
        .filter_map(|(task, answered)| {
            let received = seen.get(task)?;
            Some(received.saturating_duration_since(*answered).as_secs_f64() * 1e3)
        })
        .collect();
    let (p50_ms, p99_ms) = p50_p99(&mut latencies);
    Delivery {
        concurrency,
        completions: measured.completed.len(),
        missing: measured.completed.len() - latencies.len(),
        p50_ms,
        p99_ms,
    }
}

/// The median and the 99th percentile of `samples` (NaN for none); sorts them.
fn p50_p99(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (at(0.5), at(0.99))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Starts the server on a runtime of its own, so its threads' CPU time can be told apart, with
/// its pool (and on PostgreSQL its sequencer) on that runtime too.
fn start_server(url: DatabaseUrl, threads: Option<usize>) -> (SocketAddr, tokio::runtime::Runtime) {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    let runtime = builder
        .thread_name("hopper-server")
        .on_thread_start(fanout::mark_server_thread)
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        tx.send(listener.local_addr().unwrap()).unwrap();
        let db = Db::open(&url, 16).unwrap();
        let hub = Hub::new(db, Duration::from_secs(5));
        server::run(listener, hub, Config::default(), std::future::pending())
            .await
            .unwrap();
    });
    (rx.recv().unwrap(), runtime)
}

/// Registers Global, Project and the Orchestration `leaves` under Project.
async fn register_hierarchy(addr: SocketAddr, leaves: &[String]) {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let instances = InstanceServiceClient::new(channel);
    let register = |id: &str, scope: pb::Scope, parent: &str| {
        let mut instances = instances.clone();
        let request = pb::RegisterInstanceRequest {
            id: id.into(),
            name: id.into(),
            scope: scope.into(),
            parent_id: parent.into(),
            status: pb::InstanceStatus::Running.into(),
            ..Default::default()
        };
        async move { instances.register_instance(request).await.unwrap() }
    };
    register("global", pb::Scope::Global, "").await;
    register("project", pb::Scope::Project, "global").await;
    let leaves = leaves
        .iter()
        .map(|leaf| register(leaf, pb::Scope::Orchestration, "project"));
    futures::stream::iter(leaves)
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

async fn show_statements(target: &Target) {
    let mut tally = Tally::new();
    let mut clients = Clients::connect(target.addr, target.leaves.clone()).await;
    service_lifecycle(&mut clients, &mut tally).await; // warm the caches
    let count = |f: &str| {
        println!(
            "{f}: {} statements in {} round trips",
            count(&STATEMENTS),
            count(&ROUND_TRIPS)
        )
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("== one service lifecycle on {:?}", target.backend);
    STATEMENTS.store(0, Ordering::Relaxed);
    ROUND_TRIPS.store(0, Ordering::Relaxed);
    SHOW.store(true, Ordering::Relaxed);
    service_lifecycle(&mut clients, &mut tally).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // background work it set off
    SHOW.store(false, Ordering::Relaxed);
    count("service");
    let mut link = target.links.lock().await.pop().unwrap();
    limit_lifecycle(&mut link, EventOrder::None, &mut tally).await;
    println!("== one limit lifecycle on {:?}", target.backend);
    STATEMENTS.store(0, Ordering::Relaxed);
    ROUND_TRIPS.store(0, Ordering::Relaxed);
    SHOW.store(true, Ordering::Relaxed);
    limit_lifecycle(&mut link, EventOrder::None, &mut tally).await;
    SHOW.store(false, Ordering::Relaxed);
    count("limit");
}

async fn bench_backend(backend: Backend, args: &Args) -> anyhow::Result<()> {
    let test_db = TestDb::migrated(backend).await;
    // The warm-up runs four clients.
    let max = args.concurrency.iter().copied().max().unwrap_or(1).max(4);
    let (addr, server_runtime) = start_server(test_db.url.clone(), args.server_threads);
    let leaves: Arc<[String]> = Arc::from(["orch".to_owned()]);
    register_hierarchy(addr, &leaves).await;
    let target = Target {
        backend,
        addr,
        links: tokio::sync::Mutex::new(open_links(&test_db.url, max).await),
        leaves,
    };
    if args.show_statements {
        show_statements(&target).await;
        server_runtime.shutdown_background();
        return Ok(());
    }
    let mut sides = vec![Side::Service, Side::Limit];
    if backend == Backend::Postgres {
        sides.push(Side::LimitWithLock);
    }
    // Warm-up: connections, prepared statements, table pages.
    for side in &sides {
        run(&target, *side, 4, 1.0).await;
    }
    let mut runs = Vec::new();
    for &concurrency in &args.concurrency {
        for round in 0..args.runs {
            // A B C, then C B A, …: each side goes first as often as last.
            let order: Vec<Side> = if round % 2 == 0 {
                sides.clone()
            } else {
                sides.iter().rev().copied().collect()
            };
            for side in order {
                let measured = run(&target, side, concurrency, args.seconds).await;
                eprintln!(
                    "{backend:?} c={concurrency} {:<10} {:>7.1} lifecycles/s",
                    side.label(),
                    measured.per_second
                );
                runs.push(measured);
            }
        }
    }
    let mut deliveries = Vec::new();
    for &concurrency in &args.concurrency {
        deliveries.push(delivery(&target, concurrency, args.seconds).await);
    }
    server_runtime.shutdown_background();
    report(backend, args, &runs, &deliveries)
}

fn report(
    backend: Backend,
    args: &Args,
    runs: &[Run],
    deliveries: &[Delivery],
) -> anyhow::Result<()> {
    let name = format!("{backend:?}").to_lowercase();
    let mut md = String::new();
    let pick = |side: Side, c: usize| {
        runs.iter()
            .filter(move |r| r.side == side && r.concurrency == c)
    };
    let med = |side: Side, c: usize, f: fn(&Run) -> f64| median(pick(side, c).map(f).collect());
    let has_lock = runs.iter().any(|r| r.side == Side::LimitWithLock);
    let _ = writeln!(
        md,
        "### {name}: lifecycles/s, median of {} alternated runs of {} s\n",
        args.runs, args.seconds
    );
    let _ = writeln!(
        md,
        "| concurrency | service | limit | service/limit |{} statements (round trips) per lifecycle: service / limit | server CPU µs/lifecycle |{}",
        if has_lock {
            " limit+lock | service/(limit+lock) |"
        } else {
            ""
        },
        if backend == Backend::Postgres {
            " PostgreSQL CPU µs/lifecycle: service / limit |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "| --- | --- | --- | --- |{} --- | --- |{}",
        if has_lock { " --- | --- |" } else { "" },
        if backend == Backend::Postgres {
            " --- |"
        } else {
            ""
        }
    );
    for &c in &args.concurrency {
        let service = med(Side::Service, c, |r| r.per_second);
        let limit = med(Side::Limit, c, |r| r.per_second);
        let mut row = format!(
            "| {c} | {service:.0} | {limit:.0} | {:.2} |",
            service / limit
        );
        if has_lock {
            let locked = med(Side::LimitWithLock, c, |r| r.per_second);
            let _ = write!(row, " {locked:.0} | {:.2} |", service / locked);
        }
        let _ = write!(
            row,
            " {:.1} ({:.1}) / {:.1} ({:.1}) | {:.0} |",
            med(Side::Service, c, |r| r.statements_per_lifecycle),
            med(Side::Service, c, |r| r.round_trips_per_lifecycle),
            med(Side::Limit, c, |r| r.statements_per_lifecycle),
            med(Side::Limit, c, |r| r.round_trips_per_lifecycle),
            med(Side::Service, c, |r| r.server_cpu_us_per_lifecycle),
        );
        if backend == Backend::Postgres {
            let _ = write!(
                row,
                " {:.0} / {:.0} |",
                med(Side::Service, c, |r| r.postgres_cpu_us_per_lifecycle),
                med(Side::Limit, c, |r| r.postgres_cpu_us_per_lifecycle)
            );
        }
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(
        md,
        "\n### {name}: service latency per RPC, p50 / p99 ms (median over runs)\n"
    );
    let _ = writeln!(
        md,
        "| RPC |{}",
        args.concurrency
            .iter()
            .map(|c| format!(" c={c} |"))
            .collect::<String>()
    );
    let _ = writeln!(md, "| --- |{}", " --- |".repeat(args.concurrency.len()));
    for rpc in RPCS {
        let mut row = format!("| {rpc} |");
        for &c in &args.concurrency {
            let p50 = median(
                pick(Side::Service, c)
                    .map(|r| r.latency_ms[rpc].0)
                    .collect(),
            );
            let p99 = median(
                pick(Side::Service, c)
                    .map(|r| r.latency_ms[rpc].1)
                    .collect(),
            );
            let _ = write!(row, " {p50:.2} / {p99:.2} |");
        }
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(
        md,
        "\n### {name}: delivery, CompleteDelegation answered → task_completed at a subscriber of \
         Global (one run each)\n\n| concurrency | completions | missing | p50 ms | p99 ms |\n\
         | --- | --- | --- | --- | --- |"
    );
    for d in deliveries {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} | {:.2} |",
            d.concurrency, d.completions, d.missing, d.p50_ms, d.p99_ms
        );
    }
    println!("{md}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join(format!("lifecycle-{name}.md")), &md)?;
    std::fs::write(
        args.out.join(format!("lifecycle-{name}.json")),
        serde_json::to_string_pretty(&serde_json::json!({ "runs": runs, "delivery": deliveries }))?,
    )?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    diesel::connection::set_default_instrumentation(|| Some(Box::new(Counter)))?;
    let backends: &[Backend] = match args.backend.as_str() {
        "postgres" => &[Backend::Postgres],
        "sqlite" => &[Backend::Sqlite],
        "both" => &[Backend::Sqlite, Backend::Postgres],
        other => anyhow::bail!("--backend {other}: postgres, sqlite or both"),
    };
    for &backend in backends {
        if backend == Backend::Postgres && !postgres_available().await {
            continue;
        }
        if args.fanout {
            fanout::bench(backend, &args).await?;
        } else {
            bench_backend(backend, &args).await?;
        }
    }
    Ok(())
}
