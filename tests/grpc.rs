//! The gRPC API through real tonic clients over 127.0.0.1, on both backends.

mod common;

use std::collections::BTreeMap;

use common::{Backend, TestServer, race, rpc, snapshot};
use hopper_delegation::auth::Caller;
use hopper_delegation::proto::{self as pb, InstanceStatus, Scope};
use prost_types::{Struct, Value, value::Kind};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn result_struct() -> Struct {
    let fields = BTreeMap::from([
        ("tests".to_owned(), number(118.0)),
        ("coverage".to_owned(), number(0.93)),
        (
            "artifact".to_owned(),
            Value {
                kind: Some(Kind::StringValue("build-42".into())),
            },
        ),
    ]);
    Struct { fields }
}

/// Global -> Project -> Orchestration, plus a second project, and task `t` at Global.
async fn hierarchy(server: &mut TestServer) {
    server.hierarchy().await;
    server.new_task("t", "global").await;
}

/// Task `t` from `source` to `target`, with notes and who delegated it.
fn route(source: &str, target: &str) -> pb::CreateDelegationRequest {
    pb::CreateDelegationRequest {
        notes: "please".into(),
        delegated_by: "operator".into(),
        ..rpc::route("t", source, target)
    }
}

async fn delegate_and_accept(
    server: &mut TestServer,
    source: &str,
    target: &str,
) -> pb::Delegation {
    let d = server.delegate(route(source, target)).await;
    server.accept(&d.id).await
}

/// Each node of a tree as (id, parent, pending, accepted).
fn load(tree: &pb::GetInstanceTreeResponse) -> Vec<(&str, &str, u32, u32)> {
    tree.nodes
        .iter()
        .map(|node| {
            let instance = node.instance.as_ref().expect("instance");
            let (id, parent) = (instance.id.as_str(), instance.parent_id.as_str());
            (
                id,
                parent,
                node.pending_delegations,
                node.accepted_delegations,
            )
        })
        .collect()
}

fn violation(status: &Status) -> String {
    let details = status.get_error_details();
    let bad_request = details
        .bad_request()
        .unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
    bad_request.field_violations[0].field.clone()
}

