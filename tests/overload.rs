//! Rate limits and overload over real mutual TLS: quotas per agency and
//! officer, slow and oversized clients, a hanging provider and its circuit
//! breaker, and SIGTERM under load against the real binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{admin_get, eventually, gateway_from_banner, raw_exchange, Client, Db, TestGateway};
use common::{person_path, PERSON};
use http::StatusCode;
use karibche::audit::{self, Filter};
use karibche::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the statistics office asks for: counts, never a person.
const STATISTICS: &str = "/v1/registry/statistics?dataset=persons&by=nationality";

/// Copies the repository's policies to `dir/policies`, with `limits` as the quota file.
fn copy_policies(dir: &Path, limits: &str) -> PathBuf {
    let to = dir.join("policies");
    std::fs::create_dir_all(to.join("agencies")).unwrap();
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for rel in ["purposes.toml", "providers.toml"] {
        std::fs::copy(from.join(rel), to.join(rel)).unwrap();
    }
    for e in std::fs::read_dir(from.join("agencies")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join("agencies").join(e.file_name())).unwrap();
    }
    std::fs::write(to.join("limits.toml"), limits).unwrap();
    to
}

async fn start(limits: &str, adjust: impl FnOnce(&mut Config, &Path)) -> TestGateway {
    TestGateway::start_configured(Db::from_env(), |config, dir| {
        config.policies_dir = copy_policies(dir, limits);
        adjust(config, dir);
    })
    .await
    .unwrap()
}

fn header<'a>(r: &'a common::Reply, name: &str) -> &'a str {
    r.headers
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

