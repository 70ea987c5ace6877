//! Delegation trees on both backends: fan-out with aggregate completion, local completion,
//! rejection and re-delegation, cancellation reaching every level, races on the last subtask,
//! and deep and wide trees read in one query.

mod common;

use common::{
    Backend, TestDb, TestServer, accepted_route, delegate, hierarchy, hop, instance, new_subtask,
    race, subtask, task,
};
use hopper_delegation::{
    auth::Caller,
    domain::{DelegationStatus, DelegationType, EventKind, Scope, TaskStatus},
    error::Error,
    proto as pb,
    repository::{
        PageRequest,
        delegations::{self, Completion},
        tasks,
    },
    store::{
        Db,
        delegations::Delegation,
        event_log::{self, Event},
    },
};
use serde_json::json;

use DelegationType::{Decompose, Escalate, Route};

async fn decompose(db: &Db, task: &str, source: &str, target: &str) -> Delegation {
    let d = delegations::create(db, &Caller::Admin, hop(task, source, target, Decompose))
        .await
        .expect("decompose");
    delegations::accept(db, &Caller::Admin, &d.id)
        .await
        .expect("accept")
}

/// The standard hierarchy plus orch-b under project and leaf under orch; task `t` at global,
/// routed to project.
async fn project_holds_t(backend: Backend) -> (TestDb, Db, Delegation) {
    let test_db = TestDb::migrated(backend).await;
    let db = test_db.pool();
    hierarchy(&db).await;
    instance(&db, "orch-b", Scope::Orchestration, Some("project")).await;
    instance(&db, "leaf", Scope::Orchestration, Some("orch")).await;
    task(&db, "t", "global").await;
    let to_project = accepted_route(&db, "t", "global", "project").await;
    (test_db, db, to_project)
}

async fn all_events(db: &Db) -> Vec<Event> {
    let scope = event_log::Watched {
        instance_id: "global".into(),
        include_descendants: true,
    };
    db.sequence_events().await.unwrap();
    event_log::read(&mut db.conn().await.unwrap(), Some(&scope), 0, i64::MAX)
        .await
        .unwrap()
}

fn status_of(task: &hopper_delegation::store::tasks::Task) -> TaskStatus {
    task.status
}

async fn the_last_subtask_completes_the_parent_and_the_chain_above(backend: Backend) {
    let (_guard, db, to_project) = project_holds_t(backend).await;
    for s in ["t.1", "t.2", "t.3"] {
        subtask(&db, s, "t").await;
    }
    let h1 = decompose(&db, "t.1", "project", "orch").await;
    let h2 = decompose(&db, "t.2", "project", "orch").await;
    let h3 = decompose(&db, "t.3", "project", "orch-b").await;
    assert_eq!(
        h1.parent_delegation_id.as_deref(),
        Some(to_project.id.as_str())
    );

    for (h, n) in [(&h1, 1), (&h2, 2)] {
        let done =
            delegations::complete(&db, &Caller::Admin, &h.id, Some(&json!({"part": n})), None)
                .await
                .unwrap();
        assert!(done.completed_ancestors.is_empty(), "part {n}");
        assert_eq!(done.task.status, TaskStatus::Done);
        assert_eq!(
            tasks::get(&db, &Caller::Admin, "t").await.unwrap().status,
            TaskStatus::Pending,
            "after part {n}"
        );
    }
    let Completion {
        completed_ancestors,
        task,
        ..
    } = delegations::complete(&db, &Caller::Admin, &h3.id, Some(&json!({"part": 3})), None)
        .await
        .unwrap();
    assert_eq!(task.id, "t.3");
    let ancestors: Vec<_> = completed_ancestors.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ancestors, [to_project.id.as_str()]);
    let aggregated =
        json!({"subtasks": {"t.1": {"part": 1}, "t.2": {"part": 2}, "t.3": {"part": 3}}});
    assert_eq!(completed_ancestors[0].result.as_ref(), Some(&aggregated));
    let parent = tasks::get(&db, &Caller::Admin, "t").await.unwrap();
    assert_eq!(
        (parent.status, parent.instance_id.as_str()),
        (TaskStatus::Done, "global")
    );
    assert_eq!(parent.result, Some(aggregated));

    // The events, in order, end with the last part, the aggregate and the task.
    let log: Vec<_> = all_events(&db)
        .await
        .into_iter()
        .map(|e| (e.kind, e.task_id, e.caused_by_delegation_id))
        .collect();
    let tail = &log[log.len() - 4..];
    assert_eq!(
        tail,
        [
            (EventKind::DelegationCompleted, "t.3".to_owned(), None),
            (
                EventKind::TaskCompleted,
                "t.3".to_owned(),
                Some(h3.id.clone())
            ),
            (
                EventKind::DelegationCompleted,
                "t".to_owned(),
                Some(h3.id.clone())
            ),
            (
                EventKind::TaskCompleted,
                "t".to_owned(),
                Some(to_project.id.clone())
            ),
        ]
    );
    let done_events = log
        .iter()
        .filter(|(kind, task, _)| *kind == EventKind::TaskCompleted && task == "t")
        .count();
    assert_eq!(done_events, 1);
}

