//! Authentication and the authorization table, through a real server with bearer tokens: every
//! rule is tried with a caller it allows and callers it refuses, and every refusal leaves the
//! database as it was.
//!
//! The tree (from `common::hierarchy`): global -> project -> orch, global -> project2 -> orch2.

mod common;

use common::{
    Backend, Clients, TestDb, TestServer, hierarchy,
    rpc::{self, new_task, route, watch},
    snapshot, test_tokens, token_of,
};
use hopper_delegation::{auth::Authenticator, proto as pb, server::Config};
use tonic::Code;

/// Awaits a call that must be refused with `code` and a message containing `needle`, and
/// checks that the database did not change.
macro_rules! refused {
    ($db:expr, $code:ident, $needle:expr, $call:expr) => {{
        let before = snapshot($db).await;
        let status = match $call.await {
            Ok(_) => panic!("{} should have been refused", stringify!($call)),
            Err(status) => status,
        };
        assert_eq!(status.code(), Code::$code, "{}", status.message());
        assert!(
            status.message().contains($needle),
            "{:?} does not contain {:?}",
            status.message(),
            $needle
        );
        assert_eq!(
            snapshot($db).await,
            before,
            "a refused request wrote something"
        );
    }};
}

const INSTANCES: [&str; 6] = ["global", "project", "orch", "project2", "orch2", "later"];

async fn server(backend: common::Backend) -> TestServer {
    let config = Config {
        auth: Authenticator::new(Some(test_tokens(&INSTANCES)), false),
        ..Config::default()
    };
    let server = TestServer::start_with(TestDb::migrated(backend).await, config).await;
    hierarchy(&server.db.pool()).await;
    server
}

/// An Orchestration instance `id` under `parent`.
fn register(id: &str, parent: &str) -> pb::RegisterInstanceRequest {
    rpc::register(id, pb::Scope::Orchestration, parent)
}

fn id_of<T: Into<String>>(id: T) -> pb::GetDelegationRequest {
    pb::GetDelegationRequest { id: id.into() }
}

/// Each caller of the tree, by its token.
struct Callers {
    admin: Clients,
    global: Clients,
    project: Clients,
    orch: Clients,
    project2: Clients,
    orch2: Clients,
    later: Clients,
}

impl Callers {
    fn of(server: &TestServer) -> Self {
        let c = |id: &str| server.calling_as(&token_of(id));
        Self {
            admin: c("admin"),
            global: c("global"),
            project: c("project"),
            orch: c("orch"),
            project2: c("project2"),
            orch2: c("orch2"),
            later: c("later"),
        }
    }
}

/// `project` creates a task at itself and routes it to `orch`; returns the delegation id.
async fn routed(c: &mut Callers, task: &str) -> String {
    c.project
        .tasks
        .create_task(new_task(task, "project"))
        .await
        .unwrap();
    let hop = route(task, "project", "orch");
    c.project
        .delegations
        .create_delegation(hop)
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap()
        .id
}

async fn requests_without_a_known_token_are_unauthenticated(backend: Backend) {
    let server = server(backend).await;
    let db = &server.db.pool();
    let get = || pb::GetInstanceRequest {
        id: "global".into(),
    };
    refused!(
        db,
        Unauthenticated,
        "no credentials",
        server.instances.clone().get_instance(get())
    );
    let mut stranger = server.calling_as("not-a-token");
    refused!(
        db,
        Unauthenticated,
        "unknown bearer token",
        stranger.instances.get_instance(get())
    );
    let reg = register("x", "global");
    refused!(
        db,
        Unauthenticated,
        "unknown",
        stranger.instances.register_instance(reg)
    );
    refused!(
        db,
        Unauthenticated,
        "no credentials",
        server
            .delegations
            .clone()
            .watch_events(watch("global", true))
    );
    // Health and reflection stay open for probes and grpcurl.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
}

