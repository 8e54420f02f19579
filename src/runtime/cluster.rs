//! Which policy version each replica on the same database runs.
//!
//! Every node refreshes its row in `node_heartbeats` (its name, the policy
//! version in force, the time) every [`BEAT`], and reads back the rows of the
//! nodes seen within [`LIVE`]. Replicas that answer with different policies
//! are a mistake an operator must see: the node logs a warning when the set
//! of versions among live nodes turns mixed (and when it is one again), and
//! `/readyz` and `/metrics` (`karibche_policy_versions_in_cluster`) show it.
//! A mixed cluster stays ready: refusing traffic would not make the policies
//! agree, and a rolling reload passes through this state on purpose.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::shutdown::{stopped, Shutdown};
use crate::admin::PolicyVersions;
use crate::policy::Policy;
use crate::store::Store;

/// How often a node refreshes its row and reads the others'.
pub const BEAT: Duration = Duration::from_secs(1);
/// A node not seen for this long is taken for gone.
pub const LIVE: Duration = Duration::from_secs(5);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Records this node's policy version and reads the live nodes' versions.
async fn beat(
    store: &Store,
    node: &str,
    version: &str,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO node_heartbeats (node, policy_version, seen_at) VALUES ($1, $2, $3) \
         ON CONFLICT (node) DO UPDATE SET policy_version = excluded.policy_version, seen_at = excluded.seen_at",
    )
    .bind(node)
    .bind(version)
    .bind(now)
    .execute(store.pool())
    .await?;
    let live_since = now - i64::try_from(LIVE.as_millis()).unwrap_or(i64::MAX);
    sqlx::query_as(
        "SELECT policy_version, node FROM node_heartbeats WHERE seen_at >= $1 ORDER BY policy_version, node",
    )
    .bind(live_since)
    .fetch_all(store.pool())
    .await
}

/// Refreshes this node's row every [`BEAT`] and publishes the live versions in `view`; ends on `stop`.
pub async fn run(
    store: Store,
    node: String,
    policy: Arc<ArcSwap<Policy>>,
    view: Arc<PolicyVersions>,
    mut stop: Shutdown,
) {
    let mut tick = tokio::time::interval(BEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_mixed = false;
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = tick.tick() => {}
        }
        let version = policy.load().version().to_owned();
        let rows = match tokio::time::timeout(BEAT * 2, beat(&store, &node, &version)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(err)) => {
                tracing::debug!(%err, "node heartbeat not recorded");
                continue;
            }
            Err(_) => continue,
        };
        view.set(rows);
        let mixed = view.mixed();
        if mixed && !was_mixed {
            tracing::warn!(
                versions = %view.describe(),
                "replicas on this database run different policy versions"
            );
        } else if was_mixed && !mixed {
            tracing::info!(version = %version, "replicas on this database run one policy version again");
        }
        was_mixed = mixed;
    }
}
