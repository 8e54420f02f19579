//! `karibche bench`: a load generator that speaks what agencies' clients speak.
//!
//! Mutual TLS with an agency certificate, a pool of officers' tokens signed
//! with the development keys, HTTP/1.1 keep-alive or HTTP/2, and a mix of
//! reads by id, searches by document number and writes (border crossings).
//! It drives one of three [`Target`]s with the same requests: the gateway,
//! the register directly (as the gateway itself does: with the gateway's
//! certificate and the register's own paths), or nginx as a plain
//! mutual-TLS reverse proxy in front of the same register.
//!
//! Four [`Mode`]s:
//! - **open** loop at a fixed rate: request *i* is due at `start + i/rate`,
//!   and its latency is measured from that intended time, so a stall shows
//!   up in every request it delayed (no coordinated omission). The service
//!   time (from the actual send) is kept beside it, because tokio's timer
//!   wakes a sender up to a millisecond after the intended time;
//! - **closed** loop: N workers send back to back, for maximum throughput;
//! - **handshakes**: a new mutual-TLS connection per request, full
//!   handshakes or (with `resume`) resumed sessions;
//! - **idle**: open N connections, one request each, and hold them, reading
//!   the watched process's resident memory before and after.
//!
//! With `pid` set, the CPU time (user + system, from `/proc/PID/stat`) that
//! process spent during the measured window is reported too.

pub mod audit;
pub mod client;
pub mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

pub use client::{Answer, Call, Conn, Endpoint};
pub use report::Report;

use crate::registry::synth::Rng;
use crate::store::Store;

/// Linux reports process CPU time in clock ticks of this many per second (USER_HZ, 100 on every
/// mainstream architecture); reading sysconf would need `libc`.
const CLOCK_TICKS_PER_SECOND: u64 = 100;
/// Persons whose records are read once before measuring, to learn document numbers to search for.
const SEARCH_PERSONS: u32 = 64;
/// Persons, spread over the rest of the register, read once to learn document numbers to write crossings with.
///
/// Writes and searches go to different persons, and writes are spread thin,
/// so a search answers the same records in the first run and the last: a
/// workload that piled crossings onto the searched persons would make every
/// run heavier than the one before and skew side-by-side ratios.
const WRITE_PERSONS: u32 = 1024;
/// Handshakes in flight at once while idle connections are being opened.
const IDLE_OPENING_AT_ONCE: usize = 128;

/// What the load goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The gateway: `/v1/registry/…`, an agency's certificate.
    Gateway,
    /// The register itself: `/…`, the gateway's certificate (the only one it accepts).
    Direct,
    /// nginx in front of the register (scripts/bench/nginx.conf.in): `/v1/registry/…`, an agency's certificate.
    Nginx,
}

impl Target {
    /// The path prefix of the register's resources on this target.
    pub fn prefix(self) -> &'static str {
        match self {
            Target::Gateway | Target::Nginx => "/v1/registry",
            Target::Direct => "",
        }
    }
}

/// HTTP version, chosen by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive: one request at a time per connection.
    Http1,
    /// HTTP/2: many streams per connection.
    Http2,
}

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A fixed rate; latency from each request's intended send time.
    Open,
    /// Workers back to back: maximum throughput.
    Closed,
    /// A new mutual-TLS connection for every request.
    Handshakes,
    /// Open connections and hold them; report resident memory per connection.
    Idle,
}

/// Shares of reads by id, searches by document and writes, e.g. `read=70,search=20,write=10`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// `GET …/persons/{id}`.
    pub read: u32,
    /// `GET …/persons?document=…`.
    pub search: u32,
    /// `POST …/crossings`.
    pub write: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            read: 70,
            search: 20,
            write: 10,
        }
    }
}

impl std::str::FromStr for Mix {
    type Err = BenchError;

