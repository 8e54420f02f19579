//! The web console (src/console/) in a real browser — headless Chromium over
//! WebDriver (fantoccini) — against a gateway started by the test, and over
//! plain HTTPS for what a browser hides: the Content-Security-Policy, the
//! cookie flags, CSRF refusals, tokens that sign in only once.
//!
//! Every page that shows data must leave its own audit record (an auditors'
//! or administrators' API read through the pipeline, certificate
//! `console-session`): the walkthroughs count them at the end. The
//! administrators' pages are the policy's to give: the gateway's
//! administrators (`dga`, purpose `policy-administration`) open each and see
//! its data — a policy file edited during the test shows in the reload
//! difference and the shadow page — and a security officer is refused them
//! with a recorded 403. Screenshots of the main pages go to
//! `target/console-screenshots/`.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use common::{Client, Db, KillOnDrop, TestGateway, PERSON};
use fantoccini::{ClientBuilder, Locator};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use karibche::console::via::CONSOLE_CERTIFICATE;

/// A gateway with the console on an ephemeral port.
async fn gateway() -> TestGateway {
    TestGateway::start_configured(Db::from_env(), |c, _| {
        c.console.enabled = true;
        c.console.listen = "127.0.0.1:0".parse().unwrap();
    })
    .await
    .expect("the test database is available")
}

fn console_addr(gw: &TestGateway) -> SocketAddr {
    gw.running.started.console.expect("the console is on")
}

fn token(gw: &TestGateway, agency: &str, officer: &str, purpose: &str, ttl: Duration) -> String {
    karibche::devpki::token::issue(
        &gw.config.data_path(&gw.config.tokens.keys_dir),
        &karibche::devpki::token::IssueRequest {
            agency: agency.into(),
            officer: officer.into(),
            purpose: purpose.into(),
            case_ref: None,
            ttl,
            audience: "karibche".into(),
            backdate: Duration::ZERO,
        },
    )
    .unwrap()
}

/// Some traffic for the log: border officers reading the example person, one refused.
async fn traffic(gw: &TestGateway) {
    let client = gw.client("mia-border");
    for officer in ["officer-1", "officer-2"] {
        let t = gw.officer_token("mia-border", officer, "border-control");
        let r = client.get(&common::person_path(PERSON), Some(&t)).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let t = gw.officer_token("mia-border", "officer-3", "tax-collection");
    let r = client.get(&common::person_path(PERSON), Some(&t)).await;
    assert!(r.status.is_client_error());
}

/// Console requests that reached the log: the auditors' API reads made through the console.
async fn console_reads(gw: &TestGateway) -> Vec<karibche::audit::Record> {
    console_requests(gw, "audit").await
}

/// Console requests to `provider` (`audit`, `admin`) that reached the log.
async fn console_requests(gw: &TestGateway, provider: &str) -> Vec<karibche::audit::Record> {
    let filter = karibche::audit::Filter {
        provider: Some(provider.into()),
        ..Default::default()
    };
    karibche::audit::query(&gw.running.store, &filter)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.entry.certificate.as_deref() == Some(CONSOLE_CERTIFICATE))
        .collect()
}

// ---------------------------------------------------------------- plain HTTPS

/// An HTTPS client of the console (no client certificate) that keeps cookies by hand.
struct Http {
    client: Client,
    cookies: Vec<(String, String)>,
}

impl Http {
    fn new(gw: &TestGateway) -> Http {
        Http {
            client: Client::new(&gw.pki().join("ca.pem"), None, console_addr(gw)),
            cookies: Vec::new(),
        }
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        form: Option<&[(&str, &str)]>,
    ) -> common::Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        if !self.cookies.is_empty() {
            let c: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            req = req.header("cookie", c.join("; "));
        }
        let body = match form {
            Some(pairs) => {
                req = req.header("content-type", "application/x-www-form-urlencoded");
                let encoded: Vec<String> = pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={}", karibche::query::encode(v)))
                    .collect();
                Bytes::from(encoded.join("&"))
            }
            None => Bytes::new(),
        };
        let reply = self
            .client
            .request(req.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        for v in reply.headers.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let (pair, _) = v.split_once(';').unwrap_or((v, ""));
            let (k, val) = pair.split_once('=').unwrap();
            self.cookies.retain(|(n, _)| n != k);
            if !val.is_empty() {
                self.cookies.push((k.to_owned(), val.to_owned()));
            }
        }
        reply
    }

    /// Signs in with `token`; returns the sign-in answer.
    async fn sign_in(&mut self, token: &str) -> common::Reply {
        let form = self.send(Method::GET, "/signin", None).await;
        let csrf = hidden(&form.body, "csrf");
        self.send(
            Method::POST,
            "/signin",
            Some(&[("csrf", &csrf), ("token", token)]),
        )
        .await
    }
}

