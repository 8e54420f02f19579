-- Signed checkpoints of each node's chain head: they reveal a cut-off tail
-- and let an auditor check the chain offline with the node's public key.
CREATE TABLE audit_checkpoints (
    node       TEXT   NOT NULL,
    seq        BIGINT NOT NULL,
    hash       TEXT   NOT NULL,
    ts         TEXT   NOT NULL,
    public_key TEXT   NOT NULL,
    signature  TEXT   NOT NULL,
    PRIMARY KEY (node, seq)
);
