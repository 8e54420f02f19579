-- Shadow mode (policy grants marked `shadow = true`): what the proposed grants
-- would have decided, beside the enforced decision. NULL when no shadow grant
-- applied. Covered by the record hash only when set, so older records keep theirs.
ALTER TABLE audit_log ADD COLUMN shadow_decision TEXT;
-- `karibche audit query --shadow-diff` reads only the rows that carry one.
CREATE INDEX audit_log_shadow_ts ON audit_log (ts) WHERE shadow_decision IS NOT NULL;