/// The value of the hidden input `name` in a page.
fn hidden(body: &[u8], name: &str) -> String {
    let page = String::from_utf8_lossy(body);
    let at = page
        .find(&format!("name=\"{name}\" value=\""))
        .unwrap_or_else(|| panic!("no {name} field in {page}"));
    let rest = &page[at + name.len() + 15..];
    rest[..rest.find('"').unwrap()].to_owned()
}

#[tokio::test]
async fn every_answer_has_a_strict_csp_and_cookies_are_strict() {
    let gw = gateway().await;
    let mut http = Http::new(&gw);
    let page = http.send(Method::GET, "/signin", None).await;
    assert_eq!(page.status, StatusCode::OK);
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("default-src 'self'; script-src 'self'"),
        "{csp}"
    );
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert_eq!(page.headers["cache-control"], "no-store");
    let body = String::from_utf8_lossy(&page.body);
    assert!(
        !body.contains("<script>") && !body.contains("style="),
        "no inline script or style"
    );
    for cookie in page.headers.get_all("set-cookie") {
        let c = cookie.to_str().unwrap();
        assert!(
            c.contains("HttpOnly") && c.contains("Secure") && c.contains("SameSite=Strict"),
            "{c}"
        );
    }
    let signed = http
        .sign_in(&token(
            &gw,
            "pdps",
            "so-1",
            "supervision",
            Duration::from_secs(300),
        ))
        .await;
    assert_eq!(signed.status, StatusCode::SEE_OTHER);
    let session = signed
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("karibche_console="))
        .expect("a session cookie");
    assert!(
        session.contains("HttpOnly")
            && session.contains("Secure")
            && session.contains("SameSite=Strict"),
        "{session}"
    );
    let css = http.send(Method::GET, "/assets/console.css", None).await;
    assert_eq!(css.status, StatusCode::OK);
    assert!(css.headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    gw.shutdown().await;
}