    fn from_str(s: &str) -> Result<Mix, BenchError> {
        let bad = || BenchError::Mix(s.to_owned());
        let mut mix = Mix {
            read: 0,
            search: 0,
            write: 0,
        };
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(bad)?;
            let v: u32 = v.trim().parse().map_err(|_| bad())?;
            match k.trim() {
                "read" => mix.read = v,
                "search" => mix.search = v,
                "write" => mix.write = v,
                _ => return Err(bad()),
            }
        }
        if mix.read + mix.search + mix.write == 0 {
            return Err(bad());
        }
        Ok(mix)
    }
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// What the load goes to (decides the paths).
    pub target: Target,
    /// Its address.
    pub addr: SocketAddr,
    /// CA the server certificate must chain to.
    pub ca: PathBuf,
    /// Client certificate.
    pub cert: PathBuf,
    /// Client key.
    pub key: PathBuf,
    /// Directory of the agencies' development token signing keys.
    pub keys_dir: PathBuf,
    /// Agency whose officers' tokens are sent.
    pub agency: String,
    /// Purpose in the tokens.
    pub purpose: String,
    /// Audience in the tokens (the gateway's `tokens.audience`).
    pub audience: String,
    /// Officers in the token pool (each request picks one).
    pub officers: usize,
    /// HTTP/1.1 or HTTP/2.
    pub protocol: Protocol,
    /// How requests are paced.
    pub mode: Mode,
    /// Requests per second (open loop).
    pub rate: u64,
    /// Measured time.
    pub duration: Duration,
    /// Time before measuring (requests sent but not counted).
    pub warmup: Duration,
    /// Concurrent workers (each one request at a time).
    pub concurrency: usize,
    /// Connections (HTTP/2: workers share them; HTTP/1.1: one per worker; idle mode: how many to hold).
    pub connections: usize,
    /// Keep TLS sessions and resume them (handshakes mode).
    pub resume: bool,
    /// Handshakes mode: close each connection right after its handshake, sending no request.
    pub handshake_only: bool,
    /// Request mix.
    pub mix: Mix,
    /// Persons in the register (ids `RF-0000001` …).
    pub persons: u32,
    /// Process whose CPU time (and, idle mode, resident memory) is reported.
    pub pid: Option<u32>,
    /// Seed of the request choice, so runs are comparable.
    pub seed: u64,
    /// Idle mode: how long to keep the connections after measuring.
    pub hold: Duration,
    /// Keep the `X-Request-Id` of every 2xx answer in [`Report::request_ids`] (for `--check-audit`).
    pub keep_request_ids: bool,
}

impl BenchOptions {
    /// Development defaults for `target` at `addr`: certificates under `pki_dir`, token keys under `keys_dir`,
    /// officers of `mia-border` (border control), HTTP/1.1, 1,000 requests/s open loop for 10 s.
    pub fn new(target: Target, addr: SocketAddr, pki_dir: &Path, keys_dir: &Path) -> BenchOptions {
        let agency = "mia-border".to_owned();
        let (cert, key) = match target {
            Target::Direct => (pki_dir.join("gateway.pem"), pki_dir.join("gateway.key")),
            Target::Gateway | Target::Nginx => crate::devpki::agency_files(pki_dir, &agency),
        };
        BenchOptions {
            target,
            addr,
            ca: pki_dir.join("ca.pem"),
            cert,
            key,
            keys_dir: keys_dir.to_path_buf(),
            agency,
            purpose: "border-control".to_owned(),
            audience: "karibche".to_owned(),
            officers: 64,
            protocol: Protocol::Http1,
            mode: Mode::Open,
            rate: 1000,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            concurrency: 64,
            connections: 64,
            resume: false,
            handshake_only: false,
            mix: Mix::default(),
            persons: 10_000,
            pid: None,
            seed: 2013,
            hold: Duration::ZERO,
            keep_request_ids: false,
        }
    }

