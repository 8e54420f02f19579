//! The load generator runs for a few seconds at a low rate against a real
//! gateway, so it never rots: no errors, and every 2xx answer is backed by a
//! committed audit record. Speed is not asserted (BENCHMARKS.md measures it).

mod common;

use std::time::Duration;

use common::TestGateway;
use karibche::bench::{self, BenchOptions, Mode, Protocol, Target};

fn options(gw: &TestGateway, protocol: Protocol) -> BenchOptions {
    let mut o = BenchOptions::new(
        Target::Gateway,
        gw.gateway_addr(),
        &gw.pki(),
        &gw.config.data_path(&gw.config.tokens.keys_dir),
    );
    o.protocol = protocol;
    o.mode = Mode::Open;
    o.rate = 50;
    o.warmup = Duration::from_millis(200);
    o.duration = Duration::from_secs(1);
    o.concurrency = 8;
    o.connections = 2;
    o.officers = 8;
    o.persons = gw.config.registry.seed_persons as u32;
    // The test process is the gateway's process: its CPU time is read the same way.
    o.pid = Some(std::process::id());
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_generator_reads_searches_and_writes_with_every_2xx_audited() {
    let gw = TestGateway::start().await;
    let store = gw.running.store.clone();
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let before = bench::audit_2xx(&store).await.unwrap();
        let report = bench::run(&options(&gw, protocol)).await.unwrap();
        println!("{report}");
        assert_eq!(report.errors(), 0, "{report}");
        assert_eq!(report.setup_errors, 0, "{report}");
        assert!(report.requests() >= 40, "{report}");
        assert!(report.cpu.is_some(), "{report}");
        let after = bench::audit_2xx(&store).await.unwrap();
        assert_eq!(
            (after - before) as u64,
            report.ok() + report.setup_ok,
            "2xx audit records vs 2xx answers: {report}"
        );
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_direct_and_idle_modes_work() {
    let gw = TestGateway::start().await;
    let pki = gw.pki();
    let keys = gw.config.data_path(&gw.config.tokens.keys_dir);

    let mut o = BenchOptions::new(Target::Gateway, gw.gateway_addr(), &pki, &keys);
    o.mode = Mode::Handshakes;
    o.concurrency = 2;
    o.warmup = Duration::ZERO;
    o.duration = Duration::from_millis(500);
    o.mix = "read=100".parse().unwrap();
    o.persons = 200;
    let full = bench::run(&o).await.unwrap();
    assert_eq!(full.errors(), 0, "{full}");
    assert_eq!(full.resumed_handshakes, 0, "{full}");
    assert!(full.full_handshakes >= full.requests(), "{full}");
    o.resume = true;
    let resumed = bench::run(&o).await.unwrap();
    assert_eq!(resumed.errors(), 0, "{resumed}");
    assert!(resumed.resumed_handshakes > 0, "{resumed}");
    o.handshake_only = true;
    let bare = bench::run(&o).await.unwrap();
    assert_eq!(bare.errors(), 0, "{bare}");
    assert!(bare.handshakes_only > 0, "{bare}");
    assert!(bare.resumed_handshakes > 0, "{bare}");
    assert_eq!(bare.ok(), 0, "no request was sent: {bare}");

    // The register directly, as the gateway calls it: its own paths, the gateway's certificate.
    let registry = gw.running.started.registry.unwrap();
    let mut d = BenchOptions::new(Target::Direct, registry, &pki, &keys);
    d.mode = Mode::Closed;
    d.concurrency = 2;
    d.warmup = Duration::ZERO;
    d.duration = Duration::from_millis(500);
    d.persons = 200;
    let direct = bench::run(&d).await.unwrap();
    assert_eq!(direct.errors(), 0, "{direct}");
    assert!(direct.requests() > 0);

    let mut i = BenchOptions::new(Target::Gateway, gw.gateway_addr(), &pki, &keys);
    i.mode = Mode::Idle;
    i.connections = 20;
    i.persons = 200;
    i.pid = Some(std::process::id());
    let idle = bench::run(&i).await.unwrap();
    assert_eq!(idle.errors(), 0, "{idle}");
    assert_eq!(idle.held_connections, 20, "{idle}");
    assert!(idle.rss_kib.is_some(), "{idle}");
    gw.shutdown().await;
}

/// Two replicas on one PostgreSQL database: `bench --check-audit` against one of them passes
/// while the other serves other traffic, because it checks the node(s) that answered the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_audit_checks_the_nodes_the_run_talked_to() {
    let Some(db) = karibche::testing::PgDatabase::create().await else {
        return;
    };
    let replica = |node: &'static str| {
        let url = db.url.clone();
        common::TestGateway::start_configured(common::Db::Sqlite, move |c, _| {
            c.database_url = Some(url);
            c.node = node.to_owned();
        })
    };
    let a = replica("bench-a").await.unwrap();
    let b = replica("bench-b").await.unwrap();

    let mut bench = tokio::process::Command::new(env!("CARGO_BIN_EXE_karibche"))
        .args(["--data-dir", a.config.data_dir.to_str().unwrap()])
        .args(["--database-url", &db.url])
        .arg("bench")
        .args(["--addr", &a.gateway_addr().to_string()])
        .args(["--check-audit", "--rate", "40", "--duration", "1s"])
        .args(["--warmup", "200ms", "--concurrency", "4", "--officers", "4"])
        .args(["--persons", "200"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // For as long as the run lasts, the other replica serves other requests.
    let client = b.client("mia-border");
    let token = b.token("mia-border", "border-control", None);
    let mut served = 0;
    while bench.try_wait().unwrap().is_none() {
        let r = client
            .get("/v1/registry/persons/RF-0000002", Some(&token))
            .await;
        assert_eq!(r.status, http::StatusCode::OK);
        served += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = bench.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(served > 0);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("audit      node bench-a: "), "{stdout}");
    assert!(!stdout.contains("bench-b"), "{stdout}");
    assert!(!stdout.contains("MISMATCH"), "{stdout}");
    a.shutdown().await;
    b.shutdown().await;
}