#[tokio::test]
async fn forms_without_the_sessions_csrf_token_are_refused_and_tokens_sign_in_once() {
    let gw = gateway().await;
    let t = token(&gw, "pdps", "so-1", "supervision", Duration::from_secs(300));
    // Sign-in without the form's double-submit cookie: refused.
    let mut stranger = Http::new(&gw);
    let r = stranger
        .send(
            Method::POST,
            "/signin",
            Some(&[("csrf", "x"), ("token", &t)]),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let mut http = Http::new(&gw);
    assert_eq!(http.sign_in(&t).await.status, StatusCode::SEE_OTHER);
    let before = console_reads(&gw).await.len();
    for csrf in [None, Some("0000")] {
        let mut form = vec![("subject", PERSON), ("format", "html")];
        if let Some(c) = csrf {
            form.push(("csrf", c));
        }
        let r = http.send(Method::POST, "/search", Some(&form)).await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert_eq!(
        console_reads(&gw).await.len(),
        before,
        "a refused form reads nothing"
    );
    let search = http.send(Method::GET, "/search", None).await;
    let csrf = hidden(&search.body, "csrf");
    let r = http
        .send(
            Method::POST,
            "/search",
            Some(&[("csrf", &csrf), ("subject", PERSON), ("format", "html")]),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        console_reads(&gw).await.len(),
        before + 1,
        "the search is one recorded API read"
    );
    // Sign-out needs the token too, and ends the session.
    let r = http
        .send(Method::POST, "/signout", Some(&[("csrf", "nope")]))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = http
        .send(Method::POST, "/signout", Some(&[("csrf", &csrf)]))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = http.send(Method::GET, "/search", None).await;
    assert!(String::from_utf8_lossy(&r.body).contains("Please sign in"));
    // The same token cannot open a second session.
    let mut again = Http::new(&gw);
    assert_eq!(again.sign_in(&t).await.status, StatusCode::UNAUTHORIZED);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_export_is_the_apis_answer_as_csv() {
    let gw = gateway().await;
    traffic(&gw).await;
    let mut http = Http::new(&gw);
    http.sign_in(&token(
        &gw,
        "pdps",
        "so-1",
        "supervision",
        Duration::from_secs(300),
    ))
    .await;
    let csrf = hidden(&http.send(Method::GET, "/search", None).await.body, "csrf");
    let r = http
        .send(
            Method::POST,
            "/search",
            Some(&[("csrf", &csrf), ("subject", PERSON), ("format", "csv")]),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let csv = String::from_utf8_lossy(&r.body);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("seq,node,id,ts,agency"));
    assert!(lines.len() >= 4, "{csv}");
    assert!(lines[1..].iter().all(|l| l.contains(PERSON)), "{csv}");
    gw.shutdown().await;
}

// ---------------------------------------------------------------- the browser

/// chromedriver and a headless Chromium session, ended when dropped.
struct Browser {
    client: fantoccini::Client,
    _driver: KillOnDrop,
    _profile: tempfile::TempDir,
    base: String,
    shots: PathBuf,
}

impl Browser {
    async fn start(console: SocketAddr) -> Browser {
        let driver = common::require_tool("chromedriver", "chromium-driver");
        let chromium = common::require_tool("chromium", "chromium");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let driver = KillOnDrop(child);
        let up = common::eventually(Duration::from_secs(20), async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "chromedriver did not listen");
        let profile = tempfile::tempdir().unwrap();
        let caps = serde_json::json!({
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900", format!("--user-data-dir={}", profile.path().display())],
            }
        });
        let caps = caps.as_object().unwrap().clone().into_iter().collect();
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session");
        let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            client,
            _driver: driver,
            _profile: profile,
            base: format!("https://localhost:{}", console.port()),
            shots,
        }
    }

    async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap();
    }

    async fn text(&self, css: &str) -> String {
        // The element found may belong to the page being replaced (a stale
        // reference): look it up again until its text can be read.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let element = self
                .client
                .wait()
                .at_most(Duration::from_secs(10))
                .for_element(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no {css}: {e}"));
            match element.text().await {
                Ok(text) => return text,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("text of {css}: {e}"),
            }
        }
    }

    async fn fill(&self, css: &str, value: &str) {
        let e = self.client.find(Locator::Css(css)).await.unwrap();
        e.clear().await.unwrap();
        e.send_keys(value).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    async fn title(&self) -> String {
        self.text("h1").await
    }

    async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// Signs in as `officer` of `agency` under `purpose` with a fresh ten-minute token.
    async fn sign_in_as(&self, gw: &TestGateway, agency: &str, officer: &str, purpose: &str) {
        self.sign_in(&token(
            gw,
            agency,
            officer,
            purpose,
            Duration::from_secs(600),
        ))
        .await;
    }

    /// Signs in through the one-time URL `karibche console login` prints (token in the fragment).
    async fn sign_in(&self, token: &str) {
        self.goto(&format!("/signin#token={token}")).await;
        let signed = self
            .client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css("#signout"))
            .await;
        if let Err(e) = signed {
            // Say where the browser stands: the page it shows is the cause.
            let url = self.client.current_url().await.map(|u| u.to_string());
            let page = self.client.source().await.unwrap_or_default();
            self.shot("sign-in-failed").await;
            panic!("not signed in ({e}): at {url:?}, showing:\n{page}");
        }
    }
}

