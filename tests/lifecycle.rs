//! The repository operations and lifecycle rules, run on both backends with the same bodies.

mod common;

use common::{
    Backend, TestDb, accepted_route, delegate, hierarchy, hop, instance, race, snapshot, subtask,
    task,
};
use hopper_delegation::{
    auth::Caller,
    domain::{DelegationStatus, DelegationType, InstanceStatus, Scope, TaskStatus},
    error::Error,
    repository::{
        PageRequest,
        delegations::{self, Completion, Listing},
        instances::{self, NewInstance},
        tasks::{self, NewTask},
    },
    store::{Db, instances::Filter},
};
use serde_json::json;

use DelegationType::{Decompose, Escalate, Reassign, Route};

fn page(size: usize, token: &str) -> PageRequest {
    PageRequest {
        size,
        token: token.to_owned(),
    }
}

fn failed_precondition<T: std::fmt::Debug>(outcome: Result<T, Error>) -> String {
    match outcome {
        Err(Error::FailedPrecondition(message)) => message,
        other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
    }
}

/// A fresh migrated database with the standard hierarchy and task `t` at global.
async fn story(backend: Backend) -> (TestDb, Db) {
    let test_db = TestDb::migrated(backend).await;
    let db = test_db.pool();
    hierarchy(&db).await;
    task(&db, "t", "global").await;
    (test_db, db)
}

async fn a_completion_at_orchestration_reaches_global(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let to_project = accepted_route(&db, "t", "global", "project").await;
    assert_eq!(to_project.parent_delegation_id, None);
    let to_orch = accepted_route(&db, "t", "project", "orch").await;
    assert_eq!(
        to_orch.parent_delegation_id.as_deref(),
        Some(to_project.id.as_str())
    );
    assert_eq!(
        tasks::get(&db, &Caller::Admin, "t")
            .await
            .unwrap()
            .instance_id,
        "orch"
    );

    let result = json!({"artifact": "build-42", "tests": 118});
    let Completion {
        delegation,
        completed_ancestors,
        task,
    } = delegations::complete(
        &db,
        &Caller::Admin,
        &to_orch.id,
        Some(&result),
        Some("all green"),
    )
    .await
    .unwrap();
    assert_eq!(delegation.status, DelegationStatus::Completed);
    assert_eq!(delegation.result.as_ref(), Some(&result));
    assert_eq!(delegation.notes.as_deref(), Some("all green"));
    assert!(delegation.completed_at.is_some());
    assert_eq!(completed_ancestors.len(), 1);
    assert_eq!(completed_ancestors[0].id, to_project.id);
    assert_eq!(completed_ancestors[0].status, DelegationStatus::Completed);
    assert_eq!(completed_ancestors[0].result.as_ref(), Some(&result));
    assert_eq!(completed_ancestors[0].notes, None);
    assert_eq!(
        (task.status, task.instance_id.as_str()),
        (TaskStatus::Done, "global")
    );
    assert_eq!(task.result.as_ref(), Some(&result));
    assert_eq!(tasks::get(&db, &Caller::Admin, "t").await.unwrap(), task);

    let chain = delegations::chain(&db, &Caller::Admin, "t").await.unwrap();
    let hops: Vec<_> = chain.delegations.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(hops, [to_project.id.as_str(), to_orch.id.as_str()]);
    assert_eq!(
        (
            chain.origin_instance_id.as_str(),
            chain.current_instance_id.as_str()
        ),
        ("global", "global")
    );
    assert_eq!(
        delegations::get(&db, &Caller::Admin, &to_project.id)
            .await
            .unwrap(),
        completed_ancestors[0]
    );
}

async fn the_chain_follows_the_task_to_where_it_is_now(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let chain = delegations::chain(&db, &Caller::Admin, "t").await.unwrap();
    assert!(chain.delegations.is_empty());
    assert_eq!(
        (
            chain.origin_instance_id.as_str(),
            chain.current_instance_id.as_str()
        ),
        ("global", "global")
    );

    let to_project = accepted_route(&db, "t", "global", "project").await;
    let to_orch = delegate(&db, "t", "project", "orch", Route).await;
    let chain = delegations::chain(&db, &Caller::Admin, "t").await.unwrap();
    let statuses: Vec<_> = chain
        .delegations
        .iter()
        .map(|d| (d.id.clone(), d.status))
        .collect();
    assert_eq!(
        statuses,
        [
            (to_project.id.clone(), DelegationStatus::Accepted),
            (to_orch.id.clone(), DelegationStatus::Pending),
        ]
    );
    assert_eq!(
        (
            chain.origin_instance_id.as_str(),
            chain.current_instance_id.as_str()
        ),
        ("global", "orch")
    );

    delegations::reject(&db, &Caller::Admin, &to_orch.id, "no capacity")
        .await
        .unwrap();
    let chain = delegations::chain(&db, &Caller::Admin, "t").await.unwrap();
    assert_eq!(chain.delegations.len(), 1);
    assert_eq!(chain.current_instance_id, "project");
    assert!(matches!(
        delegations::chain(&db, &Caller::Admin, "nope").await,
        Err(Error::NotFound { entity: "task", .. })
    ));
}

