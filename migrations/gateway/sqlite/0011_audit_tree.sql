-- The Merkle tree over each node's records (RFC 9162; src/audit/merkle.rs),
-- beside the hash chain. A tree head is a checkpoint in the C2SP
-- tlog-checkpoint format, signed by the node, with the tree's right edge so
-- the writer extends the tree from there instead of recomputing it.
CREATE TABLE audit_tree_heads (
    node TEXT   NOT NULL,
    size BIGINT NOT NULL,
    root TEXT   NOT NULL,
    edge TEXT   NOT NULL,
    note TEXT   NOT NULL,
    ts   TEXT   NOT NULL,
    PRIMARY KEY (node, size)
);
-- Hashes of complete subtrees of 16 leaves and more: inclusion and
-- consistency proofs read these instead of every leaf.
CREATE TABLE audit_tree_nodes (
    node  TEXT    NOT NULL,
    level INTEGER NOT NULL,
    idx   BIGINT  NOT NULL,
    hash  TEXT    NOT NULL,
    PRIMARY KEY (node, level, idx)
);
