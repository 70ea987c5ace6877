//! `hopper.delegation.v1.TaskService`.

use tonic::{Request, Response, Status};

use super::{id, text};
use crate::{
    domain::limits,
    error::Error,
    proto::{self as pb, task_service_server::TaskService},
    repository::tasks::{self, NewTask},
    store::Db,
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
    ) -> Result<Response<pb::Task>, Status> {
        let r = request.into_inner();
        let new = NewTask {
            id: limits::optional_id("id", &r.id)?,
            title: text("title", r.title, limits::MAX_TITLE_LEN, true)?,
            description: text("description", r.description, limits::MAX_NOTES_LEN, false)?,
            instance_id: limits::optional_id("instance_id", &r.instance_id)?,
            parent_task_id: limits::optional_id("parent_task_id", &r.parent_task_id)?,
        };
        if new.instance_id.is_none() && new.parent_task_id.is_none() {
            return Err(Error::invalid("instance_id", "is required").into());
        }
        Ok(Response::new(tasks::create(&self.db, new).await?.into()))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let task_id = id("id", request.into_inner().id)?;
        Ok(Response::new(tasks::get(&self.db, &task_id).await?.into()))
    }
}
