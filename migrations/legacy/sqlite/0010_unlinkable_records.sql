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
-- New rows get theirs on insert (src/registry/db.rs); SQLite cannot add a
-- column with a random default, so existing rows get one here.
ALTER TABLE reg_persons ADD COLUMN ckey INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reg_visas ADD COLUMN ckey INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reg_residence_permits ADD COLUMN ckey INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reg_work_permits ADD COLUMN ckey INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reg_crossings ADD COLUMN ckey INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reg_asylum_cases ADD COLUMN ckey INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reg_entry_bans ADD COLUMN ckey INTEGER NOT NULL DEFAULT 0;
UPDATE reg_persons SET ckey = random() & 4294967295;
UPDATE reg_visas SET ckey = random() & 4294967295;
UPDATE reg_residence_permits SET ckey = random() & 4294967295;
UPDATE reg_work_permits SET ckey = random() & 4294967295;
UPDATE reg_crossings SET ckey = random() & 4294967295;
UPDATE reg_asylum_cases SET ckey = random() & 4294967295;
UPDATE reg_entry_bans SET ckey = random() & 4294967295;
