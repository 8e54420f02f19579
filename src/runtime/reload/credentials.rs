//! Hot reload of identity material: the gateway's TLS configuration (its
//! certificate, the agency CAs, the CRLs) and the agencies' token keys.
//!
//! A task per kind polls the files every `tls.reload_interval` (default 1 s)
//! and compares their contents' SHA-256 with the last load. On a change it
//! builds the new value completely, then swaps it in whole (`ArcSwap`), so
//! connections and requests never see half a reload; a file that fails to
//! load is logged and the last good value stays in force. New handshakes use
//! the new TLS configuration at once, so a certificate added to a CRL is
//! refused within one interval. Polling keeps this free of platform file
//! notification quirks; the files are small and few.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;

use crate::audit::event::{self, EventLog};
use crate::config::Config;
use crate::identity::tls::{ClientVerification, TlsError};
use crate::identity::token::{KeyStore, VerifyOptions};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::runtime::shutdown::Shutdown;

/// The files the gateway's server TLS configuration is built from.
#[derive(Debug, Clone)]
pub struct GatewayTlsFiles {
    /// The gateway's certificate chain.
    pub cert: PathBuf,
    /// The gateway's private key.
    pub key: PathBuf,
    /// CA bundles agency certificates may chain to.
    pub client_cas: Vec<PathBuf>,
    /// Revocation lists.
    pub crls: Vec<PathBuf>,
    /// See [`ClientVerification::allow_unknown_revocation`].
    pub allow_unknown_revocation: bool,
    /// See [`ClientVerification::enforce_crl_expiry`].
    pub enforce_crl_expiry: bool,
}

impl GatewayTlsFiles {
    /// The files a configuration names, resolved under `data_dir`.
    pub fn from_config(config: &Config) -> GatewayTlsFiles {
        let t = &config.tls;
        GatewayTlsFiles {
            cert: config.data_path(&t.cert),
            key: config.data_path(&t.key),
            client_cas: t.client_ca.iter().map(|p| config.data_path(p)).collect(),
            crls: t.crls.iter().map(|p| config.data_path(p)).collect(),
            allow_unknown_revocation: t.allow_unknown_revocation,
            enforce_crl_expiry: t.enforce_crl_expiry,
        }
    }

    /// Every file a change of which means a rebuild.
    pub fn watched(&self) -> Vec<PathBuf> {
        let mut v = vec![self.cert.clone(), self.key.clone()];
        v.extend(self.client_cas.iter().cloned());
        v.extend(self.crls.iter().cloned());
        v
    }

    /// How client certificates are verified, read from the files now.
    pub fn client_verification(&self) -> Result<ClientVerification, TlsError> {
        let mut cas = Vec::new();
        for p in &self.client_cas {
            cas.extend(crate::files::load_certs(p)?);
        }
        let mut crls = Vec::new();
        for p in &self.crls {
            crls.extend(crate::identity::crl::load_crls(p)?);
        }
        Ok(ClientVerification {
            cas,
            crls,
            allow_unknown_revocation: self.allow_unknown_revocation,
            enforce_crl_expiry: self.enforce_crl_expiry,
        })
    }

    /// Builds the server configuration from the files as they are now.
    pub fn build(&self) -> Result<ServerConfig, TlsError> {
        let chain = crate::files::load_certs(&self.cert)?;
        let key = crate::files::load_key(&self.key)?;
        crate::identity::tls::server_config(chain, key, &self.client_verification()?)
    }
}

/// SHA-256 of each file's contents (`None` when unreadable), in order.
fn snapshot(paths: &[PathBuf]) -> Vec<(PathBuf, Option<[u8; 32]>)> {
    paths
        .iter()
        .map(|p| {
            let digest = std::fs::read(p).ok().map(|b| {
                let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &b);
                let mut out = [0u8; 32];
                out.copy_from_slice(d.as_ref());
                out
            });
            (p.clone(), digest)
        })
        .collect()
}