async fn local_completion_rejection_and_cancellation_mix(backend: Backend) {
    let (_guard, db, to_project) = project_holds_t(backend).await;
    for s in ["local", "bounced", "dropped"] {
        subtask(&db, s, "t").await;
    }
    // Parent cannot complete while its subtasks are open.
    let open = tasks::complete(&db, &Caller::Admin, "t", None)
        .await
        .unwrap_err();
    assert!(open.to_string().contains("has 3 open subtasks"), "{open}");

    let local = tasks::complete(&db, &Caller::Admin, "local", Some(&json!({"by": "hand"})))
        .await
        .unwrap();
    assert_eq!(
        (local.task.status, local.task.instance_id.as_str()),
        (TaskStatus::Done, "project")
    );
    assert!(local.completed_delegations.is_empty());

    let first = delegate(&db, "bounced", "project", "orch", Decompose).await;
    let in_transit = tasks::complete(&db, &Caller::Admin, "bounced", None)
        .await
        .unwrap_err();
    assert!(
        in_transit.to_string().contains("is on its way"),
        "{in_transit}"
    );
    delegations::reject(&db, &Caller::Admin, &first.id, "orch is busy")
        .await
        .unwrap();
    assert_eq!(
        tasks::get(&db, &Caller::Admin, "bounced")
            .await
            .unwrap()
            .instance_id,
        "project"
    );
    let again = decompose(&db, "bounced", "project", "orch-b").await;

    let dropped = tasks::cancel(&db, &Caller::Admin, "dropped").await.unwrap();
    assert_eq!(dropped.task.status, TaskStatus::Cancelled);
    assert_eq!(
        tasks::get(&db, &Caller::Admin, "t").await.unwrap().status,
        TaskStatus::Pending
    );
    assert!(
        tasks::cancel(&db, &Caller::Admin, "dropped").await.is_err(),
        "cancelled twice"
    );

    // The task at orch-b completes where it is: its delegation completes and bubbles.
    let done = tasks::complete(
        &db,
        &Caller::Admin,
        "bounced",
        Some(&json!({"by": "orch-b"})),
    )
    .await
    .unwrap();
    let completed: Vec<_> = done
        .completed_delegations
        .iter()
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(completed, [again.id.as_str(), to_project.id.as_str()]);
    let parent = tasks::get(&db, &Caller::Admin, "t").await.unwrap();
    assert_eq!(parent.status, TaskStatus::Done);
    assert_eq!(
        parent.result,
        Some(json!({"subtasks": {"local": {"by": "hand"}, "bounced": {"by": "orch-b"}}}))
    );
    assert!(
        tasks::complete(&db, &Caller::Admin, "t", None)
            .await
            .is_err(),
        "done already"
    );
}

