//! Creating and reading tasks.

use super::{new_id, taken};
use crate::{
    domain::TaskStatus,
    error::Error,
    store::{
        Db, instances, now,
        tasks::{self, Task},
    },
};

/// A validated CreateTask request.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Caller-chosen id; `None` for a generated one.
    pub id: Option<String>,
    /// Short title.
    pub title: String,
    /// Longer description.
    pub description: String,
    /// Where the task starts; may be left out for a subtask.
    pub instance_id: Option<String>,
    /// The task this one is a subtask of.
    pub parent_task_id: Option<String>,
}

/// Creates a task, PENDING, at its instance. A subtask is created where its parent task is,
/// and only while the parent is not finished.
pub async fn create(db: &Db, new: NewTask) -> Result<Task, Error> {
    let mut tx = db.begin().await?;
    let outcome = async {
        let instance_id = match &new.parent_task_id {
            Some(parent_id) => {
                // Locked, so that the parent cannot move away while the subtask is placed.
                let parent = tasks::lock(&mut tx, parent_id)
                    .await?
                    .ok_or_else(|| Error::not_found("parent task", parent_id))?;
                if parent.status.is_final() {
                    return Err(Error::precondition(format!(
                        "parent task {parent_id} is {}; a finished task takes no subtasks",
                        parent.status
                    )));
                }
                match new.instance_id {
                    Some(wanted) if wanted != parent.instance_id => {
                        return Err(Error::precondition(format!(
                            "parent task {parent_id} is at instance {}, not {wanted}; \
                             a subtask is created where its parent task is",
                            parent.instance_id
                        )));
                    }
                    _ => parent.instance_id,
                }
            }
            None => {
                let id = new
                    .instance_id
                    .ok_or_else(|| Error::invalid("instance_id", "is required"))?;
                if instances::find(&mut tx, &id).await?.is_none() {
                    return Err(Error::not_found("instance", id));
                }
                id
            }
        };
        let at = now();
        let task = Task {
            id: new.id.unwrap_or_else(new_id),
            title: new.title,
            description: new.description,
            instance_id,
            parent_task_id: new.parent_task_id,
            status: TaskStatus::Pending,
            result: None,
            created_at: at,
            updated_at: at,
        };
        tasks::insert(&mut tx, &task)
            .await
            .map_err(taken("task", &task.id))?;
        Ok(task)
    }
    .await;
    tx.finish(outcome).await
}

/// Reads one task.
pub async fn get(db: &Db, id: &str) -> Result<Task, Error> {
    let mut conn = db.conn().await?;
    tasks::find(&mut conn, id)
        .await?
        .ok_or_else(|| Error::not_found("task", id))
}
