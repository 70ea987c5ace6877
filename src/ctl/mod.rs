//! `hopperctl`, the operator's client: register the hierarchy, create and delegate tasks, see
//! where work is (`chain`, `tree`, `instances tree`) and follow it live (`watch`).
//!
//! Each command is one or a few gRPC calls through the generated clients, printed by
//! [`render`]. Exit codes: 0 done, 1 the server refused the request (its message, one
//! sentence, on stderr), 2 a usage error, 3 the server cannot be reached.

mod connect;
mod render;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use crate::{
    domain::{DelegationType, InstanceStatus, Scope},
    proto as pb,
    proto::json::to_struct,
};
use connect::{Clients, Failure, Target};
use render::{Cell, Format, Printer};

/// The Hopper delegation service's command line client.
#[derive(Debug, Parser)]
#[command(name = "hopperctl", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    target: Target,
    /// Output: `text` for people, `json` for scripts (one document per record, per line).
    #[arg(short, long, value_enum, default_value_t = Format::Text, global = true)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register, list and draw instances.
    #[command(subcommand)]
    Instances(Instances),
    /// Create, show, complete and cancel tasks.
    #[command(subcommand)]
    Tasks(Tasks),
    #[command(flatten)]
    Delegations(Delegations),
    /// Print an instance's events as they arrive; reconnects and resumes by itself.
    Watch(watch::WatchArgs),
}

#[derive(Debug, Subcommand)]
enum Delegations {
    /// Delegate a task from one instance to another; prints the new delegation's id.
    Delegate {
        /// The task to delegate; it must be at the source.
        task: String,
        /// The instance sending the task.
        #[arg(long = "from")]
        source: String,
        /// The instance receiving it.
        #[arg(long = "to")]
        target: String,
        /// How the task moves.
        #[arg(long = "type", default_value = "route", value_parser = parse_word::<DelegationType>)]
        delegation_type: DelegationType,
        /// Who is delegating (a user, a service, an agent).
        #[arg(long = "by")]
        delegated_by: Option<String>,
        /// Free-form notes.
        #[arg(long)]
        notes: Option<String>,
    },
    /// Accept a pending delegation (as its target).
    Accept {
        /// The delegation's id.
        id: String,
    },
    /// Reject a pending delegation (as its target); the task goes back to the source.
    Reject {
        /// The delegation's id.
        id: String,
        /// Why the task is refused.
        #[arg(long)]
        reason: String,
    },
    /// Complete an accepted delegation; the completion bubbles up the chain.
    Complete {
        /// The delegation's id.
        id: String,
        /// The outcome, a JSON object.
        #[arg(long, value_parser = parse_object)]
        result: Option<prost_types::Struct>,
    },
    /// Cancel a pending or accepted delegation and everything delegated below it.
    Cancel {
        /// The delegation's id.
        id: String,
    },
    /// A task's hops from its origin to where it is now, one line per hop.
    Chain {
        /// The task's id.
        task: String,
    },
    /// A task, its subtasks at any depth and their hops, drawn as a tree.
    Tree {
        /// The task's id.
        task: String,
    },
    /// The delegations waiting for an instance to accept or reject them (every page).
    Pending {
        /// The target instance.
        instance: String,
    },
}