async fn a_task_lists_every_delegation_oldest_first_with_rejections(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let first = delegate(&db, "t", "global", "project", Route).await;
    let rejected = delegations::reject(&db, &Caller::Admin, &first.id, "busy")
        .await
        .unwrap();
    assert_eq!(rejected.rejection_reason.as_deref(), Some("busy"));
    assert_eq!(
        tasks::get(&db, &Caller::Admin, "t")
            .await
            .unwrap()
            .instance_id,
        "global"
    );
    let second = accepted_route(&db, "t", "global", "project2").await;
    let third = delegate(&db, "t", "project2", "orch2", Route).await;

    let all = delegations::list(&db, &Caller::Admin, Listing::OfTask("t"), &page(50, ""))
        .await
        .unwrap();
    let ids: Vec<_> = all.items.iter().map(|d| d.id.clone()).collect();
    assert_eq!(ids, [first.id.clone(), second.id.clone(), third.id.clone()]);
    assert_eq!(all.next_page_token, "");

    let mut token = String::new();
    let mut walked = Vec::new();
    loop {
        let one = delegations::list(&db, &Caller::Admin, Listing::OfTask("t"), &page(1, &token))
            .await
            .unwrap();
        walked.extend(one.items.into_iter().map(|d| d.id));
        if one.next_page_token.is_empty() {
            break;
        }
        token = one.next_page_token;
    }
    assert_eq!(walked, ids);
    assert!(matches!(
        delegations::list(
            &db,
            &Caller::Admin,
            Listing::OfTask("t"),
            &page(1, "forged")
        )
        .await,
        Err(Error::InvalidArgument {
            field: "page_token",
            ..
        })
    ));
    assert!(matches!(
        delegations::list(&db, &Caller::Admin, Listing::OfTask("nope"), &page(1, "")).await,
        Err(Error::NotFound { .. })
    ));
}

async fn an_instance_lists_its_pending_delegations_a_page_at_a_time(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let mut expected = Vec::new();
    for i in 0..5 {
        let id = format!("job-{i}");
        task(&db, &id, "global").await;
        expected.push(delegate(&db, &id, "global", "project", Route).await.id);
    }
    task(&db, "elsewhere", "global").await;
    delegate(&db, "elsewhere", "global", "project2", Route).await;
    delegations::accept(&db, &Caller::Admin, &expected[4])
        .await
        .unwrap();
    expected.pop();

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let p = delegations::list(
            &db,
            &Caller::Admin,
            Listing::PendingFor("project"),
            &page(3, &token),
        )
        .await
        .unwrap();
        pages += 1;
        for d in &p.items {
            assert_eq!(d.status, DelegationStatus::Pending, "{}", d.id);
            assert_eq!(d.target_instance_id, "project", "{}", d.id);
        }
        seen.extend(p.items.into_iter().map(|d| d.id));
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    assert_eq!((seen, pages), (expected, 2));
    assert!(matches!(
        delegations::list(
            &db,
            &Caller::Admin,
            Listing::PendingFor("ghost"),
            &page(3, "")
        )
        .await,
        Err(Error::NotFound {
            entity: "instance",
            ..
        })
    ));
}

