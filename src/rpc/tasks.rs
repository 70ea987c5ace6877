//! `hopper.delegation.v1.TaskService`.

use tonic::{Request, Response, Status};

use super::{all, id, page, parse_result, text};
use crate::{
    auth::Caller,
    domain::limits,
    error::Error,
    proto::{self as pb, server::task_service_server::TaskService},
    repository::tasks::{self, NewTask},
    store::Db,
    telemetry,
};

/// Serves TaskService from a database.
#[derive(Clone)]
pub struct TaskApi {
    db: Db,
}

impl TaskApi {
    /// A service over `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

#[tonic::async_trait]
impl TaskService for TaskApi {
    async fn create_task(
        &self,
        request: Request<pb::CreateTaskRequest>,
    ) -> Result<Response<pb::CreateTaskResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let new = NewTask {
            request_id: limits::optional_id("request_id", &r.request_id)?
                .map(|id| caller.request_key(id)),
            id: limits::optional_id("id", &r.id)?,
            title: text("title", r.title, limits::MAX_TITLE_LEN, true)?,
            description: text("description", r.description, limits::MAX_NOTES_LEN, false)?,
            instance_id: limits::optional_id("instance_id", &r.instance_id)?,
            parent_task_id: limits::optional_id("parent_task_id", &r.parent_task_id)?,
        };
        if new.instance_id.is_none() && new.parent_task_id.is_none() {
            return Err(Error::invalid("instance_id", "is required").into());
        }
        let created = tasks::create(&self.db, &caller, new).await?;
        telemetry::record_ids(Some(&created.id), None);
        Ok(Response::new(pb::CreateTaskResponse {
            task: Some(created.into()),
        }))
    }

    async fn list_subtasks(
        &self,
        request: Request<pb::ListSubtasksRequest>,
    ) -> Result<Response<pb::ListSubtasksResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let task_id = id("task_id", r.task_id)?;
        let page = page(r.page_size, r.page_token)?;
        telemetry::record_ids(Some(&task_id), None);
        let page = tasks::list_subtasks(&self.db, &caller, &task_id, &page).await?;
        Ok(Response::new(pb::ListSubtasksResponse {
            subtasks: all(page.items),
            next_page_token: page.next_page_token,
        }))
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let task_id = id("task_id", r.task_id)?;
        let result = parse_result(r.result)?;
        telemetry::record_ids(Some(&task_id), None);
        let done = tasks::complete(&self.db, &caller, &task_id, result.as_ref()).await?;
        // The first is the delegation that brought the task; the rest it bubbled up to.
        if let Some(bubbled) = done.completed_delegations.len().checked_sub(1) {
            telemetry::metrics().bubbled(bubbled);
        }
        Ok(Response::new(pb::CompleteTaskResponse {
            task: Some(done.task.into()),
            completed_delegations: all(done.completed_delegations),
        }))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        let caller = Caller::of(&request)?;
        let task_id = id("task_id", request.into_inner().task_id)?;
        telemetry::record_ids(Some(&task_id), None);
        let cancelled = tasks::cancel(&self.db, &caller, &task_id).await?;
        Ok(Response::new(pb::CancelTaskResponse {
            task: Some(cancelled.task.into()),
            cancelled_delegations: all(cancelled.cancelled_delegations),
            cancelled_subtasks: all(cancelled.cancelled_subtasks),
        }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let caller = Caller::of(&request)?;
        let task_id = id("id", request.into_inner().id)?;
        telemetry::record_ids(Some(&task_id), None);
        let task = tasks::get(&self.db, &caller, &task_id).await?;
        Ok(Response::new(pb::GetTaskResponse {
            task: Some(task.into()),
        }))
    }
}