#[derive(Debug, Subcommand)]
enum Instances {
    /// Register an instance.
    Register {
        /// Its id, e.g. `global`.
        id: String,
        /// A human-readable name.
        #[arg(long)]
        name: String,
        /// Where it sits in the tree.
        #[arg(long, value_parser = parse_word::<Scope>)]
        scope: Scope,
        /// Its parent instance; none for a root.
        #[arg(long)]
        parent: Option<String>,
        /// Its run state (default: created).
        #[arg(long, value_parser = parse_word::<InstanceStatus>)]
        status: Option<InstanceStatus>,
    },
    /// List every instance (every page), ordered by id.
    List,
    /// Draw the hierarchy with each instance's scope, status, pending and accepted delegations.
    Tree {
        /// Draw only the subtree below this instance.
        root: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum Tasks {
    /// Create a task at an instance (a subtask: where its parent is).
    Create {
        /// A short title.
        #[arg(long)]
        title: String,
        /// The instance the task starts at; a subtask (`--parent`) starts where its parent is.
        #[arg(long = "at", required_unless_present = "parent")]
        instance: Option<String>,
        /// Its id (default: a generated UUID).
        #[arg(long)]
        id: Option<String>,
        /// Make it a subtask of this task.
        #[arg(long)]
        parent: Option<String>,
        /// A longer description.
        #[arg(long)]
        description: Option<String>,
    },
    /// Show a task.
    Show {
        /// The task's id.
        id: String,
    },
    /// Complete a task where it is; the delegation that brought it completes and bubbles up.
    Complete {
        /// The task's id.
        id: String,
        /// The outcome, a JSON object.
        #[arg(long, value_parser = parse_object)]
        result: Option<prost_types::Struct>,
    },
    /// Cancel a task, its delegations and its unfinished subtasks.
    Cancel {
        /// The task's id.
        id: String,
    },
}

/// The domain enums that flags take by their lower-case word.
trait Word: Sized + Copy + 'static {
    const ALL: &'static [Self];
    fn word(self) -> &'static str;
}

macro_rules! words {
    ($($name:ty),+) => {$(
        impl Word for $name {
            const ALL: &'static [Self] = <$name>::ALL;
            fn word(self) -> &'static str {
                self.as_str()
            }
        }
    )+};
}
words!(
    Scope,
    InstanceStatus,
    DelegationType,
    crate::domain::EventKind
);

/// Parses a flag's word (`route`, `running`, …); the error lists the words allowed.
fn parse_word<T: Word>(text: &str) -> Result<T, String> {
    T::ALL
        .iter()
        .copied()
        .find(|value| value.word() == text)
        .ok_or_else(|| {
            let words: Vec<&str> = T::ALL.iter().map(|v| v.word()).collect();
            format!("expected one of: {}", words.join(", "))
        })
}

/// Parses `--result`: a JSON object.
fn parse_object(text: &str) -> Result<prost_types::Struct, String> {
    match serde_json::from_str(text) {
        Ok(value @ Value::Object(_)) => Ok(to_struct(value)),
        Ok(_) => Err("must be a JSON object, e.g. '{\"pages\": 12}'".into()),
        Err(e) => Err(format!("is not JSON: {e}")),
    }
}

/// Runs `hopperctl` with the process's arguments; returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::from(failure.code())
        }
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    let (target, printer) = (&cli.target, Printer::new(cli.output));
    match cli.command {
        Command::Watch(args) => watch::run(target, args, &printer).await,
        Command::Instances(command) => {
            instances(&mut target.connect().await?, command, &printer).await
        }
        Command::Tasks(command) => tasks(&mut target.connect().await?, command, &printer).await,
        Command::Delegations(command) => {
            delegations(&mut target.connect().await?, command, &printer).await
        }
    }
}

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

async fn instances(c: &mut Clients, command: Instances, p: &Printer) -> Result<(), Failure> {
    match command {
        Instances::Register {
            id,
            name,
            scope,
            parent,
            status,
        } => {
            let request = pb::RegisterInstanceRequest {
                id,
                name,
                scope: pb::Scope::from(scope).into(),
                parent_id: parent.unwrap_or_default(),
                status: status.map_or(0, |s| pb::InstanceStatus::from(s).into()),
                ..Default::default()
            };
            let response = c.instances.register_instance(request).await?.into_inner();
            show_instance(&record(response.instance)?, p);
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
            let mut rows = vec![header(&["ID", "NAME", "SCOPE", "STATUS", "PARENT"])];
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

async fn tasks(c: &mut Clients, command: Tasks, p: &Printer) -> Result<(), Failure> {
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

async fn delegations(c: &mut Clients, command: Delegations, p: &Printer) -> Result<(), Failure> {
    let d = &mut c.delegations;
    match command {
        Delegations::Delegate {
            task,
            source,
            target,
            delegation_type,
            delegated_by,
            notes,
        } => {
            let request = pb::CreateDelegationRequest {
                task_id: task,
                source_instance_id: source,
                target_instance_id: target,
                delegation_type: pb::DelegationType::from(delegation_type).into(),
                notes: notes.unwrap_or_default(),
                delegated_by: delegated_by.unwrap_or_default(),
                request_id: String::new(),
            };
            let created = record(d.create_delegation(request).await?.into_inner().delegation)?;
            match p.format {
                Format::Json => p.json(&render::delegation_json(&created)),
                Format::Text => p.line(&created.id),
            }
        }
        Delegations::Accept { id } => {
            let request = pb::AcceptDelegationRequest { id };
            let accepted = record(d.accept_delegation(request).await?.into_inner().delegation)?;
            changed(&accepted, p);
        }
        Delegations::Reject { id, reason } => {
            let request = pb::RejectDelegationRequest { id, reason };
            let rejected = record(d.reject_delegation(request).await?.into_inner().delegation)?;
            changed(&rejected, p);
        }
        Delegations::Complete { id, result } => {
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
        }
        Delegations::Cancel { id } => {
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
        }
        Delegations::Chain { task } => {
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
                ]
            }));
            p.table(&rows);
        }
        Delegations::Tree { task } => {
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
        }
        Delegations::Pending { instance } => {
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
            let mut rows = vec![header(&["ID", "TASK", "TYPE", "FROM", "BY", "DELEGATED"])];
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
                ]
            }));
            p.table(&rows);
        }
    }
    Ok(())
}

