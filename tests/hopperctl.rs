//! `hopperctl` as an operator runs it, against the real server binary on both backends: the
//! seed story through hopperctl only, `chain` and `tree` output, `-o json` parsed back, exit
//! codes, and `watch` receiving bubbling completions live and resuming across a server
//! restart with nothing missed or repeated. Also the server's `/metrics` and JSON logs.

mod common;

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{Backend, TestDb, text_rows};
use serde_json::Value;

/// The server binary, serving `db` on `addr` (`127.0.0.1:0` the first time).
struct Server {
    child: Child,
    addr: String,
    /// The metrics address, when asked for.
    metrics: Option<String>,
    /// Every line the server logged, read by a thread.
    log: mpsc::Receiver<String>,
}

impl Server {
    fn start(db: &TestDb, addr: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hopper-delegation"))
            .args(["serve", "--listen", addr, "--database-url", &db.url_arg()])
            .args(["--progress-interval", "200ms"])
            .args(extra)
            .env("RUST_LOG", "info,hopper_delegation=debug")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (lines, log) = mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let mut server = Self {
            child,
            addr: String::new(),
            metrics: None,
            log,
        };
        let wants_metrics = extra.contains(&"--metrics-listen");
        while server.addr.is_empty() || (wants_metrics && server.metrics.is_none()) {
            let line = server.next_line();
            let address = address_in(&line);
            if line.contains("serving gRPC") {
                server.addr = address.expect("an address");
            } else if line.contains("serving metrics") {
                server.metrics = address;
            }
        }
        server
    }

