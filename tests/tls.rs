//! TLS and client certificates (mTLS) through a real rustls handshake: certificates are made
//! for the test with rcgen (a CA, the server's, one per instance, and one from a stranger CA).

mod common;

use std::time::Duration;

use common::{Backend, TestDb, TestServer, hierarchy, test_tokens, token_of};
use hopper_delegation::{
    auth::Authenticator,
    auth::Caller,
    proto::{self as pb, instance_service_client::InstanceServiceClient},
    server::{self, Config},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

/// A CA that signs certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate and key (PEM) for `common_name`, valid for `localhost`.
    fn sign(&self, common_name: &str, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

struct Pki {
    ca: Ca,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let ca = Ca::new("hopper test CA");
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca.sign("localhost", ExtendedKeyUsagePurpose::ServerAuth);
        for (name, pem) in [
            ("server.crt", cert),
            ("server.key", key),
            ("ca.crt", ca.pem.clone()),
        ] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        Self { ca, dir }
    }

    fn tls(&self, client_ca: bool) -> server::TlsConfig {
        let path = |name: &str| self.dir.path().join(name);
        let ca = path("ca.crt");
        server::tls_config(
            &path("server.crt"),
            &path("server.key"),
            client_ca.then_some(ca.as_path()),
        )
        .unwrap()
    }

    /// A TLS channel trusting the test CA, presenting `identity` if given.
    async fn channel(
        &self,
        server: &TestServer,
        identity: Option<(String, String)>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca.pem))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Channel::from_shared(format!("https://{}", server.addr))
            .unwrap()
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    fn client_cert(&self, instance: &str) -> (String, String) {
        self.ca.sign(instance, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

async fn start(pki: &Pki, client_ca: bool) -> TestServer {
    let config = Config {
        auth: Authenticator::new(Some(test_tokens(&["project", "orch"])), client_ca),
        tls: Some(pki.tls(client_ca)),
        ..Config::default()
    };
    // The plaintext clients TestServer makes fail lazily; these tests make their own.
    let server = TestServer::start_with(TestDb::migrated(Backend::Sqlite).await, config).await;
    hierarchy(&server.db.pool()).await;
    server
}

/// Asserts the code of a refusal and a part of its message.
fn expect_status(status: &tonic::Status, code: Code, needle: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(needle), "{status:?}");
}

fn get(id: &str) -> pb::GetInstanceRequest {
    pb::GetInstanceRequest { id: id.into() }
}

#[tokio::test]
async fn tls_carries_bearer_tokens_and_refuses_plaintext() {
    let pki = Pki::new();
    let server = start(&pki, false).await;
    let channel = pki.channel(&server, None).await.unwrap();
    let mut orch = common::Clients::new(channel.clone(), Some(&token_of("orch")));
    let instance = orch
        .instances
        .get_instance(get("orch"))
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap();
    assert_eq!(instance.id, "orch");
    let mut anonymous = InstanceServiceClient::new(channel);
    let status = anonymous.get_instance(get("orch")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // A plaintext HTTP/2 client gets no answer from the TLS port.
    let status = server
        .instances
        .clone()
        .get_instance(get("orch"))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::Unknown | Code::Unavailable),
        "{status:?}"
    );
}

#[tokio::test]
async fn tls_connections_send_without_delay() {
    let pki = Pki::new();
    let server = start(&pki, false).await;
    let channel = pki.channel(&server, None).await.unwrap();
    let mut orch = common::Clients::new(channel, Some(&token_of("orch")));
    orch.instances.get_instance(get("orch")).await.unwrap();
    let sockets = common::accepted_nodelay(server.addr.port());
    assert!(!sockets.is_empty(), "found no accepted connection");
    assert!(sockets.iter().all(|on| *on), "{sockets:?}");
}

#[tokio::test]
async fn a_client_certificate_names_the_calling_instance() {
    let pki = Pki::new();
    let server = start(&pki, true).await;
    let db = server.db.pool();
    common::task(&db, "t", "project").await;
    let d = hopper_delegation::repository::delegations::create(
        &db,
        &Caller::Admin,
        common::hop(
            "t",
            "project",
            "orch",
            hopper_delegation::domain::DelegationType::Route,
        ),
    )
    .await
    .unwrap();
    let accept = || pb::AcceptDelegationRequest { id: d.id.clone() };

    // project's certificate: not the target.
    let channel = pki
        .channel(&server, Some(pki.client_cert("project")))
        .await
        .unwrap();
    let mut as_project = common::Clients::new(channel, None);
    let status = as_project
        .delegations
        .accept_delegation(accept())
        .await
        .unwrap_err();
    expect_status(&status, Code::PermissionDenied, "instance project may not");

    // A token that names another instance than the certificate is refused outright.
    let channel = pki
        .channel(&server, Some(pki.client_cert("orch")))
        .await
        .unwrap();
    let mut mixed = common::Clients::new(channel.clone(), Some(&token_of("project")));
    let status = mixed
        .delegations
        .accept_delegation(accept())
        .await
        .unwrap_err();
    expect_status(&status, Code::Unauthenticated, "names instance orch");

    // orch's certificate alone is enough to accept what was sent to orch.
    let mut as_orch = common::Clients::new(channel, None);
    let accepted = as_orch
        .delegations
        .accept_delegation(accept())
        .await
        .unwrap()
        .into_inner()
        .delegation
        .unwrap();
    assert_eq!(accepted.status(), pb::DelegationStatus::Accepted);

    // Without a certificate, a token still works; with neither, UNAUTHENTICATED.
    let channel = pki.channel(&server, None).await.unwrap();
    let mut by_token = common::Clients::new(channel.clone(), Some(&token_of("orch")));
    by_token.instances.get_instance(get("orch")).await.unwrap();
    let status = InstanceServiceClient::new(channel)
        .get_instance(get("orch"))
        .await
        .unwrap_err();
    expect_status(&status, Code::Unauthenticated, "client certificate");
}

#[tokio::test]
async fn certificates_from_another_ca_or_with_a_bad_name_are_refused() {
    let pki = Pki::new();
    let server = start(&pki, true).await;

    // The handshake itself fails for a certificate the client CA did not sign.
    let stranger = Ca::new("stranger CA").sign("orch", ExtendedKeyUsagePurpose::ClientAuth);
    let refused = match pki.channel(&server, Some(stranger)).await {
        Err(_) => true,
        Ok(channel) => InstanceServiceClient::new(channel)
            .get_instance(get("orch"))
            .await
            .is_err(),
    };
    assert!(refused, "a certificate from an unknown CA was accepted");

    let channel = pki
        .channel(&server, Some(pki.client_cert("not an id!")))
        .await
        .unwrap();
    let status = InstanceServiceClient::new(channel)
        .get_instance(get("orch"))
        .await
        .unwrap_err();
    expect_status(&status, Code::Unauthenticated, "is not an instance id");
}

#[test]
fn unreadable_or_bad_tls_files_stop_start_up_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.crt");
    let err = server::tls_config(&missing, &missing, None).unwrap_err();
    assert!(
        format!("{err:#}").contains("could not read the TLS certificate"),
        "{err:#}"
    );
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let err = server::tls_config(&junk, &junk, None).unwrap_err();
    assert!(
        format!("{err:#}").contains("could not use the TLS certificate"),
        "{err:#}"
    );
}