/// Polls the files `paths()` names every `interval`; calls `on_change` (on a blocking
/// thread) whenever their contents differ from the previous poll. Ends at shutdown.
pub fn spawn_watch<P, C>(
    what: &'static str,
    interval: Duration,
    mut shutdown: Shutdown,
    paths: P,
    on_change: C,
) -> tokio::task::JoinHandle<()>
where
    P: Fn() -> Vec<PathBuf> + Send + Sync + 'static,
    C: Fn() + Send + Sync + 'static,
{
    let paths = Arc::new(paths);
    let on_change = Arc::new(on_change);
    // The baseline is taken before this returns (a few small files, once, at
    // start-up): a change made right after start must never be mistaken for
    // the baseline and missed.
    let mut last = snapshot(&paths());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            let (paths, on_change) = (paths.clone(), on_change.clone());
            let prev = last.clone();
            let polled = tokio::task::spawn_blocking(move || {
                let now = snapshot(&paths());
                if now != prev {
                    on_change();
                }
                now
            })
            .await;
            match polled {
                Ok(now) => last = now,
                Err(err) => tracing::error!(what, %err, "reload task failed"),
            }
        }
    })
}

/// Keeps the gateway's server TLS configuration in step with its files; each reload is an audit event.
pub fn spawn_tls_reloader(
    files: GatewayTlsFiles,
    target: Arc<crate::identity::tls::ReloadableTls>,
    metrics: Arc<Metrics>,
    config: Arc<Config>,
    interval: Duration,
    shutdown: Shutdown,
    events: EventLog,
) -> tokio::task::JoinHandle<()> {
    let watched = files.watched();
    spawn_watch(
        "tls",
        interval,
        shutdown,
        move || watched.clone(),
        move || match files.build() {
            Ok(new) => {
                // Recorded before the swap, so every handshake decided by the
                // new CRLs comes after its event in the log; a failure to
                // record does not hold back a revocation.
                events.record_blocking(
                    event::TLS_RELOAD,
                    event::files_detail("gateway TLS (certificate, CAs, CRLs)", &files.watched()),
                );
                target.replace(new);
                metrics.set_certificates(crate::identity::inventory::expiry_gauges(&config));
                tracing::info!("TLS configuration reloaded (certificates, CAs, CRLs)");
            }
            Err(err) => {
                tracing::error!(%err, "TLS files changed but do not load; the previous configuration stays in force");
            }
        },
    )
}

/// Keeps the agencies' token keys in step with the keys directory (agencies as the policy names them now);
/// each reload is an audit event.
pub fn spawn_key_reloader(
    keys_dir: PathBuf,
    policy: Arc<ArcSwap<Policy>>,
    options: VerifyOptions,
    target: Arc<ArcSwap<KeyStore>>,
    interval: Duration,
    shutdown: Shutdown,
    events: EventLog,
) -> tokio::task::JoinHandle<()> {
    let agencies = {
        let policy = policy.clone();
        move || -> Vec<String> { policy.load().agencies().map(|a| a.id.clone()).collect() }
    };
    let paths = {
        let (agencies, keys_dir) = (agencies.clone(), keys_dir.clone());
        move || {
            agencies()
                .iter()
                .flat_map(|a| crate::identity::keys::agency_key_files(&keys_dir, a))
                .collect()
        }
    };
    let files = paths.clone();
    spawn_watch("token keys", interval, shutdown, paths, move || {
        let names = agencies();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        match KeyStore::load(&keys_dir, &names, options.clone()) {
            Ok(ks) => {
                events.record_blocking(
                    event::KEYS_RELOAD,
                    event::files_detail("agency token keys", &files()),
                );
                tracing::info!(keys = ?ks.key_counts(), "agency token keys reloaded");
                target.store(Arc::new(ks));
            }
            Err(err) => {
                tracing::error!(%err, "token key files changed but do not load; the previous keys stay in force");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_file_triggers_one_reload() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        std::fs::write(&f, "a").unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let (hit_tx, mut hit_rx) = tokio::sync::mpsc::unbounded_channel();
        let watched = f.clone();
        let task = spawn_watch(
            "test",
            Duration::from_millis(20),
            rx,
            move || vec![watched.clone()],
            move || {
                let _ = hit_tx.send(());
            },
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(hit_rx.try_recv().is_err(), "no change, no reload");
        std::fs::write(&f, "b").unwrap();
        tokio::time::timeout(Duration::from_secs(5), hit_rx.recv())
            .await
            .unwrap()
            .unwrap();
        std::fs::remove_file(&f).unwrap();
        tokio::time::timeout(Duration::from_secs(5), hit_rx.recv())
            .await
            .unwrap()
            .unwrap();
        tx.send(true).unwrap();
        task.await.unwrap();
    }
}
