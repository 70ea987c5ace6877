//! `--fanout`: the lifecycle load spread over 1,000 Orchestration leaves, without and with
//! thousands of WatchEvents subscribers, alternated (none, with, with, none, …):
//!
//! - **leaves**: 10,000 subscribers, ten per leaf, each watching its leaf, plus 10 watching
//!   Global with its descendants;
//! - **every event**: 1,000 subscribers watching Global with its descendants;
//! - **leaves + stalled**: the leaves' subscribers plus 100 on Global that read nothing during
//!   the run (they are read afterwards, and must have everything): what slow consumers cost
//!   writers and the other subscribers.
//!
//! Each subscriber has its own connection where the open-file limit allows. For each
//! run with subscribers it reports the throughput against the runs without, the delivery
//! latency (from the CompleteDelegation answer to the receipt of that completion's event, over
//! every subscriber that receives it), events missing or duplicated (each subscriber's events
//! against the log's matching events, by sequence), the time to open the subscribers, the
//! memory per idle subscriber (the server's heap, counted by an allocator that knows the
//! server's threads, and the whole process's resident memory, clients included), the server's
//! CPU time per delivered event, and the statements per lifecycle, whose difference is what
//! the subscribers cost the database.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    collections::{HashMap, HashSet},
    sync::atomic::AtomicIsize,
};

use std::fmt::Write as _;

use futures::StreamExt as _;
use hopper_delegation::store::event_log;
use tokio::task::JoinHandle;

use super::*;

// ---- The server's heap: bytes allocated and not freed on its threads. ----

thread_local! {
    static SERVER_THREAD: Cell<bool> = const { Cell::new(false) };
}
static SERVER_HEAP: AtomicIsize = AtomicIsize::new(0);

/// Marks the calling thread as the server's (its runtime's `on_thread_start`).
pub(crate) fn mark_server_thread() {
    SERVER_THREAD.set(true);
}

fn on_server() -> bool {
    SERVER_THREAD.try_with(Cell::get).unwrap_or(false)
}

fn server_heap() -> isize {
    AtomicIsize::load(&SERVER_HEAP, Ordering::Relaxed)
}

/// The system allocator, counting what the server's threads hold.
pub(crate) struct Counting;

fn signed(size: usize) -> isize {
    isize::try_from(size).unwrap_or(isize::MAX)
}

// SAFETY: every call is forwarded to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() && on_server() {
            SERVER_HEAP.fetch_add(signed(layout.size()), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if on_server() {
            SERVER_HEAP.fetch_sub(signed(layout.size()), Ordering::Relaxed);
        }
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() && on_server() {
            SERVER_HEAP.fetch_add(signed(new_size) - signed(layout.size()), Ordering::Relaxed);
        }
        new
    }
}

fn resident_bytes() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0)
        * 1024.0
}

/// Raises the open-file limit as far as this process may: 10,000 subscribers on connections of
/// their own take 20,000 descriptors here, client and server ends. Where the hard limit is
/// lower (20,000 on the machine of docs/PERFORMANCE.md), subscribers share connections, as
/// few to one as fit, and the report says how many.
fn raise_open_file_limit() -> u64 {
    let wanted = 65_536;
    if rlimit::setrlimit(rlimit::Resource::NOFILE, wanted, wanted).is_ok() {
        return wanted;
    }
    rlimit::increase_nofile_limit(wanted).unwrap_or(1_024)
}

// ---- The scenarios. ----

const LEAVES: usize = 1_000;

#[derive(Debug, Clone, Copy, Serialize)]
enum Scenario {
    /// Ten subscribers per leaf, plus ten on Global with descendants.
    Leaves,
    /// Every subscriber on Global with descendants.
    EveryEvent,
    /// `Leaves`, plus 100 on Global that read nothing until the run is over.
    LeavesAndStalled,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::Leaves => "10,000 on 1,000 leaves + 10 on Global",
            Scenario::EveryEvent => "1,000 receiving every event",
            Scenario::LeavesAndStalled => "the same + 100 on Global not reading",
        }
    }

    /// Each subscriber's instance, whether it watches the subtree, and whether it stalls.
    fn subscribers(self) -> Vec<(String, bool, bool)> {
        let global = |stalled| ("global".to_owned(), true, stalled);
        let leaves = (0..LEAVES * 10)
            .map(|i| (leaf(i % LEAVES), false, false))
            .chain((0..10).map(|_| global(false)));
        match self {
            Scenario::Leaves => leaves.collect(),
            Scenario::EveryEvent => (0..1_000).map(|_| global(false)).collect(),
            Scenario::LeavesAndStalled => leaves.chain((0..100).map(|_| global(true))).collect(),
        }
    }
}

