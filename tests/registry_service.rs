//! The register as its own process (`karibche registry serve`): a gateway
//! with `--no-registry` whose providers.toml names the register's URL serves
//! registry requests through it like any agency's service; only the gateway's
//! certificate gets in; the register restarted under a running gateway is
//! used again once it is back.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    admin_get, eventually, person_path, policies_with_registry_at, shared_data, spawn_registry,
    Client, Db, RegistryProcess, TestGateway, PERSON,
};
use http::{Method, StatusCode};
use karibche::config::Config;

async fn register(data: &Path, listen: &str) -> RegistryProcess {
    let data = data.to_path_buf();
    let listen = listen.to_owned();
    tokio::task::spawn_blocking(move || {
        spawn_registry(
            &data,
            &[
                "--listen",
                &listen,
                "--admin-listen",
                "127.0.0.1:0",
                "--seed-persons",
                "50",
            ],
        )
    })
    .await
    .unwrap()
}

/// A gateway without the in-process register, its providers.toml pointing at `register`.
async fn gateway_for(dir: &Path, data: &Config, register: &RegistryProcess) -> TestGateway {
    let policies = policies_with_registry_at(dir, &format!("https://{}", register.api));
    let data_dir = data.data_dir.clone();
    TestGateway::start_configured(Db::from_env(), move |c, _| {
        c.registry.enabled = false;
        c.data_dir = data_dir;
        c.policies_dir = policies;
        // A register that was down is tried again soon.
        c.limits.breaker_open = Duration::from_millis(200);
        c.limits.breaker_max_open = Duration::from_millis(400);
    })
    .await
    .expect("the test database is available")
}

async fn read_person(gw: &TestGateway) -> common::Reply {
    let token = gw.token("mia-border", "border-control", None);
    gw.client("mia-border")
        .get(&person_path(PERSON), Some(&token))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_serves_the_register_of_its_own_process_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = shared_data(dir.path());
    let reg = register(&data.data_dir, "127.0.0.1:0").await;
    let (status, body) = admin_get(reg.admin, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"service\":\"registry\""), "{body}");
    let (_, metrics) = admin_get(reg.admin, "/metrics").await;
    assert!(metrics.contains("karibche_"), "{metrics}");

    let gw = gateway_for(dir.path(), &data, &reg).await;
    assert!(
        gw.running.registry_store.is_none(),
        "no register in the gateway"
    );
    let reply = read_person(&gw).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["id"], PERSON);
    let record = gw.record_of(&reply).await;
    assert_eq!(record.entry.provider.as_deref(), Some("registry"));
    assert_eq!(record.entry.status, 200);
    assert!(record.entry.subjects.iter().any(|s| s == PERSON));

    // A write goes through too, and lands in the register's own database.
    let registry_db = karibche::store::Store::connect_registry(&data.registry_database_url())
        .await
        .unwrap();
    let document = karibche::registry::example_document(&registry_db)
        .await
        .unwrap()
        .unwrap();
    let at = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let token = gw.token("mia-border", "border-control", None);
    let write = gw
        .client("mia-border")
        .send(
            Method::POST,
            "/v1/registry/crossings",
            Some(&token),
            Some(serde_json::json!({
                "person_id": PERSON, "direction": "exit", "point": "Sarpi",
                "at": at, "document_number": document,
            })),
        )
        .await
        .unwrap();
    assert!(
        write.status.is_success(),
        "{} {}",
        write.status,
        String::from_utf8_lossy(&write.body)
    );
    // Logged ahead: the attempt, then its outcome linked to it.
    let id = write.request_id();
    let records = karibche::audit::query(&gw.running.store, &karibche::audit::Filter::default())
        .await
        .unwrap();
    assert!(records.iter().any(|r| r.entry.id == id));
    assert!(records
        .iter()
        .any(|r| r.entry.attempt_id.as_deref() == Some(id.as_str())
            && r.entry.status == write.status.as_u16()));
    let (crossings,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM reg_crossings WHERE at = $1")
        .bind(&at)
        .fetch_one(registry_db.pool())
        .await
        .unwrap();
    assert_eq!(crossings, 1, "the crossing is in the register's database");
    registry_db.close().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_register_refuses_every_certificate_but_the_gateways() {
    let dir = tempfile::tempdir().unwrap();
    let data = shared_data(dir.path());
    let reg = register(&data.data_dir, "127.0.0.1:0").await;
    let pki = data.pki_dir();
    let ca = pki.join("ca.pem");
    let path = format!("/persons/{PERSON}");
    // An agency's certificate, from the same CA: through TLS, refused at the door.
    let (cert, key) = karibche::devpki::agency_files(&pki, "mia-border");
    let agency = Client::new(&ca, Some((&cert, &key)), reg.api);
    let r = agency.get(&path, None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(!String::from_utf8_lossy(&r.body).contains(PERSON));
    // No certificate at all: the handshake fails.
    let anonymous = Client::new(&ca, None, reg.api);
    let r = anonymous
        .request(
            anonymous
                .builder(Method::GET, &path)
                .body(String::new())
                .unwrap(),
        )
        .await;
    assert!(r.is_err() || r.is_ok_and(|r| r.status == StatusCode::FORBIDDEN));
    // The gateway's own certificate is let in.
    let gateway = Client::new(
        &ca,
        Some((&pki.join("gateway.pem"), &pki.join("gateway.key"))),
        reg.api,
    );
    assert_eq!(gateway.get(&path, None).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_register_is_used_again_by_the_running_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let data = shared_data(dir.path());
    let reg = register(&data.data_dir, "127.0.0.1:0").await;
    let api = reg.api;
    let gw = gateway_for(dir.path(), &data, &reg).await;
    assert_eq!(read_person(&gw).await.status, StatusCode::OK);

    drop(reg); // SIGKILL
    let down = read_person(&gw).await;
    assert!(
        down.status.is_server_error(),
        "{} {}",
        down.status,
        String::from_utf8_lossy(&down.body)
    );
    assert_eq!(gw.record_of(&down).await.entry.status, down.status.as_u16());

    let _back = register(&data.data_dir, &api.to_string()).await;
    assert!(
        eventually(Duration::from_secs(15), async || {
            read_person(&gw).await.status == StatusCode::OK
        })
        .await,
        "the gateway serves the register again once it is back"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_register_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = shared_data(dir.path());
    let mut reg = register(&data.data_dir, "127.0.0.1:0").await;
    let pid = reg.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let stopped = eventually(Duration::from_secs(15), async || {
        reg.child.try_wait().unwrap().is_some()
    })
    .await;
    assert!(stopped, "the register did not stop on SIGTERM");
    let status = reg.child.try_wait().unwrap().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        tokio::net::TcpStream::connect(reg.api).await.is_err(),
        "its listener is closed"
    );
}