/// Runs `hopperctl ARGS` (blocking; the server runs on the test runtime's other threads).
fn hopperctl(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hopperctl"))
        .args(args)
        .env_remove("HOPPER_TOKEN")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hopperctl_speaks_tls_with_a_token_or_a_client_certificate() {
    let pki = Pki::new();
    let server = start(&pki, true).await;
    let (cert, key) = pki.client_cert("orch");
    let path = |name: &str| pki.dir.path().join(name).display().to_string();
    std::fs::write(path("orch.crt"), cert).unwrap();
    std::fs::write(path("orch.key"), key).unwrap();
    let url = format!("https://localhost:{}", server.addr.port());
    let ca = path("ca.crt");
    let tls = ["--server", url.as_str(), "--ca-cert", ca.as_str()];

    let token = token_of("project");
    let tree = hopperctl(&[&tls[..], &["--token", &token, "instances", "tree"]].concat());
    assert!(
        tree.status.success(),
        "{}",
        String::from_utf8_lossy(&tree.stderr)
    );
    let tree = String::from_utf8(tree.stdout).unwrap();
    let lines: Vec<&str> = tree.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "the project token sees its own subtree:\n{tree}"
    );
    assert!(
        lines[0].starts_with("project  ") && lines[1].starts_with("└── orch  "),
        "{tree}"
    );

    let (cert, key) = (path("orch.crt"), path("orch.key"));
    let mine = hopperctl(
        &[
            &tls[..],
            &["--cert", &cert, "--key", &key, "pending", "orch"],
        ]
        .concat(),
    );
    assert!(
        mine.status.success(),
        "{}",
        String::from_utf8_lossy(&mine.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&mine.stdout),
        "no pending delegations for orch\n"
    );
    let theirs = hopperctl(
        &[
            &tls[..],
            &["--cert", &cert, "--key", &key, "pending", "project"],
        ]
        .concat(),
    );
    assert_eq!(
        theirs.status.code(),
        Some(1),
        "refused: orch does not manage project"
    );
    assert!(String::from_utf8_lossy(&theirs.stderr).starts_with("error: instance orch may not"));

    let anonymous = hopperctl(&[&tls[..], &["pending", "orch"]].concat());
    assert_eq!(anonymous.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&anonymous.stderr).starts_with("error: no credentials"));

    // Without the test CA the server's certificate is not trusted: the server is unreachable.
    let untrusted = hopperctl(&["--server", &url, "--token", &token, "pending", "orch"]);
    assert_eq!(
        untrusted.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
    let plaintext_with_ca = hopperctl(&[
        "--server",
        "http://127.0.0.1:1",
        "--ca-cert",
        &ca,
        "pending",
        "orch",
    ]);
    assert_eq!(
        plaintext_with_ca.status.code(),
        Some(2),
        "--ca-cert needs https://"
    );
    server.stop().await;
}
