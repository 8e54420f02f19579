//! Field transforms for statistical use, applied after minimisation: the
//! statistics office can count and link records without learning who they
//! are about.
//!
//! - `pseudonymise`: a keyed HMAC-SHA-256 of the value, `ps-` + 32 hex digits.
//!   Stable for the same agency within a key period (the period key is
//!   derived from the gateway's secret and the period label, by default the
//!   calendar year), different across agencies and periods, and not
//!   reversible without the secret.
//! - `year_only`: a date or time reduced to its year (`"1985-03-14"` → `"1985"`).
//! - `age_band`: a birth date replaced by an age band (`"35-44"`) as of today.
//!
//! Grants name transforms per field path (`transforms = { id = "pseudonymise" }`);
//! paths work like grant fields (arrays are transparent).

use std::path::Path;

use aws_lc_rs::hmac;
use serde_json::Value;
use time::{Date, Month};

use crate::policy::{Transform, Transforms};

/// The gateway's pseudonymisation key for the current period, and the
/// cursor key derived from the same secret (`super::cursor`): both keep what an
/// agency receives from being linked back to a register id.
pub struct Pseudonymiser {
    key: hmac::Key,
    period: String,
    cursors: crate::gateway::release::cursor::CursorKey,
}

impl std::fmt::Debug for Pseudonymiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pseudonymiser")
            .field("period", &self.period)
            .finish()
    }
}

impl Pseudonymiser {
    /// Derives the period key from the gateway's secret and a period label (e.g. "2026").
    pub fn new(secret: &[u8], period: &str) -> Self {
        let master = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derived = hmac::sign(
            &master,
            format!("karibche-pseudonym-v1|{period}").as_bytes(),
        );
        Pseudonymiser {
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
            period: period.to_owned(),
            cursors: crate::gateway::release::cursor::CursorKey::derive(secret),
        }
    }

    /// Loads the secret at `path` (hex), creating 32 random bytes (mode 0600) if missing.
    pub fn load_or_create(path: &Path, period: &str) -> std::io::Result<Self> {
        let secret = match std::fs::read_to_string(path) {
            Ok(text) => hex::decode(text.trim())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut secret = [0u8; 32];
                aws_lc_rs::rand::fill(&mut secret)
                    .map_err(|_| std::io::Error::other("no randomness"))?;
                crate::files::write_atomic(path, hex::encode(secret).as_bytes(), 0o600)?;
                secret.to_vec()
            }
            Err(e) => return Err(e),
        };
        Ok(Pseudonymiser::new(&secret, period))
    }

    /// The key that seals pagination cursors.
    pub fn cursors(&self) -> &crate::gateway::release::cursor::CursorKey {
        &self.cursors
    }

    /// The period label.
    pub fn period(&self) -> &str {
        &self.period
    }

    /// The pseudonym of `value` for `agency`.
    pub fn pseudonym(&self, agency: &str, value: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(agency.as_bytes());
        ctx.update(&[0]);
        ctx.update(value.as_bytes());
        let tag = ctx.sign();
        format!("ps-{}", hex::encode(&tag.as_ref()[..16]))
    }
}

/// What a transform needs besides the value.
pub struct Context<'a> {
    /// The pseudonymisation key.
    pub pseudonymiser: &'a Pseudonymiser,
    /// The agency the response goes to.
    pub agency: &'a str,
    /// Today (UTC), for age bands.
    pub today: Date,
}

/// Applies the transforms to a minimised response (each record of `collection`, or the body).
pub fn apply(
    body: &mut Value,
    collection: Option<&str>,
    transforms: &Transforms,
    ctx: &Context<'_>,
) {
    if transforms.is_empty() {
        return;
    }
    let records: Vec<&mut Value> = match collection.and_then(|c| body.get_mut(c)) {
        Some(Value::Array(items)) => items.iter_mut().collect(),
        _ => vec![body],
    };
    for record in records {
        for (path, t) in &transforms.0 {
            walk(record, path, *t, ctx);
        }
    }
}

fn walk(value: &mut Value, path: &[String], t: Transform, ctx: &Context<'_>) {
    match value {
        Value::Array(items) => {
            for item in items {
                walk(item, path, t, ctx);
            }
        }
        Value::Object(map) => {
            if let Some((first, rest)) = path.split_first() {
                if let Some(child) = map.get_mut(first) {
                    walk(child, rest, t, ctx);
                }
            }
        }
        leaf if path.is_empty() => *leaf = transform(leaf, t, ctx),
        _ => {}
    }
}

