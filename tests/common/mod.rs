//! Test support: a fresh database of either backend per test, a server on 127.0.0.1:0 with
//! tonic clients, and small builders for the Global -> Project -> Orchestration story.
//!
//! PostgreSQL tests create a database of their own (dropped afterwards) through
//! `HOPPER_TEST_POSTGRES_URL` (default `postgres://root@127.0.0.1:5432/test`). If no server
//! answers, they are skipped with a message, except when `CI=true` or
//! `HOPPER_REQUIRE_POSTGRES=1`, where that is a failure.

#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod cluster;
pub mod rpc;

use std::{future::Future, net::SocketAddr, time::Duration};

use diesel::{QueryableByName, sql_types::Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use hopper_delegation::{
    auth::Caller,
    domain::{DelegationType, InstanceStatus, Scope},
    fanout::Hub,
    proto::{
        delegation_service_client::DelegationServiceClient,
        instance_service_client::InstanceServiceClient, task_service_client::TaskServiceClient,
    },
    repository::{
        delegations::{self as delegation_ops, NewDelegation},
        instances::{self as instance_ops, NewInstance},
        tasks::{self as task_ops, NewTask},
    },
    server::{self, Config},
    store::{self, Conn, DatabaseUrl, Db, Migrate, delegations::Delegation},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    Request, Status,
    codegen::InterceptedService,
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
    transport::Channel,
};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each named `async fn NAME(backend: Backend)` as two tests, `NAME::sqlite` and
/// `NAME::postgres` (the latter skipped with a message when no PostgreSQL answers, unless
/// `CI=true` or `HOPPER_REQUIRE_POSTGRES=1`). The bodies are plain functions, so rustfmt
/// formats them.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                if $crate::common::postgres_available().await {
                    super::$name($crate::common::Backend::Postgres).await
                }
            }
        }
    )+};
}

fn admin_url() -> String {
    std::env::var("HOPPER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_owned())
}

fn postgres_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("HOPPER_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// Whether PostgreSQL tests can run; panics if they must and cannot.
pub async fn postgres_available() -> bool {
    match AsyncPgConnection::establish(&admin_url()).await {
        Ok(_) => true,
        Err(err) if postgres_required() => {
            panic!(
                "PostgreSQL is required here but {} refused: {err}",
                admin_url()
            )
        }
        Err(err) => {
            eprintln!("SKIPPED: no PostgreSQL at {} ({err})", admin_url());
            false
        }
    }
}

/// A fresh, empty database that is deleted when dropped.
pub struct TestDb {
    pub url: DatabaseUrl,
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

impl TestDb {
    /// Creates an empty database (no migrations applied).
    pub async fn empty(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = DatabaseUrl::Sqlite(dir.path().join("hopper.db"));
                Self {
                    url,
                    backend,
                    _dir: Some(dir),
                    pg_name: None,
                }
            }
            Backend::Postgres => {
                let name = format!("hopper_test_{}", uuid::Uuid::new_v4().simple());
                let mut admin = AsyncPgConnection::establish(&admin_url())
                    .await
                    .expect("admin");
                admin
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create db");
                let base = admin_url();
                let server = base
                    .rsplit_once('/')
                    .map_or(base.as_str(), |(server, _)| server);
                let url = DatabaseUrl::Postgres(format!("{server}/{name}"));
                Self {
                    url,
                    backend,
                    _dir: None,
                    pg_name: Some(name),
                }
            }
        }
    }

    /// Creates a database with every migration applied.
    pub async fn migrated(backend: Backend) -> Self {
        let db = Self::empty(backend).await;
        store::migrate(&db.url, Migrate::Latest)
            .await
            .expect("migrate");
        db
    }

    /// The same database, for a second server; only the original drops it.
    pub fn borrowed(other: &TestDb) -> Self {
        Self {
            url: other.url.clone(),
            backend: other.backend,
            _dir: None,
            pg_name: None,
        }
    }

    /// The URL as `--database-url` takes it.
    pub fn url_arg(&self) -> String {
        match &self.url {
            DatabaseUrl::Postgres(url) => url.clone(),
            DatabaseUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
        }
    }

    /// A pool on this database.
    pub fn pool(&self) -> Db {
        Db::open(&self.url, 16).expect("pool")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop cannot await; a short-lived runtime on its own thread does the clean-up.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = AsyncPgConnection::establish(&admin_url()).await.ok()?;
                let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                admin.batch_execute(&drop).await.ok()
            });
            std::io::Result::Ok(())
        })
        .join();
    }
}

