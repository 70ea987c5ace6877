//! A corpus of malformed and hostile requests through real clients, on both backends: each
//! gets INVALID_ARGUMENT naming the field (in `google.rpc.BadRequest`), NOT_FOUND or
//! FAILED_PRECONDITION, and the database is unchanged afterwards (row counts, every task and
//! delegation, and the event log).

mod common;

use std::collections::BTreeMap;

use common::{Backend, TestServer, rpc, snapshot};
use hopper_delegation::proto::{self as pb, DelegationType, InstanceStatus, Scope};
use prost_types::{Struct, Value, value::Kind};
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// [`rpc::register`] with a name of its own: the corpus tries bad ones.
fn register(id: &str, name: &str, scope: Scope, parent: &str) -> pb::RegisterInstanceRequest {
    pb::RegisterInstanceRequest {
        name: name.into(),
        ..rpc::register(id, scope, parent)
    }
}

/// [`rpc::route`] with a raw type number: the corpus tries unknown ones.
fn hop(task: &str, source: &str, target: &str, kind: i32) -> pb::CreateDelegationRequest {
    pb::CreateDelegationRequest {
        delegation_type: kind,
        ..rpc::route(task, source, target)
    }
}

fn document(value: Kind) -> Struct {
    Struct {
        fields: BTreeMap::from([("x".to_owned(), Value { kind: Some(value) })]),
    }
}

/// A document nested `levels` deep.
fn nested(levels: usize) -> Struct {
    let mut inner = Struct::default();
    for _ in 0..levels {
        inner = document(Kind::StructValue(inner));
    }
    inner
}

const ROUTE: i32 = DelegationType::Route as i32;

