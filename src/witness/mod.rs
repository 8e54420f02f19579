//! `karibche witness serve`: a witness in the C2SP tlog-witness protocol. It
//! cosigns a node's checkpoint only if a consistency proof shows that it
//! extends the last checkpoint it cosigned for that log, keeps that latest
//! checkpoint across restarts (`state.json` in its directory, written
//! atomically before it answers), and refuses a rollback or a fork loudly:
//! a `warn` log, the `karibche_witness_refusals_total` metric and a line in its
//! own `refusals.jsonl`.
//!
//! `POST /add-checkpoint` takes `old {size}\n`, one base64 proof hash per
//! line, a blank line and the signed checkpoint; it answers 200 with its
//! cosignature line, 409 (`text/x.tlog.size`) with the size it has when the
//! sender's `old` is not it, 404 for an unknown origin, 403 when no known key
//! signed the checkpoint, 400 for a malformed request or one going
//! backwards, 422 when the proof does not verify. `GET /checkpoint/{origin}`
//! returns the latest cosigned checkpoint (for `audit verify --witness`),
//! `GET /metrics` its counters.
//!
//! The transport is plain HTTP: everything it carries is signed end to end
//! (the node's signature on the checkpoint, the witness's on the
//! cosignature), so TLS adds confidentiality of public data only. Run it on
//! a private network or behind a TLS-terminating proxy.

pub mod client;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::audit::merkle::{self, Hash};
use crate::audit::note::{self, Note};
use crate::audit::AuditKey;

/// Largest `add-checkpoint` request accepted (64 KiB).
const MAX_REQUEST: usize = 64 * 1024;
/// Most proof lines in a request (a proof of a tree of 2^63 leaves has fewer).
const MAX_PROOF: usize = 64;

/// A log this witness knows: its origin line and the node's Ed25519 key.
#[derive(Debug, Clone)]
pub struct KnownLog {
    /// The checkpoint origin line (also the key name of its signature).
    pub origin: String,
    /// The node's audit public key, raw.
    pub public_key: Vec<u8>,
}

/// The parsed body of an `add-checkpoint` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddCheckpoint {
    /// The size of the checkpoint the proof starts from.
    pub old: u64,
    /// The consistency proof from `old` to the checkpoint.
    pub proof: Vec<Hash>,
    /// The signed checkpoint.
    pub checkpoint: String,
}

impl AddCheckpoint {
    /// The request body.
    pub fn render(&self) -> String {
        let mut out = format!("old {}\n", self.old);
        for p in &self.proof {
            out.push_str(&B64.encode(p));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&self.checkpoint);
        out
    }

    /// Parses a request body.
    pub fn parse(body: &str) -> Option<AddCheckpoint> {
        let (head, checkpoint) = body.split_once("\n\n")?;
        let mut lines = head.split('\n');
        let old = lines.next()?.strip_prefix("old ")?;
        if old.len() > 1 && old.starts_with('0') {
            return None;
        }
        let old = old.parse().ok()?;
        let proof: Vec<Hash> = lines
            .map(|l| B64.decode(l).ok().and_then(|b| b.try_into().ok()))
            .collect::<Option<_>>()?;
        (proof.len() <= MAX_PROOF).then(|| AddCheckpoint {
            old,
            proof,
            checkpoint: checkpoint.to_owned(),
        })
    }
}

/// What the witness keeps per log: the latest checkpoint it cosigned.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cosigned {
    /// Tree size.
    pub size: u64,
    /// Root hash, hex.
    pub root: String,
    /// The checkpoint with the node's signature and this witness's cosignature.
    pub note: String,
}

/// The witness: its key, the logs it knows and their latest cosigned checkpoints.
pub struct Witness {
    name: String,
    key: AuditKey,
    logs: BTreeMap<String, KnownLog>,
    dir: PathBuf,
    /// Serialises updates: a check and its persisted result are one step.
    state: Mutex<BTreeMap<String, Cosigned>>,
    cosigned: AtomicU64,
    refusals: AtomicU64,
}