async fn instances_register_read_and_manage_only_their_subtree(backend: Backend) {
    let server = server(backend).await;
    let db = &server.db.pool();
    let mut c = Callers::of(&server);

    c.project
        .instances
        .register_instance(register("orch-b", "project"))
        .await
        .unwrap();
    c.global
        .instances
        .register_instance(register("deep", "orch"))
        .await
        .unwrap();
    refused!(
        db,
        PermissionDenied,
        "instance orch may not act for parent instance project",
        c.orch.instances.register_instance(register("x", "project"))
    );
    refused!(
        db,
        PermissionDenied,
        "takes the admin token",
        c.project.instances.register_instance(register("x", ""))
    );
    refused!(
        db,
        NotFound,
        "parent instance missing",
        c.project
            .instances
            .register_instance(register("x", "missing"))
    );
    c.admin
        .instances
        .register_instance(register("root2", ""))
        .await
        .unwrap();

    let get = |id: &str| pb::GetInstanceRequest { id: id.into() };
    c.orch.instances.get_instance(get("global")).await.unwrap();
    c.global.instances.get_instance(get("orch2")).await.unwrap();
    refused!(
        db,
        PermissionDenied,
        "neither in its subtree nor one of its ancestors",
        c.orch.instances.get_instance(get("project2"))
    );

    let ids =
        |r: pb::ListInstancesResponse| r.instances.into_iter().map(|i| i.id).collect::<Vec<_>>();
    let listed = c
        .project
        .instances
        .list_instances(pb::ListInstancesRequest::default())
        .await
        .unwrap();
    assert_eq!(
        ids(listed.into_inner()),
        ["deep", "orch", "orch-b", "project"]
    );
    let children = pb::ListInstancesRequest {
        parent_id: "global".into(),
        ..Default::default()
    };
    let listed = c
        .project
        .instances
        .list_instances(children.clone())
        .await
        .unwrap();
    assert_eq!(ids(listed.into_inner()), ["project"]);
    let listed = c.admin.instances.list_instances(children).await.unwrap();
    assert_eq!(ids(listed.into_inner()), ["project", "project2"]);

    let status = |id: &str| pb::UpdateInstanceStatusRequest {
        id: id.into(),
        status: pb::InstanceStatus::Paused.into(),
    };
    refused!(
        db,
        PermissionDenied,
        "act for instance project",
        c.orch.instances.update_instance_status(status("project"))
    );
    c.project
        .instances
        .update_instance_status(status("orch"))
        .await
        .unwrap();
    c.orch
        .instances
        .update_instance_status(status("orch"))
        .await
        .unwrap();
}

async fn the_instance_tree_is_read_only_within_the_own_subtree(backend: Backend) {
    let server = server(backend).await;
    let db = &server.db.pool();
    let mut c = Callers::of(&server);
    routed(&mut c, "t").await;

    let tree = |root: &str| pb::GetInstanceTreeRequest {
        root_id: root.into(),
    };
    let ids = |r: pb::GetInstanceTreeResponse| {
        r.nodes
            .into_iter()
            .map(|n| n.instance.unwrap().id)
            .collect::<Vec<_>>()
    };
    let own = c
        .project
        .instances
        .get_instance_tree(tree("project"))
        .await
        .unwrap()
        .into_inner();
    let pending: Vec<_> = own.nodes.iter().map(|n| n.pending_delegations).collect();
    assert_eq!(
        (ids(own), pending),
        (vec!["orch".to_owned(), "project".to_owned()], vec![1, 0])
    );
    let below = c
        .project
        .instances
        .get_instance_tree(tree("orch"))
        .await
        .unwrap();
    assert_eq!(ids(below.into_inner()), ["orch"]);
    let unrooted = c
        .project
        .instances
        .get_instance_tree(tree(""))
        .await
        .unwrap();
    assert_eq!(ids(unrooted.into_inner()), ["orch", "project"]);
    let unrooted = c.orch2.instances.get_instance_tree(tree("")).await.unwrap();
    assert_eq!(ids(unrooted.into_inner()), ["orch2"]);
    let everything = c.admin.instances.get_instance_tree(tree("")).await.unwrap();
    assert_eq!(
        ids(everything.into_inner()),
        ["global", "orch", "orch2", "project", "project2"]
    );
    c.global
        .instances
        .get_instance_tree(tree("project2"))
        .await
        .unwrap();

    refused!(
        db,
        PermissionDenied,
        "act for instance project",
        c.orch.instances.get_instance_tree(tree("project"))
    );
    refused!(
        db,
        PermissionDenied,
        "act for instance global",
        c.project.instances.get_instance_tree(tree("global"))
    );
    refused!(
        db,
        PermissionDenied,
        "act for instance orch",
        c.project2.instances.get_instance_tree(tree("orch"))
    );
    refused!(
        db,
        NotFound,
        "instance missing not found",
        c.project.instances.get_instance_tree(tree("missing"))
    );
}