    /// A short name of the run for reports.
    pub fn label(&self) -> String {
        let target = format!("{:?}", self.target).to_lowercase();
        let proto = match self.protocol {
            Protocol::Http1 => "h1",
            Protocol::Http2 => "h2",
        };
        match self.mode {
            Mode::Open => format!("{target} open {}/s {proto}", self.rate),
            Mode::Closed => format!("{target} closed c{} {proto}", self.concurrency),
            Mode::Handshakes => format!(
                "{target} handshakes {}{} c{}",
                if self.resume { "resumed" } else { "full" },
                if self.handshake_only { " only" } else { "" },
                self.concurrency
            ),
            Mode::Idle => format!("{target} idle {} {proto}", self.connections),
        }
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// A certificate or key could not be read.
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    /// The TLS client configuration could not be built.
    #[error(transparent)]
    Tls(#[from] crate::identity::tls::TlsError),
    /// An officer token could not be signed.
    #[error("cannot mint officer tokens: {0}")]
    Token(#[from] crate::devpki::token::IssueError),
    /// The request mix is not `read=N,search=N,write=N`.
    #[error("invalid mix {0:?}: expected read=N,search=N,write=N with a positive sum")]
    Mix(String),
    /// The target did not answer the discovery reads.
    #[error("the target did not answer as expected before the run: {0}")]
    Discovery(String),
    /// The watched process's /proc files could not be read.
    #[error("cannot read /proc/{pid}: {source}")]
    Proc {
        /// The process id.
        pid: u32,
        /// The cause.
        source: std::io::Error,
    },
}

/// Runs the benchmark `opts` describes.
pub async fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    let endpoint = Endpoint::new(
        opts.addr,
        &opts.ca,
        &opts.cert,
        &opts.key,
        opts.protocol,
        opts.resume,
    )?;
    let tokens = mint_tokens(opts)?;
    let mut workload = Workload {
        prefix: opts.target.prefix().to_owned(),
        persons: opts.persons.max(1),
        search_documents: Vec::new(),
        write_documents: Vec::new(),
        mix: opts.mix,
        tokens,
    };
    if opts.mode == Mode::Idle {
        return idle(opts, &endpoint, &workload).await;
    }
    let mut setup_ok = 0;
    let mut setup_ids = Vec::new();
    if opts.mix.search + opts.mix.write > 0 {
        let (search, write) = discovery_persons(workload.persons);
        let found = discover(&endpoint, &workload, search).await?;
        workload.search_documents = found.documents;
        setup_ok += found.ok;
        setup_ids.extend(found.ids);
        let found = discover(&endpoint, &workload, write).await?;
        workload.write_documents = found.documents;
        setup_ok += found.ok;
        setup_ids.extend(found.ids);
    }
    let mut report = load(opts, &endpoint, Arc::new(workload)).await?;
    report.setup_ok += setup_ok;
    if opts.keep_request_ids {
        report.request_ids.extend(setup_ids);
    }
    Ok(report)
}

/// Audit records with a 2xx status: the smoke test and `--check-audit` compare their growth with the 2xx answers.
pub async fn audit_2xx(store: &Store) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM audit_log WHERE status >= 200 AND status < 300")
        .fetch_one(store.pool())
        .await
}

fn mint_tokens(opts: &BenchOptions) -> Result<Vec<String>, BenchError> {
    // Tokens live at most 15 minutes by default; a run longer than that would see 401s.
    let ttl = (opts.warmup + opts.duration + opts.hold + Duration::from_secs(120))
        .min(Duration::from_secs(15 * 60));
    (0..opts.officers.max(1))
        .map(|i| {
            crate::devpki::token::issue(
                &opts.keys_dir,
                &crate::devpki::token::IssueRequest {
                    agency: opts.agency.clone(),
                    officer: format!("bench-officer-{i}"),
                    purpose: opts.purpose.clone(),
                    case_ref: None,
                    ttl,
                    audience: opts.audience.clone(),
                    backdate: Duration::ZERO,
                },
            )
            .map_err(BenchError::from)
        })
        .collect()
}

/// What requests to send, and with which tokens.
struct Workload {
    prefix: String,
    persons: u32,
    /// (person id, document number) pairs learned before the run, to search for.
    search_documents: Vec<(String, String)>,
    /// (person id, document number) pairs learned before the run, to write crossings with.
    write_documents: Vec<(String, String)>,
    mix: Mix,
    tokens: Vec<String>,
}

fn person_id(n: u32) -> String {
    format!("RF-{n:07}")
}

impl Workload {
    fn read(&self, n: u32) -> Call {
        Call {
            method: http::Method::GET,
            path: format!("{}/persons/{}", self.prefix, person_id(n)),
            body: None,
        }
    }

