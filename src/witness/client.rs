//! The node's side of witnessing: a background task per configured witness
//! that sends each new signed tree head with a consistency proof from the
//! last one that witness cosigned, and stores the cosignature with the head
//! (`audit_cosignatures`). It never sits on a request's path: the writer only
//! bumps a watch channel. An unreachable witness is retried with backoff (1 s
//! doubling to 30 s) and caught up with one proof when it returns; how far
//! behind each witness is shows on `/readyz` and `/metrics`
//! ([`WitnessBoard`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::AddCheckpoint;
use crate::audit::note;
use crate::audit::tree::{self, TreeReader};
use crate::audit::AuditError;
use crate::store::Store;

/// A witness the node sends its tree heads to (`[[audit.witnesses]]`).
#[derive(Debug, Clone)]
pub struct WitnessPeer {
    /// The witness's key name (the name on its cosignature lines).
    pub name: String,
    /// Its base URL, `http://host:port` (`/add-checkpoint` is appended).
    pub url: String,
    /// Its Ed25519 public key, raw.
    pub public_key: Vec<u8>,
}

/// How one witness stands, for `/readyz` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WitnessState {
    /// The largest tree size it has cosigned.
    pub cosigned: u64,
    /// Tree heads the node has signed that it has not cosigned yet (records).
    pub behind: u64,
    /// The last failure talking to it, until it answers again.
    pub error: Option<String>,
}

/// Every witness's state, shared by the witness tasks and the admin endpoint.
#[derive(Debug, Default)]
pub struct WitnessBoard {
    states: Mutex<BTreeMap<String, WitnessState>>,
}

impl WitnessBoard {
    /// A snapshot, by witness name.
    pub fn snapshot(&self) -> BTreeMap<String, WitnessState> {
        self.states.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn set(&self, name: &str, state: WitnessState) {
        if let Ok(mut s) = self.states.lock() {
            s.insert(name.to_owned(), state);
        }
    }
}

/// Why a round with a witness failed.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("answered {0}: {1}")]
    Refused(StatusCode, String),
    #[error("cosignature does not verify with the configured key")]
    BadCosignature,
    #[error("the witness has cosigned size {0} but this node's tree has {1}: this log was truncated or rolled back")]
    Ahead(u64, u64),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// Starts the witness tasks `config.audit.witnesses` calls for, reporting to `audit`'s board.
pub fn start(
    config: &crate::config::Config,
    audit: &crate::audit::AuditLog,
    shutdown: crate::runtime::shutdown::Shutdown,
) -> Vec<tokio::task::JoinHandle<()>> {
    let peers = config
        .audit
        .witnesses
        .iter()
        .map(|w| WitnessPeer {
            name: w.name.clone(),
            url: w.url.clone(),
            // Checked by Config::validate.
            public_key: hex::decode(&w.public_key).unwrap_or_default(),
        })
        .collect();
    spawn(
        audit.store().clone(),
        config.node.clone(),
        audit.tree_heads(),
        peers,
        audit.witnesses().clone(),
        shutdown,
    )
}

/// Starts one task per witness; they stop when `shutdown` turns true.
pub fn spawn(
    store: Store,
    node: String,
    heads: tokio::sync::watch::Receiver<u64>,
    peers: Vec<WitnessPeer>,
    board: Arc<WitnessBoard>,
    shutdown: crate::runtime::shutdown::Shutdown,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(http);
    peers
        .into_iter()
        .map(|peer| {
            let task = Task {
                store: store.clone(),
                node: node.clone(),
                peer,
                client: client.clone(),
                board: board.clone(),
            };
            tokio::spawn(task.run(heads.clone(), shutdown.clone()))
        })
        .collect()
}

struct Task {
    store: Store,
    node: String,
    peer: WitnessPeer,
    client: Client<HttpConnector, Full<Bytes>>,
    board: Arc<WitnessBoard>,
}

impl Task {
    async fn run(
        self,
        mut heads: tokio::sync::watch::Receiver<u64>,
        mut shutdown: crate::runtime::shutdown::Shutdown,
    ) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let head = *heads.borrow_and_update();
            let cosigned = self.cosigned().await.unwrap_or(0);
            let wait = match self.round(cosigned).await {
                Ok(size) => {
                    backoff = Duration::from_secs(1);
                    self.board.set(
                        &self.peer.name,
                        WitnessState {
                            cosigned: size,
                            behind: head.saturating_sub(size),
                            error: None,
                        },
                    );
                    None
                }
                Err(e) => {
                    tracing::warn!(witness = %self.peer.name, err = %e, "witness did not cosign; retrying later");
                    self.board.set(
                        &self.peer.name,
                        WitnessState {
                            cosigned,
                            behind: head.saturating_sub(cosigned),
                            error: Some(e.to_string()),
                        },
                    );
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    Some(w)
                }
            };
            let retry = async {
                match wait {
                    Some(w) => tokio::time::sleep(w).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                r = heads.changed() => if r.is_err() { return },
                () = retry => {}
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }

    /// The largest size this witness has cosigned, from the node's store.
    async fn cosigned(&self) -> Result<u64, AuditError> {
        let size: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(size) FROM audit_cosignatures WHERE node = $1 AND witness = $2",
        )
        .bind(self.node.as_str())
        .bind(self.peer.name.as_str())
        .fetch_one(self.store.pool())
        .await?;
        Ok(size.unwrap_or(0) as u64)
    }