fn header(names: &[&str]) -> Vec<Cell> {
    names.iter().map(|name| Cell::dim(*name)).collect()
}

fn show_instance(i: &pb::Instance, p: &Printer) {
    if p.format == Format::Json {
        return p.json(&render::instance_json(i));
    }
    p.fields(&[
        ("instance", Cell::plain(&i.id)),
        ("name", Cell::plain(&i.name)),
        ("scope", Cell::plain(render::scope(i.scope))),
        ("status", Cell::status(render::instance_status(i.status))),
        (
            "parent",
            Cell::plain(if i.parent_id.is_empty() {
                "-"
            } else {
                &i.parent_id
            }),
        ),
        (
            "config",
            Cell::plain(render::document_text(i.config.as_ref())),
        ),
        ("registered", Cell::plain(p.time(i.created_at.as_ref()))),
    ]);
}

fn show_task(t: &pb::Task, p: &Printer) {
    if p.format == Format::Json {
        return p.json(&render::task_json(t));
    }
    let mut fields = vec![
        ("task", Cell::plain(&t.id)),
        ("title", Cell::plain(&t.title)),
        ("status", Cell::status(render::task_status(t.status))),
        ("at", Cell::plain(&t.instance_id)),
    ];
    if !t.parent_task_id.is_empty() {
        fields.push(("parent", Cell::plain(&t.parent_task_id)));
    }
    if !t.description.is_empty() {
        fields.push(("description", Cell::plain(&t.description)));
    }
    fields.extend([
        (
            "result",
            Cell::plain(render::document_text(t.result.as_ref())),
        ),
        ("created", Cell::plain(p.time(t.created_at.as_ref()))),
        ("updated", Cell::plain(p.time(t.updated_at.as_ref()))),
    ]);
    p.fields(&fields);
}

/// One line for a delegation that just changed: `delegation ID accepted: a → b (route, task T)`.
fn changed(d: &pb::Delegation, p: &Printer) {
    if p.format == Format::Json {
        return p.json(&render::delegation_json(d));
    }
    p.table(&[hop_row("delegation", d)]);
}

fn hop_row(label: &str, d: &pb::Delegation) -> Vec<Cell> {
    vec![
        Cell::plain(format!("{label} {}", d.id)),
        Cell::status(render::delegation_status(d.status)),
        Cell::plain(format!(
            "{} → {}",
            d.source_instance_id, d.target_instance_id
        )),
        Cell::plain(format!(
            "({}, task {})",
            render::delegation_type(d.delegation_type),
            d.task_id
        )),
    ]
}

/// The delegations a completion or cancellation took with it, one line each.
fn hops_done(label: &str, ds: &[pb::Delegation], p: &Printer) {
    let rows: Vec<Vec<Cell>> = ds
        .iter()
        .map(|d| hop_row(&format!("  {label}"), d))
        .collect();
    p.table(&rows);
}

