//! The binary as an operator runs it: `migrate`, `serve` on the SQLite default, SIGTERM.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Backend, TestDb};

fn hopper() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hopper-delegation"))
}

async fn migrate_brings_a_database_up_to_date(backend: Backend) {
    let db = TestDb::empty(backend).await;
    let url = match &db.url {
        hopper_delegation::store::DatabaseUrl::Postgres(url) => url.clone(),
        hopper_delegation::store::DatabaseUrl::Sqlite(path) => {
            format!("sqlite://{}", path.display())
        }
    };
    for _ in 0..2 {
        let output = hopper()
            .args(["migrate", "--database-url", &url])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(String::from_utf8_lossy(&output.stderr).contains("database is up to date"));
    }
    let pending =
        hopper_delegation::store::migrate(&db.url, hopper_delegation::store::Migrate::Latest)
            .await
            .unwrap();
    assert!(pending.is_empty());
}

on_both_backends!(migrate_brings_a_database_up_to_date);

/// Starts `hopper-delegation serve ARGS` in `dir` and reads the address it logs.
fn serve(dir: &std::path::Path, args: &[&str]) -> (std::process::Child, String) {
    let mut child = hopper()
        .arg("serve")
        .args(args)
        .env_remove("DATABASE_URL")
        .current_dir(dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = log
        .by_ref()
        .map_while(Result::ok)
        .find_map(|line| {
            line.split("address=")
                .nth(1)
                .map(|a| a.split_whitespace().next().unwrap().to_owned())
        })
        .expect("the server logs its address");
    // Keep reading, so that the server never writes to a closed pipe.
    std::thread::spawn(move || log.for_each(drop));
    (child, addr)
}

/// Sends SIGTERM and checks the server exits cleanly and soon.
fn stop(mut child: std::process::Child) {
    let started = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn serve_runs_on_the_sqlite_default_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // No --database-url: the default sqlite://hopper.db, in the working directory.
    let (child, addr) = serve(dir.path(), &["--listen", "127.0.0.1:0"]);
    assert!(dir.path().join("hopper.db").exists());

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap();
        let mut health =
            tonic_health::pb::health_client::HealthClient::new(channel.connect().await.unwrap());
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(reply.into_inner().status, 1, "SERVING");
    });
    stop(child);
}

#[test]
fn a_non_loopback_address_needs_authentication_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let output = hopper()
        .args(["serve", "--listen", "0.0.0.0:0"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to serve 0.0.0.0:0 without authentication"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("hopper.db").exists(),
        "it refused before touching the database"
    );

    let (child, _) = serve(dir.path(), &["--listen", "0.0.0.0:0", "--insecure"]);
    stop(child);

    let tokens = dir.path().join("tokens.toml");
    let digest = hopper_delegation::auth::digest_hex("s3cret");
    std::fs::write(&tokens, format!("[instances]\nglobal = {digest:?}\n")).unwrap();
    let tokens = tokens.to_str().unwrap();
    let (child, addr) = serve(
        dir.path(),
        &["--listen", "0.0.0.0:0", "--auth-tokens", tokens],
    );
    let port = addr.rsplit(':').next().unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let list = || hopper_delegation::proto::ListInstancesRequest::default();
        let mut anonymous = common::Clients::new(channel.clone(), None);
        let status = anonymous
            .instances
            .list_instances(list())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        let mut global = common::Clients::new(channel, Some("s3cret"));
        global.instances.list_instances(list()).await.unwrap();
    });
    stop(child);
}

#[test]
fn bad_security_settings_stop_start_up_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokens.toml"), "admin = [\"abc\"]").unwrap();
    for (args, reason) in [
        (
            &["--auth-tokens", "tokens.toml"][..],
            "is not a SHA-256 digest",
        ),
        (
            &["--auth-tokens", "missing.toml"][..],
            "could not read the tokens file",
        ),
        (&["--tls-cert", "server.crt"][..], "--tls-key"),
        (&["--tls-client-ca", "ca.crt"][..], "--tls-cert"),
    ] {
        let output = hopper()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
}

#[test]
fn a_bad_database_url_is_refused_with_a_message() {
    let output = hopper()
        .args(["migrate", "--database-url", "mysql://x/y"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("use postgres://…, sqlite://PATH or a file path"),
        "{stderr}"
    );
}

#[test]
fn a_second_server_on_the_same_sqlite_file_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("shared.db").display());
    let mut first = hopper()
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &url])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(first.stderr.take().unwrap()).lines();
    assert!(
        log.by_ref()
            .map_while(Result::ok)
            .any(|line| line.contains("serving gRPC"))
    );

    let started = Instant::now();
    let second = hopper()
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &url])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(started.elapsed() < Duration::from_secs(5));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another hopper-delegation server is using"),
        "{stderr}"
    );

    Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(first.wait().unwrap().success());
}