fn leaf(i: usize) -> String {
    format!("leaf-{i:04}")
}

/// One open subscriber: its filter and what it received.
struct Subscriber {
    instance: String,
    descendants: bool,
    stalled: bool,
    /// (sequence, when received) of every event.
    received: Arc<Mutex<Vec<(i64, Instant)>>>,
    /// The highest sequence it has been told about (event or progress).
    reached: Arc<AtomicU64>,
    reader: JoinHandle<()>,
}

/// Opens the scenario's subscribers, `per_connection` to a connection, each waiting for its
/// first progress mark; stalled ones read nothing more until `go` is sent.
async fn open(
    addr: SocketAddr,
    scenario: Scenario,
    per_connection: usize,
    go: &tokio::sync::watch::Sender<bool>,
) -> Vec<Subscriber> {
    let filters = scenario.subscribers();
    let chunks: Vec<Vec<(String, bool, bool)>> = filters
        .chunks(per_connection.max(1))
        .map(<[_]>::to_vec)
        .collect();
    let opened = futures::stream::iter(chunks.into_iter().map(|chunk| async move {
        let go = go.subscribe();
        // A stalled client's windows: HTTP/2's initial 64 KiB, as most clients start with
        // (tonic's own are 2 and 5 MiB), so that the server soon has nowhere to put more.
        let stalled = chunk.iter().any(|(_, _, stalled)| *stalled);
        let window = stalled.then_some(65_535);
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .initial_stream_window_size(window)
            .initial_connection_window_size(window)
            .connect()
            .await
            .expect("connect a subscriber");
        let mut subscribers = Vec::new();
        for (instance, descendants, stalled) in chunk {
            let request = pb::WatchEventsRequest {
                instance_id: instance.clone(),
                include_descendants: descendants,
                ..Default::default()
            };
            let mut stream = DelegationServiceClient::new(channel.clone())
                .watch_events(request)
                .await
                .expect("watch")
                .into_inner();
            let first = stream.message().await.unwrap().unwrap();
            let Some(pb::watch_events_response::Payload::Progress(progress)) = first.payload else {
                panic!("the first message is a progress mark")
            };
            let received = Arc::new(Mutex::new(Vec::new()));
            let reached = Arc::new(AtomicU64::new(progress.sequence));
            let reader = tokio::spawn({
                let (received, reached) = (received.clone(), reached.clone());
                let mut go = go.clone();
                async move {
                    if stalled {
                        let _ = go.wait_for(|go| *go).await;
                    }
                    while let Ok(Some(message)) = stream.message().await {
                        use pb::watch_events_response::Payload;
                        match message.payload {
                            Some(Payload::Event(event)) => {
                                let at = Instant::now();
                                received.lock().unwrap().push((event.sequence as i64, at));
                                reached.fetch_max(event.sequence, Ordering::Relaxed);
                            }
                            Some(Payload::Progress(progress)) => {
                                reached.fetch_max(progress.sequence, Ordering::Relaxed);
                            }
                            None => {}
                        }
                    }
                }
            });
            subscribers.push(Subscriber {
                instance,
                descendants,
                stalled,
                received,
                reached,
                reader,
            });
        }
        subscribers
    }))
    .buffer_unordered(128)
    .collect::<Vec<_>>()
    .await;
    opened.into_iter().flatten().collect()
}

/// One run with subscribers.
#[derive(Debug, Clone, Serialize)]
struct FanoutRun {
    scenario: Scenario,
    subscribers: usize,
    per_connection: usize,
    open_seconds: f64,
    server_heap_per_subscriber: f64,
    resident_per_subscriber: f64,
    with: Run,
    delivered: u64,
    missing: u64,
    duplicated: u64,
    delivery_p50_ms: f64,
    delivery_p99_ms: f64,
    server_cpu_us_per_delivery: f64,
}

/// What the log says: each event's (source, target, kind, task).
struct LogEvent {
    source: String,
    target: String,
    kind: hopper_delegation::domain::EventKind,
    task_id: String,
}

