//! The expiry benchmark: what deadlines and leases cost the service, and how promptly they fire.
//!
//! - **Writers do not pay for deadlines.** Lifecycles per second with 100,000 open hops whose
//!   deadlines are a day away, against the same open hops without deadlines (with
//!   `--lifecycle-deadlines`, every lifecycle hop of the first side carries deadlines too): two
//!   servers on two databases, runs alternated A B A B.
//! - **An expiry storm.** 10,000 hops due in the same second: how long until the last expired,
//!   whether a subscriber received all 10,000 `delegation_expired` events in order, each once,
//!   and the lifecycle rate during the storm against the rate just before it.
//! - **Expiry lag** under the lifecycle load: hops with a 1 s accept deadline created at a
//!   steady rate and never answered; lag = `expired_at - accept_by` (the database's clock).
//! - **Leases.** 1,000 instances renewing a 30 s lease every 10 s beside the lifecycles,
//!   against the lifecycles alone, alternated.
//!
//! ```sh
//! cargo bench --bench expiry                                  # both backends
//! cargo bench --bench expiry -- --backend sqlite --seconds 4 --runs 2
//! ```
//!
//! One lifecycle is CreateTask, CreateDelegation global → project, accept, project → orch,
//! accept, CompleteDelegation (bubbling), as in `benches/lifecycle.rs`, by 8 clients.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use common::{Backend, TestDb, TestServer, execute, postgres_available, rpc};
use hopper_delegation::{
    proto::{self as pb, watch_events_response::Payload},
    server::Config,
};

#[derive(Parser)]
struct Args {
    /// `postgres`, `sqlite` or `both`.
    #[arg(long, default_value = "both")]
    backend: String,
    /// Length of one lifecycle run.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Runs per side, alternated.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Open hops in the database for the deadline comparison.
    #[arg(long, default_value_t = 100_000)]
    open_hops: usize,
    /// Hops in the storm.
    #[arg(long, default_value_t = 10_000)]
    storm: usize,
    /// In the writers comparison, give every lifecycle hop on the deadlines side an hour's
    /// deadlines too (by default only the open hops differ).
    #[arg(long)]
    lifecycle_deadlines: bool,
    /// Which parts to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "writers,storm,lag,leases"
    )]
    parts: Vec<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const CLIENTS: usize = 8;

fn hour() -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    })
}

/// Global → project → orch, and `parked` under global for hops nobody answers.
async fn tree(server: &mut TestServer) {
    server.hierarchy().await;
    server
        .register("parked", pb::Scope::Project, "global")
        .await;
}

/// Every `delegation_expired` event below Global from now on.
async fn expiries(server: &mut TestServer) -> tonic::Streaming<pb::WatchEventsResponse> {
    let request = pb::WatchEventsRequest {
        kinds: vec![pb::EventKind::DelegationExpired as i32],
        ..rpc::watch("global", true)
    };
    server
        .delegations
        .watch_events(request)
        .await
        .unwrap()
        .into_inner()
}

/// One lifecycle; with `deadlines`, both hops carry an hour's deadlines.
async fn lifecycle(server: &TestServer, deadlines: bool) {
    let (mut t, mut d) = (server.tasks.clone(), server.delegations.clone());
    let create = pb::CreateTaskRequest {
        title: "bench".into(),
        instance_id: "global".into(),
        ..Default::default()
    };
    let task = t
        .create_task(create)
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let mut last = String::new();
    for (from, to) in [("global", "project"), ("project", "orch")] {
        let mut request = rpc::route(&task.id, from, to);
        if deadlines {
            (request.accept_within, request.complete_within) = (hour(), hour());
        }
        let hop = d.create_delegation(request).await.unwrap();
        last = hop.into_inner().delegation.unwrap().id;
        let accept = pb::AcceptDelegationRequest { id: last.clone() };
        d.accept_delegation(accept).await.unwrap();
    }
    d.complete_delegation(rpc::complete(&last)).await.unwrap();
}