async fn a_delegation_must_follow_the_creation_rules_and_writes_nothing_otherwise(
    backend: Backend,
) {
    let (_guard, db) = story(backend).await;
    instance(&db, "stopped", Scope::Orchestration, Some("global")).await;
    instances::set_status(&db, &Caller::Admin, "stopped", InstanceStatus::Stopped)
        .await
        .unwrap();
    let before = snapshot(&db).await;

    let refused = [
        (hop("ghost", "global", "project", Route), "not found"),
        (hop("t", "ghost", "project", Route), "not found"),
        (hop("t", "global", "ghost", Route), "not found"),
        (hop("t", "global", "global", Route), "must differ"),
        (hop("t", "project", "orch", Route), "is at instance global"),
        (hop("t", "global", "stopped", Route), "is stopped"),
        (
            hop("t", "project", "global", Escalate),
            "is at instance global",
        ),
        (
            hop("t", "global", "project", Escalate),
            "goes to an ancestor",
        ),
        (
            hop("t", "global", "project", Reassign),
            "neither an ancestor nor a descendant",
        ),
        (hop("t", "global", "project", Decompose), "not a subtask"),
    ];
    for (request, message) in refused {
        let err = delegations::create(&db, &Caller::Admin, request.clone())
            .await
            .unwrap_err();
        assert!(err.to_string().contains(message), "{request:?}: {err}");
    }
    assert_eq!(snapshot(&db).await, before);

    let pending = delegate(&db, "t", "global", "project", Route).await;
    let before = snapshot(&db).await;
    let again = failed_precondition(
        delegations::create(&db, &Caller::Admin, hop("t", "orch", "orch2", Reassign)).await,
    );
    assert!(
        again.contains(&format!("pending delegation {}", pending.id)),
        "{again}"
    );
    let route_up = failed_precondition(
        delegations::create(&db, &Caller::Admin, hop("t", "project", "global", Route)).await,
    );
    assert!(route_up.contains("pending delegation"), "{route_up}");
    assert_eq!(snapshot(&db).await, before);
}

async fn escalate_goes_up_and_reassign_goes_sideways(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let to_project = accepted_route(&db, "t", "global", "project").await;
    let to_orch = accepted_route(&db, "t", "project", "orch").await;
    let refused = failed_precondition(
        delegations::create(&db, &Caller::Admin, hop("t", "orch", "global", Route)).await,
    );
    assert!(refused.contains("goes to a descendant"), "{refused}");
    let sideways = delegate(&db, "t", "orch", "orch2", Reassign).await;
    assert_eq!(
        sideways.parent_delegation_id.as_deref(),
        Some(to_orch.id.as_str())
    );
    delegations::reject(&db, &Caller::Admin, &sideways.id, "not ours")
        .await
        .unwrap();

    let up = delegate(&db, "t", "orch", "global", Escalate).await;
    assert_eq!(
        up.parent_delegation_id.as_deref(),
        Some(to_orch.id.as_str())
    );
    delegations::accept(&db, &Caller::Admin, &up.id)
        .await
        .unwrap();
    let done = delegations::complete(
        &db,
        &Caller::Admin,
        &up.id,
        Some(&json!({"fixed": true})),
        None,
    )
    .await
    .unwrap();
    let ancestors: Vec<_> = done
        .completed_ancestors
        .iter()
        .map(|d| d.id.clone())
        .collect();
    assert_eq!(ancestors, [to_orch.id.clone(), to_project.id.clone()]);
    assert_eq!(
        (done.task.status, done.task.instance_id.as_str()),
        (TaskStatus::Done, "global")
    );
}

async fn transitions_from_the_wrong_status_name_the_current_one(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let d = delegate(&db, "t", "global", "project", Route).await;
    let message =
        failed_precondition(delegations::complete(&db, &Caller::Admin, &d.id, None, None).await);
    assert_eq!(
        message,
        format!(
            "delegation {} is pending; it must be accepted to complete",
            d.id
        )
    );
    delegations::accept(&db, &Caller::Admin, &d.id)
        .await
        .unwrap();
    assert!(
        failed_precondition(delegations::accept(&db, &Caller::Admin, &d.id).await)
            .contains("is accepted")
    );
    assert!(
        failed_precondition(delegations::reject(&db, &Caller::Admin, &d.id, "late").await)
            .contains("is accepted")
    );
    delegations::complete(&db, &Caller::Admin, &d.id, None, None)
        .await
        .unwrap();
    let message = failed_precondition(delegations::cancel(&db, &Caller::Admin, &d.id).await);
    assert!(
        message.contains("is completed; it must be pending or accepted to cancel"),
        "{message}"
    );
    let finished = failed_precondition(
        delegations::create(&db, &Caller::Admin, hop("t", "global", "project", Route)).await,
    );
    assert!(finished.contains("task t is done"), "{finished}");
    for outcome in [
        delegations::accept(&db, &Caller::Admin, "ghost")
            .await
            .map(drop),
        delegations::reject(&db, &Caller::Admin, "ghost", "x")
            .await
            .map(drop),
        delegations::complete(&db, &Caller::Admin, "ghost", None, None)
            .await
            .map(drop),
        delegations::cancel(&db, &Caller::Admin, "ghost")
            .await
            .map(drop),
        delegations::get(&db, &Caller::Admin, "ghost")
            .await
            .map(drop),
        delegations::update_notes(&db, &Caller::Admin, "ghost", "x")
            .await
            .map(drop),
    ] {
        assert_eq!(outcome, Err(Error::not_found("delegation", "ghost")));
    }
}