async fn log_after(db: &Db, after: i64) -> BTreeMap<i64, LogEvent> {
    db.sequence_events().await.unwrap();
    let mut conn = db.conn().await.unwrap();
    event_log::read(&mut conn, None, after, i64::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            let event = LogEvent {
                source: e.source_instance_id,
                target: e.target_instance_id,
                kind: e.kind,
                task_id: e.task_id,
            };
            (e.sequence, event)
        })
        .collect()
}

/// Runs the load with the scenario's subscribers and checks what each received.
async fn with_subscribers(
    target: &Target,
    db: &Db,
    scenario: Scenario,
    per_connection: usize,
    concurrency: usize,
    seconds: f64,
) -> FanoutRun {
    db.sequence_events().await.unwrap();
    let start = event_log::bounds(&mut db.conn().await.unwrap())
        .await
        .unwrap()
        .head;
    let (heap, resident) = (server_heap(), resident_bytes());
    let opening = Instant::now();
    let go = tokio::sync::watch::channel(false).0;
    let subscribers = open(target.addr, scenario, per_connection, &go).await;
    let open_seconds = opening.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await; // settle: idle subscribers
    let n = subscribers.len() as f64;
    let server_heap_per_subscriber = (server_heap() - heap) as f64 / n;
    let resident_per_subscriber = (resident_bytes() - resident) / n;

    let with = run(target, Side::Service, concurrency, seconds).await;
    go.send_replace(true);
    let log = log_after(db, start).await;
    let head = log.keys().next_back().copied().unwrap_or(start);
    let caught_up = tokio::time::timeout(Duration::from_secs(60), async {
        while subscribers
            .iter()
            .any(|s| (count(&s.reached) as i64) < head)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if caught_up.is_err() {
        eprintln!("some subscribers did not reach sequence {head} within 60 s");
    }
    let answered: HashMap<&str, Instant> = with
        .completed
        .iter()
        .map(|(task, at)| (task.as_str(), *at))
        .collect();
    let (mut delivered, mut missing, mut duplicated) = (0, 0, 0);
    let mut latencies = Vec::new();
    for subscriber in &subscribers {
        subscriber.reader.abort();
        let received = subscriber.received.lock().unwrap();
        let concerns = |event: &LogEvent| {
            subscriber.descendants
                || event.source == subscriber.instance
                || event.target == subscriber.instance
        };
        let expected: HashSet<i64> = log
            .iter()
            .filter(|(_, event)| concerns(event))
            .map(|(sequence, _)| *sequence)
            .collect();
        let got: HashSet<i64> = received.iter().map(|(sequence, _)| *sequence).collect();
        delivered += received.len() as u64;
        duplicated += (received.len() - got.len()) as u64;
        missing += expected.difference(&got).count() as u64;
        // The leaf hop's own completion: written by the CompleteDelegation that was timed.
        for (sequence, at) in received.iter().filter(|_| !subscriber.stalled) {
            let Some(event) = log.get(sequence) else {
                continue;
            };
            if event.kind == hopper_delegation::domain::EventKind::DelegationCompleted
                && event.target.starts_with("leaf-")
                && let Some(answered) = answered.get(event.task_id.as_str())
            {
                latencies.push(at.saturating_duration_since(*answered).as_secs_f64() * 1e3);
            }
        }
    }
    let (delivery_p50_ms, delivery_p99_ms) = p50_p99(&mut latencies);
    drop(subscribers);
    tokio::time::sleep(Duration::from_millis(500)).await; // the server closes them
    FanoutRun {
        scenario,
        subscribers: n as usize,
        per_connection,
        open_seconds,
        server_heap_per_subscriber,
        resident_per_subscriber,
        delivered,
        missing,
        duplicated,
        delivery_p50_ms,
        delivery_p99_ms,
        server_cpu_us_per_delivery: 0.0,
        with,
    }
}

/// The whole `--fanout` benchmark on one backend.
pub(crate) async fn bench(backend: Backend, args: &Args) -> anyhow::Result<()> {
    let limit = raise_open_file_limit();
    // Two descriptors per subscriber here (both ends), and some to spare.
    let per_connection = (10_010_usize * 2).div_ceil((limit.saturating_sub(2_000) as usize).max(1));
    let test_db = TestDb::migrated(backend).await;
    let db = test_db.pool();
    let (addr, server_runtime) = start_server(test_db.url.clone(), args.server_threads);
    let leaves: Arc<[String]> = (0..LEAVES).map(leaf).collect::<Vec<_>>().into();
    register_hierarchy(addr, &leaves).await;
    let target = Target {
        backend,
        addr,
        links: tokio::sync::Mutex::new(Vec::new()),
        leaves,
    };
    let concurrency = args.fanout_clients;
    run(&target, Side::Service, 4, 1.0).await; // warm-up
    let mut without = Vec::new();
    let mut with = Vec::new();
    for scenario in [
        Scenario::Leaves,
        Scenario::LeavesAndStalled,
        Scenario::EveryEvent,
    ] {
        for round in 0..args.runs {
            // none, with; then with, none: each side goes first as often as last.
            for with_subscribers_now in [round % 2 == 1, round % 2 == 0] {
                if with_subscribers_now {
                    let measured = with_subscribers(
                        &target,
                        &db,
                        scenario,
                        per_connection,
                        concurrency,
                        args.seconds,
                    )
                    .await;
                    eprintln!(
                        "{backend:?} {}: {:.1} lifecycles/s, p99 {:.1} ms, missing {}, duplicated {}",
                        scenario.label(),
                        measured.with.per_second,
                        measured.delivery_p99_ms,
                        measured.missing,
                        measured.duplicated
                    );
                    with.push(measured);
                } else {
                    let measured = run(&target, Side::Service, concurrency, args.seconds).await;
                    eprintln!(
                        "{backend:?} no subscribers: {:.1} lifecycles/s",
                        measured.per_second
                    );
                    without.push((scenario, measured));
                }
            }
        }
    }
    server_runtime.shutdown_background();
    report(backend, args, concurrency, &without, &mut with)
}

fn report(
    backend: Backend,
    args: &Args,
    concurrency: usize,
    without: &[(Scenario, Run)],
    with: &mut [FanoutRun],
) -> anyhow::Result<()> {
    let mut md = String::new();
    writeln!(
        md,
        "### Fan-out on {backend:?}: {concurrency} clients, lifecycles over {LEAVES} leaves, \
         {} s runs\n",
        args.seconds
    )?;
    writeln!(
        md,
        "| subscribers | lifecycles/s with / without (ratio) | delivery p50 / p99 ms | \
         missing / duplicated | delivered | server µs per delivery | statements per lifecycle \
         with / without | open s | server heap / RSS per subscriber KiB |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
    for run in with.iter_mut() {
        let label = run.scenario.label();
        let base: Vec<&Run> = without
            .iter()
            .filter(|(s, _)| s.label() == label)
            .map(|(_, r)| r)
            .collect();
        let base_rate = median(base.iter().map(|r| r.per_second).collect());
        let base_cpu = median(base.iter().map(|r| r.server_cpu_us_per_lifecycle).collect());
        let base_statements = median(base.iter().map(|r| r.statements_per_lifecycle).collect());
        let extra_cpu =
            (run.with.server_cpu_us_per_lifecycle - base_cpu) * run.with.lifecycles as f64;
        run.server_cpu_us_per_delivery = extra_cpu / run.delivered.max(1) as f64;
        writeln!(
            md,
            "| {label}{} | {:.1} / {:.1} ({:.2}) | {:.1} / {:.1} | {} / {} | {} | {:.1} | {:.1} / {:.1} | {:.1} | {:.1} / {:.1} |",
            if run.per_connection > 1 {
                format!(" ({} per connection)", run.per_connection)
            } else {
                String::new()
            },
            run.with.per_second,
            base_rate,
            run.with.per_second / base_rate,
            run.delivery_p50_ms,
            run.delivery_p99_ms,
            run.missing,
            run.duplicated,
            run.delivered,
            run.server_cpu_us_per_delivery,
            run.with.statements_per_lifecycle,
            base_statements,
            run.open_seconds,
            run.server_heap_per_subscriber / 1024.0,
            run.resident_per_subscriber / 1024.0,
        )?;
    }
    println!("{md}");
    std::fs::create_dir_all(&args.out)?;
    let name = format!("fanout-{}", format!("{backend:?}").to_lowercase());
    std::fs::write(args.out.join(format!("{name}.md")), &md)?;
    let without: Vec<&Run> = without.iter().map(|(_, r)| r).collect();
    let json = serde_json::json!({ "with": with, "without": without });
    std::fs::write(
        args.out.join(format!("{name}.json")),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}