async fn a_completion_at_orchestration_reaches_global_over_grpc(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    hierarchy(&mut server).await;
    let to_project = delegate_and_accept(&mut server, "global", "project").await;
    let to_orch = delegate_and_accept(&mut server, "project", "orch").await;
    assert_eq!(to_orch.parent_delegation_id, to_project.id);
    assert_eq!(to_orch.status, pb::DelegationStatus::Accepted as i32);
    assert!(to_orch.accepted_at.is_some() && to_orch.completed_at.is_none());

    let done = server
        .delegations
        .complete_delegation(pb::CompleteDelegationRequest {
            id: to_orch.id.clone(),
            result: Some(result_struct()),
            notes: Some("green".into()),
        })
        .await
        .unwrap()
        .into_inner();
    let delegation = done.delegation.unwrap();
    assert_eq!(delegation.status, pb::DelegationStatus::Completed as i32);
    assert_eq!(delegation.notes, "green");
    assert_eq!(done.completed_ancestors.len(), 1);
    assert_eq!(done.completed_ancestors[0].id, to_project.id);
    assert_eq!(done.completed_ancestors[0].result, Some(result_struct()));
    let task = done.task.unwrap();
    assert_eq!(
        (task.status, task.instance_id.as_str()),
        (pb::TaskStatus::Done as i32, "global")
    );
    assert_eq!(task.result, Some(result_struct()));

    // Whole numbers are stored as JSON integers, not 118.0.
    let stored = hopper_delegation::repository::tasks::get(&server.db.pool(), &Caller::Admin, "t")
        .await
        .unwrap();
    assert_eq!(stored.result.unwrap()["tests"], serde_json::json!(118));

    let chain = server
        .delegations
        .get_delegation_chain(pb::GetDelegationChainRequest {
            task_id: "t".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let hops: Vec<_> = chain
        .delegations
        .iter()
        .map(|d| d.target_instance_id.as_str())
        .collect();
    assert_eq!(hops, ["project", "orch"]);
    assert_eq!(
        (
            chain.task_id.as_str(),
            chain.origin_instance_id.as_str(),
            chain.current_instance_id.as_str()
        ),
        ("t", "global", "global")
    );

    let fetched = server
        .tasks
        .get_task(pb::GetTaskRequest { id: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(fetched, task);
    let listed = server
        .delegations
        .list_task_delegations(pb::ListTaskDelegationsRequest {
            task_id: "t".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.delegations.len(), 1);
    assert!(!listed.next_page_token.is_empty());
    server.stop().await;
}

async fn operators_reject_cancel_and_annotate_over_grpc(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    hierarchy(&mut server).await;
    let d = server
        .delegations
        .create_delegation(route("global", "project"))
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap();
    let pending = server
        .delegations
        .list_pending_delegations(pb::ListPendingDelegationsRequest {
            instance_id: "project".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.delegations, std::slice::from_ref(&d));
    assert_eq!(pending.next_page_token, "");

    let rejected = server
        .delegations
        .reject_delegation(pb::RejectDelegationRequest {
            id: d.id.clone(),
            reason: "no capacity".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap();
    assert_eq!(
        (rejected.status, rejected.rejection_reason.as_str()),
        (pb::DelegationStatus::Rejected as i32, "no capacity")
    );

    let d = delegate_and_accept(&mut server, "global", "project2").await;
    let noted = server
        .delegations
        .update_delegation(pb::UpdateDelegationRequest {
            id: d.id.clone(),
            notes: "ETA friday".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap();
    assert_eq!(noted.notes, "ETA friday");
    let cancelled = server
        .delegations
        .cancel_delegation(pb::CancelDelegationRequest { id: d.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cancelled.delegation.unwrap().status,
        pb::DelegationStatus::Cancelled as i32
    );
    assert!(cancelled.cancelled_descendants.is_empty());
    assert_eq!(cancelled.task.unwrap().instance_id, "global");
    let fetched = server
        .delegations
        .get_delegation(pb::GetDelegationRequest { id: d.id })
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap();
    assert_eq!(fetched.notes, "ETA friday");

    let stopped = server
        .instances
        .update_instance_status(pb::UpdateInstanceStatusRequest {
            id: "orch".into(),
            status: InstanceStatus::Stopped.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap();
    assert_eq!(stopped.status, InstanceStatus::Stopped as i32);
    let got = server
        .instances
        .get_instance(pb::GetInstanceRequest { id: "orch".into() })
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap();
    assert_eq!(got, stopped);
    let projects = server
        .instances
        .list_instances(pb::ListInstancesRequest {
            scope: Scope::Project.into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(projects.instances.len(), 1);
    let rest = server
        .instances
        .list_instances(pb::ListInstancesRequest {
            scope: Scope::Project.into(),
            page_size: 1,
            page_token: projects.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.instances[0].id, "project2");
    server.stop().await;
}

async fn the_instance_tree_shows_each_instances_pending_and_accepted_delegations(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    hierarchy(&mut server).await;
    // t: global -> project (accepted) -> orch (pending); t2: global -> project2, rejected.
    delegate_and_accept(&mut server, "global", "project").await;
    server
        .delegations
        .create_delegation(route("project", "orch"))
        .await
        .unwrap();
    server
        .tasks
        .create_task(pb::CreateTaskRequest {
            id: "t2".into(),
            title: "Write the notes".into(),
            instance_id: "global".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let to_project2 = pb::CreateDelegationRequest {
        task_id: "t2".into(),
        ..route("global", "project2")
    };
    let rejected = server
        .delegations
        .create_delegation(to_project2)
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap();
    server
        .delegations
        .reject_delegation(pb::RejectDelegationRequest {
            id: rejected.id,
            reason: "busy".into(),
        })
        .await
        .unwrap();

    let tree = |root: &str| pb::GetInstanceTreeRequest {
        root_id: root.into(),
    };
    let everything = server
        .instances
        .get_instance_tree(tree(""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        load(&everything),
        [
            ("global", "", 0, 0),
            ("orch", "project", 1, 0),
            ("project", "global", 0, 1),
            ("project2", "global", 0, 0)
        ]
    );
    let got = server
        .instances
        .get_instance(pb::GetInstanceRequest { id: "orch".into() })
        .await
        .unwrap()
        .into_inner()
        .instance;
    assert_eq!(everything.nodes[1].instance, got);
    let project = server
        .instances
        .get_instance_tree(tree("project"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        load(&project),
        [("orch", "project", 1, 0), ("project", "global", 0, 1)]
    );

    let before = snapshot(&server.db.pool()).await;
    let ghost = server
        .instances
        .get_instance_tree(tree("ghost"))
        .await
        .unwrap_err();
    assert_eq!(
        (ghost.code(), ghost.message()),
        (Code::NotFound, "instance ghost not found")
    );
    let invalid = server
        .instances
        .get_instance_tree(tree("x'; DROP TABLE tasks; --"))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    assert_eq!(violation(&invalid), "root_id", "{invalid:?}");
    assert!(invalid.message().starts_with("root_id: "), "{invalid:?}");
    assert_eq!(snapshot(&server.db.pool()).await, before);
    server.stop().await;
}

async fn bad_input_gets_a_clear_status_and_changes_nothing(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    hierarchy(&mut server).await;
    let pending = server
        .delegations
        .create_delegation(route("global", "project"))
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap();
    let before = snapshot(&server.db.pool()).await;
    let d = server.delegations.clone();
    let i = server.instances.clone();
    let t = server.tasks.clone();

    let invalid: Vec<(&str, Status)> = vec![
        (
            "id",
            d.clone()
                .get_delegation(pb::GetDelegationRequest { id: String::new() })
                .await
                .unwrap_err(),
        ),
        (
            "id",
            d.clone()
                .accept_delegation(pb::AcceptDelegationRequest {
                    id: "x'; DROP TABLE tasks; --".into(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "reason",
            d.clone()
                .reject_delegation(pb::RejectDelegationRequest {
                    id: pending.id.clone(),
                    reason: "  ".into(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "delegation_type",
            d.clone()
                .create_delegation(pb::CreateDelegationRequest {
                    delegation_type: 0,
                    ..route("global", "project")
                })
                .await
                .unwrap_err(),
        ),
        (
            "delegation_type",
            d.clone()
                .create_delegation(pb::CreateDelegationRequest {
                    delegation_type: 99,
                    ..route("global", "project")
                })
                .await
                .unwrap_err(),
        ),
        (
            "notes",
            d.clone()
                .create_delegation(pb::CreateDelegationRequest {
                    notes: "n".repeat(16 * 1024 + 1),
                    ..route("global", "project")
                })
                .await
                .unwrap_err(),
        ),
        (
            "target_instance_id",
            d.clone()
                .create_delegation(route("global", "global"))
                .await
                .unwrap_err(),
        ),
        (
            "page_size",
            d.clone()
                .list_pending_delegations(pb::ListPendingDelegationsRequest {
                    instance_id: "project".into(),
                    page_size: -1,
                    page_token: String::new(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "page_token",
            d.clone()
                .list_pending_delegations(pb::ListPendingDelegationsRequest {
                    instance_id: "project".into(),
                    page_size: 5,
                    page_token: "forged".into(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "result",
            d.clone()
                .complete_delegation(pb::CompleteDelegationRequest {
                    id: pending.id.clone(),
                    result: Some(Struct {
                        fields: BTreeMap::from([("x".to_owned(), number(f64::INFINITY))]),
                    }),
                    notes: None,
                })
                .await
                .unwrap_err(),
        ),
        (
            "title",
            t.clone()
                .create_task(pb::CreateTaskRequest {
                    title: String::new(),
                    instance_id: "global".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
        (
            "instance_id",
            t.clone()
                .create_task(pb::CreateTaskRequest {
                    title: "x".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
        (
            "scope",
            i.clone()
                .register_instance(pb::RegisterInstanceRequest {
                    name: "n".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
        (
            "name",
            i.clone()
                .register_instance(pb::RegisterInstanceRequest {
                    scope: Scope::Event.into(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
        (
            "status",
            i.clone()
                .update_instance_status(pb::UpdateInstanceStatusRequest {
                    id: "orch".into(),
                    status: 0,
                })
                .await
                .unwrap_err(),
        ),
        (
            "status",
            i.clone()
                .list_instances(pb::ListInstancesRequest {
                    status: 42,
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
    ];
    for (field, status) in &invalid {
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(violation(status), *field, "{status:?}");
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{status:?}"
        );
    }

    let not_found = [
        d.clone()
            .get_delegation(pb::GetDelegationRequest { id: "ghost".into() })
            .await
            .unwrap_err(),
        d.clone()
            .create_delegation(pb::CreateDelegationRequest {
                task_id: "ghost".into(),
                ..route("global", "project")
            })
            .await
            .unwrap_err(),
        t.clone()
            .get_task(pb::GetTaskRequest { id: "ghost".into() })
            .await
            .unwrap_err(),
        i.clone()
            .get_instance(pb::GetInstanceRequest { id: "ghost".into() })
            .await
            .unwrap_err(),
        d.clone()
            .get_delegation_chain(pb::GetDelegationChainRequest {
                task_id: "ghost".into(),
            })
            .await
            .unwrap_err(),
    ];
    for status in &not_found {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert!(status.message().ends_with("ghost not found"), "{status:?}");
    }

    let complete = d
        .clone()
        .complete_delegation(pb::CompleteDelegationRequest {
            id: pending.id.clone(),
            result: None,
            notes: None,
        })
        .await
        .unwrap_err();
    assert_eq!(complete.code(), Code::FailedPrecondition);
    assert!(complete.message().contains("is pending"), "{complete:?}");
    let taken = i
        .clone()
        .register_instance(pb::RegisterInstanceRequest {
            id: "global".into(),
            name: "g".into(),
            scope: Scope::Global.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (taken.code(), taken.message()),
        (Code::AlreadyExists, "instance global already exists")
    );

    assert_eq!(snapshot(&server.db.pool()).await, before);
    server.stop().await;
}

async fn racing_completions_over_grpc_have_one_winner(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    hierarchy(&mut server).await;
    delegate_and_accept(&mut server, "global", "project").await;
    let last = delegate_and_accept(&mut server, "project", "orch").await;
    let client = server.delegations.clone();
    let outcomes = race(8, |_| {
        let mut client = client.clone();
        let id = last.id.clone();
        async move {
            client
                .complete_delegation(pb::CompleteDelegationRequest {
                    id,
                    result: None,
                    notes: None,
                })
                .await
        }
    })
    .await;
    let codes: Vec<_> = outcomes
        .iter()
        .map(|o| o.as_ref().map_or_else(Status::code, |_| Code::Ok))
        .collect();
    assert_eq!(
        codes.iter().filter(|c| **c == Code::Ok).count(),
        1,
        "{codes:?}"
    );
    assert_eq!(
        codes
            .iter()
            .filter(|c| **c == Code::FailedPrecondition)
            .count(),
        7,
        "{codes:?}"
    );
    server.stop().await;
}

async fn an_unreachable_database_answers_unavailable(backend: Backend) {
    let url = match backend {
        Backend::Sqlite => "sqlite:///nonexistent-dir/for/hopper.db",
        Backend::Postgres => "postgres://root@127.0.0.1:9/none",
    };
    let db = hopper_delegation::store::Db::open(&url.parse().unwrap(), 2).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hub = hopper_delegation::fanout::Hub::new(db, std::time::Duration::from_secs(5));
    let config = hopper_delegation::server::Config::default();
    let served = tokio::spawn(hopper_delegation::server::run(
        listener,
        hub,
        config,
        async {
            let _ = stopped.await;
        },
    ));
    let mut tasks = pb::task_service_client::TaskServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let status = tasks
        .get_task(pb::GetTaskRequest { id: "t".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    stop.send(()).unwrap();
    served.await.unwrap().unwrap();
}

on_both_backends!(
    a_completion_at_orchestration_reaches_global_over_grpc,
    operators_reject_cancel_and_annotate_over_grpc,
    the_instance_tree_shows_each_instances_pending_and_accepted_delegations,
    bad_input_gets_a_clear_status_and_changes_nothing,
    racing_completions_over_grpc_have_one_winner,
    an_unreachable_database_answers_unavailable
);

/// Without TCP_NODELAY on the accepted socket, a response written in two segments waits about
/// 40 ms for the client's delayed ACK (tonic's `tcp_nodelay` does not reach sockets from a
/// listener it did not bind).
#[tokio::test]
async fn accepted_connections_send_without_delay() {
    let mut server = TestServer::start(Backend::Sqlite).await;
    server
        .instances
        .list_instances(pb::ListInstancesRequest::default())
        .await
        .unwrap();
    let sockets = common::accepted_nodelay(server.addr.port());
    assert!(!sockets.is_empty(), "found no accepted connection");
    assert!(sockets.iter().all(|on| *on), "{sockets:?}");
    server.stop().await;
}

#[tokio::test]
async fn reflection_and_health_are_served_for_grpcurl() {
    use tonic_reflection::pb::{v1, v1alpha};
    let server = TestServer::start(Backend::Sqlite).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = alpha
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for service in [
        "hopper.delegation.v1.DelegationService",
        "hopper.delegation.v1.InstanceService",
        "hopper.delegation.v1.TaskService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&service), "{service} missing from {names:?}");
    }

    let mut current = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "google.rpc.BadRequest".into(),
            ),
        ),
    };
    let mut stream = current
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    assert!(
        matches!(
            response.message_response,
            Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "{response:?}"
    );

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "hopper.delegation.v1.DelegationService"] {
        let status = health
            .check(Request::new(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            }))
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    server.stop().await;
}