    /// Sends the newest head (with a proof from `old`); the size now cosigned.
    async fn round(&self, mut old: u64) -> Result<u64, RoundError> {
        let Some(head) = tree::latest(&self.store, &self.node).await? else {
            return Ok(0);
        };
        let size = head.size as u64;
        if size == old {
            return Ok(size);
        }
        // One retry after a 409: the witness said where it really is.
        for _ in 0..2 {
            if old > size {
                return Err(RoundError::Ahead(old, size));
            }
            let proof = TreeReader::new(&self.store, &self.node)
                .consistency(old, size)
                .await?;
            let body = AddCheckpoint {
                old,
                proof,
                checkpoint: head.note.clone(),
            }
            .render();
            let (status, answer) = self.post(body).await?;
            match status {
                StatusCode::OK => {
                    let text = note::Note::parse(&head.note)
                        .map(|n| n.text)
                        .unwrap_or_default();
                    let line = answer
                        .lines()
                        .find(|l| {
                            note::verify_cosignature(
                                &self.peer.name,
                                &self.peer.public_key,
                                &text,
                                l,
                            )
                            .is_some()
                        })
                        .ok_or(RoundError::BadCosignature)?;
                    self.store_cosignature(size, line).await?;
                    return Ok(size);
                }
                StatusCode::CONFLICT => {
                    old = answer
                        .trim()
                        .parse()
                        .map_err(|_| RoundError::Refused(status, answer.clone()))?;
                }
                _ => return Err(RoundError::Refused(status, answer.trim().to_owned())),
            }
        }
        Err(RoundError::Refused(
            StatusCode::CONFLICT,
            "the witness's size changed twice".into(),
        ))
    }

    async fn post(&self, body: String) -> Result<(StatusCode, String), RoundError> {
        let url = format!("{}/add-checkpoint", self.peer.url.trim_end_matches('/'));
        let req = Request::post(url)
            .header(http::header::CONTENT_TYPE, "text/plain")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| RoundError::Unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| RoundError::Unreachable("timed out".into()))?
            .map_err(|e| RoundError::Unreachable(e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| RoundError::Unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn store_cosignature(&self, size: u64, line: &str) -> Result<(), AuditError> {
        let mut tx = self.store.begin_write().await?;
        sqlx::query(
            "INSERT INTO audit_cosignatures (node, size, witness, line, ts) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (node, size, witness) DO NOTHING",
        )
        .bind(self.node.as_str())
        .bind(size as i64)
        .bind(self.peer.name.as_str())
        .bind(line)
        .bind(crate::audit::now_ts())
        .execute(tx.conn())
        .await?;
        tx.commit().await?;
        tracing::info!(witness = %self.peer.name, size, "tree head cosigned");
        Ok(())
    }
}

/// Every cosignature line stored for `node`'s head of `size`, with the witness names.
pub async fn cosignatures(
    store: &Store,
    node: &str,
    size: u64,
) -> Result<Vec<(String, String)>, AuditError> {
    Ok(sqlx::query_as(
        "SELECT witness, line FROM audit_cosignatures WHERE node = $1 AND size = $2 ORDER BY witness",
    )
    .bind(node)
    .bind(size as i64)
    .fetch_all(store.pool())
    .await?)
}

/// The latest checkpoint a witness at `url` cosigned for `origin` (`GET /checkpoint/{origin}`), if any.
pub async fn fetch_latest(url: &str, origin: &str) -> Result<Option<String>, String> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let path = percent_encoding::utf8_percent_encode(origin, percent_encoding::NON_ALPHANUMERIC);
    let req = Request::get(format!("{}/checkpoint/{path}", url.trim_end_matches('/')))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| format!("{url}: timed out"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    match status {
        StatusCode::OK => Ok(Some(String::from_utf8_lossy(&body).into_owned())),
        StatusCode::NOT_FOUND => Ok(None),
        s => Err(format!("{url} answered {s}")),
    }
}
