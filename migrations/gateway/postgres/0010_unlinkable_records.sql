-- Issue 14: what providers answered, and pseudonymised reads.
--
-- upstream_status: the provider's own HTTP status when it answered with an
-- error (the caller got the gateway's problem instead). pseudonymised: 1 when
-- the deciding grant releases the data subject only as a pseudonym; the
-- agency's own audit views then withhold the subjects. Both are covered by the
-- record hash only when set, so older records keep theirs.
ALTER TABLE audit_log ADD COLUMN upstream_status INTEGER;
ALTER TABLE audit_log ADD COLUMN pseudonymised INTEGER NOT NULL DEFAULT 0;
