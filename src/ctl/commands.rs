//! One function per hopperctl command (but `watch`, in `watch.rs`): its gRPC calls and what it
//! prints.

use serde_json::json;

use super::{
    args::{Delegations, Instances, Tasks},
    connect::{Clients, Failure},
    render::{self, Cell, Format, Printer, changed, header, hops_done, show_instance, show_task},
    tree::{instance_tree, task_tree},
};
use crate::proto::{self as pb, delegation_service_client::DelegationServiceClient};

type DelegationClient = DelegationServiceClient<super::connect::Authed>;

/// The largest page the server serves.
const PAGE_SIZE: i32 = 500;

/// Every page of a listing: `page` reads the page at a token and returns its records and the
/// next token (empty after the last page).
async fn every_page<T, F, P>(mut page: P) -> Result<Vec<T>, Failure>
where
    P: FnMut(String) -> F,
    F: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let (mut all, mut token) = (Vec::new(), String::new());
    loop {
        let (records, next) = page(token).await?;
        all.extend(records);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

/// Takes the record out of a response that must carry one.
fn record<T>(record: Option<T>) -> Result<T, Failure> {
    record.ok_or_else(|| Failure::Refused("the server sent an empty response".into()))
}

pub(super) async fn instances(
    c: &mut Clients,
    command: Instances,
    p: &Printer,
) -> Result<(), Failure> {
    match command {
        Instances::Register {
            id,
            name,
            scope,
            parent,
            status,
            lease,
        } => {
            let request = pb::RegisterInstanceRequest {
                id,
                name,
                scope: pb::Scope::from(scope).into(),
                parent_id: parent.unwrap_or_default(),
                status: status.map_or(0, |s| pb::InstanceStatus::from(s).into()),
                lease: lease.map(wire_duration),
                ..Default::default()
            };
            let response = c.instances.register_instance(request).await?.into_inner();
            show_instance(&record(response.instance)?, p);
        }
        Instances::Renew { id } => {
            let request = pb::RenewInstanceLeaseRequest { instance_id: id };
            let response = c
                .instances
                .renew_instance_lease(request)
                .await?
                .into_inner();
            let instance = record(response.instance)?;
            match p.format {
                Format::Json => p.json(&render::instance_json(&instance)),
                Format::Text => p.line(format!(
                    "{} live until {}",
                    instance.id,
                    p.time(response.live_until.as_ref())
                )),
            }
        }
        Instances::List => {
            let client = &c.instances;
            let all = every_page(|page_token| {
                let mut client = client.clone();
                async move {
                    let request = pb::ListInstancesRequest {
                        page_size: PAGE_SIZE,
                        page_token,
                        ..Default::default()
                    };
                    let page = client.list_instances(request).await?.into_inner();
                    Ok((page.instances, page.next_page_token))
                }
            })
            .await?;
            if p.format == Format::Json {
                all.iter().for_each(|i| p.json(&render::instance_json(i)));
                return Ok(());
            }
            let mut rows = vec![header(&[
                "ID", "NAME", "SCOPE", "STATUS", "PARENT", "LEASE",
            ])];
            rows.extend(all.iter().map(|i| {
                vec![
                    Cell::plain(&i.id),
                    Cell::plain(&i.name),
                    Cell::plain(render::scope(i.scope)),
                    Cell::status(render::instance_status(i.status)),
                    Cell::plain(if i.parent_id.is_empty() {
                        "-"
                    } else {
                        &i.parent_id
                    }),
                    Cell::plain(p.lease(i)),
                ]
            }));
            p.table(&rows);
        }
        Instances::Tree { root } => {
            let request = pb::GetInstanceTreeRequest {
                root_id: root.clone().unwrap_or_default(),
            };
            let nodes = c
                .instances
                .get_instance_tree(request)
                .await?
                .into_inner()
                .nodes;
            instance_tree(&nodes, root.as_deref(), p);
        }
    }
    Ok(())
}

pub(super) async fn tasks(c: &mut Clients, command: Tasks, p: &Printer) -> Result<(), Failure> {
    match command {
        Tasks::Create {
            title,
            instance,
            id,
            parent,
            description,
        } => {
            let request = pb::CreateTaskRequest {
                id: id.unwrap_or_default(),
                title,
                description: description.unwrap_or_default(),
                instance_id: instance.unwrap_or_default(),
                parent_task_id: parent.unwrap_or_default(),
                request_id: String::new(),
            };
            let task = record(c.tasks.create_task(request).await?.into_inner().task)?;
            show_task(&task, p);
        }
        Tasks::Show { id } => {
            let task = record(
                c.tasks
                    .get_task(pb::GetTaskRequest { id })
                    .await?
                    .into_inner()
                    .task,
            )?;
            show_task(&task, p);
        }
        Tasks::Complete { id, result } => {
            let request = pb::CompleteTaskRequest {
                task_id: id,
                result,
            };
            let done = c.tasks.complete_task(request).await?.into_inner();
            let task = record(done.task)?;
            if p.format == Format::Json {
                p.json(&json!({
                    "task": render::task_json(&task),
                    "completed_delegations": render::delegations_json(&done.completed_delegations),
                }));
                return Ok(());
            }
            p.line(format!(
                "task {} is {}",
                task.id,
                render::task_status(task.status)
            ));
            hops_done("completed", &done.completed_delegations, p);
        }
        Tasks::Cancel { id } => {
            let request = pb::CancelTaskRequest { task_id: id };
            let cancelled = c.tasks.cancel_task(request).await?.into_inner();
            let task = record(cancelled.task)?;
            if p.format == Format::Json {
                p.json(&json!({
                    "task": render::task_json(&task),
                    "cancelled_delegations": render::delegations_json(&cancelled.cancelled_delegations),
                    "cancelled_subtasks": cancelled.cancelled_subtasks.iter().map(render::task_json).collect::<Vec<_>>(),
                }));
                return Ok(());
            }
            p.line(format!(
                "task {} is {}",
                task.id,
                render::task_status(task.status)
            ));
            hops_done("cancelled", &cancelled.cancelled_delegations, p);
            for subtask in &cancelled.cancelled_subtasks {
                p.line(format!("  subtask {} cancelled", subtask.id));
            }
        }
    }
    Ok(())
}

/// The delegation commands (`delegate`, `accept`, `reject`, `complete`, `cancel`, `chain`,
/// `tree`, `pending`).
pub(super) async fn delegations(
    c: &mut Clients,
    command: Delegations,
    p: &Printer,
) -> Result<(), Failure> {
    let d = &mut c.delegations;
    match command {
        Delegations::Delegate {
            task,
            source,
            target,
            delegation_type,
            delegated_by,
            notes,
            accept_within,
            complete_within,
        } => {
            let request = pb::CreateDelegationRequest {
                task_id: task,
                source_instance_id: source,
                target_instance_id: target,
                delegation_type: pb::DelegationType::from(delegation_type).into(),
                notes: notes.unwrap_or_default(),
                delegated_by: delegated_by.unwrap_or_default(),
                request_id: String::new(),
                id: String::new(),
                accept_within: accept_within.map(wire_duration),
                complete_within: complete_within.map(wire_duration),
            };
            let created = record(d.create_delegation(request).await?.into_inner().delegation)?;
            match p.format {
                Format::Json => p.json(&render::delegation_json(&created)),
                Format::Text => p.line(&created.id),
            }
            Ok(())
        }
        Delegations::Accept { id } => {
            let request = pb::AcceptDelegationRequest { id };
            let accepted = record(d.accept_delegation(request).await?.into_inner().delegation)?;
            changed(&accepted, p);
            Ok(())
        }
        Delegations::Reject { id, reason } => {
            let request = pb::RejectDelegationRequest { id, reason };
            let rejected = record(d.reject_delegation(request).await?.into_inner().delegation)?;
            changed(&rejected, p);
            Ok(())
        }
        Delegations::Complete { id, result } => complete(d, id, result, p).await,
        Delegations::Cancel { id } => cancel(d, id, p).await,
        Delegations::Chain { task } => chain(d, task, p).await,
        Delegations::Tree { task } => tree(d, task, p).await,
        Delegations::Pending { instance } => pending(d, instance, p).await,
    }
}

/// Completes a hop; prints it, the hops the completion bubbled up to, and the task.
async fn complete(
    d: &mut DelegationClient,
    id: String,
    result: Option<prost_types::Struct>,
    p: &Printer,
) -> Result<(), Failure> {
    let request = pb::CompleteDelegationRequest {
        id,
        result,
        notes: None,
    };
    let done = d.complete_delegation(request).await?.into_inner();
    let (delegation, task) = (record(done.delegation)?, record(done.task)?);
    if p.format == Format::Json {
        p.json(&json!({
            "delegation": render::delegation_json(&delegation),
            "completed_ancestors": render::delegations_json(&done.completed_ancestors),
            "task": render::task_json(&task),
        }));
        return Ok(());
    }
    changed(&delegation, p);
    hops_done("bubbled up: completed", &done.completed_ancestors, p);
    p.line(format!(
        "task {} is {} at {}",
        task.id,
        render::task_status(task.status),
        task.instance_id
    ));
    Ok(())
}

/// Cancels a hop; prints it, what was cancelled with it, and where the task is now.
async fn cancel(d: &mut DelegationClient, id: String, p: &Printer) -> Result<(), Failure> {
    let request = pb::CancelDelegationRequest { id };
    let cancelled = d.cancel_delegation(request).await?.into_inner();
    let (delegation, task) = (record(cancelled.delegation)?, record(cancelled.task)?);
    if p.format == Format::Json {
        p.json(&json!({
            "delegation": render::delegation_json(&delegation),
            "cancelled_descendants": render::delegations_json(&cancelled.cancelled_descendants),
            "task": render::task_json(&task),
            "cancelled_subtasks": cancelled.cancelled_subtasks.iter().map(render::task_json).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    changed(&delegation, p);
    hops_done("with it: cancelled", &cancelled.cancelled_descendants, p);
    for subtask in &cancelled.cancelled_subtasks {
        p.line(format!("  subtask {} cancelled", subtask.id));
    }
    p.line(format!("task {} is back at {}", task.id, task.instance_id));
    Ok(())
}

/// Prints a task's chain of hops, from its origin to where it is now.
async fn chain(d: &mut DelegationClient, task: String, p: &Printer) -> Result<(), Failure> {
    let request = pb::GetDelegationChainRequest { task_id: task };
    let chain = d.get_delegation_chain(request).await?.into_inner();
    if p.format == Format::Json {
        p.json(&json!({
            "task_id": chain.task_id,
            "origin_instance_id": chain.origin_instance_id,
            "current_instance_id": chain.current_instance_id,
            "delegations": render::delegations_json(&chain.delegations),
        }));
        return Ok(());
    }
    p.line(format!(
        "task {}: from {} to {}, {} hop{}",
        chain.task_id,
        chain.origin_instance_id,
        chain.current_instance_id,
        chain.delegations.len(),
        if chain.delegations.len() == 1 {
            ""
        } else {
            "s"
        },
    ));
    let mut rows = vec![header(&[
        "#",
        "TYPE",
        "HOP",
        "STATUS",
        "DELEGATED",
        "ACCEPTED",
        "COMPLETED",
        "DEADLINE",
    ])];
    rows.extend(chain.delegations.iter().enumerate().map(|(n, h)| {
        vec![
            Cell::plain((n + 1).to_string()),
            Cell::plain(render::delegation_type(h.delegation_type)),
            Cell::plain(format!(
                "{} → {}",
                h.source_instance_id, h.target_instance_id
            )),
            Cell::status(render::delegation_status(h.status)),
            Cell::plain(p.time(h.delegated_at.as_ref())),
            Cell::plain(p.time(h.accepted_at.as_ref())),
            Cell::plain(p.time(h.completed_at.as_ref())),
            Cell::plain(p.deadline(h)),
        ]
    }));
    p.table(&rows);
    Ok(())
}

/// Draws a task with its subtasks and their hops.
async fn tree(d: &mut DelegationClient, task: String, p: &Printer) -> Result<(), Failure> {
    let request = pb::GetDelegationTreeRequest { task_id: task };
    let tree = d.get_delegation_tree(request).await?.into_inner();
    let root = record(tree.task)?;
    if p.format == Format::Json {
        p.json(&json!({
            "task": render::task_json(&root),
            "subtasks": tree.subtasks.iter().map(render::task_json).collect::<Vec<_>>(),
            "delegations": render::delegations_json(&tree.delegations),
        }));
        return Ok(());
    }
    task_tree(&root, &tree.subtasks, &tree.delegations, p);
    Ok(())
}

/// Lists every delegation waiting at an instance.
async fn pending(d: &mut DelegationClient, instance: String, p: &Printer) -> Result<(), Failure> {
    let client = &*d;
    let all = every_page(|page_token| {
        let (mut client, instance_id) = (client.clone(), instance.clone());
        async move {
            let request = pb::ListPendingDelegationsRequest {
                instance_id,
                page_size: PAGE_SIZE,
                page_token,
            };
            let page = client.list_pending_delegations(request).await?.into_inner();
            Ok((page.delegations, page.next_page_token))
        }
    })
    .await?;
    if p.format == Format::Json {
        all.iter().for_each(|d| p.json(&render::delegation_json(d)));
        return Ok(());
    }
    if all.is_empty() {
        p.line(format!("no pending delegations for {instance}"));
        return Ok(());
    }
    let mut rows = vec![header(&[
        "ID",
        "TASK",
        "TYPE",
        "FROM",
        "BY",
        "DELEGATED",
        "DEADLINE",
    ])];
    rows.extend(all.iter().map(|d| {
        vec![
            Cell::plain(&d.id),
            Cell::plain(&d.task_id),
            Cell::plain(render::delegation_type(d.delegation_type)),
            Cell::plain(&d.source_instance_id),
            Cell::plain(if d.delegated_by.is_empty() {
                "-"
            } else {
                &d.delegated_by
            }),
            Cell::plain(p.time(d.delegated_at.as_ref())),
            Cell::plain(p.deadline(d)),
        ]
    }));
    p.table(&rows);
    Ok(())
}

/// A flag's duration on the wire. The server says what it thinks of the value
/// (INVALID_ARGUMENT naming the field); too large for the wire is too large for it too.
fn wire_duration(within: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(within.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(within.subsec_nanos()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_page_reads_until_the_token_is_empty_and_stops_at_a_refusal() {
        let all = every_page(|token| async move {
            Ok(match token.as_str() {
                "" => (vec![1, 2], "a".to_owned()),
                "a" => (vec![3], "b".to_owned()),
                _ => (vec![], String::new()),
            })
        })
        .await
        .unwrap();
        assert_eq!(all, [1, 2, 3]);
        let refused = every_page::<u8, _, _>(|_| async {
            Err(tonic::Status::invalid_argument(
                "page_token: is not a token from this server",
            ))
        })
        .await
        .unwrap_err();
        assert_eq!(refused.code(), 1);
    }
}