async fn delegations_are_made_and_answered_by_their_own_ends(backend: Backend) {
    let server = server(backend).await;
    let db = &server.db.pool();
    let mut c = Callers::of(&server);

    refused!(
        db,
        PermissionDenied,
        "act for instance project",
        c.orch2.tasks.create_task(new_task("t", "project"))
    );
    c.project
        .tasks
        .create_task(new_task("t", "project"))
        .await
        .unwrap();
    let sub = pb::CreateTaskRequest {
        parent_task_id: "t".into(),
        ..new_task("t.1", "")
    };
    refused!(
        db,
        PermissionDenied,
        "instance orch may not create a subtask of task t; \
         only an instance managing where it is may",
        c.orch.tasks.create_task(sub.clone())
    );

    refused!(
        db,
        PermissionDenied,
        "act for source instance project",
        c.orch
            .delegations
            .create_delegation(route("t", "project", "orch"))
    );
    refused!(
        db,
        PermissionDenied,
        "act for source instance project",
        c.project2
            .delegations
            .create_delegation(route("t", "project", "orch"))
    );
    // Naming itself as the source does not let project2 probe a task it may not read.
    refused!(
        db,
        PermissionDenied,
        "read task t, which involves no instance",
        c.project2
            .delegations
            .create_delegation(route("t", "project2", "orch2"))
    );
    let d1 = c
        .project
        .delegations
        .create_delegation(route("t", "project", "orch"))
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap()
        .id;

    let pending = |id: &str| pb::ListPendingDelegationsRequest {
        instance_id: id.into(),
        ..Default::default()
    };
    let listed = c
        .project
        .delegations
        .list_pending_delegations(pending("orch"))
        .await
        .unwrap();
    assert_eq!(listed.into_inner().delegations.len(), 1);
    refused!(
        db,
        PermissionDenied,
        "act for instance orch",
        c.orch2
            .delegations
            .list_pending_delegations(pending("orch"))
    );

    let accept = || pb::AcceptDelegationRequest { id: d1.clone() };
    refused!(
        db,
        PermissionDenied,
        "only its target instance may accept",
        c.project.delegations.accept_delegation(accept())
    );
    refused!(
        db,
        PermissionDenied,
        "only its target instance may accept",
        c.global.delegations.accept_delegation(accept())
    );
    refused!(
        db,
        NotFound,
        "delegation missing",
        c.orch
            .delegations
            .accept_delegation(pb::AcceptDelegationRequest {
                id: "missing".into()
            })
    );
    c.orch
        .delegations
        .accept_delegation(accept())
        .await
        .unwrap();

    let notes = |by: &str| pb::UpdateDelegationRequest {
        id: d1.clone(),
        notes: format!("by {by}"),
    };
    refused!(
        db,
        PermissionDenied,
        "may not annotate delegation",
        c.orch2.delegations.update_delegation(notes("orch2"))
    );
    c.orch
        .delegations
        .update_delegation(notes("orch"))
        .await
        .unwrap();
    c.project
        .delegations
        .update_delegation(notes("project"))
        .await
        .unwrap();

    let complete = || pb::CompleteTaskRequest {
        task_id: "t".into(),
        ..Default::default()
    };
    refused!(
        db,
        PermissionDenied,
        "only the instance it is at may",
        c.project.tasks.complete_task(complete())
    );
    let done = c
        .orch
        .tasks
        .complete_task(complete())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.task.unwrap().status(), pb::TaskStatus::Done);

    // The ancestor of a source may delegate for it; reject and complete are the target's.
    c.project
        .tasks
        .create_task(new_task("t2", "project"))
        .await
        .unwrap();
    let d2 = c
        .global
        .delegations
        .create_delegation(route("t2", "project", "orch"))
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap()
        .id;
    let reject = pb::RejectDelegationRequest {
        id: d2.clone(),
        reason: "busy".into(),
    };
    refused!(
        db,
        PermissionDenied,
        "only its target instance",
        c.orch2.delegations.reject_delegation(reject.clone())
    );
    c.orch.delegations.reject_delegation(reject).await.unwrap();

    let d3 = c
        .project
        .delegations
        .create_delegation(route("t2", "project", "orch"))
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap()
        .id;
    c.orch
        .delegations
        .accept_delegation(pb::AcceptDelegationRequest { id: d3.clone() })
        .await
        .unwrap();
    let complete = || pb::CompleteDelegationRequest {
        id: d3.clone(),
        ..Default::default()
    };
    refused!(
        db,
        PermissionDenied,
        "only its target instance",
        c.project.delegations.complete_delegation(complete())
    );
    c.admin
        .delegations
        .complete_delegation(complete())
        .await
        .unwrap();
}