    fn call(&self, rng: &mut Rng) -> Call {
        let total = u64::from(self.mix.read + self.mix.search + self.mix.write);
        let pick = rng.below(total);
        let searching = pick < u64::from(self.mix.read + self.mix.search);
        let documents = if searching {
            &self.search_documents
        } else {
            &self.write_documents
        };
        let docs = documents.len() as u64;
        if pick < u64::from(self.mix.read) || docs == 0 {
            let n = rng.below(u64::from(self.persons)) as u32 + 1;
            return self.read(n);
        }
        let (person, document) = &documents[rng.below(docs) as usize];
        if searching {
            return Call {
                method: http::Method::GET,
                path: format!(
                    "{}/persons?document={}",
                    self.prefix,
                    crate::query::encode(document)
                ),
                body: None,
            };
        }
        let at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let points = &crate::registry::model::CROSSING_POINTS;
        let body = serde_json::json!({
            "person_id": person,
            // Exits only: an entry may be refused by an entry ban in force, which
            // would count as an error of the gateway under test.
            "direction": "exit",
            "point": points[rng.below(points.len() as u64) as usize],
            "at": at,
            "document_number": document,
        });
        Call {
            method: http::Method::POST,
            path: format!("{}/crossings", self.prefix),
            body: Some(Bytes::from(body.to_string())),
        }
    }

    fn token(&self, rng: &mut Rng) -> &str {
        &self.tokens[rng.below(self.tokens.len() as u64) as usize]
    }
}

/// The persons whose documents searches use, and those whose documents writes use (disjoint
/// when the register is large enough).
fn discovery_persons(persons: u32) -> (Vec<u32>, Vec<u32>) {
    let search: Vec<u32> = (1..=SEARCH_PERSONS.min(persons)).collect();
    let rest = persons.saturating_sub(SEARCH_PERSONS);
    if rest < SEARCH_PERSONS {
        return (search.clone(), search);
    }
    let step = (rest / WRITE_PERSONS).max(1);
    let write = (0..WRITE_PERSONS.min(rest))
        .map(|k| SEARCH_PERSONS + 1 + k * step)
        .collect();
    (search, write)
}

/// Reads these persons' records once to learn document numbers valid today; returns them and the 2xx count.
async fn discover(
    endpoint: &Endpoint,
    workload: &Workload,
    persons: Vec<u32>,
) -> Result<Discovered, BenchError> {
    let mut conn = endpoint
        .connect()
        .await
        .map_err(|e| BenchError::Discovery(format!("{} failed", e.kind())))?;
    let mut documents = Vec::new();
    let mut ok = 0;
    let mut ids = Vec::new();
    let mut rng = Rng::new(1);
    for n in persons {
        let client::Answer {
            status,
            request_id,
            body,
        } = conn
            .send(&workload.read(n), workload.token(&mut rng))
            .await
            .map_err(|e| BenchError::Discovery(format!("{} failed", e.kind())))?;
        if status == http::StatusCode::NOT_FOUND {
            continue;
        }
        if !status.is_success() {
            return Err(BenchError::Discovery(format!(
                "GET {} answered {status}: {}",
                workload.read(n).path,
                String::from_utf8_lossy(&body)
            )));
        }
        ok += 1;
        ids.extend(request_id.map(|id| id.as_u128()));
        let record: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| BenchError::Discovery(format!("not JSON: {e}")))?;
        // The register accepts a crossing only with a document valid that day.
        let today = time::OffsetDateTime::now_utc().date().to_string();
        let numbers = record["documents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| {
                d["issued_on"].as_str().is_some_and(|f| f <= today.as_str())
                    && d["valid_until"]
                        .as_str()
                        .is_some_and(|u| u >= today.as_str())
            })
            .filter_map(|d| d["number"].as_str());
        for number in numbers {
            documents.push((person_id(n), number.to_owned()));
        }
    }
    if documents.is_empty() {
        return Err(BenchError::Discovery(
            "no document numbers in the records read before the run: searches and writes need some (use --mix read=100)"
                .to_owned(),
        ));
    }
    Ok(Discovered { documents, ok, ids })
}