fn transform(value: &Value, t: Transform, ctx: &Context<'_>) -> Value {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Null => return Value::Null,
        other => other.to_string(),
    };
    match t {
        Transform::Pseudonymise => Value::String(ctx.pseudonymiser.pseudonym(ctx.agency, &text)),
        Transform::YearOnly => match text
            .get(..4)
            .filter(|y| y.bytes().all(|b| b.is_ascii_digit()))
        {
            Some(year) => Value::String(year.to_owned()),
            None => Value::Null,
        },
        Transform::AgeBand => match parse_date(&text) {
            Some(born) => Value::String(age_band(born, ctx.today).to_owned()),
            None => Value::Null,
        },
    }
}

fn parse_date(s: &str) -> Option<Date> {
    let y: i32 = s.get(0..4)?.parse().ok()?;
    let m: u8 = s.get(5..7)?.parse().ok()?;
    let d: u8 = s.get(8..10)?.parse().ok()?;
    Date::from_calendar_date(y, Month::try_from(m).ok()?, d).ok()
}

fn age_band(born: Date, today: Date) -> &'static str {
    let mut age = today.year() - born.year();
    if (today.month() as u8, today.day()) < (born.month() as u8, born.day()) {
        age -= 1;
    }
    match age {
        i32::MIN..=17 => "0-17",
        18..=24 => "18-24",
        25..=34 => "25-34",
        35..=44 => "35-44",
        45..=54 => "45-54",
        55..=64 => "55-64",
        _ => "65+",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::date;

    fn ctx<'a>(p: &'a Pseudonymiser, agency: &'a str) -> Context<'a> {
        Context {
            pseudonymiser: p,
            agency,
            today: date!(2026 - 11 - 25),
        }
    }

    #[test]
    fn transforms_apply_at_depth_and_in_collections() {
        let p = Pseudonymiser::new(b"secret", "2026");
        let t = Transforms::new([
            ("id", Transform::Pseudonymise),
            ("birth_date", Transform::AgeBand),
            ("visas.valid_until", Transform::YearOnly),
        ]);
        let mut body = json!({"results": [
            {"id": "RF-1", "birth_date": "1990-12-01", "visas": [{"valid_until": "2027-05-01", "category": "C1"}]},
            {"id": "RF-2", "birth_date": "2010-01-01", "visas": []}
        ], "next": "x"});
        apply(&mut body, Some("results"), &t, &ctx(&p, "geostat"));
        let r = &body["results"];
        assert!(r[0]["id"].as_str().unwrap().starts_with("ps-"));
        assert_ne!(r[0]["id"], r[1]["id"]);
        assert_eq!(r[0]["birth_date"], "35-44");
        assert_eq!(r[1]["birth_date"], "0-17");
        assert_eq!(r[0]["visas"][0]["valid_until"], "2027");
        assert_eq!(r[0]["visas"][0]["category"], "C1");
        assert_eq!(body["next"], "x");
    }

    #[test]
    fn pseudonyms_are_stable_per_agency_and_period_only() {
        let p = Pseudonymiser::new(b"secret", "2026");
        let same = Pseudonymiser::new(b"secret", "2026");
        let next_year = Pseudonymiser::new(b"secret", "2027");
        let other_key = Pseudonymiser::new(b"other", "2026");
        let a = p.pseudonym("geostat", "RF-1");
        assert_eq!(a, same.pseudonym("geostat", "RF-1"));
        assert_eq!(a.len(), 3 + 32);
        assert_ne!(a, p.pseudonym("geostat", "RF-2"));
        assert_ne!(a, p.pseudonym("psda", "RF-1"));
        assert_ne!(a, next_year.pseudonym("geostat", "RF-1"));
        assert_ne!(a, other_key.pseudonym("geostat", "RF-1"));
    }

    #[test]
    fn year_only_and_bad_input() {
        let p = Pseudonymiser::new(b"k", "2026");
        let c = ctx(&p, "a");
        assert_eq!(
            transform(&json!("2024-05-01T10:22:00Z"), Transform::YearOnly, &c),
            json!("2024")
        );
        assert_eq!(
            transform(&json!("n/a"), Transform::YearOnly, &c),
            Value::Null
        );
        assert_eq!(
            transform(&json!("garbage"), Transform::AgeBand, &c),
            Value::Null
        );
        assert_eq!(
            transform(&Value::Null, Transform::Pseudonymise, &c),
            Value::Null
        );
    }

    #[test]
    fn secret_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/pseudonym.key");
        let a = Pseudonymiser::load_or_create(&path, "2026").unwrap();
        let b = Pseudonymiser::load_or_create(&path, "2026").unwrap();
        assert_eq!(a.pseudonym("x", "1"), b.pseudonym("x", "1"));
    }
}
