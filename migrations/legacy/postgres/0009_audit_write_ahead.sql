-- Issue 13: changes are logged ahead. A write to a provider, a consent, an
-- administrative change leaves an attempt record (phase = 'attempt'),
-- committed before the change is made, and an outcome record
-- (phase = 'outcome', attempt_id = the attempt's id) once it is known.
-- request_digest is the hex SHA-256 of the request body; written the JSON
-- array of the field paths the change writes. All four are covered by the
-- record hash only when set, so older records keep theirs.
ALTER TABLE audit_log ADD COLUMN phase TEXT;
ALTER TABLE audit_log ADD COLUMN attempt_id TEXT;
ALTER TABLE audit_log ADD COLUMN request_digest TEXT;
ALTER TABLE audit_log ADD COLUMN written TEXT;
-- An attempt's outcome is found by its id; attempts without one are listed
-- by `audit query` and `audit verify` as "outcome unknown".
CREATE INDEX audit_log_attempt ON audit_log (attempt_id) WHERE attempt_id IS NOT NULL;
CREATE INDEX audit_log_attempts ON audit_log (ts) WHERE phase = 'attempt';