/// Runs one statement returning a single text column `line`, on either backend.
pub async fn text_rows(conn: &mut Conn, sql: &str) -> Vec<String> {
    #[derive(QueryableByName)]
    struct Line {
        #[diesel(sql_type = Text)]
        line: String,
    }
    let rows: Vec<Line> = match conn {
        Conn::Pg(c) => diesel::sql_query(sql).load(&mut **c).await,
        Conn::Sqlite(c) => diesel::sql_query(sql).load(&mut **c).await,
    }
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.into_iter().map(|row| row.line).collect()
}

/// Runs statements that return nothing, on either backend.
pub async fn execute(conn: &mut Conn, sql: &str) {
    match conn {
        Conn::Pg(c) => c.batch_execute(sql).await,
        Conn::Sqlite(c) => c.batch_execute(sql).await,
    }
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Counts rows per table (and the event log's head) and dumps every task and delegation with
/// its status and last change, to show that a failed request wrote nothing.
pub async fn snapshot(db: &Db) -> Vec<String> {
    // Every committed event numbered first, so that the count cannot move under the snapshot
    // (on PostgreSQL the sequencer numbers them in the background).
    db.sequence_events().await.expect("sequence events");
    let mut conn = db.conn().await.expect("conn");
    text_rows(
        &mut conn,
        "SELECT 'instances ' || COUNT(*) AS line FROM hopper_instances
         UNION ALL SELECT 'tasks ' || COUNT(*) FROM tasks
         UNION ALL SELECT 'delegations ' || COUNT(*) FROM task_delegations
         UNION ALL SELECT 'events ' || COUNT(*) || ' ' || COALESCE(MAX(sequence), 0)
                   FROM delegation_events
         UNION ALL SELECT 'requests ' || COUNT(*) FROM idempotent_requests
         UNION ALL SELECT t.id || ' ' || t.status || ' ' || t.instance_id || ' ' ||
                          CAST(t.updated_at AS TEXT) FROM tasks t
         UNION ALL SELECT d.id || ' ' || d.status || ' ' || CAST(d.updated_at AS TEXT)
                   FROM task_delegations d",
    )
    .await
}

/// Registers a RUNNING instance.
pub async fn instance(db: &Db, id: &str, scope: Scope, parent: Option<&str>) {
    instance_ops::register(
        db,
        &Caller::Admin,
        NewInstance {
            request_id: None,
            id: Some(id.to_owned()),
            name: id.to_uppercase(),
            scope,
            parent_id: parent.map(str::to_owned),
            status: InstanceStatus::Running,
            config: serde_json::json!({}),
            lease: None,
        },
    )
    .await
    .expect("register instance");
}

/// Registers global, project (under global), orch (under project) and a sibling project2
/// with orch2 below it.
pub async fn hierarchy(db: &Db) {
    instance(db, "global", Scope::Global, None).await;
    instance(db, "project", Scope::Project, Some("global")).await;
    hierarchy_rest(db).await;
}

/// Registers what [`hierarchy`] does beyond `global` and `project`.
pub async fn hierarchy_rest(db: &Db) {
    instance(db, "orch", Scope::Orchestration, Some("project")).await;
    instance(db, "project2", Scope::Project, Some("global")).await;
    instance(db, "orch2", Scope::Orchestration, Some("project2")).await;
}

/// Creates a task at an instance.
pub async fn task(db: &Db, id: &str, at: &str) {
    task_ops::create(
        db,
        &Caller::Admin,
        NewTask {
            request_id: None,
            id: Some(id.to_owned()),
            title: format!("task {id}"),
            description: String::new(),
            instance_id: Some(at.to_owned()),
            parent_task_id: None,
        },
    )
    .await
    .expect("create task");
}

/// Creates a subtask where its parent is.
pub async fn subtask(db: &Db, id: &str, parent: &str) {
    let new = new_subtask(id, parent);
    task_ops::create(db, &Caller::Admin, new)
        .await
        .expect("subtask");
}

/// The request for a subtask of `parent`, where the parent is.
pub fn new_subtask(id: &str, parent: &str) -> NewTask {
    NewTask {
        request_id: None,
        id: Some(id.to_owned()),
        title: id.to_owned(),
        description: String::new(),
        instance_id: None,
        parent_task_id: Some(parent.to_owned()),
    }
}

/// The request for a hop of `task` from `source` to `target`.
pub fn hop(task: &str, source: &str, target: &str, kind: DelegationType) -> NewDelegation {
    NewDelegation {
        request_id: None,
        id: None,
        task_id: task.to_owned(),
        source_instance_id: source.to_owned(),
        target_instance_id: target.to_owned(),
        delegation_type: kind,
        notes: None,
        delegated_by: Some("tests".to_owned()),
        accept_within: None,
        complete_within: None,
        defaults: Default::default(),
    }
}

/// Adds a request id to a [`hop`].
pub trait NewDelegationExt {
    fn with_request_id(self, request_id: &str) -> Self;
}

impl NewDelegationExt for NewDelegation {
    fn with_request_id(self, request_id: &str) -> Self {
        Self {
            request_id: Some(request_id.to_owned()),
            ..self
        }
    }
}

/// Sends `task` from `source` to `target`: a PENDING hop.
pub async fn delegate(
    db: &Db,
    task: &str,
    source: &str,
    target: &str,
    kind: DelegationType,
) -> Delegation {
    delegation_ops::create(db, &Caller::Admin, hop(task, source, target, kind))
        .await
        .expect("create delegation")
}

/// Delegates and accepts a route hop.
pub async fn accepted_route(db: &Db, task: &str, source: &str, target: &str) -> Delegation {
    let d = delegate(db, task, source, target, DelegationType::Route).await;
    delegation_ops::accept(db, &Caller::Admin, &d.id)
        .await
        .expect("accept")
}

/// A server on 127.0.0.1:0 over a fresh migrated database, with clients.
pub struct TestServer {
    pub addr: SocketAddr,
    pub db: TestDb,
    pub hub: Hub,
    pub instances: InstanceServiceClient<Channel>,
    pub tasks: TaskServiceClient<Channel>,
    pub delegations: DelegationServiceClient<Channel>,
    pub channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// A server with a progress interval of 200 ms.
    pub async fn start(backend: Backend) -> Self {
        let config = Config {
            progress_interval: Duration::from_millis(200),
            ..Config::default()
        };
        Self::start_with(TestDb::migrated(backend).await, config).await
    }

    /// A server on `db` with `config`.
    pub async fn start_with(db: TestDb, config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (shutdown, stop) = oneshot::channel::<()>();
        let hub = Hub::with_limits(db.pool(), config.progress_interval, config.watch);
        let handle = tokio::spawn(server::run(listener, hub.clone(), config, async {
            let _ = stop.await;
        }));
        // Lazy, so that a TLS server (whose clients a test makes itself) starts too.
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_lazy();
        Self {
            addr,
            db,
            hub,
            instances: InstanceServiceClient::new(channel.clone()),
            tasks: TaskServiceClient::new(channel.clone()),
            delegations: DelegationServiceClient::new(channel.clone()),
            channel,
            shutdown: Some(shutdown),
            handle: Some(handle),
        }
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.take().map(|s| s.send(()));
        if let Some(handle) = self.handle.take() {
            handle.await.expect("server task").expect("server");
        }
    }
}

/// Runs `n` copies of a future concurrently on the runtime's threads and collects the results.
pub async fn race<F, T>(n: usize, make: impl Fn(usize) -> F) -> Vec<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            let future = make(i);
            tokio::spawn(async move {
                barrier.wait().await;
                future.await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(n);
    for handle in handles {
        results.push(handle.await.expect("task"));
    }
    results
}

/// Inserts `children` subtasks under `root`, each with `grandchildren` subtasks, in a few
/// multi-row statements (the API would take minutes for 10,000 tasks in a debug build).
pub async fn bulk_subtasks(db: &Db, root: &str, children: usize, grandchildren: usize) {
    let mut conn = db.conn().await.expect("conn");
    let stamp = "2026-01-01 00:00:00";
    let row = |id: &str, parent: &str| {
        format!("('{id}', '{id}', '', 'global', '{parent}', 'pending', '{stamp}', '{stamp}')")
    };
    let insert = "INSERT INTO tasks (id, title, description, instance_id, parent_task_id, status, \
                  created_at, updated_at) VALUES ";
    let level: Vec<_> = (0..children)
        .map(|c| row(&format!("{root}.{c}"), root))
        .collect();
    execute(&mut conn, &format!("{insert}{}", level.join(", "))).await;
    for c in 0..children {
        let parent = format!("{root}.{c}");
        let level: Vec<_> = (0..grandchildren)
            .map(|g| row(&format!("{parent}.{g}"), &parent))
            .collect();
        execute(&mut conn, &format!("{insert}{}", level.join(", "))).await;
    }
}

/// Sends `authorization: Bearer TOKEN` with every request (nothing for `None`).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Clients of the three services that authenticate with one bearer token.
pub struct Clients {
    pub instances: InstanceServiceClient<InterceptedService<Channel, Bearer>>,
    pub tasks: TaskServiceClient<InterceptedService<Channel, Bearer>>,
    pub delegations: DelegationServiceClient<InterceptedService<Channel, Bearer>>,
}

impl Clients {
    /// Clients over `channel` sending `token` (none for `None`).
    pub fn new(channel: Channel, token: Option<&str>) -> Self {
        let bearer = Bearer(token.map(|t| format!("Bearer {t}").parse().expect("ascii token")));
        Self {
            instances: InstanceServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            tasks: TaskServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            delegations: DelegationServiceClient::with_interceptor(channel, bearer),
        }
    }
}

impl TestServer {
    /// Clients that call as the holder of `token`.
    pub fn calling_as(&self, token: &str) -> Clients {
        Clients::new(self.channel.clone(), Some(token))
    }
}

/// The token of an instance in the test tokens file: `ID-token`; the admin's is `admin-token`.
pub fn token_of(id: &str) -> String {
    format!("{id}-token")
}

/// A tokens file with the admin token and one token for each of `instances`.
pub fn test_tokens(instances: &[&str]) -> hopper_delegation::auth::Tokens {
    use hopper_delegation::auth::digest_hex;
    let mut toml = format!(
        "admin = {:?}\n[instances]\n",
        digest_hex(&token_of("admin"))
    );
    for id in instances {
        toml.push_str(&format!("{id:?} = {:?}\n", digest_hex(&token_of(id))));
    }
    hopper_delegation::auth::Tokens::parse(&toml).expect("tokens")
}

/// TCP_NODELAY of every connection this process accepted on `port` (the server side of each
/// client connection to a [`TestServer`] in this process), read from the sockets themselves.
pub fn accepted_nodelay(port: u16) -> Vec<bool> {
    use std::os::fd::BorrowedFd;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let name = entry.expect("fd entry").file_name();
        let Ok(fd) = name.to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the descriptor is only read with getsockname/getsockopt; if it was closed
        // meanwhile those calls fail or read another socket, never write anything.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let (Ok(local), Ok(_peer)) = (socket.local_addr(), socket.peer_addr()) else {
            continue;
        };
        if local.as_socket().map(|a| a.port()) == Some(port) {
            found.push(socket.tcp_nodelay().expect("TCP_NODELAY"));
        }
    }
    found
}