/// What the reads before the run found.
struct Discovered {
    /// `(person id, document number)` pairs valid today.
    documents: Vec<(String, String)>,
    /// Reads answered 2xx.
    ok: u64,
    /// Their request ids.
    ids: Vec<u128>,
}

/// When the run measures, and (open loop) the schedule.
struct Schedule {
    start: Instant,
    measure_from: Instant,
    end: Instant,
    /// Open loop: requests per second; the next request's number is `next`.
    rate: Option<u64>,
    next: AtomicU64,
}

impl Schedule {
    /// The next request's send time, or `None` once the run is over.
    async fn next_slot(&self) -> Option<Instant> {
        match self.rate {
            Some(rate) => {
                let i = self.next.fetch_add(1, Ordering::Relaxed);
                let offset = Duration::from_nanos(
                    u64::try_from(u128::from(i) * 1_000_000_000 / u128::from(rate))
                        .unwrap_or(u64::MAX),
                );
                let due = self.start + offset;
                if due >= self.end {
                    return None;
                }
                tokio::time::sleep_until(due).await;
                Some(due)
            }
            None => {
                let now = Instant::now();
                (now < self.end).then_some(now)
            }
        }
    }
}

/// Open, closed and handshake modes: workers send until the schedule ends.
async fn load(
    opts: &BenchOptions,
    endpoint: &Endpoint,
    workload: Arc<Workload>,
) -> Result<Report, BenchError> {
    let workers = opts.concurrency.max(1);
    // HTTP/2 workers share a few connections, opened before the clock starts.
    let mut shared = Vec::new();
    if opts.protocol == Protocol::Http2 && opts.mode != Mode::Handshakes {
        for _ in 0..opts.connections.clamp(1, workers) {
            match endpoint.connect().await {
                Ok(c) => shared.push(c),
                Err(e) => {
                    return Err(BenchError::Discovery(format!(
                        "opening an HTTP/2 connection: {} failed",
                        e.kind()
                    )))
                }
            }
        }
    }
    let start = Instant::now() + Duration::from_millis(50);
    let schedule = Arc::new(Schedule {
        start,
        measure_from: start + opts.warmup,
        end: start + opts.warmup + opts.duration,
        rate: (opts.mode == Mode::Open).then_some(opts.rate.max(1)),
        next: AtomicU64::new(0),
    });
    let cpu_start = {
        let pid = opts.pid;
        let at = schedule.measure_from;
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            pid.map(cpu_time).transpose()
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let conn = shared.get(w % shared.len().max(1)).and_then(Conn::share);
        let worker = Worker {
            endpoint: endpoint.clone(),
            workload: workload.clone(),
            schedule: schedule.clone(),
            conn,
            per_request: opts.mode == Mode::Handshakes,
            keep_ids: opts.keep_request_ids,
            handshake_only: opts.mode == Mode::Handshakes && opts.handshake_only,
            rng: Rng::new(opts.seed ^ (w as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        };
        tasks.spawn(worker.run());
    }
    let mut report = Report::new(opts.label());
    report.full_handshakes = shared.iter().filter(|c| !c.resumed).count() as u64;
    report.resumed_handshakes = shared.len() as u64 - report.full_handshakes;
    drop(shared);
    while let Some(r) = tasks.join_next().await {
        if let Ok(r) = r {
            report.merge(&r);
        }
    }
    let finished = Instant::now();
    report.elapsed = finished.saturating_duration_since(schedule.measure_from);
    if let Some(pid) = opts.pid {
        let before = match cpu_start.await {
            Ok(r) => r?,
            Err(_) => None,
        };
        let after = cpu_time(pid)?;
        report.cpu = before.map(|b| after.saturating_sub(b));
    }
    Ok(report)
}

/// One sender: takes the next slot, sends, records.
struct Worker {
    endpoint: Endpoint,
    workload: Arc<Workload>,
    schedule: Arc<Schedule>,
    conn: Option<Conn>,
    /// A new connection for every request (handshakes mode).
    per_request: bool,
    /// Only the TLS handshake: no HTTP on the connection.
    handshake_only: bool,
    /// Keep the request ids of 2xx answers in the report.
    keep_ids: bool,
    rng: Rng,
}

impl Worker {
    async fn run(mut self) -> Report {
        let mut report = Report::new("");
        while let Some(due) = self.schedule.next_slot().await {
            let measured = due >= self.schedule.measure_from;
            let call = self.workload.call(&mut self.rng);
            let token = self.workload.token(&mut self.rng).to_owned();
            let sent = Instant::now();
            if self.handshake_only {
                let result = self.endpoint.handshake().await;
                let done = Instant::now();
                match result {
                    Ok(resumed) if measured => {
                        report.handshake_done(resumed, done - due);
                        report.service(done - sent);
                    }
                    Ok(_) => {}
                    Err(e) if measured => report.failed(e.kind(), done - due),
                    Err(_) => report.setup_errors += 1,
                }
                continue;
            }
            let result = self.send(&call, &token, &mut report).await;
            let done = Instant::now();
            if let Ok((200..=299, Some(id))) = result {
                if self.keep_ids {
                    report.request_ids.push(id.as_u128());
                }
            }
            match result.map(|(status, _)| status) {
                Ok(status) if measured => {
                    report.answered(status, done - due);
                    report.service(done - sent);
                }
                Ok(status) if (200..300).contains(&status) => report.setup_ok += 1,
                Ok(_) => report.setup_errors += 1,
                Err(e) => {
                    self.conn = None;
                    if measured {
                        report.failed(e.kind(), done - due);
                    } else {
                        report.setup_errors += 1;
                    }
                }
            }
            if self.per_request {
                self.conn = None;
            }
        }
        report
    }

    async fn send(
        &mut self,
        call: &Call,
        token: &str,
        report: &mut Report,
    ) -> Result<(u16, Option<uuid::Uuid>), client::SendError> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => {
                let c = self.endpoint.connect().await?;
                if c.resumed {
                    report.resumed_handshakes += 1;
                } else {
                    report.full_handshakes += 1;
                }
                self.conn.insert(c)
            }
        };
        conn.send(call, token)
            .await
            .map(|a| (a.status.as_u16(), a.request_id))
    }
}