/// Draws instances as a tree under `root` (or under every instance whose parent is not in the
/// list), children ordered by id, each with its scope, status and load.
fn instance_tree(nodes: &[pb::InstanceTreeNode], root: Option<&str>, p: &Printer) {
    let instance = |n: &pb::InstanceTreeNode| n.instance.clone().unwrap_or_default();
    if p.format == Format::Json {
        for node in nodes {
            let mut value = render::instance_json(&instance(node));
            value["pending_delegations"] = node.pending_delegations.into();
            value["accepted_delegations"] = node.accepted_delegations.into();
            p.json(&value);
        }
        return;
    }
    let instances: Vec<(pb::Instance, &pb::InstanceTreeNode)> =
        nodes.iter().map(|n| (instance(n), n)).collect();
    let ids: std::collections::HashSet<&str> =
        instances.iter().map(|(i, _)| i.id.as_str()).collect();
    let tops = instances
        .iter()
        .filter(|(i, _)| root.map_or(!ids.contains(i.parent_id.as_str()), |root| i.id == root))
        .collect();
    let children = |(parent, _): &&(pb::Instance, &pb::InstanceTreeNode)| {
        instances
            .iter()
            .filter(|(i, _)| i.parent_id == parent.id)
            .collect()
    };
    let row = |(i, node): &&(pb::Instance, &pb::InstanceTreeNode), branch: &str| {
        vec![
            Cell::plain(format!("{branch}{}", i.id)),
            Cell::plain(&i.name),
            Cell::plain(render::scope(i.scope)),
            Cell::status(render::instance_status(i.status)),
            Cell::plain(format!("pending {}", node.pending_delegations)),
            Cell::plain(format!("accepted {}", node.accepted_delegations)),
        ]
    };
    p.table(&draw_tree(tops, children, row));
}

/// Draws a task tree: each task, then its hops, then its subtasks.
fn task_tree(root: &pb::Task, subtasks: &[pb::Task], hops: &[pb::Delegation], p: &Printer) {
    enum Line<'a> {
        Task(&'a pb::Task),
        Hop(&'a pb::Delegation),
    }
    let children = |line: &Line<'_>| match line {
        Line::Hop(_) => Vec::new(),
        Line::Task(t) => hops
            .iter()
            .filter(|h| h.task_id == t.id)
            .map(Line::Hop)
            .chain(
                subtasks
                    .iter()
                    .filter(|s| s.parent_task_id == t.id)
                    .map(Line::Task),
            )
            .collect(),
    };
    let row = |line: &Line<'_>, branch: &str| match line {
        Line::Hop(h) => vec![
            Cell::plain(format!(
                "{branch}{}",
                render::delegation_type(h.delegation_type)
            )),
            Cell::plain(format!(
                "{} → {}",
                h.source_instance_id, h.target_instance_id
            )),
            Cell::status(render::delegation_status(h.status)),
            Cell::dim(&h.id),
        ],
        Line::Task(t) => vec![
            Cell::plain(format!("{branch}{}", t.id)),
            Cell::plain(format!("at {}", t.instance_id)),
            Cell::status(render::task_status(t.status)),
            Cell::plain(&t.title),
        ],
    };
    p.table(&draw_tree(vec![Line::Task(root)], children, row));
}

/// The rows of a tree drawn with box-drawing branches, depth first: `row` makes a node's row
/// given the branch to put before its name; `children` lists a node's children in order.
fn draw_tree<T>(
    roots: Vec<T>,
    children: impl Fn(&T) -> Vec<T>,
    row: impl Fn(&T, &str) -> Vec<Cell>,
) -> Vec<Vec<Cell>> {
    let mut rows = Vec::new();
    let mut stack: Vec<(T, String, String)> = roots
        .into_iter()
        .rev()
        .map(|node| (node, String::new(), String::new()))
        .collect();
    while let Some((node, branch, indent)) = stack.pop() {
        rows.push(row(&node, &branch));
        let below = children(&node);
        let last = below.len();
        for (n, child) in below.into_iter().enumerate().rev() {
            let (branch, more) = if n + 1 == last {
                ("└── ", "    ")
            } else {
                ("├── ", "│   ")
            };
            stack.push((
                child,
                format!("{indent}{branch}"),
                format!("{indent}{more}"),
            ));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::json::from_struct;

    #[test]
    fn flags_take_the_domain_words_and_list_them_when_wrong() {
        assert_eq!(
            parse_word::<DelegationType>("escalate"),
            Ok(DelegationType::Escalate)
        );
        assert_eq!(
            parse_word::<Scope>("galaxy"),
            Err("expected one of: global, project, orchestration, personal, family, event, federated".into())
        );
    }

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

    #[test]
    fn results_must_be_json_objects() {
        let parsed = parse_object(r#"{"pages": 12}"#).unwrap();
        assert_eq!(from_struct("result", parsed).unwrap(), json!({"pages": 12}));
        assert!(parse_object("[1]").unwrap_err().contains("JSON object"));
        assert!(parse_object("{").unwrap_err().contains("not JSON"));
    }
}
