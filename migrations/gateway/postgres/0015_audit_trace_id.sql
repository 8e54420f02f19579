-- Issue 19: the W3C trace id of the request (traceparent), so one request can
-- be followed from the agency's logs through the gateway's access log to the
-- provider's. Stored beside the record and NOT covered by its hash: it is a
-- correlation aid chosen by the caller (or generated), not evidence, and
-- leaving it out of the canonical JSON keeps every record's hash unchanged.
ALTER TABLE audit_log ADD COLUMN trace_id TEXT;
