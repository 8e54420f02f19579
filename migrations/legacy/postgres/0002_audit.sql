-- The tamper-evident access log: one hash chain per gateway node.
-- subjects and fields are JSON arrays of strings, as hashed.
CREATE TABLE audit_log (
    node           TEXT    NOT NULL,
    seq            BIGINT  NOT NULL,
    id             TEXT    NOT NULL UNIQUE,
    ts             TEXT    NOT NULL,
    agency         TEXT,
    certificate    TEXT,
    officer        TEXT,
    purpose        TEXT,
    legal_basis    TEXT,
    case_ref       TEXT,
    consent_ref    TEXT,
    token_id       TEXT,
    provider       TEXT,
    service        TEXT,
    operation      TEXT,
    method         TEXT    NOT NULL,
    path           TEXT    NOT NULL,
    subjects       TEXT    NOT NULL,
    fields         TEXT    NOT NULL,
    decision       TEXT    NOT NULL,
    reason         TEXT,
    status         INTEGER NOT NULL CHECK (status BETWEEN 0 AND 65535),
    policy_version TEXT    NOT NULL,
    prev_hash      TEXT    NOT NULL,
    hash           TEXT    NOT NULL,
    PRIMARY KEY (node, seq)
);
CREATE INDEX audit_log_agency_ts ON audit_log (agency, ts);
CREATE INDEX audit_log_officer_ts ON audit_log (officer, ts);
CREATE INDEX audit_log_ts ON audit_log (ts);

-- Which records name which data subject: a subject's access report without a scan.
CREATE TABLE audit_subjects (
    node    TEXT   NOT NULL,
    seq     BIGINT NOT NULL,
    subject TEXT   NOT NULL,
    PRIMARY KEY (node, seq, subject)
);
CREATE INDEX audit_subjects_subject ON audit_subjects (subject);