async fn records(gw: &TestGateway) -> Vec<audit::Record> {
    audit::query(&gw.running.store, &Filter::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agency_over_its_quota_gets_429_while_another_is_served() {
    let gw = start(
        "[agencies.mia-border]\nagency = { rate = \"1/h\", burst = 3 }\n",
        |_, _| {},
    )
    .await;
    let border = gw.client("mia-border");
    let border_token = gw.token("mia-border", "border-control", None);
    let stats = gw.client("geostat");
    let stats_token = gw.token("geostat", "official-statistics", None);

    // Both agencies at the same time: the Border Police floods, statistics asks normally.
    let flood = async {
        let mut out = Vec::new();
        for _ in 0..12 {
            out.push(border.get(&person_path(PERSON), Some(&border_token)).await);
        }
        out
    };
    let normal = async {
        let mut out = Vec::new();
        for _ in 0..8 {
            out.push(stats.get(STATISTICS, Some(&stats_token)).await.status);
        }
        out
    };
    let (flood, normal) = tokio::join!(flood, normal);
    assert_eq!(
        normal,
        vec![StatusCode::OK; 8],
        "the other agency is unaffected"
    );
    let statuses: Vec<u16> = flood.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");

    let refused = &flood[3];
    assert_eq!(refused.content_type(), "application/problem+json");
    assert_eq!(refused.json()["status"], 429);
    let retry: u64 = header(refused, "retry-after").parse().unwrap();
    assert!(retry > 3000 && retry <= 3600, "{retry}");
    // q: the burst; w: the time it takes to refill (3 requests at 1/h).
    assert_eq!(
        header(refused, "ratelimit-policy"),
        "\"agency\";q=3;w=10800"
    );
    assert_eq!(
        header(refused, "ratelimit"),
        format!("\"agency\";r=0;t={retry}")
    );

    // The first refusal is recorded on its own; the other eight share one summary record.
    let first = refused.request_id();
    let summary_id = flood[4].request_id();
    assert_ne!(first, summary_id);
    assert!(flood[4..].iter().all(|r| r.request_id() == summary_id));
    let found = eventually(Duration::from_secs(3), async || {
        records(&gw).await.iter().any(|r| r.entry.id == summary_id)
    })
    .await;
    assert!(
        found,
        "the summary record is written when the window closes"
    );
    let all = records(&gw).await;
    let one = all.iter().find(|r| r.entry.id == first).unwrap();
    assert_eq!(one.entry.reason.as_deref(), Some("rate_limited"));
    assert_eq!(one.entry.status, 429);
    assert_eq!(one.entry.decision, "deny");
    let summary = all.iter().find(|r| r.entry.id == summary_id).unwrap();
    assert_eq!(
        summary.entry.reason.as_deref(),
        Some("rate_limited_summary")
    );
    assert_eq!(summary.entry.path, "summary:8");
    assert_eq!(summary.entry.agency.as_deref(), Some("mia-border"));
    assert_eq!(summary.entry.subjects, vec![PERSON.to_owned()]);
    assert_eq!(
        all.iter()
            .filter(|r| r.entry.agency.as_deref() == Some("mia-border"))
            .count(),
        3 + 1 + 1,
        "three answers, one refusal, one summary"
    );
    let (_, metrics) = admin_get(gw.running.started.admin, "/metrics").await;
    assert!(
        metrics.contains("karibche_rate_limit_unrecorded_total 8"),
        "{metrics}"
    );
    assert!(
        metrics.contains("karibche_denials_total{agency=\"mia-border\",reason=\"rate_limited\"} 9")
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_officer_limit_sits_inside_the_agency_limit() {
    let gw = start(
        "[agencies.psda]\nagency = { rate = \"1/h\", burst = 6 }\nofficer = { rate = \"1/h\", burst = 4 }\n",
        |_, _| {},
    )
    .await;
    let psda = gw.client("psda");
    let purpose = "identity-documentation";
    let (t1, t2) = (
        gw.officer_token("psda", "officer-1", purpose),
        gw.officer_token("psda", "officer-2", purpose),
    );
    let mut one = Vec::new();
    for _ in 0..6 {
        one.push(psda.get(&person_path(PERSON), Some(&t1)).await);
    }
    let s: Vec<u16> = one.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(s, [200, 200, 200, 200, 429, 429]);
    assert!(header(&one[4], "ratelimit-policy").starts_with("\"officer\";q=4"));
    // Officer 1's refusals did not use the agency's quota: two of six remain, for officer 2.
    let mut two = Vec::new();
    for _ in 0..3 {
        two.push(psda.get(&person_path(PERSON), Some(&t2)).await);
    }
    let s: Vec<u16> = two.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(s, [200, 200, 429]);
    assert!(header(&two[2], "ratelimit-policy").starts_with("\"agency\";q=6"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_off_while_others_are_served() {
    let gw = start("", |c, _| {
        c.gateway.header_timeout = Duration::from_millis(600)
    })
    .await;
    let client = gw.client("mia-border");
    let token = gw.token("mia-border", "border-control", None);

    let mut slow = client.tls().await;
    slow.write_all(b"GET /v1/registry/persons/RF-0000001 HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        // Trickle one header byte at a time, never finishing.
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                r = slow.read(&mut buf) => return r.map(|n| n == 0).unwrap_or(true),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if slow.write_all(b"X").await.is_err() {
                        return true;
                    }
                }
            }
        }
    });
    // Meanwhile normal clients are served.
    for _ in 0..5 {
        assert_eq!(
            client.get(&person_path(PERSON), Some(&token)).await.status,
            StatusCode::OK
        );
    }
    let closed = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the slow connection must be closed")
        .unwrap();
    assert!(closed);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
    let metrics = gw.running.gateway.metrics.clone();
    assert!(
        eventually(Duration::from_secs(2), async || metrics
            .overloads("gateway", "header_timeout")
            == 1)
        .await
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_body_is_refused_before_it_is_read() {
    let gw = start("", |_, _| {}).await;
    let token = gw.token("mia-border", "border-control", None);
    let head = format!(
        "POST /v1/registry/crossings HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    );
    // 16 KiB of 100 MB sent: the answer must come without the rest.
    let (status, id) = raw_exchange(
        &gw,
        "mia-border",
        &head,
        &[b' '; 16 * 1024],
        Duration::from_secs(5),
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    assert!(!id.is_empty(), "no x-request-id");
    let rec = records(&gw)
        .await
        .into_iter()
        .find(|r| r.entry.id == id)
        .unwrap();
    assert_eq!(rec.entry.reason.as_deref(), Some("body_too_large"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_provider_gets_504s_then_its_breaker_opens() {
    // A provider that accepts connections and never says a word.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hang.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = hang.accept().await {
            keep.lock().unwrap().push(s);
        }
    });
    let gw = start("", |c, dir| {
        let policies = dir.join("policies");
        let mut providers = std::fs::read_to_string(policies.join("providers.toml")).unwrap();
        providers.push_str(&format!(
            "\n[[providers]]\nid = \"slow\"\ntitle = \"A provider that never answers\"\nupstream = \"https://127.0.0.1:{port}\"\n\n[[providers.services]]\nid = \"records\"\ntitle = \"Records\"\noperations = [\"read\"]\nsubject_field = \"id\"\n"
        ));
        std::fs::write(policies.join("providers.toml"), providers).unwrap();
        let agency = policies.join("agencies/mia-border.toml");
        let mut text = std::fs::read_to_string(&agency).unwrap();
        text.push_str("\n[[grants]]\nprovider = \"slow\"\nservice = \"records\"\noperations = [\"read\"]\npurposes = [\"border-control\"]\nfields = [\"id\"]\n");
        std::fs::write(agency, text).unwrap();
        c.gateway.upstream_timeout = Duration::from_millis(400);
        c.limits.breaker_failures = 2;
        c.limits.breaker_open = Duration::from_secs(30);
        c.limits.breaker_max_open = Duration::from_secs(60);
    })
    .await;
    let client = gw.client("mia-border");
    let token = gw.token("mia-border", "border-control", None);

    for _ in 0..2 {
        let t = Instant::now();
        let r = client.get("/v1/slow/records/X-1", Some(&token)).await;
        let took = t.elapsed();
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
    // Open: a fast 503 with Retry-After instead of another wait.
    let t = Instant::now();
    let r = client.get("/v1/slow/records/X-1", Some(&token)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    // The register is still served.
    assert_eq!(
        client.get(&person_path(PERSON), Some(&token)).await.status,
        StatusCode::OK
    );

    let (status, body) = admin_get(gw.running.started.admin, "/readyz").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "an open breaker does not make the gateway unready"
    );
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["open_breakers"], serde_json::json!(["slow"]));
    assert_eq!(ready["providers"]["slow"]["breaker"], "open");
    assert_eq!(ready["providers"]["registry"]["breaker"], "closed");
    let (_, metrics) = admin_get(gw.running.started.admin, "/metrics").await;
    assert!(metrics.contains("karibche_provider_breaker_open{provider=\"slow\"} 1"));
    assert!(
        metrics.contains("karibche_overload_total{listener=\"gateway\",kind=\"breaker_open\"} 1")
    );
    let reasons: Vec<String> = records(&gw)
        .await
        .into_iter()
        .filter(|r| r.entry.provider.as_deref() == Some("slow"))
        .filter_map(|r| r.entry.reason)
        .collect();
    assert_eq!(
        reasons,
        [
            "upstream_timeout",
            "upstream_timeout",
            "upstream_circuit_open"
        ]
    );
    gw.shutdown().await;
    assert!(!held.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_agency_with_a_clear_answer() {
    let gw = start("", |c, _| c.limits.max_connections_per_agency = 2).await;
    let client = gw.client("mia-border");
    let token = gw.token("mia-border", "border-control", None);
    // Two connections held open (handshake done, nothing sent).
    let _a = client.tls().await;
    let _b = client.tls().await;
    let held = eventually(Duration::from_secs(3), async || {
        let (_, m) = admin_get(gw.running.started.admin, "/metrics").await;
        m.contains("karibche_open_connections{listener=\"gateway\"} 2")
    })
    .await;
    assert!(held, "the server has admitted both connections");
    let third = client.get(&person_path(PERSON), Some(&token)).await;
    assert_eq!(third.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(third.json()["type"], "urn:karibche:problem:over-capacity");
    assert_eq!(header(&third, "retry-after"), "1");
    // Another agency is not affected.
    let other = gw.token("geostat", "official-statistics", None);
    assert_eq!(
        gw.client("geostat")
            .get(STATISTICS, Some(&other))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        gw.running
            .gateway
            .metrics
            .overloads("gateway", "connections_agency"),
        1
    );
    drop((_a, _b));
    let freed = eventually(Duration::from_secs(3), async || {
        client.get(&person_path(PERSON), Some(&token)).await.status == StatusCode::OK
    })
    .await;
    assert!(freed, "closing connections frees the agency's slots");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed() {
    let gw = start("", |c, _| {
        c.gateway.handshake_timeout = Duration::from_millis(300);
        c.limits.idle_timeout = Duration::from_millis(300);
    })
    .await;
    let metrics = gw.running.gateway.metrics.clone();
    // A TCP connection that never starts its TLS handshake.
    let mut silent = tokio::net::TcpStream::connect(gw.gateway_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf))
        .await
        .expect("cut at the handshake timeout");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(
        eventually(Duration::from_secs(2), async || metrics
            .overloads("gateway", "handshake_timeout")
            == 1)
        .await
    );

    // A keep-alive connection that answered one request and then sits idle.
    let token = gw.token("mia-border", "border-control", None);
    let mut tls = gw.client("mia-border").tls().await;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n",
        person_path(PERSON)
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection must be closed");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        eventually(Duration::from_secs(2), async || {
            metrics.overloads("gateway", "idle_timeout") == 1
        })
        .await
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_total_cap_are_refused_clearly() {
    let gw = start("", |c, _| c.gateway.max_connections = 1).await;
    let client = gw.client("geostat");
    let token = gw.token("geostat", "official-statistics", None);
    let _held = client.tls().await;
    let refused = client.get(&person_path(PERSON), Some(&token)).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.json()["type"], "urn:karibche:problem:over-capacity");
    assert_eq!(
        gw.running
            .gateway
            .metrics
            .overloads("gateway", "connections_total"),
        1
    );
    drop(_held);
    let served = eventually(Duration::from_secs(3), async || {
        client.get(STATISTICS, Some(&token)).await.status == StatusCode::OK
    })
    .await;
    assert!(served);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_acknowledged_request() {
    use tokio::io::AsyncBufReadExt;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    // A small officer quota, so that some answers are 429s folded into a
    // summary record that only the shutdown writes.
    let policies = copy_policies(
        dir.path(),
        "[agencies.mia-border]\nofficer = { rate = \"1/h\", burst = 30 }\n",
    );
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_karibche"))
        .args(["serve", "--seed-persons", "50"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--registry-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--policies")
        .arg(&policies)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let gateway = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(addr) = gateway_from_banner(&line) {
                return addr;
            }
        }
        panic!("serve exited before it was ready")
    })
    .await
    .expect("serve did not become ready");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let pki = data.join("pki");
    let (cert, key) = karibche::devpki::agency_files(&pki, "mia-border");
    let client = Arc::new(Client::new(
        &pki.join("ca.pem"),
        Some((&cert, &key)),
        gateway,
    ));
    let token = Arc::new(common::dev_token(
        &data.join("keys"),
        "mia-border",
        "officer-1",
        "border-control",
    ));

    // Eight clients ask as fast as they can until the gateway stops answering.
    let acknowledged = Arc::new(Mutex::new(Vec::<(u16, String)>::new()));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (client, token, acknowledged) = (client.clone(), token.clone(), acknowledged.clone());
        workers.push(tokio::spawn(async move {
            let path = person_path(PERSON);
            loop {
                match client
                    .send(http::Method::GET, &path, Some(&token), None)
                    .await
                {
                    Ok(r) => acknowledged
                        .lock()
                        .unwrap()
                        .push((r.status.as_u16(), r.request_id())),
                    Err(_) => return,
                }
            }
        }));
    }
    let loaded = eventually(Duration::from_secs(10), async || {
        acknowledged.lock().unwrap().len() >= 40
    })
    .await;
    assert!(loaded);
    let pid = child.id().unwrap();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("serve did not stop after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    for w in workers {
        tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .unwrap()
            .unwrap();
    }

    let store = karibche::store::Store::connect(&format!(
        "sqlite://{}",
        data.join("karibche.db").display()
    ))
    .await
    .unwrap();
    let report = audit::verify(&store, None).await.unwrap();
    assert!(report.intact(), "{report:?}");
    let logged: std::collections::HashSet<String> = audit::query(&store, &Filter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.entry.id)
        .collect();
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(acknowledged.iter().filter(|(s, _)| *s == 200).count(), 30);
    assert!(acknowledged.iter().filter(|(s, _)| *s == 429).count() >= 10);
    for (status, id) in &acknowledged {
        assert!(
            logged.contains(id),
            "answered {status} with {id}, not in the log"
        );
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_can_set_a_smaller_body_limit_and_slow_bodies_time_out() {
    let gw = start("", |config, _| {
        config.gateway.body_timeout = Duration::from_millis(300);
        // The consular department's visa grant accepts at most 256 bytes.
        let file = config.policies_dir.join("agencies/mfa-consular.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let text = text.replacen(
            "service = \"visas\"\n",
            "service = \"visas\"\nmax_body_bytes = 256\n",
            1,
        );
        std::fs::write(&file, text).unwrap();
    })
    .await;
    let token = gw.officer_token("mfa-consular", "consul-1", "visa-decision");
    let big = format!(
        "{{\"person_id\": \"RF-0000001\", \"padding\": \"{}\"}}",
        "x".repeat(400)
    );
    let head = format!(
        "POST /v1/registry/visas HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        big.len()
    );
    let (status, id) = raw_exchange(
        &gw,
        "mfa-consular",
        &head,
        big.as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    let rec = records(&gw)
        .await
        .into_iter()
        .find(|r| r.entry.id == id)
        .unwrap();
    assert_eq!(rec.entry.reason.as_deref(), Some("body_too_large"));

    // Headers promise 100 bytes, 10 arrive, the rest never does: 408 within the body timeout.
    let head = format!(
        "POST /v1/registry/visas HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    let started = std::time::Instant::now();
    let (status, id) = raw_exchange(
        &gw,
        "mfa-consular",
        &head,
        b"{\"person_i",
        Duration::from_secs(10),
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let rec = records(&gw)
        .await
        .into_iter()
        .find(|r| r.entry.id == id)
        .unwrap();
    assert_eq!(rec.entry.reason.as_deref(), Some("body_timeout"));
    assert!(
        gw.running
            .gateway
            .metrics
            .overloads("gateway", "body_timeout")
            >= 1
    );
    gw.shutdown().await;
}