async fn cancelling_belongs_to_the_source_side(backend: Backend) {
    let server = server(backend).await;
    let db = &server.db.pool();
    let mut c = Callers::of(&server);

    let d = routed(&mut c, "t").await;
    let cancel = || pb::CancelDelegationRequest { id: d.clone() };
    refused!(
        db,
        PermissionDenied,
        "only an instance managing where it was sent from may",
        c.orch.delegations.cancel_delegation(cancel())
    );
    refused!(
        db,
        PermissionDenied,
        "may not cancel delegation",
        c.project2.delegations.cancel_delegation(cancel())
    );
    c.global
        .delegations
        .cancel_delegation(cancel())
        .await
        .unwrap();

    // The task is at orch now, but it started at project: only project's side cancels it.
    let d = routed(&mut c, "t2").await;
    c.orch
        .delegations
        .accept_delegation(pb::AcceptDelegationRequest { id: d })
        .await
        .unwrap();
    let cancel = || pb::CancelTaskRequest {
        task_id: "t2".into(),
    };
    refused!(
        db,
        PermissionDenied,
        "may not cancel task t2; only an instance managing where it started may",
        c.orch.tasks.cancel_task(cancel())
    );
    c.project.tasks.cancel_task(cancel()).await.unwrap();
}

async fn a_task_is_read_by_the_instances_it_involves_and_their_ancestors(backend: Backend) {
    let server = server(backend).await;
    let db = &server.db.pool();
    let mut c = Callers::of(&server);
    let d = routed(&mut c, "t").await;

    let get = || pb::GetTaskRequest { id: "t".into() };
    for reader in [&mut c.orch, &mut c.project, &mut c.global, &mut c.admin] {
        reader.tasks.get_task(get()).await.unwrap();
        reader.delegations.get_delegation(id_of(&d)).await.unwrap();
    }
    let t = || "t".to_owned();
    let involves = "involves no instance in its subtree";
    refused!(
        db,
        PermissionDenied,
        involves,
        c.orch2.tasks.get_task(get())
    );
    refused!(
        db,
        PermissionDenied,
        involves,
        c.project2.delegations.get_delegation(id_of(&d))
    );
    refused!(
        db,
        PermissionDenied,
        involves,
        c.orch2
            .delegations
            .get_delegation_chain(pb::GetDelegationChainRequest { task_id: t() })
    );
    refused!(
        db,
        PermissionDenied,
        involves,
        c.orch2
            .delegations
            .get_delegation_tree(pb::GetDelegationTreeRequest { task_id: t() })
    );
    refused!(
        db,
        PermissionDenied,
        involves,
        c.orch2
            .delegations
            .list_task_delegations(pb::ListTaskDelegationsRequest {
                task_id: t(),
                ..Default::default()
            })
    );
    refused!(
        db,
        PermissionDenied,
        involves,
        c.orch2.tasks.list_subtasks(pb::ListSubtasksRequest {
            task_id: t(),
            ..Default::default()
        })
    );
    refused!(
        db,
        NotFound,
        "task missing",
        c.orch.tasks.get_task(pb::GetTaskRequest {
            id: "missing".into()
        })
    );
    c.orch
        .delegations
        .get_delegation_chain(pb::GetDelegationChainRequest { task_id: t() })
        .await
        .unwrap();
}