/// Idle mode: open `connections` connections (one read each), measure resident memory, hold them.
async fn idle(
    opts: &BenchOptions,
    endpoint: &Endpoint,
    workload: &Workload,
) -> Result<Report, BenchError> {
    let rss_before = opts.pid.map(rss_kib).transpose()?;
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(IDLE_OPENING_AT_ONCE));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..opts.connections {
        let endpoint = endpoint.clone();
        let call = workload.read(i as u32 % workload.persons + 1);
        let token = workload.tokens[i % workload.tokens.len()].clone();
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let t = Instant::now();
            let mut conn = endpoint.connect().await?;
            let answer = conn.send(&call, &token).await?;
            Ok::<_, client::SendError>((conn, answer, t.elapsed()))
        });
    }
    let mut report = Report::new(opts.label());
    let mut held = Vec::with_capacity(opts.connections);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok((conn, answer, latency))) => {
                report.answered(answer.status.as_u16(), latency);
                if let (true, true, Some(id)) = (
                    opts.keep_request_ids,
                    answer.status.is_success(),
                    answer.request_id,
                ) {
                    report.request_ids.push(id.as_u128());
                }
                if conn.resumed {
                    report.resumed_handshakes += 1;
                } else {
                    report.full_handshakes += 1;
                }
                held.push(conn);
            }
            Ok(Err(e)) => report.failed(e.kind(), Duration::ZERO),
            Err(_) => report.failed("task", Duration::ZERO),
        }
    }
    report.elapsed = started.elapsed();
    report.held_connections = held.len() as u64;
    // Let the server finish its side of the last handshakes and free their transient buffers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let (Some(pid), Some(before)) = (opts.pid, rss_before) {
        report.rss_kib = Some((before, rss_kib(pid)?));
    }
    tokio::time::sleep(opts.hold).await;
    drop(held);
    Ok(report)
}