#[tokio::test]
async fn a_security_officer_follows_the_log_in_a_browser() {
    let gw = gateway().await;
    traffic(&gw).await;
    let b = Browser::start(console_addr(&gw)).await;

    // Sign in (pdps, supervision) with a one-time URL; the script posts the token.
    b.sign_in_as(&gw, "pdps", "so-1", "supervision").await;
    assert_eq!(b.title().await, "Search the access log");
    assert!(
        !b.client
            .current_url()
            .await
            .unwrap()
            .as_str()
            .contains("token"),
        "the token leaves the address bar"
    );

    // Search by subject (posted: the id is in no console URL).
    b.fill("#f-subject", PERSON).await;
    b.click("#search").await;
    let count = b.text("#result-count").await;
    assert!(count.starts_with('3') || count.starts_with('4'), "{count}");
    assert!(!b
        .client
        .current_url()
        .await
        .unwrap()
        .as_str()
        .contains(PERSON));
    b.shot("search").await;

    // Open a record: every field, and its verification.
    b.click("a.record-link").await;
    assert!(b.text("#hash-ok").await.starts_with("yes"));
    assert!(b.text("#fields").await.contains("legal_basis"));
    b.shot("record").await;

    // A person's page: accesses next to their report.
    b.goto("/person").await;
    b.fill("#subject", PERSON).await;
    b.click("#open").await;
    assert_eq!(b.text("#person-id").await, PERSON);
    assert!(
        b.text("#person-report").await.contains("Border"),
        "{}",
        b.text("#person-report").await
    );
    b.shot("person").await;

    // Charts are SVG drawn on the server.
    b.goto("/charts").await;
    let svgs = b
        .client
        .find_all(Locator::Css("figure.chart svg"))
        .await
        .unwrap();
    assert_eq!(svgs.len(), 3);
    b.shot("charts").await;
    b.goto("/signals").await;
    assert_eq!(b.title().await, "Misuse signals");
    b.shot("signals").await;
    // The chains: heads and checkpoints, then every chain verified (both API reads).
    b.goto("/chains").await;
    assert!(b.text("#heads").await.contains("record"));
    b.click("#verify").await;
    assert!(b.text("#chains").await.contains("intact"));

    // Sign out: the session is gone.
    b.click("#signout").await;
    assert_eq!(b.title().await, "Signed out");
    b.goto("/search").await;
    assert!(b.title().await.starts_with("Please sign in"));

    // A public service hall prints a person's report in Georgian, under its own purpose.
    b.sign_in_as(&gw, "psda", "hall-7", "subject-access-request")
        .await;
    b.goto("/report").await;
    b.fill("#subject", PERSON).await;
    b.click("#lang-ka").await;
    b.click("#open").await;
    assert_eq!(
        b.text("#report-title").await,
        "ანგარიში თქვენს პერსონალურ მონაცემებზე წვდომის შესახებ"
    );
    let table = b.text("#report-table").await;
    assert!(
        table.contains("Border") || table.contains("border"),
        "other agencies' accesses are in the report: {table}"
    );
    b.shot("report-ka").await;
    b.click("#print").await; // the print dialog is a no-op headless; the handler must not fail
    b.goto("/search").await;
    b.click("#signout").await;

    // An agency's security officer sees their agency only: another's records are refused.
    b.sign_in_as(&gw, "psda", "so-psda", "internal-audit").await;
    b.fill("#f-agency", "mia-border").await;
    b.click("#search").await;
    assert_eq!(b.title().await, "Refused");
    assert!(b.text("#message").await.contains("Audit record"));
    b.shot("refused").await;
    b.click("#signout").await;

    // Expiry: a session never outlives its token.
    b.sign_in(&token(
        &gw,
        "pdps",
        "so-2",
        "supervision",
        Duration::from_secs(3),
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    b.goto("/search").await;
    assert!(
        b.title().await.starts_with("Please sign in"),
        "{}",
        b.title().await
    );

    // Each page view with log data left its own audit record, under the officer who saw it.
    let reads = console_reads(&gw).await;
    let by = |officer: &str, service: &str| {
        reads
            .iter()
            .filter(|r| {
                r.entry.officer.as_deref() == Some(officer)
                    && r.entry.service.as_deref() == Some(service)
            })
            .count()
    };
    // search, record, person (records), charts, signals; the chains twice
    assert_eq!(by("so-1", "chains"), 2, "heads, then the verification");
    assert!(
        by("so-1", "records") >= 5,
        "{:#?}",
        reads.iter().map(|r| &r.entry.path).collect::<Vec<_>>()
    );
    assert_eq!(by("so-1", "report"), 1, "the person page's report");
    assert_eq!(by("hall-7", "report"), 1, "the printed report");
    let refused: Vec<_> = reads
        .iter()
        .filter(|r| r.entry.officer.as_deref() == Some("so-psda"))
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].entry.decision.as_str(), "deny");
    let subject_search = reads
        .iter()
        .find(|r| r.entry.officer.as_deref() == Some("so-1") && r.entry.subjects == [PERSON])
        .expect("the subject search names the person in its record, as the API's does");
    assert!(subject_search
        .entry
        .path
        .starts_with("/v1/audit/records?subject="));
    b.client.clone().close().await.unwrap();
    gw.shutdown().await;
}

