//! Property-based fuzzing of request validation and authorization: arbitrary requests from
//! arbitrary callers go straight into the gRPC handlers (no network, a real SQLite database)
//! and must come back as a response or a status from the documented set — never a panic,
//! never INTERNAL. The case count is bounded
//! (`PROPTEST_CASES`, default 256 per property) so CI runs it in seconds.

mod common;

use std::sync::OnceLock;

use common::{Backend, TestDb};
use hopper_delegation::{
    auth::Caller,
    fanout::Hub,
    proto::{
        self as pb,
        server::{
            delegation_service_server::DelegationService, instance_service_server::InstanceService,
            task_service_server::TaskService,
        },
    },
    rpc::{DelegationApi, InstanceApi, TaskApi},
};
use proptest::prelude::*;
use tonic::{Code, Request};

/// One database and runtime for every case: the properties are about validation, not data.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    instances: InstanceApi,
    tasks: TaskApi,
    delegations: DelegationApi,
    _db: TestDb,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let db = runtime.block_on(async {
            let db = TestDb::migrated(Backend::Sqlite).await;
            common::hierarchy(&db.pool()).await;
            common::task(&db.pool(), "t", "global").await;
            db
        });
        let pool = db.pool();
        Fixture {
            instances: InstanceApi::new(pool.clone()),
            tasks: TaskApi::new(pool.clone()),
            delegations: DelegationApi::new(
                Hub::new(pool, std::time::Duration::from_secs(5)),
                Default::default(),
            ),
            runtime,
            _db: db,
        }
    })
}

/// Strings that mix plausible ids, SQL, control characters, unicode and long runs.
/// Any duration the wire can carry, or none.
fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    proptest::option::of(
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
    )
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("global".to_owned()),
        Just("t".to_owned()),
        "[a-z0-9._-]{1,70}",
        "\\PC{0,80}",
        Just("x'; DROP TABLE tasks; --".to_owned()),
        "[\\x00-\\x1f]{1,5}",
        (1usize..20_000).prop_map(|n| "a".repeat(n)),
    ]
}

/// Unauthenticated servers, admins, instances of the tree and strangers.
fn caller() -> impl Strategy<Value = Caller> {
    prop_oneof![
        Just(Caller::Open),
        Just(Caller::Admin),
        prop_oneof![Just("global"), Just("project"), Just("orch2")]
            .prop_map(|id| Caller::Instance(id.to_owned())),
        text().prop_map(Caller::Instance),
    ]
}

/// `message` as a request from `caller`, as the authenticating interceptor leaves it.
fn from<T>(caller: &Caller, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(caller.clone());
    request
}

fn number() -> impl Strategy<Value = i32> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(-1),
        Just(i32::MIN),
        Just(i32::MAX),
        -5i32..12
    ]
}

fn check<T>(outcome: Result<T, tonic::Status>) -> Result<(), TestCaseError> {
    if let Err(status) = outcome {
        let allowed = [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::AlreadyExists,
            Code::OutOfRange,
            Code::PermissionDenied,
        ];
        prop_assert!(allowed.contains(&status.code()), "{status:?}");
    }
    Ok(())
}

