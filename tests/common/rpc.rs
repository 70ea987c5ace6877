//! The gRPC requests the tests send, built once: instances, tasks and hops of the Global ->
//! Project -> Orchestration story, and [`TestServer`] calls that must succeed.

use hopper_delegation::proto as pb;

use super::TestServer;

/// Registers instance `id` (named after itself, RUNNING) with `scope` under `parent` (`""` for
/// a root).
pub fn register(id: &str, scope: impl Into<i32>, parent: &str) -> pb::RegisterInstanceRequest {
    pb::RegisterInstanceRequest {
        id: id.into(),
        name: id.into(),
        scope: scope.into(),
        parent_id: parent.into(),
        status: pb::InstanceStatus::Running.into(),
        ..Default::default()
    }
}

/// Creates task `id` (titled after itself) at instance `at`.
pub fn new_task(id: &str, at: &str) -> pb::CreateTaskRequest {
    pb::CreateTaskRequest {
        id: id.into(),
        title: id.into(),
        instance_id: at.into(),
        ..Default::default()
    }
}

/// Delegates `task` from `source` to `target` as `kind`.
pub fn hop(
    task: &str,
    source: &str,
    target: &str,
    kind: pb::DelegationType,
) -> pb::CreateDelegationRequest {
    pb::CreateDelegationRequest {
        task_id: task.into(),
        source_instance_id: source.into(),
        target_instance_id: target.into(),
        delegation_type: kind.into(),
        ..Default::default()
    }
}

/// Routes `task` from `source` down to `target`.
pub fn route(task: &str, source: &str, target: &str) -> pb::CreateDelegationRequest {
    hop(task, source, target, pb::DelegationType::Route)
}

/// Watches `instance` (and, if asked, every instance below it) from the log's head.
pub fn watch(instance: &str, include_descendants: bool) -> pb::WatchEventsRequest {
    pb::WatchEventsRequest {
        instance_id: instance.into(),
        include_descendants,
        ..Default::default()
    }
}

/// Completes delegation `id` with no result.
pub fn complete(id: &str) -> pb::CompleteDelegationRequest {
    pb::CompleteDelegationRequest {
        id: id.into(),
        result: None,
        notes: None,
    }
}

impl TestServer {
    /// Registers an instance (see [`register`]); it must succeed.
    pub async fn register(
        &mut self,
        id: &str,
        scope: impl Into<i32>,
        parent: &str,
    ) -> pb::Instance {
        let request = register(id, scope, parent);
        let response = self.instances.register_instance(request).await;
        response.expect("register").into_inner().instance.unwrap()
    }

    /// Registers Global -> Project -> Orchestration (`global`, `project`, `orch`) and a second
    /// project, `project2`, all RUNNING.
    pub async fn hierarchy(&mut self) {
        self.register("global", pb::Scope::Global, "").await;
        self.register("project", pb::Scope::Project, "global").await;
        self.register("orch", pb::Scope::Orchestration, "project")
            .await;
        self.register("project2", pb::Scope::Project, "global")
            .await;
    }

    /// Creates a task (see [`new_task`]); it must succeed.
    pub async fn new_task(&mut self, id: &str, at: &str) -> pb::Task {
        let response = self.tasks.create_task(new_task(id, at)).await;
        response.expect("create task").into_inner().task.unwrap()
    }

    /// Creates a delegation; it must succeed.
    pub async fn delegate(&mut self, request: pb::CreateDelegationRequest) -> pb::Delegation {
        let response = self.delegations.create_delegation(request).await;
        response
            .expect("create delegation")
            .into_inner()
            .delegation
            .unwrap()
    }

    /// Accepts delegation `id`; it must succeed.
    pub async fn accept(&mut self, id: &str) -> pb::Delegation {
        let request = pb::AcceptDelegationRequest { id: id.into() };
        let response = self.delegations.accept_delegation(request).await;
        response.expect("accept").into_inner().delegation.unwrap()
    }

    /// Completes delegation `id` (see [`complete`]); it must succeed.
    pub async fn complete(&mut self, id: &str) -> pb::CompleteDelegationResponse {
        let response = self.delegations.complete_delegation(complete(id)).await;
        response.expect("complete").into_inner()
    }
}
