//! How long one query takes to read a chain of 1,000 hops and a tree of 10,001 tasks, on each
//! backend (median of 7 reads, one run; the machine is shared, so read them as orders of
//! magnitude and as ratios between backends).
//!
//! Run with `cargo bench --bench trees` (PostgreSQL as for the tests).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Backend, TestDb, bulk_subtasks, hierarchy, hop, postgres_available, task};
use hopper_delegation::{
    auth::Caller,
    domain::DelegationType,
    repository::{delegations, tasks},
    store::Db,
};

async fn median_of<F, Fut>(mut read: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut samples = Vec::new();
    for _ in 0..7 {
        let started = Instant::now();
        read().await;
        samples.push(started.elapsed());
    }
    samples.sort();
    samples[samples.len() / 2]
}

async fn measure(backend: Backend) {
    let test_db = TestDb::migrated(backend).await;
    let db: Db = test_db.pool();
    hierarchy(&db).await;
    task(&db, "deep", "global").await;
    for i in 0..1000 {
        let (source, target, kind) = if i % 2 == 0 {
            ("global", "project", DelegationType::Route)
        } else {
            ("project", "global", DelegationType::Escalate)
        };
        let d = delegations::create(&db, &Caller::Admin, hop("deep", source, target, kind))
            .await
            .unwrap();
        delegations::accept(&db, &Caller::Admin, &d.id)
            .await
            .unwrap();
    }
    let chain = median_of(|| async {
        assert_eq!(
            delegations::chain(&db, &Caller::Admin, "deep")
                .await
                .unwrap()
                .delegations
                .len(),
            1000
        );
    })
    .await;

    task(&db, "wide", "global").await;
    bulk_subtasks(&db, "wide", 100, 99).await;
    let tree = median_of(|| async {
        assert_eq!(
            tasks::tree(&db, &Caller::Admin, "wide")
                .await
                .unwrap()
                .tasks
                .len(),
            1 + 100 + 100 * 99
        );
    })
    .await;
    println!(
        "{backend:?}: chain of 1,000 hops read in {chain:?}; tree of 10,001 tasks read in {tree:?}"
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    measure(Backend::Sqlite).await;
    if postgres_available().await {
        measure(Backend::Postgres).await;
    }
}