/// Lifecycles per second by [`CLIENTS`] clients for `seconds`.
async fn rate(server: &TestServer, deadlines: bool, seconds: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let clients = (0..CLIENTS).map(|_| {
        let done = done.clone();
        async move {
            while Instant::now() < until {
                lifecycle(server, deadlines).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let start = Instant::now();
    futures::future::join_all(clients).await;
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Inserts `n` open hops global → `target` (their tasks at the target) in two statements,
/// with `accept_by` and `complete_by` `due` from now (an SQL interval / SQLite modifier).
async fn open_hops(db: &TestDb, backend: Backend, n: usize, target: &str, due: Option<&str>) {
    let mut conn = db.pool().conn().await.unwrap();
    let (rows, now, at) = match backend {
        Backend::Postgres => (
            format!("generate_series(1, {n}) AS g (n)"),
            "CAST(statement_timestamp() AT TIME ZONE 'UTC' AS TIMESTAMP)".to_owned(),
            due.map(|due| {
                format!(
                    "CAST(statement_timestamp() AT TIME ZONE 'UTC' AS TIMESTAMP) + INTERVAL '{due}'"
                )
            }),
        ),
        Backend::Sqlite => (
            "g".to_owned(),
            "strftime('%Y-%m-%d %H:%M:%f', 'now')".to_owned(),
            due.map(|due| format!("strftime('%Y-%m-%d %H:%M:%f', 'now', '+{due}')")),
        ),
    };
    let with = match backend {
        Backend::Postgres => String::new(),
        Backend::Sqlite => format!(
            "WITH RECURSIVE g (n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {n}) "
        ),
    };
    let at = at.unwrap_or_else(|| "NULL".into());
    let prefix = format!("{target}-{}", uuid::Uuid::new_v4().simple());
    execute(
        &mut conn,
        &format!(
            "{with}INSERT INTO tasks (id, title, description, instance_id, status, created_at,
                 updated_at)
             SELECT '{prefix}-' || n, 'open', '', '{target}', 'pending', {now}, {now} FROM {rows}"
        ),
    )
    .await;
    execute(
        &mut conn,
        &format!(
            "{with}INSERT INTO task_delegations (id, task_id, source_instance_id,
                 target_instance_id, delegation_type, status, delegated_at, created_at,
                 updated_at, accept_by, complete_by)
             SELECT '{prefix}-d' || n, '{prefix}-' || n, 'global', '{target}', 'route', 'pending',
                 {now}, {now}, {now}, {at}, {at} FROM {rows}"
        ),
    )
    .await;
}

async fn writers(backend: Backend, args: &Args) {
    let (with, without) = (
        TestDb::migrated(backend).await,
        TestDb::migrated(backend).await,
    );
    let mut a = TestServer::start_with(TestDb::borrowed(&with), Config::default()).await;
    let mut b = TestServer::start_with(TestDb::borrowed(&without), Config::default()).await;
    tree(&mut a).await;
    tree(&mut b).await;
    open_hops(&with, backend, args.open_hops, "parked", Some("1 day")).await;
    open_hops(&without, backend, args.open_hops, "parked", None).await;
    let own = args.lifecycle_deadlines;
    rate(&a, own, 1.0).await;
    rate(&b, false, 1.0).await;
    let (mut rates_with, mut rates_without) = (Vec::new(), Vec::new());
    for round in 0..args.runs {
        for side in if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            let r = if side {
                rate(&a, own, args.seconds).await
            } else {
                rate(&b, false, args.seconds).await
            };
            eprintln!("{backend:?} deadlines={side} {r:.1} lifecycles/s");
            if side {
                rates_with.push(r)
            } else {
                rates_without.push(r)
            }
        }
    }
    let (w, wo) = (median(rates_with), median(rates_without));
    println!(
        "{backend:?} | writers, {} open hops{} | with deadlines {w:.1}/s | without {wo:.1}/s \
         | ratio {:.3}",
        args.open_hops,
        if own {
            ", lifecycle hops with deadlines too"
        } else {
            ""
        },
        w / wo
    );
    a.stop().await;
    b.stop().await;
}

async fn storm(backend: Backend, args: &Args) {
    let db = TestDb::migrated(backend).await;
    let mut server = TestServer::start_with(TestDb::borrowed(&db), Config::default()).await;
    tree(&mut server).await;
    let before = rate(&server, false, args.seconds).await;
    let mut stream = expiries(&mut server).await;
    // Due in the same second, a little after the insert.
    open_hops(&db, backend, args.storm, "parked", Some("3 seconds")).await;
    let inserted = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let server = &server;
        async move {
            let mut rates = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                rates.push(rate(server, false, 1.0).await);
            }
            rates
        }
    };
    let receive = async {
        let (mut seen, mut last, mut in_order) = (HashSet::new(), 0, true);
        while seen.len() < args.storm {
            let message = stream.message().await.unwrap().unwrap();
            if let Some(Payload::Event(event)) = message.payload {
                in_order &= event.sequence > last;
                last = event.sequence;
                assert!(seen.insert(event.delegation.unwrap().id), "an expiry twice");
            }
        }
        stop.store(true, Ordering::Relaxed);
        (inserted.elapsed(), in_order)
    };
    let (rates, (took, in_order)) = tokio::join!(load, receive);
    let during = median(rates);
    println!(
        "{backend:?} | storm of {} due at +3 s | all expired and received after {:.2} s \
         (so {:.2} s after due) | in order, each once: {in_order} | lifecycles {during:.1}/s \
         during, {before:.1}/s before, ratio {:.2}",
        args.storm,
        took.as_secs_f64(),
        took.as_secs_f64() - 3.0,
        during / before
    );
    server.stop().await;
}