async fn a_hop_cannot_complete_while_the_task_is_delegated_onward(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let to_project = accepted_route(&db, "t", "global", "project").await;
    let to_orch = delegate(&db, "t", "project", "orch", Route).await;
    let before = snapshot(&db).await;
    let message = failed_precondition(
        delegations::complete(&db, &Caller::Admin, &to_project.id, None, None).await,
    );
    assert!(
        message.contains(&format!("delegated onward by delegation {}", to_orch.id)),
        "{message}"
    );
    assert_eq!(snapshot(&db).await, before);
}

async fn a_rejection_sends_the_task_back_for_another_try(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let to_project = accepted_route(&db, "t", "global", "project").await;
    let refused = delegate(&db, "t", "project", "orch", Route).await;
    delegations::reject(&db, &Caller::Admin, &refused.id, "orch is full")
        .await
        .unwrap();
    assert_eq!(
        tasks::get(&db, &Caller::Admin, "t")
            .await
            .unwrap()
            .instance_id,
        "project"
    );
    let retry = accepted_route(&db, "t", "project", "orch").await;
    assert_eq!(
        retry.parent_delegation_id.as_deref(),
        Some(to_project.id.as_str())
    );
    let done = delegations::complete(&db, &Caller::Admin, &retry.id, None, None)
        .await
        .unwrap();
    assert_eq!(done.completed_ancestors.len(), 1);
    assert_eq!(done.task.status, TaskStatus::Done);
    assert_eq!(
        delegations::get(&db, &Caller::Admin, &refused.id)
            .await
            .unwrap()
            .status,
        DelegationStatus::Rejected
    );
}

async fn cancelling_a_hop_cancels_everything_below_it(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let to_project = accepted_route(&db, "t", "global", "project").await;
    let to_orch = accepted_route(&db, "t", "project", "orch").await;
    let sideways = delegate(&db, "t", "orch", "orch2", Reassign).await;

    let cancelled = delegations::cancel(&db, &Caller::Admin, &to_project.id)
        .await
        .unwrap();
    assert_eq!(cancelled.delegation.status, DelegationStatus::Cancelled);
    let below: Vec<_> = cancelled
        .cancelled_descendants
        .iter()
        .map(|d| (d.id.clone(), d.status))
        .collect();
    assert_eq!(
        below,
        [
            (to_orch.id.clone(), DelegationStatus::Cancelled),
            (sideways.id.clone(), DelegationStatus::Cancelled),
        ]
    );
    assert_eq!(cancelled.task.instance_id, "global");
    assert_eq!(cancelled.task.status, TaskStatus::Pending);
    failed_precondition(delegations::accept(&db, &Caller::Admin, &sideways.id).await);
    failed_precondition(delegations::complete(&db, &Caller::Admin, &to_orch.id, None, None).await);
    assert!(
        delegations::chain(&db, &Caller::Admin, "t")
            .await
            .unwrap()
            .delegations
            .is_empty()
    );
    // The task can set off again from where it went back to.
    accepted_route(&db, "t", "global", "project2").await;
}

async fn cancelling_an_inner_hop_leaves_the_hops_above_it(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let to_project = accepted_route(&db, "t", "global", "project").await;
    let to_orch = delegate(&db, "t", "project", "orch", Route).await;
    let cancelled = delegations::cancel(&db, &Caller::Admin, &to_orch.id)
        .await
        .unwrap();
    assert!(cancelled.cancelled_descendants.is_empty());
    assert_eq!(cancelled.task.instance_id, "project");
    assert_eq!(
        delegations::get(&db, &Caller::Admin, &to_project.id)
            .await
            .unwrap()
            .status,
        DelegationStatus::Accepted
    );
    let done = delegations::complete(&db, &Caller::Admin, &to_project.id, None, None)
        .await
        .unwrap();
    assert_eq!(done.task.status, TaskStatus::Done);
}

