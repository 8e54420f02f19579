-- Issue 16: replicas sharing one database say which policy version each runs.
--
-- One row per node name, refreshed every few seconds by the process that holds
-- the node's lock (src/runtime/cluster.rs). seen_at: Unix milliseconds of the
-- last refresh; a row not refreshed for a while belongs to a node that is gone.
-- Not part of any chain: losing a row loses a warning, never a record.
CREATE TABLE node_heartbeats (
    node TEXT PRIMARY KEY,
    policy_version TEXT NOT NULL,
    seen_at BIGINT NOT NULL
);
