//! The server killed with SIGKILL in the middle of a bubbling completion, on both backends:
//! afterwards either the whole bubbling happened or none of it did, and SQLite's file is intact.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use common::{Backend, TestDb, delegate, hierarchy, task, text_rows};
use hopper_delegation::{
    auth::Caller,
    domain::{DelegationStatus, DelegationType, EventKind, TaskStatus},
    proto as pb,
    repository::{PageRequest, delegations, tasks},
    store::{DatabaseUrl, event_log},
};

const HOPS: usize = 600;

/// Builds a chain of HOPS accepted hops for `task_id`; returns the last one.
async fn chain(db: &hopper_delegation::store::Db, task_id: &str) -> String {
    task(db, task_id, "global").await;
    let mut last = String::new();
    for i in 0..HOPS {
        let (source, target, kind) = if i % 2 == 0 {
            ("global", "project", DelegationType::Route)
        } else {
            ("project", "global", DelegationType::Escalate)
        };
        let d = delegate(db, task_id, source, target, kind).await;
        last = delegations::accept(db, &Caller::Admin, &d.id)
            .await
            .unwrap()
            .id;
    }
    last
}

/// Starts the server on `url`, asks it to complete `last`, kills it with SIGKILL after
/// `delay`; returns whether the client got an answer.
async fn complete_and_kill(url: &str, last: String, delay: Duration) -> bool {
    let mut server = Command::new(env!("CARGO_BIN_EXE_hopper-delegation"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", url])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = BufReader::new(server.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            line.split("address=")
                .nth(1)
                .map(|a| a.split_whitespace().next().unwrap().to_owned())
        })
        .unwrap();
    let endpoint = format!("http://{addr}");
    let mut client = pb::delegation_service_client::DelegationServiceClient::connect(endpoint)
        .await
        .unwrap();
    let completing = tokio::spawn(async move {
        let request = pb::CompleteDelegationRequest {
            id: last,
            result: None,
            notes: None,
        };
        client.complete_delegation(request).await
    });
    tokio::time::sleep(delay).await;
    server.kill().unwrap();
    server.wait().unwrap();
    completing.await.unwrap().is_ok()
}

async fn a_kill_mid_bubbling_leaves_all_or_nothing(backend: Backend) {
    let test_db = TestDb::migrated(backend).await;
    let db = test_db.pool();
    hierarchy(&db).await;
    let url = match &test_db.url {
        DatabaseUrl::Postgres(url) => url.clone(),
        DatabaseUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
    };
    let mut seen = Vec::new();
    // Kills earlier and later in the completion: before it starts, during it, after it.
    for (round, millis) in [5u64, 40, 80, 160, 320, 1000].into_iter().enumerate() {
        let task_id = format!("t{round}");
        let last = chain(&db, &task_id).await;
        let answered = complete_and_kill(&url, last, Duration::from_millis(millis)).await;

        let listing = delegations::Listing::OfTask(&task_id);
        let page = PageRequest {
            size: 1000,
            token: String::new(),
        };
        let all = delegations::list(&db, &Caller::Admin, listing, &page)
            .await
            .unwrap();
        let count = |status| all.items.iter().filter(|d| d.status == status).count();
        let (completed, accepted) = (
            count(DelegationStatus::Completed),
            count(DelegationStatus::Accepted),
        );
        let task = tasks::get(&db, &Caller::Admin, &task_id).await.unwrap();
        let scope = event_log::Watched {
            instance_id: "global".into(),
            include_descendants: true,
        };
        db.sequence_events().await.unwrap(); // whatever the killed server left queued
        let log = event_log::read(&mut db.conn().await.unwrap(), Some(&scope), 0, i64::MAX)
            .await
            .unwrap();
        let done_events = log
            .iter()
            .filter(|e| e.task_id == task_id)
            .filter(|e| {
                matches!(
                    e.kind,
                    EventKind::DelegationCompleted | EventKind::TaskCompleted
                )
            })
            .count();
        if completed == 0 {
            assert_eq!(
                (accepted, task.status, done_events),
                (HOPS, TaskStatus::Pending, 0),
                "{millis} ms"
            );
            assert!(!answered, "{millis} ms: answered but nothing was written");
        } else {
            assert_eq!(
                (completed, task.status, done_events),
                (HOPS, TaskStatus::Done, HOPS + 1),
                "{millis} ms"
            );
        }
        seen.push(format!(
            "{millis} ms: {}",
            if completed == 0 { "nothing" } else { "all" }
        ));
    }
    eprintln!("{backend:?}: SIGKILL after {}", seen.join(", "));
    if let DatabaseUrl::Sqlite(_) = &test_db.url {
        let check = text_rows(
            &mut db.conn().await.unwrap(),
            "SELECT integrity_check AS line FROM pragma_integrity_check",
        )
        .await;
        assert_eq!(check, ["ok"]);
    }
}

on_both_backends!(a_kill_mid_bubbling_leaves_all_or_nothing);