async fn a_decompose_hop_completes_its_subtask_while_the_parent_waits_for_the_rest(
    backend: Backend,
) {
    let (_guard, db) = story(backend).await;
    let to_project = accepted_route(&db, "t", "global", "project").await;
    subtask(&db, "t.1", "t").await;
    subtask(&db, "t.2", "t").await;
    let sub = tasks::get(&db, &Caller::Admin, "t.1").await.unwrap();
    assert_eq!(
        (sub.instance_id.as_str(), sub.parent_task_id.as_deref()),
        ("project", Some("t"))
    );

    let split = delegate(&db, "t.1", "project", "orch", Decompose).await;
    assert_eq!(
        split.parent_delegation_id.as_deref(),
        Some(to_project.id.as_str())
    );
    delegations::accept(&db, &Caller::Admin, &split.id)
        .await
        .unwrap();
    let done = delegations::complete(
        &db,
        &Caller::Admin,
        &split.id,
        Some(&json!({"part": 1})),
        None,
    )
    .await
    .unwrap();
    assert!(done.completed_ancestors.is_empty());
    assert_eq!(
        (
            done.task.id.as_str(),
            done.task.status,
            done.task.instance_id.as_str()
        ),
        ("t.1", TaskStatus::Done, "project")
    );
    assert_eq!(
        delegations::get(&db, &Caller::Admin, &to_project.id)
            .await
            .unwrap()
            .status,
        DelegationStatus::Accepted
    );
    assert_eq!(
        tasks::get(&db, &Caller::Admin, "t").await.unwrap().status,
        TaskStatus::Pending
    );
}

async fn cancelling_a_parent_hop_reaches_into_subtasks(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let to_project = accepted_route(&db, "t", "global", "project").await;
    subtask(&db, "t.1", "t").await;
    let split = delegate(&db, "t.1", "project", "orch", Decompose).await;
    let cancelled = delegations::cancel(&db, &Caller::Admin, &to_project.id)
        .await
        .unwrap();
    assert_eq!(cancelled.cancelled_descendants.len(), 1);
    assert_eq!(cancelled.cancelled_descendants[0].id, split.id);
    assert_eq!(
        tasks::get(&db, &Caller::Admin, "t.1")
            .await
            .unwrap()
            .instance_id,
        "project"
    );
    assert_eq!(
        tasks::get(&db, &Caller::Admin, "t")
            .await
            .unwrap()
            .instance_id,
        "global"
    );
}

async fn a_subtask_is_created_where_its_parent_is(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let new = |instance: Option<&str>, parent: &str| NewTask {
        request_id: None,
        id: None,
        title: "part".into(),
        description: "one part".into(),
        instance_id: instance.map(str::to_owned),
        parent_task_id: Some(parent.to_owned()),
    };
    let sub = tasks::create(&db, &Caller::Admin, new(Some("global"), "t"))
        .await
        .unwrap();
    assert_eq!(sub.instance_id, "global");
    assert_eq!(sub.id.len(), 36, "a generated UUID");
    let elsewhere =
        failed_precondition(tasks::create(&db, &Caller::Admin, new(Some("project"), "t")).await);
    assert!(
        elsewhere.contains("parent task t is at instance global"),
        "{elsewhere}"
    );
    assert!(matches!(
        tasks::create(&db, &Caller::Admin, new(None, "ghost")).await,
        Err(Error::NotFound {
            entity: "parent task",
            ..
        })
    ));
    let plain = NewTask {
        parent_task_id: None,
        instance_id: Some("ghost".into()),
        ..new(None, "t")
    };
    assert!(matches!(
        tasks::create(&db, &Caller::Admin, plain).await,
        Err(Error::NotFound {
            entity: "instance",
            ..
        })
    ));
    let taken = NewTask {
        id: Some("t".into()),
        parent_task_id: None,
        instance_id: Some("global".into()),
        ..new(None, "t")
    };
    assert_eq!(
        tasks::create(&db, &Caller::Admin, taken).await,
        Err(Error::AlreadyExists {
            entity: "task",
            id: "t".into()
        })
    );

    // Its only open subtask done, t completes in place; a finished task takes no subtasks.
    tasks::complete(&db, &Caller::Admin, &sub.id, None)
        .await
        .unwrap();
    assert_eq!(
        tasks::get(&db, &Caller::Admin, "t").await.unwrap().status,
        TaskStatus::Done
    );
    let finished = failed_precondition(tasks::create(&db, &Caller::Admin, new(None, "t")).await);
    assert!(finished.contains("is done"), "{finished}");
}