// rustfmt leaves macro bodies alone: these are formatted by hand.
proptest! {
    #[test]
    fn instance_requests_never_panic(
        who in caller(),
        (id, name, parent, token) in (text(), text(), text(), text()),
        (scope, status, page) in (number(), number(), number()),
        lease in duration(),
    ) {
        let f = fixture();
        f.runtime.block_on(async {
            let i = &f.instances;
            let register = pb::RegisterInstanceRequest {
                id: id.clone(),
                name,
                scope,
                parent_id: parent.clone(),
                status,
                config: None,
                request_id: id.clone(),
                lease,
            };
            check(i.register_instance(from(&who, register)).await)?;
            let renew = pb::RenewInstanceLeaseRequest { instance_id: id.clone() };
            check(i.renew_instance_lease(from(&who, renew)).await)?;
            let get = pb::GetInstanceRequest { id: id.clone() };
            check(i.get_instance(from(&who, get)).await)?;
            let list = pb::ListInstancesRequest {
                scope,
                parent_id: parent,
                status,
                page_size: page,
                page_token: token,
            };
            check(i.list_instances(from(&who, list)).await)?;
            let update = pb::UpdateInstanceStatusRequest { id, status };
            check(i.update_instance_status(from(&who, update)).await)
        })?;
    }

    #[test]
    fn task_requests_never_panic(
        who in caller(),
        (id, title, instance, parent, token) in (text(), text(), text(), text(), text()),
        page in number(),
    ) {
        let f = fixture();
        f.runtime.block_on(async {
            let t = &f.tasks;
            let create = pb::CreateTaskRequest {
                id: id.clone(),
                title,
                description: String::new(),
                instance_id: instance,
                parent_task_id: parent,
                request_id: String::new(),
            };
            check(t.create_task(from(&who, create)).await)?;
            check(t.get_task(from(&who, pb::GetTaskRequest { id: id.clone() })).await)?;
            let subtasks = pb::ListSubtasksRequest {
                task_id: id.clone(),
                page_size: page,
                page_token: token,
            };
            check(t.list_subtasks(from(&who, subtasks)).await)?;
            check(t.cancel_task(from(&who, pb::CancelTaskRequest { task_id: id })).await)
        })?;
    }

    #[test]
    fn delegation_requests_never_panic(
        who in caller(),
        (task, source, target, id, reason, token) in
            (text(), text(), text(), text(), text(), text()),
        (kind, page) in (number(), number()),
        after in proptest::option::of(any::<u64>()),
        kinds in proptest::collection::vec(number(), 0..3),
        (accept_within, complete_within) in (duration(), duration()),
    ) {
        let f = fixture();
        f.runtime.block_on(async {
            let d = &f.delegations;
            let create = pb::CreateDelegationRequest {
                accept_within,
                complete_within,
                task_id: task.clone(),
                source_instance_id: source,
                target_instance_id: target.clone(),
                delegation_type: kind,
                notes: reason.clone(),
                delegated_by: String::new(),
                request_id: String::new(),
                id: id.clone(),
            };
            check(d.create_delegation(from(&who, create)).await)?;
            let get = pb::GetDelegationRequest { id: id.clone() };
            check(d.get_delegation(from(&who, get)).await)?;
            let reject = pb::RejectDelegationRequest { id: id.clone(), reason };
            check(d.reject_delegation(from(&who, reject)).await)?;
            let complete = pb::CompleteDelegationRequest {
                id: id.clone(),
                result: None,
                notes: None,
            };
            check(d.complete_delegation(from(&who, complete)).await)?;
            let of_instance = pb::ListInstanceDelegationsRequest {
                instance_id: target.clone(),
                direction: kind,
                statuses: kinds.clone(),
                page_size: page,
                page_token: token.clone(),
            };
            check(d.list_instance_delegations(from(&who, of_instance)).await)?;
            let counted = pb::CountDelegationsRequest {
                instance_id: target.clone(),
                direction: page,
            };
            check(d.count_delegations(from(&who, counted)).await)?;
            let pending = pb::ListPendingDelegationsRequest {
                instance_id: target,
                page_size: page,
                page_token: token.clone(),
            };
            check(d.list_pending_delegations(from(&who, pending)).await)?;
            let listed = pb::ListTaskDelegationsRequest {
                task_id: task.clone(),
                page_size: page,
                page_token: token,
            };
            check(d.list_task_delegations(from(&who, listed)).await)?;
            let tree = pb::GetDelegationTreeRequest { task_id: task.clone() };
            check(d.get_delegation_tree(from(&who, tree)).await)?;
            let watch = pb::WatchEventsRequest {
                instance_id: task,
                include_descendants: true,
                after_sequence: after,
                kinds,
            };
            check(d.watch_events(from(&who, watch)).await.map(drop))
        })?;
    }
}