/// A gateway with the console, reading a copy of the policies the test may edit.
async fn gateway_with_own_policies() -> TestGateway {
    TestGateway::start_configured(Db::from_env(), |c, dir| {
        c.console.enabled = true;
        c.console.listen = "127.0.0.1:0".parse().unwrap();
        c.policies_dir = common::copy_policies(dir);
    })
    .await
    .expect("the test database is available")
}

/// A shadow grant for the Border Police: reads of persons only for visa decisions.
/// Its requests for border control are then allowed, and denied in the shadow.
const SHADOW_GRANT: &str = "\n# Proposed: border checks move to the visa-decision purpose.\n[[grants]]\nprovider = \"registry\"\nservice = \"persons\"\noperations = [\"read\"]\npurposes = [\"visa-decision\"]\nfields = [\"id\", \"names\"]\nshadow = true\n";

#[tokio::test]
async fn an_administrator_reads_the_gateway_in_a_browser() {
    let gw = gateway_with_own_policies().await;
    let gateway = gw.running.gateway.clone();
    traffic(&gw).await;
    let b = Browser::start(console_addr(&gw)).await;

    // The gateway's administrators land on the policy, read through the administrators' API.
    b.sign_in_as(&gw, "dga", "admin-1", "policy-administration")
        .await;
    assert_eq!(b.title().await, "Policy");
    assert!(b.text("#matrix").await.contains("dga"));
    b.fill("#x-agency", "mia-border").await;
    b.fill("#x-purpose", "border-control").await;
    b.fill("#x-path", &common::person_path(PERSON)).await;
    b.click("#explain").await;
    let said = b.text("#explanation").await;
    assert!(said.contains("allow") || said.contains("ALLOW"), "{said}");
    assert!(said.contains("mia-border"), "{said}");
    b.shot("policy").await;

    // A policy file edited while the gateway runs: a shadow grant for the Border Police.
    let file = gw.config.policies_dir.join("agencies/mia-border.toml");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str(SHADOW_GRANT);
    std::fs::write(&file, text).unwrap();
    let before = gateway.policy.load().version().to_owned();
    // The file watcher may get there first; either way the new set is in force after this.
    gw.running.reload_policy().await.unwrap();
    assert_ne!(gateway.policy.load().version(), before, "reloaded");
    // Border checks now decided twice: allowed, and denied in the shadow. A latency
    // snapshot between the two bursts gives the chart two intervals.
    gateway.administration.latency.record(&gateway.metrics);
    traffic(&gw).await;

    // The reload, and the difference between the two sets in words.
    b.click("nav a[href='/reloads']").await;
    assert_eq!(b.title().await, "Policy reloads");
    assert!(b.text("#events").await.contains("agencies/mia-border.toml"));
    b.click("#compare").await;
    let diff = b.text("#diff").await;
    assert!(diff.contains("mia-border"), "{diff}");
    assert!(
        diff.contains("(shadow, not enforced) may now read registry/persons for \"visa-decision\""),
        "{diff}"
    );
    b.shot("reloads").await;

    // The shadow grant, and where it decides otherwise.
    b.goto("/shadow").await;
    assert!(b.text("#shadow-grants").await.contains("mia-border"));
    let diverging = b.text("#divergences").await;
    assert!(
        diverging.contains("registry/persons") && diverging.contains("border-control"),
        "{diverging}"
    );
    assert!(
        !b.text("#shadow-records").await.contains(PERSON),
        "no subject for administrators"
    );
    b.shot("shadow").await;

    // Certificates and CRLs, with the days left.
    b.goto("/certificates").await;
    let certs = b.text("#certificates").await;
    assert!(
        certs.contains("gateway") && certs.contains("CRL"),
        "{certs}"
    );
    b.shot("certificates").await;

    // Providers' breakers and the quotas in force.
    b.goto("/providers").await;
    let providers = b.text("#providers").await;
    assert!(
        providers.contains("registry") && providers.contains("closed"),
        "{providers}"
    );
    assert!(b.text("#quota-agencies").await.contains("mia-border"));
    b.shot("providers").await;

    // Latency percentiles, drawn on the server, by agency and by provider.
    b.goto("/latency").await;
    let charts = b
        .client
        .find_all(Locator::Css("figure.latency svg"))
        .await
        .unwrap();
    assert!(!charts.is_empty(), "a chart per agency with requests");
    assert!(b.text("main").await.contains("mia-border"));
    b.shot("latency").await;
    b.click("#by-provider").await;
    b.click("#group").await;
    assert!(b.text("main").await.contains("registry"));

    // The chains, verified.
    b.goto("/chains").await;
    b.click("#verify").await;
    assert!(b.text("#chains").await.contains("intact"));
    b.click("#signout").await;
    assert_eq!(b.title().await, "Signed out");

    // A security officer is not an administrator: refused, with the refusal's record.
    b.sign_in_as(&gw, "pdps", "so-1", "supervision").await;
    b.goto("/reloads").await;
    assert_eq!(b.title().await, "Refused");
    assert!(b.text("#message").await.contains("Audit record"));
    b.shot("admin-refused").await;

    // Every page the administrator opened is an API read of its own, recorded under them.
    let admin = console_requests(&gw, "admin").await;
    let by = |officer: &str, service: &str| {
        admin
            .iter()
            .filter(|r| {
                r.entry.officer.as_deref() == Some(officer)
                    && r.entry.service.as_deref() == Some(service)
            })
            .count()
    };
    for service in ["reloads", "shadow", "certificates", "providers", "explain"] {
        assert!(by("admin-1", service) >= 1, "{service}");
    }
    assert!(
        by("admin-1", "policy") >= 2,
        "the policy page and after explain"
    );
    assert_eq!(by("admin-1", "latency"), 2);
    let shadow_reads: Vec<_> = console_reads(&gw)
        .await
        .into_iter()
        .filter(|r| r.entry.officer.as_deref() == Some("admin-1"))
        .collect();
    assert!(shadow_reads
        .iter()
        .any(|r| r.entry.path.contains("shadow_diff=true")));
    let refused: Vec<_> = admin
        .iter()
        .filter(|r| r.entry.officer.as_deref() == Some("so-1"))
        .collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert_eq!(refused[0].entry.decision.as_str(), "deny");
    assert_eq!(refused[0].entry.status, 403);
    b.client.clone().close().await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_pages_answer_403_with_their_record_to_others_and_the_log_only_where_shadows_differ()
{
    let gw = gateway().await;
    for (agency, officer, purpose, page) in [
        ("pdps", "so-1", "supervision", "/policy"),
        ("pdps", "so-2", "supervision", "/latency"),
        ("mia-border", "so-3", "internal-audit", "/chains"),
    ] {
        let mut http = Http::new(&gw);
        let signed = http
            .sign_in(&token(
                &gw,
                agency,
                officer,
                purpose,
                Duration::from_secs(300),
            ))
            .await;
        assert_eq!(signed.status, StatusCode::SEE_OTHER);
        let r = http.send(Method::GET, page, None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{page}");
        let body = String::from_utf8_lossy(&r.body);
        let id = body
            .split("Audit record: <code>")
            .nth(1)
            .and_then(|rest| rest.split('<').next())
            .unwrap_or_else(|| panic!("the refusal names its record: {body}"));
        let record = gw.record(id).await;
        assert_eq!(record.entry.officer.as_deref(), Some(officer));
        assert_eq!(record.entry.decision.as_str(), "deny");
        assert_eq!(record.entry.status, 403);
    }
    // The administrators' view of the log: only where shadow decisions differ, never by person.
    let client = gw.client("dga");
    let t = gw.officer_token("dga", "admin-1", "policy-administration");
    let r = client.get("/v1/audit/records", Some(&t)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = client
        .get(
            &format!("/v1/audit/records?shadow_diff=true&subject={PERSON}"),
            Some(&t),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = client
        .get("/v1/audit/records?shadow_diff=true", Some(&t))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = client.get("/v1/admin/certificates", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json()["certificates"].as_array().unwrap().len() >= 2);
    gw.shutdown().await;
}

/// The figure in the README: the search page over a log of a million records
/// (SQLite), seeded through the library's writer. Not a timed test:
/// `KARIBCHE_CONSOLE_RECORDS=1000000 cargo test --test console -- --ignored --nocapture`
/// (add `--release` for the production build's figure).
#[tokio::test]
#[ignore]
async fn search_page_over_a_large_log() {
    let n: usize = std::env::var("KARIBCHE_CONSOLE_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let gw = gateway().await;
    let audit = gw.running.gateway.audit.clone();
    let started = std::time::Instant::now();
    let workers = 512;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let audit = audit.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                let entry = karibche::audit::Entry {
                    id: uuid_like(i),
                    ts: karibche::audit::now_ts(),
                    agency: Some(["mia-border", "psda", "mia-migration", "molhsa"][i % 4].into()),
                    officer: Some(format!("officer-{}", i % 50)),
                    purpose: Some("border-control".into()),
                    provider: Some("registry".into()),
                    service: Some("persons".into()),
                    method: "GET".into(),
                    path: format!("/v1/registry/persons/RF-{:07}", i % 100_000),
                    subjects: vec![format!("RF-{:07}", i % 100_000)],
                    status: 200,
                    policy_version: "seed".into(),
                    ..Default::default()
                };
                audit.append(entry).await.unwrap();
                i += workers;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!("seeded {n} records in {:.1?}", started.elapsed());
    let mut http = Http::new(&gw);
    // Within tokens.max_lifetime (15 minutes): a longer token is refused, and the
    // "pages" timed would be the sign-in form.
    let signed = http
        .sign_in(&token(
            &gw,
            "pdps",
            "so-1",
            "supervision",
            Duration::from_secs(600),
        ))
        .await;
    assert_eq!(signed.status, StatusCode::SEE_OTHER, "signed in");
    let csrf = hidden(&http.send(Method::GET, "/search", None).await.body, "csrf");
    // The query alone, as the auditors' API asks it (first page: PAGE + 1 records).
    let filters = [
        karibche::audit::Filter::default(),
        karibche::audit::Filter {
            subject: Some("RF-0004242".into()),
            ..Default::default()
        },
        karibche::audit::Filter {
            agency: Some("psda".into()),
            officer: Some("officer-9".into()),
            ..Default::default()
        },
    ];
    for (i, mut filter) in filters.into_iter().enumerate() {
        filter.limit = Some(51);
        let t = std::time::Instant::now();
        let found = karibche::audit::query(&gw.running.store, &filter)
            .await
            .unwrap();
        println!(
            "query alone, filter {i}: {} records in {:.1?}",
            found.len(),
            t.elapsed()
        );
    }
    for (label, form) in [
        ("no filter (first page)", vec![("format", "html")]),
        (
            "by subject",
            vec![("subject", "RF-0004242"), ("format", "html")],
        ),
        (
            "by agency and officer",
            vec![
                ("agency", "psda"),
                ("officer", "officer-9"),
                ("format", "html"),
            ],
        ),
    ] {
        let mut times = Vec::new();
        for _ in 0..5 {
            let mut f = form.clone();
            f.push(("csrf", &csrf));
            let t = std::time::Instant::now();
            let r = http.send(Method::POST, "/search", Some(&f)).await;
            times.push(t.elapsed());
            assert_eq!(r.status, StatusCode::OK);
            let page = String::from_utf8_lossy(&r.body);
            assert!(
                page.contains("id=\"result-count\""),
                "a page of results, not {page:.300}"
            );
        }
        times.sort();
        println!("search page, {label}: median {:.1?} (min {:.1?}, max {:.1?}) over 5, each with a fresh TLS connection", times[2], times[0], times[4]);
    }
    gw.shutdown().await;
}

fn uuid_like(i: usize) -> String {
    format!("00000000-0000-7000-8000-{i:012}")
}
