//! What the event log costs writers, as ratios measured in one run (the machine is shared and
//! noisy, so absolute figures mean little):
//!
//! 1. PostgreSQL: eight concurrent writers whose events go through the sequencer vs. numbered
//!    at insert with no ordering at all (the hole `tests/event_ordering.rs` shows).
//! 2. Both backends: eight concurrent writers while a subscriber's stream is open but never
//!    read, vs. with no subscriber.
//!
//! Run with `cargo bench --bench events` (PostgreSQL as for the tests).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Backend, TestServer, hierarchy, hop, postgres_available, task};
use hopper_delegation::{
    auth::Caller, domain::DelegationType, proto as pb, repository::delegations, store::Db,
};

const WRITERS: usize = 8;
const ROUNDS: usize = 100;
/// Runs per variant, alternating which goes first (the tables grow as runs go on).
const REPEATS: usize = 4;

/// Eight writers, each making ROUNDS create+reject transitions (two events) on its own task.
async fn write(db: &Db, run: usize) -> Duration {
    for w in 0..WRITERS {
        task(db, &format!("r{run}-w{w}"), "global").await;
    }
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let db = db.clone();
            tokio::spawn(async move {
                let task_id = format!("r{run}-w{w}");
                for _ in 0..ROUNDS {
                    let hop = hop(&task_id, "global", "project", DelegationType::Route);
                    let d = delegations::create(&db, &Caller::Admin, hop).await.unwrap();
                    delegations::reject(&db, &Caller::Admin, &d.id, "again")
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    started.elapsed()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

async fn sequencer_cost() {
    let server = TestServer::start(Backend::Postgres).await;
    let db = server.db.pool();
    hierarchy(&db).await;
    let at_insert = db.clone().numbering_at_insert();
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for run in 0..2 * REPEATS {
        let sequenced = (run % 4 == 0) || (run % 4 == 3);
        let took = write(if sequenced { &db } else { &at_insert }, run).await;
        if sequenced {
            with.push(took)
        } else {
            without.push(took)
        }
    }
    let (with, without) = (median(with), median(without));
    println!(
        "postgres: {} transitions by {WRITERS} writers: through the sequencer {with:?}, numbered at insert {without:?}: ratio {:.2}",
        WRITERS * ROUNDS * 2,
        with.as_secs_f64() / without.as_secs_f64()
    );
    server.stop().await;
}

async fn stalled_subscriber_cost(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let db = server.db.pool();
    hierarchy(&db).await;
    let (mut alone, mut stalled) = (Vec::new(), Vec::new());
    for run in 0..2 * REPEATS {
        if (run % 4 == 0) || (run % 4 == 3) {
            alone.push(write(&db, run).await);
            continue;
        }
        let request = pb::WatchEventsRequest {
            instance_id: "global".into(),
            include_descendants: true,
            ..Default::default()
        };
        // Opened and never read while the writers run.
        let stream = server
            .delegations
            .watch_events(request)
            .await
            .unwrap()
            .into_inner();
        stalled.push(write(&db, run).await);
        drop(stream);
    }
    let (alone, stalled) = (median(alone), median(stalled));
    println!(
        "{backend:?}: {} transitions by {WRITERS} writers: with a stalled subscriber {stalled:?}, with none {alone:?}: ratio {:.2}",
        WRITERS * ROUNDS * 2,
        stalled.as_secs_f64() / alone.as_secs_f64()
    );
    server.stop().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    stalled_subscriber_cost(Backend::Sqlite).await;
    if postgres_available().await {
        stalled_subscriber_cost(Backend::Postgres).await;
        sequencer_cost().await;
    }
}