async fn instances_register_list_and_change_status(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let taken = NewInstance {
        request_id: None,
        id: Some("global".into()),
        name: "again".into(),
        scope: Scope::Global,
        parent_id: None,
        status: InstanceStatus::Created,
        config: json!({"region": "eu", "replicas": 3}),
        lease: None,
    };
    assert_eq!(
        instances::register(&db, &Caller::Admin, taken.clone()).await,
        Err(Error::AlreadyExists {
            entity: "instance",
            id: "global".into()
        })
    );
    let orphan = NewInstance {
        id: None,
        parent_id: Some("ghost".into()),
        ..taken.clone()
    };
    assert_eq!(
        instances::register(&db, &Caller::Admin, orphan).await,
        Err(Error::not_found("parent instance", "ghost"))
    );
    let fresh = instances::register(&db, &Caller::Admin, NewInstance { id: None, ..taken })
        .await
        .unwrap();
    assert_eq!(fresh.config, json!({"region": "eu", "replicas": 3}));
    assert_eq!(
        instances::get(&db, &Caller::Admin, &fresh.id)
            .await
            .unwrap(),
        fresh
    );

    let projects = instances::list(
        &db,
        &Caller::Admin,
        &Filter {
            scope: Some(Scope::Project),
            ..Filter::default()
        },
        &page(50, ""),
    )
    .await
    .unwrap();
    let ids: Vec<_> = projects.items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["project", "project2"]);
    let children = instances::list(
        &db,
        &Caller::Admin,
        &Filter {
            parent_id: Some("project2".into()),
            ..Filter::default()
        },
        &page(50, ""),
    )
    .await
    .unwrap();
    assert_eq!(children.items.len(), 1);
    let first = instances::list(&db, &Caller::Admin, &Filter::default(), &page(2, ""))
        .await
        .unwrap();
    assert_eq!(first.items.len(), 2);
    let rest = instances::list(
        &db,
        &Caller::Admin,
        &Filter::default(),
        &page(50, &first.next_page_token),
    )
    .await
    .unwrap();
    assert_eq!(first.items.len() + rest.items.len(), 6);
    assert!(matches!(
        instances::list(&db, &Caller::Admin, &Filter::default(), &page(2, "../x")).await,
        Err(Error::InvalidArgument { .. })
    ));

    let paused = instances::set_status(&db, &Caller::Admin, "orch2", InstanceStatus::Paused)
        .await
        .unwrap();
    assert_eq!(paused.status, InstanceStatus::Paused);
    assert!(paused.updated_at >= paused.created_at);
    let paused_only = instances::list(
        &db,
        &Caller::Admin,
        &Filter {
            status: Some(InstanceStatus::Paused),
            ..Filter::default()
        },
        &page(50, ""),
    )
    .await
    .unwrap();
    assert_eq!(paused_only.items, [paused]);
    assert_eq!(
        instances::set_status(&db, &Caller::Admin, "ghost", InstanceStatus::Paused).await,
        Err(Error::not_found("instance", "ghost"))
    );
    assert_eq!(
        instances::get(&db, &Caller::Admin, "ghost").await,
        Err(Error::not_found("instance", "ghost"))
    );
}

async fn notes_can_be_changed_at_any_status(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let d = accepted_route(&db, "t", "global", "project").await;
    let noted = delegations::update_notes(&db, &Caller::Admin, &d.id, "waiting on review")
        .await
        .unwrap();
    assert_eq!(noted.notes.as_deref(), Some("waiting on review"));
    assert_eq!(noted.status, DelegationStatus::Accepted);
    assert!(noted.updated_at >= d.updated_at);
}