async fn events_are_watched_only_within_the_own_subtree(backend: Backend) {
    let server = server(backend).await;
    let db = &server.db.pool();
    let mut c = Callers::of(&server);

    c.orch
        .delegations
        .watch_events(watch("orch", false))
        .await
        .unwrap();
    refused!(
        db,
        NotFound,
        "instance later not found",
        c.later.delegations.watch_events(watch("later", true))
    );
    let mut stream = c
        .project
        .delegations
        .watch_events(watch("project", true))
        .await
        .unwrap()
        .into_inner();
    refused!(
        db,
        PermissionDenied,
        "act for instance global",
        c.project.delegations.watch_events(watch("global", true))
    );
    refused!(
        db,
        PermissionDenied,
        "act for instance project",
        c.orch2.delegations.watch_events(watch("project", false))
    );

    // The allowed subscription delivers the subtree's events.
    routed(&mut c, "t").await;
    let event = loop {
        match stream.message().await.unwrap().unwrap().payload.unwrap() {
            pb::watch_events_response::Payload::Event(event) => break event,
            pb::watch_events_response::Payload::Progress(_) => {}
        }
    };
    assert_eq!(event.kind(), pb::EventKind::DelegationCreated);
    assert_eq!(event.task_id, "t");
}

async fn request_ids_belong_to_their_caller(backend: Backend) {
    let server = server(backend).await;
    let mut c = Callers::of(&server);
    let create = |id: &str, at: &str| pb::CreateTaskRequest {
        request_id: "req-1".into(),
        ..new_task(id, at)
    };

    let first = c
        .project
        .tasks
        .create_task(create("a", "project"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    // The same request id from another caller is a request of its own…
    let other = c
        .project2
        .tasks
        .create_task(create("b", "project2"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!((first.id.as_str(), other.id.as_str()), ("a", "b"));
    let admin = c
        .admin
        .tasks
        .create_task(create("c", "project"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(admin.id, "c");
    // …while a retry by the same caller gets the original, and a different body under it is
    // ALREADY_EXISTS, naming the id as the caller sent it.
    let retry = c
        .project
        .tasks
        .create_task(create("a", "project"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(retry, first);
    let err = c
        .project
        .tasks
        .create_task(create("z", "project"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message().starts_with("request req-1 (it was used"),
        "{}",
        err.message()
    );
}

on_both_backends!(
    requests_without_a_known_token_are_unauthenticated,
    instances_register_read_and_manage_only_their_subtree,
    the_instance_tree_is_read_only_within_the_own_subtree,
    delegations_are_made_and_answered_by_their_own_ends,
    cancelling_belongs_to_the_source_side,
    a_task_is_read_by_the_instances_it_involves_and_their_ancestors,
    events_are_watched_only_within_the_own_subtree,
    request_ids_belong_to_their_caller
);
