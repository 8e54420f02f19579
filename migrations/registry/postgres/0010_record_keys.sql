-- Issue 14: record keys for the statistics' disclosure control.
--
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