async fn bad_requests_get_clear_statuses_and_change_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (mut i, mut t, mut d) = (
        server.instances.clone(),
        server.tasks.clone(),
        server.delegations.clone(),
    );
    for request in [
        register("global", "Global", Scope::Global, ""),
        register("project", "Project", Scope::Project, "global"),
        register("orch", "Orch", Scope::Orchestration, "project"),
        register("stopped", "Stopped", Scope::Orchestration, "project"),
    ] {
        i.register_instance(request).await.unwrap();
    }
    i.update_instance_status(pb::UpdateInstanceStatusRequest {
        id: "stopped".into(),
        status: InstanceStatus::Stopped.into(),
    })
    .await
    .unwrap();
    let create = |id: &str| pb::CreateTaskRequest {
        id: id.into(),
        title: id.into(),
        instance_id: "global".into(),
        ..Default::default()
    };
    t.create_task(create("t")).await.unwrap();
    t.create_task(create("done")).await.unwrap();
    t.create_task(create("spare")).await.unwrap();
    t.complete_task(pb::CompleteTaskRequest {
        task_id: "done".into(),
        result: None,
    })
    .await
    .unwrap();
    let pending = d
        .create_delegation(hop("t", "global", "project", ROUTE))
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap()
        .id;
    let before = snapshot(&server.db.pool()).await;

    let long_id = "x".repeat(65);
    let big_text = |n: usize| "n".repeat(n);
    let huge_json = document(Kind::StringValue("j".repeat(1024 * 1024)));
    let nan = document(Kind::NumberValue(f64::NAN));
    let mut outcomes: Vec<(&str, Code, &str, Result<(), Status>)> = Vec::new();
    macro_rules! case {
        ($name:expr, $code:ident, $expect:expr, $call:expr) => {
            outcomes.push(($name, Code::$code, $expect, $call.await.map(drop)))
        };
    }

    // InstanceService
    case!(
        "id too long",
        InvalidArgument,
        "id",
        i.register_instance(register(&long_id, "n", Scope::Project, "global"))
    );
    case!(
        "id with a space",
        InvalidArgument,
        "id",
        i.register_instance(register("a b", "n", Scope::Project, "global"))
    );
    case!(
        "id that looks like SQL",
        InvalidArgument,
        "id",
        i.register_instance(register(
            "x'; DROP TABLE tasks; --",
            "n",
            Scope::Project,
            "global"
        ))
    );
    case!(
        "id with a slash",
        InvalidArgument,
        "id",
        i.register_instance(register("../etc", "n", Scope::Project, "global"))
    );
    case!(
        "empty name",
        InvalidArgument,
        "name",
        i.register_instance(register("p2", "", Scope::Project, "global"))
    );
    case!(
        "name too long",
        InvalidArgument,
        "name",
        i.register_instance(register("p2", &big_text(257), Scope::Project, "global"))
    );
    case!(
        "scope UNSPECIFIED",
        InvalidArgument,
        "scope",
        i.register_instance(register("p2", "n", Scope::Unspecified, "global"))
    );
    case!(
        "unknown scope",
        InvalidArgument,
        "scope",
        i.register_instance(pb::RegisterInstanceRequest {
            scope: 99,
            ..register("p2", "n", Scope::Project, "global")
        })
    );
    case!(
        "unknown status",
        InvalidArgument,
        "status",
        i.register_instance(pb::RegisterInstanceRequest {
            status: 42,
            ..register("p2", "n", Scope::Project, "global")
        })
    );
    case!(
        "bad parent id",
        InvalidArgument,
        "parent_id",
        i.register_instance(register("p2", "n", Scope::Project, "-x"))
    );
    case!(
        "unknown parent",
        NotFound,
        "parent instance ghost not found",
        i.register_instance(register("p2", "n", Scope::Project, "ghost"))
    );
    case!(
        "its own parent",
        NotFound,
        "parent instance self not found",
        i.register_instance(register("self", "n", Scope::Project, "self"))
    );
    case!(
        "taken id",
        AlreadyExists,
        "instance global already exists",
        i.register_instance(register("global", "n", Scope::Global, ""))
    );
    case!(
        "config too large",
        InvalidArgument,
        "config",
        i.register_instance(pb::RegisterInstanceRequest {
            config: Some(huge_json.clone()),
            ..register("p2", "n", Scope::Project, "global")
        })
    );
    case!(
        "config NaN",
        InvalidArgument,
        "config",
        i.register_instance(pb::RegisterInstanceRequest {
            config: Some(nan.clone()),
            ..register("p2", "n", Scope::Project, "global")
        })
    );
    case!(
        "config nested too deep",
        InvalidArgument,
        "config",
        i.register_instance(pb::RegisterInstanceRequest {
            config: Some(nested(33)),
            ..register("p2", "n", Scope::Project, "global")
        })
    );
    case!(
        "bad request id",
        InvalidArgument,
        "request_id",
        i.register_instance(pb::RegisterInstanceRequest {
            request_id: "no spaces".into(),
            ..register("p2", "n", Scope::Project, "global")
        })
    );
    case!(
        "get: empty id",
        InvalidArgument,
        "id",
        i.get_instance(pb::GetInstanceRequest { id: String::new() })
    );
    case!(
        "get: unknown",
        NotFound,
        "instance ghost not found",
        i.get_instance(pb::GetInstanceRequest { id: "ghost".into() })
    );
    case!(
        "list: negative page size",
        InvalidArgument,
        "page_size",
        i.list_instances(pb::ListInstancesRequest {
            page_size: -1,
            ..Default::default()
        })
    );
    case!(
        "list: forged token",
        InvalidArgument,
        "page_token",
        i.list_instances(pb::ListInstancesRequest {
            page_token: "%%%".into(),
            ..Default::default()
        })
    );
    case!(
        "list: unknown scope",
        InvalidArgument,
        "scope",
        i.list_instances(pb::ListInstancesRequest {
            scope: 77,
            ..Default::default()
        })
    );
    case!(
        "status UNSPECIFIED",
        InvalidArgument,
        "status",
        i.update_instance_status(pb::UpdateInstanceStatusRequest {
            id: "orch".into(),
            status: 0
        })
    );
    case!(
        "status of unknown",
        NotFound,
        "instance ghost not found",
        i.update_instance_status(pb::UpdateInstanceStatusRequest {
            id: "ghost".into(),
            status: InstanceStatus::Paused.into()
        })
    );

    // TaskService
    case!(
        "empty title",
        InvalidArgument,
        "title",
        t.create_task(pb::CreateTaskRequest {
            title: String::new(),
            ..create("t2")
        })
    );
    case!(
        "blank title",
        InvalidArgument,
        "title",
        t.create_task(pb::CreateTaskRequest {
            title: "   ".into(),
            ..create("t2")
        })
    );
    case!(
        "title too long",
        InvalidArgument,
        "title",
        t.create_task(pb::CreateTaskRequest {
            title: big_text(513),
            ..create("t2")
        })
    );
    case!(
        "description too long",
        InvalidArgument,
        "description",
        t.create_task(pb::CreateTaskRequest {
            description: big_text(16 * 1024 + 1),
            ..create("t2")
        })
    );
    case!(
        "bad task id",
        InvalidArgument,
        "id",
        t.create_task(create(&long_id))
    );
    case!(
        "no instance",
        InvalidArgument,
        "instance_id",
        t.create_task(pb::CreateTaskRequest {
            instance_id: String::new(),
            ..create("t2")
        })
    );
    case!(
        "unknown instance",
        NotFound,
        "instance ghost not found",
        t.create_task(pb::CreateTaskRequest {
            instance_id: "ghost".into(),
            ..create("t2")
        })
    );
    case!(
        "unknown parent task",
        NotFound,
        "parent task ghost not found",
        t.create_task(pb::CreateTaskRequest {
            parent_task_id: "ghost".into(),
            ..create("t2")
        })
    );
    case!(
        "its own parent task",
        NotFound,
        "parent task loop not found",
        t.create_task(pb::CreateTaskRequest {
            parent_task_id: "loop".into(),
            ..create("loop")
        })
    );
    case!(
        "subtask of a done task",
        FailedPrecondition,
        "is done",
        t.create_task(pb::CreateTaskRequest {
            parent_task_id: "done".into(),
            ..create("t2")
        })
    );
    case!(
        "taken task id",
        AlreadyExists,
        "task t already exists",
        t.create_task(create("t"))
    );
    case!(
        "get: bad id",
        InvalidArgument,
        "id",
        t.get_task(pb::GetTaskRequest { id: "a b".into() })
    );
    case!(
        "subtasks: negative page",
        InvalidArgument,
        "page_size",
        t.list_subtasks(pb::ListSubtasksRequest {
            task_id: "t".into(),
            page_size: -5,
            ..Default::default()
        })
    );
    case!(
        "complete: result too large",
        InvalidArgument,
        "result",
        t.complete_task(pb::CompleteTaskRequest {
            task_id: "t".into(),
            result: Some(huge_json.clone())
        })
    );
    case!(
        "complete: unknown",
        NotFound,
        "task ghost not found",
        t.complete_task(pb::CompleteTaskRequest {
            task_id: "ghost".into(),
            result: None
        })
    );
    case!(
        "complete: in transit",
        FailedPrecondition,
        "is on its way",
        t.complete_task(pb::CompleteTaskRequest {
            task_id: "t".into(),
            result: None
        })
    );
    case!(
        "complete: done already",
        FailedPrecondition,
        "task done is done",
        t.complete_task(pb::CompleteTaskRequest {
            task_id: "done".into(),
            result: None
        })
    );
    case!(
        "cancel: bad id",
        InvalidArgument,
        "task_id",
        t.cancel_task(pb::CancelTaskRequest {
            task_id: String::new()
        })
    );

    // DelegationService
    case!(
        "type UNSPECIFIED",
        InvalidArgument,
        "delegation_type",
        d.create_delegation(hop("t", "project", "orch", 0))
    );
    case!(
        "unknown type",
        InvalidArgument,
        "delegation_type",
        d.create_delegation(hop("t", "project", "orch", 9))
    );
    case!(
        "empty task id",
        InvalidArgument,
        "task_id",
        d.create_delegation(hop("", "project", "orch", ROUTE))
    );
    case!(
        "bad source",
        InvalidArgument,
        "source_instance_id",
        d.create_delegation(hop("t", "pro ject", "orch", ROUTE))
    );
    case!(
        "self-delegation",
        InvalidArgument,
        "target_instance_id",
        d.create_delegation(hop("done", "global", "global", ROUTE))
    );
    case!(
        "second pending",
        FailedPrecondition,
        "already has a pending delegation",
        d.create_delegation(hop("t", "project", "orch", ROUTE))
    );
    case!(
        "to a stopped instance",
        FailedPrecondition,
        "stopped",
        d.create_delegation(hop("spare", "global", "stopped", ROUTE))
    );
    case!(
        "notes too long",
        InvalidArgument,
        "notes",
        d.create_delegation(pb::CreateDelegationRequest {
            notes: big_text(16 * 1024 + 1),
            ..hop("t", "project", "orch", ROUTE)
        })
    );
    case!(
        "delegated_by too long",
        InvalidArgument,
        "delegated_by",
        d.create_delegation(pb::CreateDelegationRequest {
            delegated_by: big_text(257),
            ..hop("t", "project", "orch", ROUTE)
        })
    );
    case!(
        "unknown task",
        NotFound,
        "task ghost not found",
        d.create_delegation(hop("ghost", "global", "project", ROUTE))
    );
    case!(
        "finished task",
        FailedPrecondition,
        "task done is done",
        d.create_delegation(hop("done", "global", "project", ROUTE))
    );
    case!(
        "get: bad id",
        InvalidArgument,
        "id",
        d.get_delegation(pb::GetDelegationRequest {
            id: "x".repeat(100)
        })
    );
    case!(
        "notes update too long",
        InvalidArgument,
        "notes",
        d.update_delegation(pb::UpdateDelegationRequest {
            id: pending.clone(),
            notes: big_text(16 * 1024 + 1)
        })
    );
    case!(
        "notes of unknown",
        NotFound,
        "delegation ghost not found",
        d.update_delegation(pb::UpdateDelegationRequest {
            id: "ghost".into(),
            notes: "n".into()
        })
    );
    case!(
        "forged token",
        InvalidArgument,
        "page_token",
        d.list_task_delegations(pb::ListTaskDelegationsRequest {
            task_id: "t".into(),
            page_size: 1,
            page_token: "1~../../x".into()
        })
    );
    case!(
        "empty reason",
        InvalidArgument,
        "reason",
        d.reject_delegation(pb::RejectDelegationRequest {
            id: pending.clone(),
            reason: String::new()
        })
    );
    case!(
        "reason too long",
        InvalidArgument,
        "reason",
        d.reject_delegation(pb::RejectDelegationRequest {
            id: pending.clone(),
            reason: big_text(4 * 1024 + 1)
        })
    );
    case!(
        "complete a pending one",
        FailedPrecondition,
        "is pending",
        d.complete_delegation(pb::CompleteDelegationRequest {
            id: pending.clone(),
            result: None,
            notes: None
        })
    );
    case!(
        "result NaN",
        InvalidArgument,
        "result",
        d.complete_delegation(pb::CompleteDelegationRequest {
            id: pending.clone(),
            result: Some(nan.clone()),
            notes: None
        })
    );
    case!(
        "result nested too deep",
        InvalidArgument,
        "result",
        d.complete_delegation(pb::CompleteDelegationRequest {
            id: pending.clone(),
            result: Some(nested(33)),
            notes: None
        })
    );
    case!(
        "nested past the decoder's limit",
        InvalidArgument,
        "failed to decode",
        d.complete_delegation(pb::CompleteDelegationRequest {
            id: pending.clone(),
            result: Some(nested(60)),
            notes: None
        })
    );
    case!(
        "cancel unknown",
        NotFound,
        "delegation ghost not found",
        d.cancel_delegation(pb::CancelDelegationRequest { id: "ghost".into() })
    );
    case!(
        "chain of unknown",
        NotFound,
        "task ghost not found",
        d.get_delegation_chain(pb::GetDelegationChainRequest {
            task_id: "ghost".into()
        })
    );
    case!(
        "tree: bad id",
        InvalidArgument,
        "task_id",
        d.get_delegation_tree(pb::GetDelegationTreeRequest {
            task_id: "é".into()
        })
    );
    case!(
        "watch: unknown kind",
        InvalidArgument,
        "kinds",
        d.watch_events(pb::WatchEventsRequest {
            instance_id: "global".into(),
            kinds: vec![42],
            ..Default::default()
        })
    );
    case!(
        "watch: unknown instance",
        NotFound,
        "instance ghost not found",
        d.watch_events(pb::WatchEventsRequest {
            instance_id: "ghost".into(),
            ..Default::default()
        })
    );

    assert!(outcomes.len() >= 50, "only {} cases", outcomes.len());
    for (name, code, expect, outcome) in &outcomes {
        let status = outcome
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"));
        assert_eq!(status.code(), *code, "{name}: {status:?}");
        if *code == Code::InvalidArgument && !status.message().starts_with("failed to decode") {
            let details = status.get_error_details();
            let violation = &details
                .bad_request()
                .unwrap_or_else(|| panic!("{name}: no BadRequest"))
                .field_violations[0];
            assert_eq!(violation.field, *expect, "{name}");
        } else {
            assert!(
                status.message().contains(expect),
                "{name}: {:?}",
                status.message()
            );
        }
    }
    assert_eq!(
        snapshot(&server.db.pool()).await,
        before,
        "something was written"
    );
    eprintln!("{} bad requests refused, nothing written", outcomes.len());
    server.stop().await;
}

async fn oversized_messages_are_resource_exhausted(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let request = pb::CreateTaskRequest {
        title: "big".into(),
        instance_id: "global".into(),
        description: "d".repeat(5 * 1024 * 1024),
        ..Default::default()
    };
    let before = snapshot(&server.db.pool()).await;
    let status = server.tasks.create_task(request).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    assert_eq!(snapshot(&server.db.pool()).await, before);
    server.stop().await;
}

on_both_backends!(
    bad_requests_get_clear_statuses_and_change_nothing,
    oversized_messages_are_resource_exhausted
);