async fn racing_clients_on_one_delegation_have_exactly_one_winner(backend: Backend) {
    let (_guard, db) = story(backend).await;
    const N: usize = 12;
    type Op = fn(Db, String) -> futures::future::BoxFuture<'static, Result<(), Error>>;
    let accept: Op = |db, id| {
        Box::pin(async move {
            delegations::accept(&db, &Caller::Admin, &id)
                .await
                .map(drop)
        })
    };
    let reject: Op = |db, id| {
        Box::pin(async move {
            delegations::reject(&db, &Caller::Admin, &id, "no")
                .await
                .map(drop)
        })
    };
    let complete: Op = |db, id| {
        Box::pin(async move {
            delegations::complete(&db, &Caller::Admin, &id, None, None)
                .await
                .map(drop)
        })
    };
    let cancel: Op = |db, id| {
        Box::pin(async move {
            delegations::cancel(&db, &Caller::Admin, &id)
                .await
                .map(drop)
        })
    };
    for (round, (name, op, needs_accept)) in [
        ("accept", accept, false),
        ("reject", reject, false),
        ("complete", complete, true),
        ("cancel", cancel, true),
    ]
    .into_iter()
    .enumerate()
    {
        let task_id = format!("race-{round}");
        task(&db, &task_id, "global").await;
        let d = delegate(&db, &task_id, "global", "project", Route).await;
        if needs_accept {
            delegations::accept(&db, &Caller::Admin, &d.id)
                .await
                .unwrap();
        }
        let outcomes = race(N, |_| op(db.clone(), d.id.clone())).await;
        let wins = outcomes.iter().filter(|o| o.is_ok()).count();
        let losses = outcomes
            .iter()
            .filter(|o| matches!(o, Err(Error::FailedPrecondition(_))))
            .count();
        assert_eq!((wins, losses), (1, N - 1), "{name}: {outcomes:?}");
    }

    // Mixed: accept, reject and cancel on one pending delegation. The winners must form
    // a legal history, each transition winning at most once.
    task(&db, "mixed", "global").await;
    let d = delegate(&db, "mixed", "global", "project", Route).await;
    let ops = [("accept", accept), ("reject", reject), ("cancel", cancel)];
    let outcomes = race(N, |i| ops[i % 3].1(db.clone(), d.id.clone())).await;
    let mut winners: Vec<_> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| o.is_ok())
        .map(|(i, _)| ops[i % 3].0)
        .collect();
    winners.sort_unstable();
    let expected_status = match winners.as_slice() {
        ["accept"] => DelegationStatus::Accepted,
        ["reject"] => DelegationStatus::Rejected,
        ["cancel"] | ["accept", "cancel"] => DelegationStatus::Cancelled,
        other => panic!("not a legal history: {other:?}"),
    };
    assert_eq!(
        delegations::get(&db, &Caller::Admin, &d.id)
            .await
            .unwrap()
            .status,
        expected_status
    );
}

async fn racing_delegations_of_one_task_leave_one_pending(backend: Backend) {
    let (_guard, db) = story(backend).await;
    let targets = ["project", "project2", "orch", "orch2"];
    let outcomes = race(8, |i| {
        let db = db.clone();
        async move {
            delegations::create(
                &db,
                &Caller::Admin,
                hop("t", "global", targets[i % 4], Route),
            )
            .await
        }
    })
    .await;
    assert_eq!(
        outcomes.iter().filter(|o| o.is_ok()).count(),
        1,
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .all(|o| o.is_ok() || matches!(o, Err(Error::FailedPrecondition(_))))
    );
    let all = delegations::list(&db, &Caller::Admin, Listing::OfTask("t"), &page(50, ""))
        .await
        .unwrap();
    assert_eq!(all.items.len(), 1);
}

on_both_backends!(
    a_completion_at_orchestration_reaches_global,
    the_chain_follows_the_task_to_where_it_is_now,
    a_task_lists_every_delegation_oldest_first_with_rejections,
    an_instance_lists_its_pending_delegations_a_page_at_a_time,
    a_delegation_must_follow_the_creation_rules_and_writes_nothing_otherwise,
    escalate_goes_up_and_reassign_goes_sideways,
    transitions_from_the_wrong_status_name_the_current_one,
    a_hop_cannot_complete_while_the_task_is_delegated_onward,
    a_rejection_sends_the_task_back_for_another_try,
    cancelling_a_hop_cancels_everything_below_it,
    cancelling_an_inner_hop_leaves_the_hops_above_it,
    a_decompose_hop_completes_its_subtask_while_the_parent_waits_for_the_rest,
    cancelling_a_parent_hop_reaches_into_subtasks,
    a_subtask_is_created_where_its_parent_is,
    instances_register_list_and_change_status,
    notes_can_be_changed_at_any_status,
    racing_clients_on_one_delegation_have_exactly_one_winner,
    racing_delegations_of_one_task_leave_one_pending
);