/// User + system CPU time of a process so far.
pub fn cpu_time(pid: u32) -> Result<Duration, BenchError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|source| BenchError::Proc { pid, source })?;
    parse_cpu_ticks(&stat)
        .map(|ticks| Duration::from_millis(ticks * 1000 / CLOCK_TICKS_PER_SECOND))
        .ok_or_else(|| BenchError::Proc {
            pid,
            source: std::io::Error::other("unexpected /proc/PID/stat format"),
        })
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in clock ticks.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count fields after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3, so field N is fields[N - 3].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory (VmRSS) of a process, KiB.
pub fn rss_kib(pid: u32) -> Result<u64, BenchError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|source| BenchError::Proc { pid, source })?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| BenchError::Proc {
            pid,
            source: std::io::Error::other("no VmRSS in /proc/PID/status"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_rejects() {
        let m: Mix = "read=80, search=20".parse().unwrap();
        assert_eq!(
            m,
            Mix {
                read: 80,
                search: 20,
                write: 0
            }
        );
        assert!("read=0".parse::<Mix>().is_err());
        assert!("reads=1".parse::<Mix>().is_err());
        assert!("read=x".parse::<Mix>().is_err());
    }

    #[test]
    fn cpu_ticks_from_stat_with_odd_command_name() {
        let stat = "1234 (kari (b) che) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 8 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        let own = cpu_time(std::process::id()).unwrap();
        assert!(own < Duration::from_secs(3600));
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn workload_follows_the_mix_and_the_target_paths() {
        let w = Workload {
            prefix: "/v1/registry".into(),
            persons: 10,
            search_documents: vec![("RF-0000001".into(), "AB 12/3".into())],
            write_documents: vec![("RF-0000002".into(), "CD 45/6".into())],
            mix: Mix::default(),
            tokens: vec!["t".into()],
        };
        let mut rng = Rng::new(7);
        let (mut reads, mut searches, mut writes) = (0, 0, 0);
        for _ in 0..10_000 {
            let c = w.call(&mut rng);
            if c.method == http::Method::POST {
                assert_eq!(c.path, "/v1/registry/crossings");
                let v: serde_json::Value =
                    serde_json::from_slice(c.body.as_ref().unwrap()).unwrap();
                assert_eq!(v["document_number"], "CD 45/6");
                assert_eq!(v["person_id"], "RF-0000002");
                writes += 1;
            } else if c.path.contains('?') {
                assert_eq!(c.path, "/v1/registry/persons?document=AB%2012%2F3");
                searches += 1;
            } else {
                assert!(c.path.starts_with("/v1/registry/persons/RF-00000"));
                reads += 1;
            }
        }
        assert!((6500..7500).contains(&reads), "{reads}");
        assert!((1500..2500).contains(&searches), "{searches}");
        assert!((600..1400).contains(&writes), "{writes}");
        assert_eq!(Target::Direct.prefix(), "");
    }

    #[test]
    fn writes_and_searches_use_different_persons_spread_over_the_register() {
        let (search, write) = discovery_persons(10_000);
        assert_eq!(search, (1..=64).collect::<Vec<_>>());
        assert_eq!(write.len(), 1024);
        assert_eq!(write[0], 65);
        assert!(*write.last().unwrap() <= 10_000);
        assert!(write.iter().all(|n| !search.contains(n)));
        let (search, write) = discovery_persons(10);
        assert_eq!(search, write);
        assert_eq!(search.len(), 10);
    }
}
