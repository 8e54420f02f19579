-- Consent records (src/consent.rs): a data subject's consent, collected by an
-- agency, to the processing of their record for one purpose. Timestamps are
-- RFC 3339 UTC TEXT with microseconds (fixed width, so text order is time
-- order); valid_until is an ISO date, the last day the consent holds (UTC).
-- Rows are never deleted by the gateway: revocation sets revoked_at.
CREATE TABLE consents (
    id           TEXT PRIMARY KEY,
    subject      TEXT NOT NULL,
    agency       TEXT NOT NULL,
    purpose      TEXT NOT NULL,
    -- Space-separated "provider/service" entries; NULL covers every service.
    scope        TEXT,
    given_at     TEXT NOT NULL,
    valid_until  TEXT,
    evidence_ref TEXT,
    recorded_at  TEXT NOT NULL,
    recorded_by  TEXT NOT NULL,
    revoked_at   TEXT
);
-- The per-request check looks up one subject's consents for one agency and purpose.
CREATE INDEX consents_subject_agency_purpose ON consents (subject, agency, purpose);
