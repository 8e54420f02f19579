-- RFC 3161 time-stamp tokens of tree heads (`[audit.tsa]`), kept with the
-- heads they stamp: the token's DER in base64, the SHA-256 of the TSA
-- certificate that verified it, and the TSA's genTime.
CREATE TABLE audit_timestamps (
    node     TEXT   NOT NULL,
    size     BIGINT NOT NULL,
    token    TEXT   NOT NULL,
    tsa      TEXT   NOT NULL,
    gen_time TEXT   NOT NULL,
    ts       TEXT   NOT NULL,
    PRIMARY KEY (node, size)
);