async fn a_task_at_its_origin_completes_in_place(backend: Backend) {
    let test_db = TestDb::migrated(backend).await;
    let db = test_db.pool();
    hierarchy(&db).await;
    task(&db, "t", "global").await;
    subtask(&db, "t.1", "t").await;
    let done = tasks::complete(&db, &Caller::Admin, "t.1", Some(&json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(done.task.status, TaskStatus::Done);
    // The last subtask finished the parent in place, at its origin, with no delegation.
    let parent = tasks::get(&db, &Caller::Admin, "t").await.unwrap();
    assert_eq!(
        (parent.status, parent.instance_id.as_str()),
        (TaskStatus::Done, "global")
    );
    let log = all_events(&db).await;
    let kinds: Vec<_> = log
        .iter()
        .map(|e| (e.kind, e.task_id.as_str(), e.delegation_id.is_none()))
        .collect();
    assert_eq!(
        kinds,
        [
            (EventKind::TaskCompleted, "t.1", true),
            (EventKind::TaskCompleted, "t", true)
        ]
    );
    assert!(matches!(
        tasks::complete(&db, &Caller::Admin, "ghost", None).await,
        Err(Error::NotFound { .. })
    ));
}

async fn an_escalation_completes_the_chain_above_it(backend: Backend) {
    let (_guard, db, to_project) = project_holds_t(backend).await;
    let to_orch = accepted_route(&db, "t", "project", "orch").await;
    let up = delegate(&db, "t", "orch", "project", Escalate).await;
    delegations::accept(&db, &Caller::Admin, &up.id)
        .await
        .unwrap();
    let done = tasks::complete(
        &db,
        &Caller::Admin,
        "t",
        Some(&json!({"fixed": "at project"})),
    )
    .await
    .unwrap();
    let completed: Vec<_> = done
        .completed_delegations
        .iter()
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(
        completed,
        [up.id.as_str(), to_orch.id.as_str(), to_project.id.as_str()]
    );
    assert_eq!(
        (done.task.status, done.task.instance_id.as_str()),
        (TaskStatus::Done, "global")
    );
}

async fn cancelling_at_global_stops_everything_below(backend: Backend) {
    let (_guard, db, to_project) = project_holds_t(backend).await;
    subtask(&db, "t.1", "t").await;
    subtask(&db, "t.2", "t").await;
    let h1 = decompose(&db, "t.1", "project", "orch").await;
    subtask(&db, "t.1.a", "t.1").await;
    let deep = delegate(&db, "t.1.a", "orch", "leaf", Decompose).await;
    assert_eq!(deep.parent_delegation_id.as_deref(), Some(h1.id.as_str()));

    let cancelled = delegations::cancel(&db, &Caller::Admin, &to_project.id)
        .await
        .unwrap();
    let mut hops: Vec<_> = cancelled
        .cancelled_descendants
        .iter()
        .map(|d| d.id.clone())
        .collect();
    hops.sort();
    let mut expected = vec![h1.id.clone(), deep.id.clone()];
    expected.sort();
    assert_eq!(hops, expected);
    assert!(
        cancelled
            .cancelled_subtasks
            .iter()
            .all(|t| status_of(t) == TaskStatus::Cancelled)
    );
    let mut subtasks: Vec<_> = cancelled
        .cancelled_subtasks
        .iter()
        .map(|t| t.id.clone())
        .collect();
    subtasks.sort();
    assert_eq!(subtasks, ["t.1", "t.1.a", "t.2"]);
    assert_eq!(cancelled.task.instance_id, "global");
    // One event per cancelled delegation, each naming the cancellation that caused it.
    let log = all_events(&db).await;
    let causes: Vec<_> = log
        .iter()
        .filter(|e| e.kind == EventKind::DelegationCancelled)
        .map(|e| e.caused_by_delegation_id.clone())
        .collect();
    assert_eq!(
        causes,
        [
            None,
            Some(to_project.id.clone()),
            Some(to_project.id.clone())
        ]
    );
    // Nothing below can move any more.
    for outcome in [
        delegations::accept(&db, &Caller::Admin, &deep.id)
            .await
            .map(drop),
        delegations::complete(&db, &Caller::Admin, &h1.id, None, None)
            .await
            .map(drop),
        tasks::complete(&db, &Caller::Admin, "t.2", None)
            .await
            .map(drop),
    ] {
        assert!(
            matches!(outcome, Err(Error::FailedPrecondition(_))),
            "{outcome:?}"
        );
    }
    assert!(
        delegations::create(
            &db,
            &Caller::Admin,
            hop("t.2", "project", "orch", Decompose)
        )
        .await
        .is_err()
    );
}

async fn cancelling_a_task_cancels_its_chain_and_subtasks(backend: Backend) {
    let (_guard, db, to_project) = project_holds_t(backend).await;
    let to_orch = accepted_route(&db, "t", "project", "orch").await;
    subtask(&db, "t.1", "t").await;
    let h = delegate(&db, "t.1", "orch", "leaf", Decompose).await;
    let cancelled = tasks::cancel(&db, &Caller::Admin, "t").await.unwrap();
    assert_eq!(
        (cancelled.task.status, cancelled.task.instance_id.as_str()),
        (TaskStatus::Cancelled, "global")
    );
    let mut ids: Vec<_> = cancelled
        .cancelled_delegations
        .iter()
        .map(|d| d.id.clone())
        .collect();
    ids.sort();
    let mut expected = vec![to_project.id.clone(), to_orch.id.clone(), h.id.clone()];
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(cancelled.cancelled_subtasks.len(), 1);
    assert!(
        cancelled
            .cancelled_delegations
            .iter()
            .all(|d| d.status == DelegationStatus::Cancelled)
    );
}

async fn a_task_with_open_subtasks_neither_moves_nor_completes_by_its_hop(backend: Backend) {
    let (_guard, db, to_project) = project_holds_t(backend).await;
    subtask(&db, "t.1", "t").await;
    let finish = delegations::complete(&db, &Caller::Admin, &to_project.id, None, None)
        .await
        .unwrap_err();
    assert!(
        finish.to_string().contains("task t has 1 open subtasks"),
        "{finish}"
    );
    let onward = delegations::create(&db, &Caller::Admin, hop("t", "project", "orch", Route))
        .await
        .unwrap_err();
    assert!(
        onward.to_string().contains("has 1 open subtasks"),
        "{onward}"
    );
    // Decompose starts a subtask's chain only; further down it is a route.
    let split = decompose(&db, "t.1", "project", "orch").await;
    let again = delegations::create(&db, &Caller::Admin, hop("t.1", "orch", "leaf", Decompose))
        .await
        .unwrap_err();
    assert!(again.to_string().contains("use route from here"), "{again}");
    let down = delegate(&db, "t.1", "orch", "leaf", Route).await;
    assert_eq!(
        down.parent_delegation_id.as_deref(),
        Some(split.id.as_str())
    );
    // No subtasks for a task on its way; a task on its way can still be cancelled.
    let in_transit = tasks::create(&db, &Caller::Admin, new_subtask("t.1.a", "t.1"))
        .await
        .unwrap_err();
    assert!(
        in_transit.to_string().contains("task t.1 is on its way"),
        "{in_transit}"
    );
    task(&db, "u", "global").await;
    let moving = delegate(&db, "u", "global", "project", Route).await;
    let cancelled = tasks::cancel(&db, &Caller::Admin, "u").await.unwrap();
    assert_eq!(cancelled.cancelled_delegations[0].id, moving.id);
    assert_eq!(cancelled.task.instance_id, "global");
}

async fn the_last_two_subtasks_racing_complete_the_parent_once(backend: Backend) {
    let (_guard, db, to_project) = project_holds_t(backend).await;
    subtask(&db, "t.1", "t").await;
    subtask(&db, "t.2", "t").await;
    let hops = [
        decompose(&db, "t.1", "project", "orch").await,
        decompose(&db, "t.2", "project", "orch-b").await,
    ];
    let outcomes = race(2, |i| {
        let (db, id) = (db.clone(), hops[i].id.clone());
        async move {
            delegations::complete(&db, &Caller::Admin, &id, Some(&json!({"i": i})), None).await
        }
    })
    .await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let bubbled: usize = outcomes
        .iter()
        .map(|o| o.as_ref().unwrap().completed_ancestors.len())
        .sum();
    assert_eq!(bubbled, 1, "exactly one completion carried the parent");
    let log = all_events(&db).await;
    let parent_done = log
        .iter()
        .filter(|e| e.kind == EventKind::TaskCompleted && e.task_id == "t")
        .count();
    let hop_done = log
        .iter()
        .filter(|e| {
            e.delegation_id.as_deref() == Some(to_project.id.as_str())
                && e.kind == EventKind::DelegationCompleted
        })
        .count();
    assert_eq!((parent_done, hop_done), (1, 1));
}

async fn a_chain_of_depth_1000_is_read_and_bubbled_whole(backend: Backend) {
    let test_db = TestDb::migrated(backend).await;
    let db = test_db.pool();
    hierarchy(&db).await;
    task(&db, "t", "global").await;
    let mut ids = Vec::new();
    for i in 0..1000 {
        let (source, target, kind) = if i % 2 == 0 {
            ("global", "project", Route)
        } else {
            ("project", "global", Escalate)
        };
        let d = delegate(&db, "t", source, target, kind).await;
        ids.push(
            delegations::accept(&db, &Caller::Admin, &d.id)
                .await
                .unwrap()
                .id,
        );
    }
    let chain = delegations::chain(&db, &Caller::Admin, "t").await.unwrap();
    let read: Vec<_> = chain.delegations.iter().map(|d| d.id.clone()).collect();
    assert_eq!(read, ids);
    let done = delegations::complete(
        &db,
        &Caller::Admin,
        ids.last().unwrap(),
        Some(&json!({"deep": true})),
        None,
    )
    .await
    .unwrap();
    assert_eq!(done.completed_ancestors.len(), 999);
    assert_eq!(
        (done.task.status, done.task.instance_id.as_str()),
        (TaskStatus::Done, "global")
    );
}

async fn a_tree_of_10000_tasks_is_read_in_one_query(backend: Backend) {
    let test_db = TestDb::migrated(backend).await;
    let db = test_db.pool();
    hierarchy(&db).await;
    task(&db, "root", "global").await;
    common::bulk_subtasks(&db, "root", 100, 99).await;
    let tree = tasks::tree(&db, &Caller::Admin, "root").await.unwrap();
    assert_eq!(tree.tasks.len(), 1 + 100 + 100 * 99);
    assert_eq!(tree.tasks[0].id, "root");
    assert!(
        tree.tasks[1..101]
            .iter()
            .all(|t| t.parent_task_id.as_deref() == Some("root"))
    );
    assert!(matches!(
        tasks::tree(&db, &Caller::Admin, "ghost").await,
        Err(Error::NotFound { .. })
    ));
}

async fn subtasks_and_trees_over_grpc(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let db = server.db.pool();
    hierarchy(&db).await;
    task(&db, "t", "global").await;
    let to_project = accepted_route(&db, "t", "global", "project").await;
    for s in ["t.1", "t.2"] {
        subtask(&db, s, "t").await;
    }
    decompose(&db, "t.1", "project", "orch").await;
    let page = server
        .tasks
        .list_subtasks(pb::ListSubtasksRequest {
            task_id: "t".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.subtasks[0].id, "t.1");
    let rest = server
        .tasks
        .list_subtasks(pb::ListSubtasksRequest {
            task_id: "t".into(),
            page_size: 1,
            page_token: page.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (rest.subtasks[0].id.as_str(), rest.next_page_token.as_str()),
        ("t.2", "")
    );

    let tree = server
        .delegations
        .get_delegation_tree(pb::GetDelegationTreeRequest {
            task_id: "t".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tree.task.unwrap().id, "t");
    assert_eq!(tree.subtasks.len(), 2);
    assert_eq!(tree.delegations.len(), 2);
    assert_eq!(tree.delegations[0].id, to_project.id);

    let cancelled = server
        .tasks
        .cancel_task(pb::CancelTaskRequest {
            task_id: "t.2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cancelled.task.unwrap().status,
        pb::TaskStatus::Cancelled as i32
    );
    let done = server
        .tasks
        .complete_task(pb::CompleteTaskRequest {
            task_id: "t.1".into(),
            result: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.task.unwrap().status, pb::TaskStatus::Done as i32);
    assert_eq!(done.completed_delegations.len(), 2);
    let missing = server
        .tasks
        .list_subtasks(pb::ListSubtasksRequest {
            task_id: "ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let paged = tasks::list_subtasks(
        &db,
        &Caller::Admin,
        "t",
        &PageRequest {
            size: 50,
            token: String::new(),
        },
    )
    .await
    .unwrap();
    assert_eq!(paged.items.len(), 2);
    server.stop().await;
}

on_both_backends!(
    the_last_subtask_completes_the_parent_and_the_chain_above,
    local_completion_rejection_and_cancellation_mix,
    a_task_at_its_origin_completes_in_place,
    an_escalation_completes_the_chain_above_it,
    cancelling_at_global_stops_everything_below,
    cancelling_a_task_cancels_its_chain_and_subtasks,
    a_task_with_open_subtasks_neither_moves_nor_completes_by_its_hop,
    the_last_two_subtasks_racing_complete_the_parent_once,
    a_chain_of_depth_1000_is_read_and_bubbled_whole,
    a_tree_of_10000_tasks_is_read_in_one_query,
    subtasks_and_trees_over_grpc
);