    fn next_line(&self) -> String {
        self.log
            .recv_timeout(Duration::from_secs(30))
            .expect("the server logs")
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGTERM, and a clean exit; returns what the server logged that was not read yet.
    fn stop(mut self) -> Vec<String> {
        signal(&self.child, "TERM");
        assert!(self.child.wait().unwrap().success());
        std::mem::replace(&mut self.log, mpsc::channel().1)
            .iter()
            .collect()
    }
}

impl Drop for Server {
    /// A test that fails half-way leaves no server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `hopperctl watch` child, killed if the test fails before it is stopped.
struct Watch(Child);

impl Watch {
    /// `hopperctl --server URL watch ARGS`, with the lines it prints to stdout.
    fn start(url: &str, args: &[&str]) -> (Self, mpsc::Receiver<String>) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hopperctl"))
            .args(["--server", url, "watch"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = lines_of(child.stdout.take().unwrap());
        (Self(child), lines)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The address in a log line, text (`address=…`) or JSON (`"address":"…"`).
fn address_in(line: &str) -> Option<String> {
    if let Ok(json) = serde_json::from_str::<Value>(line) {
        return json["fields"]["address"].as_str().map(str::to_owned);
    }
    let rest = line.split("address=").nth(1)?;
    Some(rest.split_whitespace().next()?.to_owned())
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Runs `hopperctl --server URL ARGS`.
fn ctl(server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hopperctl"))
        .arg("--server")
        .arg(server)
        .args(args)
        .env_remove("HOPPER_TOKEN")
        .output()
        .unwrap()
}

/// Runs hopperctl and returns its stdout; panics with its stderr unless it succeeds.
fn ok(server: &str, args: &[&str]) -> String {
    let output = ctl(server, args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "hopperctl {args:?}: {stderr}");
    String::from_utf8(output.stdout).unwrap()
}

/// Runs hopperctl with `-o json` and parses its one document.
fn json(server: &str, args: &[&str]) -> Value {
    let out = ok(server, &[args, &["-o", "json"]].concat());
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Registers Global -> Project -> Orchestration (global, web, web-ci) through hopperctl.
fn register_hierarchy(server: &str) {
    for (id, name, scope, parent) in [
        ("global", "Global", "global", None),
        ("web", "Web project", "project", Some("global")),
        ("web-ci", "Web CI run", "orchestration", Some("web")),
    ] {
        let mut args = vec![
            "instances",
            "register",
            id,
            "--name",
            name,
            "--scope",
            scope,
        ];
        args.extend(["--status", "running"]);
        if let Some(parent) = parent {
            args.extend(["--parent", parent]);
        }
        let registered = json(server, &args);
        assert_eq!(registered["id"], id);
        assert_eq!(registered["status"], "running");
    }
}

/// Creates `task` at global and routes it down to web-ci, both hops accepted; returns the
/// two delegation ids (global -> web, web -> web-ci).
fn route_down(server: &str, task: &str) -> (String, String) {
    ok(
        server,
        &[
            "tasks", "create", "--id", task, "--title", "Ship it", "--at", "global",
        ],
    );
    let to_web = ok(
        server,
        &[
            "delegate", task, "--from", "global", "--to", "web", "--by", "alice",
        ],
    );
    let to_web = to_web.trim().to_owned();
    ok(server, &["accept", &to_web]);
    let to_ci = ok(
        server,
        &["delegate", task, "--from", "web", "--to", "web-ci"],
    );
    let to_ci = to_ci.trim().to_owned();
    ok(server, &["accept", &to_ci]);
    (to_web, to_ci)
}

async fn the_seed_story_runs_through_hopperctl_alone(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = Server::start(&db, "127.0.0.1:0", &[]);
    let url = server.url();
    register_hierarchy(&url);

    ok(
        &url,
        &[
            "tasks",
            "create",
            "--id",
            "release-42",
            "--title",
            "Ship release 42",
            "--at",
            "global",
        ],
    );
    let to_web = ok(
        &url,
        &[
            "delegate",
            "release-42",
            "--from",
            "global",
            "--to",
            "web",
            "--by",
            "alice",
        ],
    );
    let to_web = to_web.trim();
    assert_eq!(
        to_web.len(),
        36,
        "the new delegation's id alone: {to_web:?}"
    );
    let accepted = ok(&url, &["accept", to_web]);
    assert_eq!(
        accepted.trim(),
        format!("delegation {to_web}  accepted  global → web  (route, task release-42)")
    );
    let created = json(
        &url,
        &[
            "delegate",
            "release-42",
            "--from",
            "web",
            "--to",
            "web-ci",
            "--notes",
            "CI",
        ],
    );
    assert_eq!(
        (created["status"].as_str(), created["notes"].as_str()),
        (Some("pending"), Some("CI"))
    );
    let to_ci = created["id"].as_str().unwrap().to_owned();

    let pending = ok(&url, &["pending", "web-ci"]);
    let rows: Vec<&str> = pending.lines().collect();
    assert_eq!(rows.len(), 2, "{pending}");
    assert!(
        rows[0].starts_with("ID") && rows[1].starts_with(&to_ci),
        "{pending}"
    );
    assert!(rows[1].contains("release-42  route  web"), "{pending}");
    ok(&url, &["accept", &to_ci]);
    assert_eq!(
        ok(&url, &["pending", "web-ci"]).trim(),
        "no pending delegations for web-ci"
    );

    let tree = ok(&url, &["instances", "tree"]);
    assert_eq!(
        tree.lines().collect::<Vec<_>>(),
        [
            "global          Global       global         running  pending 0  accepted 0",
            "└── web         Web project  project        running  pending 0  accepted 1",
            "    └── web-ci  Web CI run   orchestration  running  pending 0  accepted 1",
        ]
    );
    let subtree = ok(&url, &["instances", "tree", "web"]);
    assert!(
        subtree.starts_with("web  ") && subtree.lines().count() == 2,
        "{subtree}"
    );

    let done = ok(
        &url,
        &[
            "complete",
            &to_ci,
            "--result",
            r#"{"artifact": "web-42.tar.gz", "tests": 118}"#,
        ],
    );
    let done: Vec<&str> = done.lines().collect();
    assert_eq!(done.len(), 3, "{done:?}");
    assert!(
        done[0].starts_with(&format!("delegation {to_ci}  completed  web → web-ci")),
        "{done:?}"
    );
    assert!(
        done[1].contains(&format!(
            "bubbled up: completed {to_web}  completed  global → web"
        )),
        "{done:?}"
    );
    assert_eq!(done[2], "task release-42 is done at global");

    let task = json(&url, &["tasks", "show", "release-42"]);
    assert_eq!(task["status"], "done");
    assert_eq!(task["instance_id"], "global");
    assert_eq!(
        task["result"],
        serde_json::json!({"artifact": "web-42.tar.gz", "tests": 118})
    );

    let chain = ok(&url, &["chain", "release-42"]);
    let lines: Vec<&str> = chain.lines().collect();
    assert_eq!(lines[0], "task release-42: from global to global, 2 hops");
    assert!(
        lines[1].starts_with("#  TYPE   HOP           STATUS     DELEGATED"),
        "{chain}"
    );
    assert!(
        lines[2].starts_with("1  route  global → web  completed  20"),
        "{chain}"
    );
    assert!(
        lines[3].starts_with("2  route  web → web-ci  completed  20"),
        "{chain}"
    );
    assert!(lines[3].contains(" UTC (just now)"), "{chain}");
    let chain = json(&url, &["chain", "release-42"]);
    let hops: Vec<(&str, &str, &str)> = chain["delegations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["source_instance_id"].as_str().unwrap(),
                d["target_instance_id"].as_str().unwrap(),
                d["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        hops,
        [
            ("global", "web", "completed"),
            ("web", "web-ci", "completed")
        ]
    );
    assert_eq!(chain["delegations"][0]["delegated_by"], "alice");

    // A parent split in two subtasks, drawn as a tree.
    ok(
        &url,
        &[
            "tasks",
            "create",
            "--id",
            "docs-7",
            "--title",
            "Write the docs",
            "--at",
            "global",
        ],
    );
    let split = ok(
        &url,
        &["delegate", "docs-7", "--from", "global", "--to", "web"],
    );
    ok(&url, &["accept", split.trim()]);
    ok(
        &url,
        &[
            "tasks",
            "create",
            "--id",
            "docs-7.api",
            "--title",
            "API reference",
            "--parent",
            "docs-7",
        ],
    );
    ok(
        &url,
        &[
            "tasks",
            "create",
            "--id",
            "docs-7.guide",
            "--title",
            "User guide",
            "--parent",
            "docs-7",
        ],
    );
    let api = ok(
        &url,
        &[
            "delegate",
            "docs-7.api",
            "--from",
            "web",
            "--to",
            "web-ci",
            "--type",
            "decompose",
        ],
    );
    let tree = ok(&url, &["tree", "docs-7"]);
    let expected = [
        "docs-7             at web        pending   Write the docs".to_owned(),
        format!(
            "├── route          global → web  accepted  {}",
            split.trim()
        ),
        "├── docs-7.api     at web-ci     pending   API reference".to_owned(),
        format!("│   └── decompose  web → web-ci  pending   {}", api.trim()),
        "└── docs-7.guide   at web        pending   User guide".to_owned(),
    ];
    assert_eq!(tree.lines().collect::<Vec<_>>(), expected, "{tree}");
    let tree = json(&url, &["tree", "docs-7"]);
    assert_eq!(tree["task"]["id"], "docs-7");
    assert_eq!(tree["subtasks"].as_array().unwrap().len(), 2);
    assert_eq!(tree["delegations"].as_array().unwrap().len(), 2);

    let listed = ok(&url, &["instances", "list", "-o", "json"]);
    let ids: Vec<String> = listed
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids, ["global", "web", "web-ci"]);
    server.stop();
}

async fn rejecting_cancelling_and_completing_in_place_through_hopperctl(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = Server::start(&db, "127.0.0.1:0", &[]);
    let url = server.url();
    register_hierarchy(&url);
    let created = json(
        &url,
        &[
            "instances",
            "register",
            "spare",
            "--name",
            "Spare",
            "--scope",
            "event",
            "--parent",
            "global",
        ],
    );
    assert_eq!(
        (created["status"].as_str(), created["scope"].as_str()),
        (Some("created"), Some("event"))
    );

    // web turns the task down; it is back at global.
    ok(
        &url,
        &[
            "tasks",
            "create",
            "--id",
            "r",
            "--title",
            "Refused",
            "--at",
            "global",
            "--description",
            "Try web",
        ],
    );
    let refused = ok(&url, &["delegate", "r", "--from", "global", "--to", "web"]);
    let refused = refused.trim();
    let out = ok(&url, &["reject", refused, "--reason", "busy this week"]);
    assert_eq!(
        out.trim(),
        format!("delegation {refused}  rejected  global → web  (route, task r)")
    );
    let again = ok(&url, &["delegate", "r", "--from", "global", "--to", "web"]);
    let rejected = json(&url, &["reject", again.trim(), "--reason", "still busy"]);
    assert_eq!(
        (
            rejected["status"].as_str(),
            rejected["rejection_reason"].as_str()
        ),
        (Some("rejected"), Some("still busy"))
    );
    let task = json(&url, &["tasks", "show", "r"]);
    assert_eq!(
        (task["instance_id"].as_str(), task["description"].as_str()),
        (Some("global"), Some("Try web"))
    );

    // Calling off the top hop cancels the one below it too.
    let (c_top, c_below) = route_down(&url, "c");
    let out = ok(&url, &["cancel", &c_top]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!("delegation {c_top}  cancelled  global → web  (route, task c)")
    );
    assert_eq!(
        lines[1],
        format!("  with it: cancelled {c_below}  cancelled  web → web-ci  (route, task c)")
    );
    assert_eq!(lines[2], "task c is back at global");

    // A task cancelled with its subtask and the subtask's hop.
    ok(
        &url,
        &[
            "tasks", "create", "--id", "p", "--title", "Parent", "--at", "global",
        ],
    );
    ok(
        &url,
        &[
            "tasks", "create", "--id", "p.1", "--title", "Child", "--parent", "p",
        ],
    );
    let hop = ok(
        &url,
        &[
            "delegate",
            "p.1",
            "--from",
            "global",
            "--to",
            "web",
            "--type",
            "decompose",
        ],
    );
    let cancelled = json(&url, &["tasks", "cancel", "p"]);
    assert_eq!(cancelled["task"]["status"], "cancelled");
    assert_eq!(cancelled["cancelled_subtasks"][0]["id"], "p.1");
    assert_eq!(cancelled["cancelled_delegations"][0]["id"], hop.trim());

    // Completed where it is: the hop that brought it completes and bubbles up.
    let (top, below) = route_down(&url, "w");
    let out = ok(
        &url,
        &["tasks", "complete", "w", "--result", r#"{"ok": true}"#],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "task w is done");
    assert!(
        lines[1].starts_with(&format!("  completed {below}  completed  web → web-ci")),
        "{out}"
    );
    assert!(
        lines[2].starts_with(&format!("  completed {top}  completed  global → web")),
        "{out}"
    );
    assert_eq!(
        json(&url, &["tasks", "show", "w"])["result"],
        serde_json::json!({"ok": true})
    );

    // What happened at web-ci, replayed as text: one aligned line per event.
    let (mut watch, lines) = Watch::start(&url, &["web-ci", "--since", "0"]);
    let next = || lines.recv_timeout(Duration::from_secs(30)).unwrap();
    let (created, accepted, cancelled) = (next(), next(), next());
    let hop = format!("{c_below}  web → web-ci  task c  20");
    assert!(
        created.ends_with(" ago)") || created.ends_with("just now)"),
        "{created}"
    );
    // After the sequence: the kind, padded to the longest kind, and the hop.
    let after_sequence = |line: &str| line.trim_start().split_once("  ").unwrap().1.to_owned();
    assert!(
        after_sequence(&created).starts_with(&format!("delegation_created    {hop}")),
        "{created}"
    );
    assert!(
        after_sequence(&accepted).starts_with(&format!("delegation_accepted   {hop}")),
        "{accepted}"
    );
    assert!(
        after_sequence(&cancelled).starts_with(&format!("delegation_cancelled  {hop}")),
        "{cancelled}"
    );
    assert!(
        cancelled.ends_with(&format!(")  caused by {c_top}")),
        "{cancelled}"
    );
    let sequences: Vec<u64> = [&created, &accepted, &cancelled]
        .iter()
        .map(|line| line.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
    signal(&watch.0, "INT");
    assert!(watch.0.wait().unwrap().success());
    server.stop();
}

async fn hopperctl_exit_codes_tell_refusals_usage_and_an_unreachable_server_apart(
    backend: Backend,
) {
    let db = TestDb::migrated(backend).await;
    let server = Server::start(&db, "127.0.0.1:0", &[]);
    let url = server.url();
    register_hierarchy(&url);
    let (to_web, _) = route_down(&url, "t");
    let before = snapshot(&db).await;

    let refused = ctl(&url, &["accept", &to_web]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr),
        format!("error: delegation {to_web} is accepted; it must be pending to accept\n")
    );
    assert!(refused.stdout.is_empty());
    let unknown = ctl(&url, &["tasks", "show", "ghost"]);
    assert_eq!(
        (
            unknown.status.code(),
            String::from_utf8_lossy(&unknown.stderr).into_owned()
        ),
        (Some(1), "error: task ghost not found\n".into())
    );
    let invalid = ctl(&url, &["reject", &to_web, "--reason", " "]);
    assert_eq!(invalid.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&invalid.stderr).starts_with("error: reason: "));

    for usage in [
        vec!["delegate", "t", "--from", "global"],
        vec![
            "delegate", "t", "--from", "global", "--to", "web", "--type", "sideways",
        ],
        vec!["complete", &to_web, "--result", "[1]"],
        vec![
            "instances",
            "register",
            "x",
            "--name",
            "X",
            "--scope",
            "galaxy",
        ],
        vec!["tasks", "create", "--title", "nowhere"],
    ] {
        let output = ctl(&url, &usage);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{usage:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let unknown = ctl(&url, &["watch", "ghost"]);
    assert_eq!(
        (
            unknown.status.code(),
            String::from_utf8_lossy(&unknown.stderr).into_owned()
        ),
        (Some(1), "error: instance ghost not found\n".into())
    );
    let ahead = ctl(&url, &["watch", "global", "--since", "1000000"]);
    assert_eq!(
        ahead.status.code(),
        Some(1),
        "OUT_OF_RANGE: {}",
        String::from_utf8_lossy(&ahead.stderr)
    );
    let help = ctl(&url, &["watch", "--help"]);
    assert!(
        help.status.success() && String::from_utf8_lossy(&help.stdout).contains("--descendants")
    );
    assert_eq!(snapshot(&db).await, before, "refusals changed nothing");

    server.stop();
    let watch = ctl(&url, &["watch", "global"]);
    assert_eq!(
        watch.status.code(),
        Some(3),
        "a watch that cannot start says so"
    );
    let unreachable = ctl(&url, &["tasks", "show", "t"]);
    assert_eq!(unreachable.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(
        stderr.starts_with(&format!("error: cannot reach the server at {url}")),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

async fn watch_follows_completions_bubbling_up_and_resumes_after_a_restart(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = Server::start(&db, "127.0.0.1:0", &[]);
    let url = server.url();
    register_hierarchy(&url);

    let (mut watch, events) = Watch::start(
        &url,
        &["global", "--descendants", "--since", "0", "-o", "json"],
    );

    let (_, to_ci) = route_down(&url, "first");
    ok(&url, &["complete", &to_ci]);
    let mut seen = until_task_completed(&events, "first");
    let kinds: Vec<&str> = seen.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds[kinds.len() - 3..],
        [
            "delegation_completed",
            "delegation_completed",
            "task_completed"
        ]
    );
    assert_eq!(
        seen[seen.len() - 2]["caused_by_delegation_id"],
        to_ci.as_str(),
        "the Project hop bubbled from the CI hop"
    );

    // A second watcher, of web-ci only and without --since: its cursor comes from the
    // progress mark the server sends once it has joined (within the 200 ms interval).
    let (mut quiet, quiet_events) = Watch::start(&url, &["web-ci", "-o", "json"]);
    std::thread::sleep(Duration::from_secs(1));

    // The server goes away; the next lifecycle is written through another server on the
    // same database while both watchers are cut off; then the first comes back. Only a
    // replay from each watcher's cursor can show them what happened meanwhile.
    let last_before = seen.last().unwrap()["sequence"].as_i64().unwrap();
    let addr = server.addr.clone();
    server.stop();
    let meanwhile = Server::start(&db, "127.0.0.1:0", &[]);
    let (_, to_ci) = route_down(&meanwhile.url(), "second");
    ok(&meanwhile.url(), &["complete", &to_ci]);
    meanwhile.stop();
    let server = Server::start(&db, &addr, &[]);
    seen.extend(until_task_completed(&events, "second"));
    let kinds: Vec<Value> = (0..3)
        .map(|_| next_event(&quiet_events)["kind"].clone())
        .collect();
    assert_eq!(
        kinds,
        [
            "delegation_created",
            "delegation_accepted",
            "delegation_completed"
        ],
        "only what happened at web-ci after it started"
    );

    signal(&watch.0, "INT");
    assert!(watch.0.wait().unwrap().success(), "Ctrl-C exits 0");
    let mut stderr = String::new();
    watch
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let resumed: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("resuming after"))
        .collect();
    assert_eq!(
        resumed,
        [format!(
            "hopperctl: reconnected to {url}; resuming after sequence {last_before}"
        )],
        "{stderr}"
    );
    signal(&quiet.0, "INT");
    assert!(quiet.0.wait().unwrap().success());
    assert!(quiet_events.try_recv().is_err(), "nothing more for web-ci");

    let printed: Vec<i64> = seen
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    let mut conn = db.pool().conn().await.unwrap();
    let logged: Vec<i64> = text_rows(
        &mut conn,
        "SELECT CAST(sequence AS TEXT) AS line FROM delegation_events ORDER BY sequence",
    )
    .await
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    assert_eq!(printed, logged, "every event of the log, once, in order");
    assert_eq!(printed.iter().collect::<BTreeSet<_>>().len(), printed.len());
    server.stop();
}

async fn metrics_are_served_and_move_with_requests_and_logs_carry_the_rpc_span(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = Server::start(
        &db,
        "127.0.0.1:0",
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--max-connections",
            "7",
        ],
    );
    let url = server.url();
    let metrics = server.metrics.clone().unwrap();
    let before = scrape(&metrics);
    assert_eq!(
        value(&before, "hopper_db_pool_connections{state=\"max\"}"),
        7.0
    );
    assert_eq!(value(&before, "hopper_watch_subscribers"), 0.0);

    register_hierarchy(&url);
    let (mut watch, events) = Watch::start(&url, &["web-ci", "--since", "0", "-o", "json"]);
    let (_, to_ci) = route_down(&url, "m");
    ok(
        &url,
        &[
            "complete",
            &to_ci,
            "--result",
            r#"{"secret": "s3cr3t-result"}"#,
        ],
    );
    let _ = ctl(&url, &["tasks", "show", "ghost"]);
    // The CI hop's created, accepted and completed events reach the web-ci watcher.
    let kinds: Vec<Value> = (0..3)
        .map(|_| next_event(&events)["kind"].clone())
        .collect();
    assert_eq!(
        kinds,
        [
            "delegation_created",
            "delegation_accepted",
            "delegation_completed"
        ]
    );

    let after = scrape(&metrics);
    for name in [
        "hopper_rpc_requests_total",
        "hopper_rpc_duration_seconds",
        "hopper_watch_subscribers",
        "hopper_event_log_head_sequence",
        "hopper_events_delivered_total",
        "hopper_db_pool_connections",
        "hopper_bubbled_hops",
    ] {
        assert!(
            after.contains(&format!("# TYPE {}", name.trim_end_matches("_total"))),
            "{name} in\n{after}"
        );
    }
    let count = |text: &str, method: &str, code: &str| {
        value(
            text,
            &format!("hopper_rpc_requests_total{{method=\"{method}\",code=\"{code}\"}}"),
        )
    };
    assert_eq!(count(&after, "RegisterInstance", "OK"), 3.0);
    assert_eq!(count(&after, "AcceptDelegation", "OK"), 2.0);
    assert_eq!(count(&after, "CompleteDelegation", "OK"), 1.0);
    assert_eq!(count(&after, "GetTask", "NotFound"), 1.0);
    assert_eq!(
        value(
            &after,
            "hopper_rpc_duration_seconds_count{method=\"CreateDelegation\"}"
        ),
        2.0
    );
    assert_eq!(value(&after, "hopper_watch_subscribers"), 1.0);
    let mut conn = db.pool().conn().await.unwrap();
    let head = text_rows(
        &mut conn,
        "SELECT CAST(MAX(sequence) AS TEXT) AS line FROM delegation_events",
    )
    .await;
    assert_eq!(
        value(&after, "hopper_event_log_head_sequence"),
        head[0].parse::<f64>().unwrap()
    );
    assert!(value(&after, "hopper_events_delivered_total") >= 3.0);
    assert_eq!(value(&after, "hopper_bubbled_hops_count"), 1.0);
    assert_eq!(
        value(&after, "hopper_bubbled_hops_sum"),
        1.0,
        "the CI hop's completion bubbled to one more"
    );

    signal(&watch.0, "INT");
    assert!(watch.0.wait().unwrap().success());
    server_log_has_span(&server, &to_ci);
    for line in server.stop() {
        assert!(
            !line.contains("s3cr3t-result"),
            "a result body in the log: {line}"
        );
    }
}

/// Deadlines and leases through hopperctl alone: a hop's deadline in `chain` and `pending`,
/// `watch` printing the expiry with its reason, a lease renewed then lapsing, and the
/// unresponsive instance marked in `instances list` and `instances tree`.
async fn deadlines_and_leases_through_hopperctl(backend: Backend) {
    let db = TestDb::migrated(backend).await;
    let server = Server::start(&db, "127.0.0.1:0", &["--metrics-listen", "127.0.0.1:0"]);
    let url = server.url();
    ok(
        &url,
        &[
            "instances",
            "register",
            "global",
            "--name",
            "G",
            "--scope",
            "global",
        ],
    );
    let leased = json(
        &url,
        &[
            "instances",
            "register",
            "web",
            "--name",
            "W",
            "--scope",
            "project",
            "--parent",
            "global",
            "--lease",
            "1500ms",
        ],
    );
    assert_eq!(leased["lease_seconds"], 1.5);
    let renewed = ok(&url, &["instances", "renew", "web"]);
    assert!(renewed.starts_with("web live until "), "{renewed}");
    let (watch, events) = Watch::start(&url, &["global", "--descendants", "--since", "0"]);
    ok(
        &url,
        &[
            "tasks", "create", "--id", "t", "--title", "T", "--at", "global",
        ],
    );
    let args = [
        "delegate",
        "t",
        "--from",
        "global",
        "--to",
        "web",
        "--accept-within",
        "1h",
        "--complete-within",
        "2h",
    ];
    let hop = ok(&url, &args).trim().to_owned();
    let pending = ok(&url, &["pending", "web"]);
    assert!(
        pending.contains("DEADLINE") && pending.contains("(in 59m)"),
        "{pending}"
    );
    let chain = ok(&url, &["chain", "t"]);
    assert!(chain.contains("(in 59m)"), "{chain}");
    let shown = json(&url, &["pending", "web"]);
    assert!(
        shown["accept_by"].is_string() && shown["complete_by"].is_string(),
        "{shown}"
    );

    // web stops renewing: the hop expires, the watcher says why, the instance is marked.
    let expired = loop {
        let line = events
            .recv_timeout(Duration::from_secs(20))
            .expect("an event");
        if line.contains("delegation_expired") {
            break line;
        }
    };
    assert!(
        expired.contains(&hop) && expired.contains("target unresponsive"),
        "{expired}"
    );
    let list = ok(&url, &["instances", "list"]);
    assert!(list.contains("unresponsive since"), "{list}");
    let tree = ok(&url, &["instances", "tree"]);
    assert!(tree.contains("unresponsive since"), "{tree}");
    let drawn = ok(&url, &["tree", "t"]);
    assert!(
        drawn.contains("expired") && drawn.contains("target unresponsive"),
        "{drawn}"
    );
    let metrics = scrape(server.metrics.as_deref().unwrap());
    let expired = r#"hopper_delegations_expired_total{reason="target_unresponsive"}"#;
    assert_eq!(value(&metrics, expired), 1.0, "{metrics}");
    assert_eq!(value(&metrics, "hopper_unresponsive_instances"), 1.0);
    assert_eq!(value(&metrics, "hopper_expiry_lag_seconds_count"), 1.0);
    drop(watch);
    server.stop();
}

on_both_backends!(
    deadlines_and_leases_through_hopperctl,
    the_seed_story_runs_through_hopperctl_alone,
    rejecting_cancelling_and_completing_in_place_through_hopperctl,
    hopperctl_exit_codes_tell_refusals_usage_and_an_unreachable_server_apart,
    watch_follows_completions_bubbling_up_and_resumes_after_a_restart,
    metrics_are_served_and_move_with_requests_and_logs_carry_the_rpc_span
);

/// The JSON log has a line for the CompleteDelegation with its span's fields, and no result.
fn server_log_has_span(server: &Server, delegation: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut found = false;
    while Instant::now() < deadline && !found {
        let Ok(line) = server.log.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        assert!(
            !line.contains("s3cr3t-result"),
            "a result body in the log: {line}"
        );
        let Ok(json) = serde_json::from_str::<Value>(&line) else {
            panic!("not JSON: {line}");
        };
        let span = &json["span"];
        if span["method"] == "CompleteDelegation" && json["fields"]["message"] == "answered" {
            assert_eq!(span["delegation_id"], delegation);
            assert_eq!(span["caller"], "open");
            found = true;
        }
    }
    assert!(found, "no CompleteDelegation span in the log");
}

/// `GET /metrics`, over a plain HTTP/1.1 connection.
fn scrape(addr: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("content-type: application/openmetrics-text"),
        "{response}"
    );
    response.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// The value of one sample line (`name{labels} value`); panics if there is none.
fn value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no {sample} in\n{text}"))
}

/// The lines a child writes, through a channel (so that reads can time out).
fn lines_of(out: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (lines, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    receiver
}

fn next_event(events: &mpsc::Receiver<String>) -> Value {
    let line = events
        .recv_timeout(Duration::from_secs(30))
        .expect("an event within 30 s");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// The events printed up to and including `task`'s task_completed.
fn until_task_completed(events: &mpsc::Receiver<String>, task: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let event = next_event(events);
        let done = event["kind"] == "task_completed" && event["task_id"] == task;
        seen.push(event);
        if done {
            return seen;
        }
    }
}

async fn snapshot(db: &TestDb) -> Vec<String> {
    common::snapshot(&db.pool()).await
}