/// Errors starting a witness.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// The key could not be loaded or created.
    #[error(transparent)]
    Key(#[from] crate::audit::checkpoint::AuditKeyError),
    /// The state directory could not be read or written.
    #[error("witness state in {0}: {1}")]
    State(String, String),
}

/// One answer of the witness.
type Answer = Response<Full<Bytes>>;

fn text(status: StatusCode, content_type: &str, body: String) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn plain(status: StatusCode, body: &str) -> Answer {
    text(status, "text/plain; charset=utf-8", format!("{body}\n"))
}

impl Witness {
    /// Opens the witness in `dir` (key `witness.key`, `state.json`), cosigning as `name`.
    pub fn open(dir: &Path, name: &str, logs: Vec<KnownLog>) -> Result<Witness, WitnessError> {
        let state_err = |e: String| WitnessError::State(dir.display().to_string(), e);
        std::fs::create_dir_all(dir).map_err(|e| state_err(e.to_string()))?;
        let key = AuditKey::load_or_create(&dir.join("witness.key"))?;
        let state = match std::fs::read(dir.join("state.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| state_err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(state_err(e.to_string())),
        };
        Ok(Witness {
            name: name.to_owned(),
            key,
            logs: logs.into_iter().map(|l| (l.origin.clone(), l)).collect(),
            dir: dir.to_owned(),
            state: Mutex::new(state),
            cosigned: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
        })
    }

    /// The cosigning key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cosigning public key, hex.
    pub fn public_hex(&self) -> &str {
        self.key.public_hex()
    }

    /// Answers one HTTP request.
    pub async fn handle<B>(&self, req: Request<B>) -> Answer
    where
        B: hyper::body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::POST, "/add-checkpoint") => {
                let body = match Limited::new(req.into_body(), MAX_REQUEST).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(_) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "request too large"),
                };
                let Ok(body) = std::str::from_utf8(&body) else {
                    return plain(StatusCode::BAD_REQUEST, "not UTF-8");
                };
                self.add_checkpoint(body).await
            }
            (&Method::GET, "/metrics") => text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                format!(
                    "# HELP karibche_witness_cosigned_total Checkpoints cosigned.\n# TYPE karibche_witness_cosigned_total counter\nkaribche_witness_cosigned_total {}\n\
                     # HELP karibche_witness_refusals_total Checkpoints refused as a rollback, fork or bad proof.\n# TYPE karibche_witness_refusals_total counter\nkaribche_witness_refusals_total {}\n",
                    self.cosigned.load(Ordering::Relaxed),
                    self.refusals.load(Ordering::Relaxed)
                ),
            ),
            (&Method::GET, p) if p.starts_with("/checkpoint/") => {
                let origin = percent_encoding::percent_decode_str(&p["/checkpoint/".len()..])
                    .decode_utf8_lossy()
                    .into_owned();
                match self.state.lock().await.get(&origin) {
                    Some(c) => text(StatusCode::OK, "text/plain; charset=utf-8", c.note.clone()),
                    None => plain(StatusCode::NOT_FOUND, "no checkpoint cosigned for this origin"),
                }
            }
            _ => plain(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }

    /// The tlog-witness `add-checkpoint` step.
    pub async fn add_checkpoint(&self, body: &str) -> Answer {
        let Some(req) = AddCheckpoint::parse(body) else {
            return plain(StatusCode::BAD_REQUEST, "malformed add-checkpoint request");
        };
        let Some(signed) = Note::parse(&req.checkpoint) else {
            return plain(StatusCode::BAD_REQUEST, "malformed signed note");
        };
        let Some((origin, size, root)) = note::parse_checkpoint_text(&signed.text) else {
            return plain(StatusCode::BAD_REQUEST, "malformed checkpoint");
        };
        let Some(log) = self.logs.get(&origin) else {
            return plain(StatusCode::NOT_FOUND, "unknown log origin");
        };
        let Some(node_sig) = signed
            .signatures
            .iter()
            .find(|l| note::verify(&log.origin, &log.public_key, &signed.text, l))
        else {
            return plain(
                StatusCode::FORBIDDEN,
                "the checkpoint is not signed by the log's key",
            );
        };
        let mut state = self.state.lock().await;
        let latest = state.get(&origin).cloned();
        let (latest_size, latest_root) = match &latest {
            Some(c) => (c.size, merkle::from_hex(&c.root).unwrap_or([0; 32])),
            None => (0, merkle::empty_root()),
        };
        // A smaller tree than the one cosigned: whatever `old` says, the log went back.
        if size < latest_size {
            self.refuse(
                &origin,
                "rollback",
                req.old,
                size,
                latest_size,
                &req.checkpoint,
            )
            .await;
        }
        if req.old > size {
            return plain(
                StatusCode::BAD_REQUEST,
                "old size is larger than the checkpoint",
            );
        }
        if req.old != latest_size {
            return text(
                StatusCode::CONFLICT,
                "text/x.tlog.size",
                format!("{latest_size}\n"),
            );
        }
        if !merkle::verify_consistency(latest_size, size, &latest_root, &root, &req.proof) {
            let kind = if size == latest_size {
                "fork"
            } else {
                "inconsistent"
            };
            self.refuse(&origin, kind, req.old, size, latest_size, &req.checkpoint)
                .await;
            return plain(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the checkpoint does not extend the one cosigned before",
            );
        }
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let cosig = note::cosign(&self.key, &self.name, &signed.text, time);
        let kept = Note {
            text: signed.text.clone(),
            signatures: vec![node_sig.clone(), cosig.clone()],
        };
        let mut next = state.clone();
        next.insert(
            origin.clone(),
            Cosigned {
                size,
                root: hex::encode(root),
                note: kept.render(),
            },
        );
        // Durable before the answer: a restarted witness must not forget what it cosigned.
        if let Err(e) = self.persist(&next).await {
            tracing::error!(err = %e, "witness state not written; refusing to cosign");
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "witness state not writable",
            );
        }
        *state = next;
        self.cosigned.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%origin, size, "checkpoint cosigned");
        plain(StatusCode::OK, &cosig)
    }

    async fn persist(&self, state: &BTreeMap<String, Cosigned>) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        let path = self.dir.join("state.json");
        tokio::task::spawn_blocking(move || crate::files::write_atomic(&path, &bytes, 0o600))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Records a refusal: counter, warn log, and a line in `refusals.jsonl`.
    async fn refuse(&self, origin: &str, kind: &str, old: u64, size: u64, latest: u64, cp: &str) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%origin, kind, old, size, latest, "witness refused a checkpoint: the log was rolled back or forked");
        let line = serde_json::json!({
            "ts": crate::audit::now_ts(), "origin": origin, "kind": kind,
            "old": old, "size": size, "cosigned_size": latest, "checkpoint": cp,
        });
        let path = self.dir.join("refusals.jsonl");
        let result = async {
            use tokio::io::AsyncWriteExt;
            let mut f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .await?;
            f.write_all(format!("{line}\n").as_bytes()).await?;
            f.sync_data().await
        }
        .await;
        if let Err(e) = result {
            tracing::error!(err = %e, "witness refusal not recorded in refusals.jsonl");
        }
    }
}

/// Serves the witness on `listener` until `shutdown` turns true.
pub async fn serve(
    witness: Arc<Witness>,
    listener: tokio::net::TcpListener,
    shutdown: crate::runtime::shutdown::Shutdown,
) {
    let handler = move |req: Request<hyper::body::Incoming>| {
        let w = witness.clone();
        async move { w.handle(req).await }
    };
    crate::runtime::listener::serve_plain(listener, handler, shutdown).await;
}
