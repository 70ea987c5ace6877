//! Trees drawn with box-drawing branches: `instances tree` and a task's `tree`.

use super::render::{self, Cell, Format, Printer};
use crate::proto as pb;

/// Draws instances as a tree under `root` (or under every instance whose parent is not in the
/// list), children ordered by id, each with its scope, status and load.
pub(super) fn instance_tree(nodes: &[pb::InstanceTreeNode], root: Option<&str>, p: &Printer) {
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
            Cell::plain(match p.lease(i) {
                lease if lease.starts_with("unresponsive") => lease,
                _ => String::new(),
            }),
        ]
    };
    p.table(&draw_tree(tops, children, row));
}

/// Draws a task tree: each task, then its hops, then its subtasks.
pub(super) fn task_tree(
    root: &pb::Task,
    subtasks: &[pb::Task],
    hops: &[pb::Delegation],
    p: &Printer,
) {
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
            Cell::plain(match p.deadline(h) {
                none if none == "-" => String::new(),
                deadline => deadline,
            }),
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
