-- Issue 9: what was released, restricted grants, and retention.
--
-- response_digest: hex SHA-256 of the response body exactly as released
-- (allowed records only). restricted: 1 when a grant marked `restricted`
-- allowed the request; such accesses reach the data subject's report only
-- after `audit.restricted_report_delay`. Both are covered by the record hash
-- only when set (digest present, restricted = 1), so older records keep theirs.
ALTER TABLE audit_log ADD COLUMN response_digest TEXT;
ALTER TABLE audit_log ADD COLUMN restricted INTEGER NOT NULL DEFAULT 0;
CREATE INDEX audit_log_purpose_ts ON audit_log (purpose, ts);
CREATE INDEX audit_log_provider_service_ts ON audit_log (provider, service, ts);

-- Retention: `karibche audit archive` moves the oldest records of a node's
-- chain to a file. The signed checkpoint of the last archived record stays
-- here, so the first remaining record's prev_hash can still be checked.
CREATE TABLE audit_archives (
    node        TEXT   NOT NULL,
    seq         BIGINT NOT NULL,
    hash        TEXT   NOT NULL,
    ts          TEXT   NOT NULL,
    public_key  TEXT   NOT NULL,
    signature   TEXT   NOT NULL,
    first_seq   BIGINT NOT NULL,
    cut         TEXT   NOT NULL,
    file        TEXT   NOT NULL,
    file_sha256 TEXT   NOT NULL,
    archived_at TEXT   NOT NULL,
    PRIMARY KEY (node, seq)
);
