-- Issue 14: what providers answered, pseudonymised reads, and record keys for
-- the statistics' disclosure control.
--
-- upstream_status: the provider's own HTTP status when it answered with an
-- error (the caller got the gateway's problem instead). pseudonymised: 1 when
-- the deciding grant releases the data subject only as a pseudonym; the
-- agency's own audit views then withhold the subjects. Both are covered by the
-- record hash only when set, so older records keep theirs.
ALTER TABLE audit_log ADD COLUMN upstream_status INTEGER;
ALTER TABLE audit_log ADD COLUMN pseudonymised INTEGER NOT NULL DEFAULT 0;

-- ckey: each register record's secret, permanent record key (a random 32-bit
-- integer) for cell-key rounding of statistics (src/registry/statistics.rs).
-- The volatile default gives every existing row its own key; inserts set it
-- explicitly as well (src/registry/db.rs).
ALTER TABLE reg_persons ADD COLUMN ckey BIGINT NOT NULL DEFAULT (floor(random() * 4294967296))::bigint;
ALTER TABLE reg_visas ADD COLUMN ckey BIGINT NOT NULL DEFAULT (floor(random() * 4294967296))::bigint;
ALTER TABLE reg_residence_permits ADD COLUMN ckey BIGINT NOT NULL DEFAULT (floor(random() * 4294967296))::bigint;
ALTER TABLE reg_work_permits ADD COLUMN ckey BIGINT NOT NULL DEFAULT (floor(random() * 4294967296))::bigint;
ALTER TABLE reg_crossings ADD COLUMN ckey BIGINT NOT NULL DEFAULT (floor(random() * 4294967296))::bigint;
ALTER TABLE reg_asylum_cases ADD COLUMN ckey BIGINT NOT NULL DEFAULT (floor(random() * 4294967296))::bigint;
ALTER TABLE reg_entry_bans ADD COLUMN ckey BIGINT NOT NULL DEFAULT (floor(random() * 4294967296))::bigint;
