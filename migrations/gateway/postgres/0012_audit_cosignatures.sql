-- Witnesses' cosignatures of tree heads (C2SP tlog-cosignature lines), kept
-- with the heads they cosign; the largest size per witness is where the next
-- consistency proof sent to it starts.
CREATE TABLE audit_cosignatures (
    node    TEXT   NOT NULL,
    size    BIGINT NOT NULL,
    witness TEXT   NOT NULL,
    line    TEXT   NOT NULL,
    ts      TEXT   NOT NULL,
    PRIMARY KEY (node, size, witness)
);