async fn lag(backend: Backend, args: &Args) {
    let mut server = TestServer::start(backend).await;
    tree(&mut server).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut stream = expiries(&mut server).await;
    let n = (args.seconds * 50.0) as usize;
    let parked = {
        let server = &server;
        async move {
            for i in 0..n {
                let task = format!("lag-{i}");
                let mut t = server.tasks.clone();
                t.create_task(rpc::new_task(&task, "global")).await.unwrap();
                let request = pb::CreateDelegationRequest {
                    accept_within: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    ..rpc::route(&task, "global", "parked")
                };
                server
                    .delegations
                    .clone()
                    .create_delegation(request)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let load = {
        let stop = stop.clone();
        let server = &server;
        async move {
            while !stop.load(Ordering::Relaxed) {
                rate(server, false, 0.5).await;
            }
        }
    };
    let receive = async {
        let mut lags = Vec::new();
        while lags.len() < n {
            let message = stream.message().await.unwrap().unwrap();
            if let Some(Payload::Event(event)) = message.payload {
                let d = event.delegation.unwrap();
                let at = |t: Option<prost_types::Timestamp>| {
                    let t = t.unwrap();
                    t.seconds as f64 + f64::from(t.nanos) / 1e9
                };
                lags.push(at(d.expired_at) - at(d.accept_by));
            }
        }
        stop.store(true, Ordering::Relaxed);
        lags
    };
    let ((), (), mut lags) = tokio::join!(parked, load, receive);
    lags.sort_by(f64::total_cmp);
    let p = |q: f64| lags[((lags.len() - 1) as f64 * q).round() as usize] * 1000.0;
    println!(
        "{backend:?} | expiry lag of {n} hops under {CLIENTS} lifecycle clients | p50 {:.0} ms | \
         p99 {:.0} ms | max {:.0} ms",
        p(0.5),
        p(0.99),
        p(1.0)
    );
    server.stop().await;
}

async fn leases(backend: Backend, args: &Args) {
    let mut server = TestServer::start(backend).await;
    tree(&mut server).await;
    let instances = 1000;
    for i in 0..instances {
        let request = pb::RegisterInstanceRequest {
            lease: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            ..rpc::register(&format!("leased-{i}"), pb::Scope::Personal, "global")
        };
        server.instances.register_instance(request).await.unwrap();
    }
    let renewing = Arc::new(AtomicBool::new(false));
    let renewals = Arc::new(AtomicU64::new(0));
    // 1,000 instances every 10 s: one renewal every 10 ms, spread evenly.
    let renewer = {
        let (renewing, renewals) = (renewing.clone(), renewals.clone());
        let mut client = server.instances.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for i in (0..instances).cycle() {
                tick.tick().await;
                if renewing.load(Ordering::Relaxed) {
                    let request = pb::RenewInstanceLeaseRequest {
                        instance_id: format!("leased-{i}"),
                    };
                    client.renew_instance_lease(request).await.unwrap();
                    renewals.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    rate(&server, false, 1.0).await;
    let (mut alone, mut beside) = (Vec::new(), Vec::new());
    for round in 0..args.runs {
        for side in if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            renewing.store(side, Ordering::Relaxed);
            let r = rate(&server, false, args.seconds).await;
            eprintln!("{backend:?} renewals={side} {r:.1} lifecycles/s");
            if side { beside.push(r) } else { alone.push(r) }
        }
    }
    renewing.store(false, Ordering::Relaxed);
    renewer.abort();
    let (b, a) = (median(beside), median(alone));
    println!(
        "{backend:?} | 1,000 leases renewed every 10 s ({} renewals) | lifecycles {b:.1}/s \
         beside, {a:.1}/s alone, ratio {:.3}",
        renewals.load(Ordering::Relaxed),
        b / a
    );
    server.stop().await;
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    let mut backends = Vec::new();
    if args.backend != "postgres" {
        backends.push(Backend::Sqlite);
    }
    if args.backend != "sqlite" && postgres_available().await {
        backends.push(Backend::Postgres);
    }
    let part = |name: &str| args.parts.iter().any(|p| p == name);
    for backend in backends {
        if part("writers") {
            writers(backend, &args).await;
        }
        if part("storm") {
            storm(backend, &args).await;
        }
        if part("lag") {
            lag(backend, &args).await;
        }
        if part("leases") {
            leases(backend, &args).await;
        }
    }
}
