//! The JSON Schema (draft 2020-12) of the policy files, printed by
//! `karibche policy schema` and committed as `policies/schema.json`, so that
//! editors (Even Better TOML / taplo, VS Code, IntelliJ) validate and complete
//! the files as they are typed. The root describes an agency file, the file
//! administrators edit most; `$defs` holds the providers, purposes and test
//! case files (`#/$defs/providers_file`, …).
//!
//! The loader stays the authority: the schema cannot express cross-file
//! checks (unknown purpose, overlapping grants), which `policy check` reports.

use serde_json::{json, Value};

/// The schema document as pretty-printed JSON (what `policies/schema.json` holds).
pub fn schema() -> String {
    // Serialising a `Value` built from literals cannot fail.
    serde_json::to_string_pretty(&document()).unwrap_or_default() + "\n"
}

fn document() -> Value {
    let kebab = json!({"type": "string", "pattern": "^[a-z0-9]+(-[a-z0-9]+)*$"});
    let field_path = json!({"type": "string", "pattern": "^[a-z0-9_]+(\\.[a-z0-9_]+)*$"});
    // The pattern holds months to 01-12 and days to their month's (February to 29: the
    // loader rejects a 29th outside leap years), since validators need not check `format`.
    let date = json!({
        "description": "A day, YYYY-MM-DD: a TOML local date or a string.",
        "type": "string",
        "format": "date",
        "pattern": "^[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-9]))$"
    });
    let string_or_list = json!({
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
        ]
    });
    let operations = json!({
        "type": "array", "minItems": 1, "uniqueItems": true,
        "items": {"enum": ["read", "write"]},
        "description": "read = GET, HEAD; write = POST, PUT, PATCH, DELETE."
    });
    let certificate = json!({
        "type": "object",
        "additionalProperties": false,
        "minProperties": 1,
        "description": "Which client certificates are this agency's; any one matcher matching is enough; list several during a rotation. No two agencies may share a matcher.",
        "properties": {
            "uri_san": {"$ref": "#/$defs/string_or_list", "description": "URI subject alternative name(s), e.g. urn:karibche:agency:psda."},
            "dns_san": {"$ref": "#/$defs/string_or_list", "description": "DNS subject alternative name(s)."},
            "subject": {"$ref": "#/$defs/string_or_list", "description": "Subject DN(s), exactly as RFC 4514 text printed by x509-parser, e.g. \"CN=psda, O=Government of Georgia\"."},
            "sha256": {"$ref": "#/$defs/string_or_list", "description": "Pinned SHA-256 fingerprint(s) of the DER certificate: 64 hex digits, colons allowed."}
        }
    });
    let grant = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["provider", "service", "operations", "purposes", "fields"],
        "description": "One permission. Its id is \"<agency>#<index>\", the index counting grants from 0 in file order. Two enforced grants (or two shadow grants) may not both apply to one request.",
        "properties": {
            "provider": {"$ref": "#/$defs/kebab", "description": "A provider id from providers.toml."},
            "service": {"$ref": "#/$defs/kebab", "description": "A service id of that provider."},
            "operations": {"$ref": "#/$defs/operations"},
            "purposes": {"type": "array", "minItems": 1, "uniqueItems": true, "items": {"$ref": "#/$defs/kebab"}, "description": "Purpose codes from purposes.toml."},
            "fields": {"type": "array", "uniqueItems": true, "items": {"$ref": "#/$defs/field_path"}, "description": "Field paths released; a path releases its whole subtree; arrays are transparent."},
            "consent": {"enum": ["none", "required"], "default": "none", "description": "Whether the data subject's consent must be on record (karibche consent, POST /v1/consents). Such a grant serves only requests naming one data subject in the path; searches are refused."},
            "case_required": {"type": "boolean", "default": false, "description": "The officer's token must carry a case reference."},
            "valid_from": {"$ref": "#/$defs/date", "description": "First day the grant applies (inclusive)."},
            "valid_until": {"$ref": "#/$defs/date", "description": "Last day the grant applies (inclusive)."},
            "shadow": {"type": "boolean", "default": false, "description": "A proposed grant: decided and recorded in the audit log as shadow_decision, never enforced. The shadow grants of a service stand in for all its enforced grants."},
            "restricted": {"type": "boolean", "default": false, "description": "Stricter handling of restricted records."},
            "max_body_bytes": {"type": "integer", "minimum": 1, "description": "Largest request body (bytes) a write under this grant may send; the gateway's own limit (gateway.max_body_bytes) caps it."},
            "transforms": {"type": "object", "additionalProperties": {"enum": ["pseudonymise", "year_only", "age_band"]}, "description": "Field path (one the grant releases) -> transform of the released value: pseudonymise (keyed hash, stable per agency within a key period; such a grant serves no lookup by id, document or name), year_only (dates to their year), age_band (birth date to an age band)."},
            "acknowledge": {"type": "array", "items": {"$ref": "#/$defs/acknowledgement"}, "description": "policy check warnings reviewed and accepted for this grant, each with its reason."}
        }
    });
    let acknowledgement = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["check", "because"],
        "description": "A reviewed policy check warning. It silences the warning for exactly the fields it lists; a field added later warns again, and an acknowledgement that matches nothing is itself a warning.",
        "properties": {
            "check": {"enum": ["consent-bypass", "case-bypass", "consent-search"], "description": "consent-bypass / case-bypass: this grant releases, without consent / a case reference, fields another grant of the agency protects with one. consent-search: a consent grant on a service that also answers searches."},
            "fields": {"type": "array", "uniqueItems": true, "items": {"$ref": "#/$defs/field_path"}, "description": "With consent-bypass and case-bypass: the fields accepted."},
            "because": {"type": "string", "minLength": 20, "description": "Why the finding is acceptable, for whoever reviews the policy."}
        }
    });
    let providers_file = json!({
        "title": "karibche providers file (policies/providers.toml)",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "providers": {"type": "array", "items": {
                "type": "object",
                "additionalProperties": false,
                "required": ["id", "title", "upstream"],
                "properties": {
                    "id": {"$ref": "#/$defs/kebab", "description": "The first path segment after /v1/."},
                    "title": {"type": "string", "minLength": 1},
                    "upstream": {"type": "string", "pattern": "^(builtin:[a-z0-9]+(-[a-z0-9]+)*|https://.+)$", "description": "builtin:<name> or an https:// base URL."},
                    "services": {"type": "array", "items": {
                        "type": "object",
                        "additionalProperties": false,
                        "required": ["id", "title", "operations", "subject_field"],
                        "properties": {
                            "id": {"$ref": "#/$defs/kebab"},
                            "title": {"type": "string", "minLength": 1},
                            "operations": {"$ref": "#/$defs/operations"},
                            "subject_field": {"type": "string", "pattern": "^[a-z0-9_]+$", "description": "The field of each record that holds the data subject's id."},
                            "collection": {"type": "string", "pattern": "^[a-z0-9_]+$", "description": "The key of the record list in search answers."},
                            "fields": {"type": "array", "uniqueItems": true, "items": {"$ref": "#/$defs/field_path"}, "description": "The record's known field paths; grants are checked against them."},
                            "pseudonymous_query": {"type": "array", "uniqueItems": true, "items": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"}, "description": "Query parameters that select only by attributes a pseudonymising grant releases. Under a grant with a pseudonymise transform the gateway serves only the collection path with these parameters (and its own cursor and fields); lookups by id, document or name are refused."}
                        }
                    }}
                }
            }}
        }
    });
    let purposes_file = json!({
        "title": "karibche purpose vocabulary (policies/purposes.toml)",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "purposes": {"type": "array", "items": {
                "type": "object",
                "additionalProperties": false,
                "required": ["code", "title", "legal_basis"],
                "properties": {
                    "code": {"$ref": "#/$defs/kebab", "description": "Carried in officers' tokens."},
                    "title": {"type": "string", "minLength": 1},
                    "legal_basis": {"type": "string", "minLength": 1, "description": "The law that allows processing for this purpose; cited in every audit record."}
                }
            }}
        }
    });
    let cases_file = json!({
        "title": "karibche policy test cases (policies/tests/*.toml)",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "cases": {"type": "array", "items": {
                "type": "object",
                "additionalProperties": false,
                "required": ["name", "agency", "purpose", "path", "expect"],
                "properties": {
                    "name": {"type": "string"},
                    "agency": {"type": "string"},
                    "purpose": {"type": "string"},
                    "method": {"type": "string", "default": "GET"},
                    "path": {"type": "string", "pattern": "^/v1/"},
                    "case": {"type": "string"},
                    "date": {"$ref": "#/$defs/date"},
                    "expect": {"enum": ["allow", "deny"]},
                    "reason": {"type": "string", "description": "With deny: the reason code (no_grant, purpose_not_allowed, …)."},
                    "grant": {"type": "string", "description": "With allow: the deciding grant, <agency>#<index>."},
                    "fields": {"type": "array", "items": {"$ref": "#/$defs/field_path"}, "description": "With allow: exactly the fields released."},
                    "must_not_release": {"type": "array", "items": {"$ref": "#/$defs/field_path"}},
                    "shadow": {"enum": ["allow", "deny"], "description": "The expected shadow decision."}
                }
            }}
        }
    });
    json!({
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://karibche.example/policies/schema.json",
    "title": "karibche agency policy file (policies/agencies/<id>.toml)",
    "description": "One agency: its client certificates and its grants. Nothing is allowed unless a grant says so. Unknown keys are errors.",
    "type": "object",
    "additionalProperties": false,
    "required": ["id", "name", "certificate"],
    "properties": {
        "id": {"$ref": "#/$defs/kebab", "description": "The agency id; equal to the file name without .toml."},
        "name": {"type": "string", "minLength": 1, "description": "The agency's full name."},
        "require_bound_tokens": {"type": "boolean", "default": false, "description": "Officers' tokens must be bound to the client certificate (cnf.x5t#S256)."},
        "case_format": {"type": "string", "minLength": 1, "description": "The form of the agency's case references: a regular expression (Rust regex syntax) the whole reference must match where a grant has case_required. Default: 3 to 64 letters, digits and - / . _, starting with a letter or digit and holding a digit."},
        "shadow": {"type": "boolean", "default": false, "description": "The whole file is a proposal: every grant in it is a shadow grant, decided and recorded as shadow_decision, never enforced (the agency's requests are refused meanwhile)."},
        "certificate": {"$ref": "#/$defs/certificate"},
        "grants": {"type": "array", "items": {"$ref": "#/$defs/grant"}}
    },
    "$defs": {
        "kebab": kebab,
        "field_path": field_path,
        "date": date,
        "string_or_list": string_or_list,
        "operations": operations,
        "certificate": certificate,
        "grant": grant,
        "acknowledgement": acknowledgement,
        "providers_file": providers_file,
        "purposes_file": purposes_file,
        "cases_file": cases_file
    }
        })
}
