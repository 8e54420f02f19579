//! The register's write side: one record kind per endpoint, each recorded by
//! the agency that owns it (the gateway's policy decides who may call which).
//!
//! A write is checked in two steps: [`parse`] validates the body on its own
//! (required fields, known codes, dates in order) and [`NewRecord::check`]
//! validates it against the register (the person exists, the document shown
//! at the border is the person's and valid that day, no entry while a ban is
//! in force…). Every refusal is a 422 whose detail starts with the field name.

use http::StatusCode;
use serde_json::{Map, Value};
use sqlx::AnyConnection;
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime};

use super::answer::internal;
use super::dates::{iso, parse_date};
use super::db;
use super::model::{
    self, AsylumCase, BirthPlace, Crossing, Document, Employer, EntryBan, Names, Person,
    ResidencePermit, Visa, WorkPermit, ASYLUM_STATUSES, BAN_REASONS, CROSSING_POINTS, DIRECTIONS,
    DOCUMENT_KINDS, PERMIT_STATUSES, RESIDENCE_PERMIT_TYPES, SEXES, VISA_ENTRIES,
};
use super::names::to_georgian;
use crate::problem::Problem;
use crate::store::Backend;

/// Longest id, number or code accepted.
pub(crate) const MAX_TOKEN: usize = 64;
/// Longest free-text field (names, posts, employers).
const MAX_TEXT: usize = 200;
/// How far in the future a crossing may be stamped, for clock skew between posts and the register.
const CLOCK_SKEW_SECS: i64 = 600;
/// Most nationalities one person may hold in the register.
const MAX_NATIONALITIES: usize = 5;

/// The record kinds that can be written, by endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Person,
    Document,
    Visa,
    ResidencePermit,
    WorkPermit,
    Crossing,
    AsylumCase,
    EntryBan,
}

impl Kind {
    /// The kind written by `POST /{segment}`; segments are the gateway's kebab-case service ids.
    pub(crate) fn from_segment(segment: &str) -> Option<Kind> {
        Some(match segment {
            "persons" => Kind::Person,
            "documents" => Kind::Document,
            "visas" => Kind::Visa,
            "residence-permits" => Kind::ResidencePermit,
            "work-permits" => Kind::WorkPermit,
            "crossings" => Kind::Crossing,
            "asylum-cases" => Kind::AsylumCase,
            "entry-bans" => Kind::EntryBan,
            _ => return None,
        })
    }

    /// The endpoint's segment, also the idempotency scope's kind.
    pub(crate) fn segment(self) -> &'static str {
        match self {
            Kind::Person => "persons",
            Kind::Document => "documents",
            Kind::Visa => "visas",
            Kind::ResidencePermit => "residence-permits",
            Kind::WorkPermit => "work-permits",
            Kind::Crossing => "crossings",
            Kind::AsylumCase => "asylum-cases",
            Kind::EntryBan => "entry-bans",
        }
    }
}

/// A validated record, ready to be checked against the register and stored.
#[derive(Debug)]
pub(crate) enum NewRecord {
    Person(Box<Person>),
    Document(Document),
    Visa(Visa),
    ResidencePermit(ResidencePermit),
    WorkPermit(WorkPermit),
    Crossing(Crossing),
    AsylumCase(AsylumCase),
    EntryBan(EntryBan),
}

/// A write the register refuses: which field, and why. Answered as 422
/// `invalid-field` with the detail `field: why`, naming the field first, as
/// every write refusal does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub(crate) struct Invalid {
    /// The field, as the caller named it (`documents[0].number`).
    pub field: String,
    /// What is wrong with it.
    pub why: String,
}

impl From<Invalid> for Problem {
    fn from(e: Invalid) -> Problem {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-field",
            "Invalid field",
            e.to_string(),
        )
    }
}

/// The refusal of `field` because it `why`.
pub(crate) fn unprocessable(field: &str, why: &str) -> Invalid {
    Invalid {
        field: field.to_owned(),
        why: why.to_owned(),
    }
}

/// Validates a body on its own and builds the record, with a fresh id.
pub(crate) fn parse(kind: Kind, map: &Map<String, Value>) -> Result<NewRecord, Invalid> {
    let today = OffsetDateTime::now_utc().date();
    match kind {
        Kind::Person => parse_person(map, today).map(|p| NewRecord::Person(Box::new(p))),
        Kind::Document => parse_document(map, today).map(NewRecord::Document),
        Kind::Visa => parse_visa(map).map(NewRecord::Visa),
        Kind::ResidencePermit => parse_permit(map, today).map(NewRecord::ResidencePermit),
        Kind::WorkPermit => parse_work(map).map(NewRecord::WorkPermit),
        Kind::Crossing => parse_crossing(map).map(NewRecord::Crossing),
        Kind::AsylumCase => parse_asylum(map, today).map(NewRecord::AsylumCase),
        Kind::EntryBan => parse_ban(map).map(NewRecord::EntryBan),
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// The members of a JSON object, each read by name; members not allowed are refused.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: &'static str,
}

impl<'a> Fields<'a> {
    fn new(
        map: &'a Map<String, Value>,
        allowed: &[&str],
        prefix: &'static str,
    ) -> Result<Self, Invalid> {
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(unprocessable(&format!("{prefix}{k}"), "unknown field"));
        }
        Ok(Fields { map, prefix })
    }

    fn name(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }

    fn opt_text(&self, field: &str, max: usize) -> Result<Option<String>, Invalid> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() && s.chars().count() <= max => {
                if s.chars().any(char::is_control) {
                    Err(unprocessable(
                        &self.name(field),
                        "must not contain control characters",
                    ))
                } else {
                    Ok(Some(s.trim().to_owned()))
                }
            }
            Some(Value::String(_)) => Err(unprocessable(
                &self.name(field),
                &format!("must be 1 to {max} characters"),
            )),
            Some(_) => Err(unprocessable(&self.name(field), "must be a string")),
        }
    }

    fn text(&self, field: &str, max: usize) -> Result<String, Invalid> {
        self.opt_text(field, max)?
            .ok_or_else(|| unprocessable(&self.name(field), "is required"))
    }

    /// An identifier or number: letters, digits and hyphens.
    fn code(&self, field: &str) -> Result<String, Invalid> {
        let v = self.text(field, MAX_TOKEN)?;
        if v.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
            Ok(v)
        } else {
            Err(unprocessable(
                &self.name(field),
                "must be letters, digits and hyphens",
            ))
        }
    }

    fn one_of(&self, field: &str, allowed: &[&str]) -> Result<String, Invalid> {
        let v = self.text(field, MAX_TOKEN)?;
        check_one_of(&self.name(field), v, allowed)
    }

    fn opt_one_of(&self, field: &str, allowed: &[&str]) -> Result<Option<String>, Invalid> {
        self.opt_text(field, MAX_TOKEN)?
            .map(|v| check_one_of(&self.name(field), v, allowed))
            .transpose()
    }

    fn country(&self, field: &str) -> Result<String, Invalid> {
        let v = self.text(field, MAX_TOKEN)?;
        check_country(&self.name(field), v)
    }

    fn date(&self, field: &str) -> Result<Date, Invalid> {
        let v = self.text(field, MAX_TOKEN)?;
        parse_date(&v).ok_or_else(|| unprocessable(&self.name(field), "must be a date YYYY-MM-DD"))
    }

    fn opt_date(&self, field: &str) -> Result<Option<Date>, Invalid> {
        match self.opt_text(field, MAX_TOKEN)? {
            None => Ok(None),
            Some(v) => parse_date(&v)
                .map(Some)
                .ok_or_else(|| unprocessable(&self.name(field), "must be a date YYYY-MM-DD")),
        }
    }

    fn bool(&self, field: &str, default: bool) -> Result<bool, Invalid> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(unprocessable(&self.name(field), "must be true or false")),
        }
    }

    fn object(&self, field: &str) -> Result<&'a Map<String, Value>, Invalid> {
        match self.map.get(field) {
            Some(Value::Object(m)) => Ok(m),
            None | Some(Value::Null) => Err(unprocessable(&self.name(field), "is required")),
            Some(_) => Err(unprocessable(&self.name(field), "must be an object")),
        }
    }
}

fn check_one_of(field: &str, v: String, allowed: &[&str]) -> Result<String, Invalid> {
    if allowed.contains(&v.as_str()) {
        Ok(v)
    } else {
        Err(unprocessable(
            field,
            &format!("must be one of: {}", allowed.join(", ")),
        ))
    }
}

fn check_country(field: &str, v: String) -> Result<String, Invalid> {
    if model::is_country(&v) {
        Ok(v)
    } else {
        Err(unprocessable(
            field,
            "must be an ISO 3166-1 alpha-2 country code (upper case)",
        ))
    }
}

fn in_order(from: Date, until: Date, field: &str, after: &str) -> Result<(), Invalid> {
    if until <= from {
        return Err(unprocessable(field, &format!("must be after {after}")));
    }
    Ok(())
}

fn not_future(d: Date, today: Date, field: &str) -> Result<(), Invalid> {
    if d > today {
        return Err(unprocessable(field, "lies in the future"));
    }
    Ok(())
}

fn parse_person(map: &Map<String, Value>, today: Date) -> Result<Person, Invalid> {
    let f = Fields::new(
        map,
        &[
            "personal_number",
            "names",
            "sex",
            "birth_date",
            "birth_place",
            "nationalities",
            "stateless",
        ],
        "",
    )?;
    let personal_number = f.opt_text("personal_number", MAX_TOKEN)?;
    if let Some(pn) = &personal_number {
        if pn.len() != 11 || !pn.bytes().all(|c| c.is_ascii_digit()) {
            return Err(unprocessable("personal_number", "must be 11 digits"));
        }
    }
    let n = Fields::new(
        f.object("names")?,
        &["surname", "given_names", "surname_ka", "given_names_ka"],
        "names.",
    )?;
    let surname = n.text("surname", MAX_TEXT)?;
    let given_names = n.text("given_names", MAX_TEXT)?;
    // Georgian renderings default to the national transliteration of the Latin names.
    let surname_ka = n
        .opt_text("surname_ka", MAX_TEXT)?
        .unwrap_or_else(|| to_georgian(&surname));
    let given_names_ka = n
        .opt_text("given_names_ka", MAX_TEXT)?
        .unwrap_or_else(|| to_georgian(&given_names));
    if super::names::surname_key(&surname).is_empty() {
        return Err(unprocessable("names.surname", "must contain letters"));
    }
    let sex = f.one_of("sex", &SEXES)?;
    let birth = f.date("birth_date")?;
    not_future(birth, today, "birth_date")?;
    let b = Fields::new(
        f.object("birth_place")?,
        &["city", "country"],
        "birth_place.",
    )?;
    let birth_place = BirthPlace {
        city: b.text("city", MAX_TEXT)?,
        country: b.country("country")?,
    };
    let nationalities = match map.get("nationalities") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            let mut out: Vec<String> = Vec::new();
            for item in items {
                let Value::String(code) = item else {
                    return Err(unprocessable("nationalities", "must be country codes"));
                };
                let code = check_country("nationalities", code.clone())?;
                if code == "GE" {
                    return Err(unprocessable(
                        "nationalities",
                        "a citizen of Georgia is not a foreigner",
                    ));
                }
                if out.contains(&code) {
                    return Err(unprocessable("nationalities", "lists a code twice"));
                }
                out.push(code);
            }
            if out.len() > MAX_NATIONALITIES {
                return Err(unprocessable(
                    "nationalities",
                    &format!("at most {MAX_NATIONALITIES}"),
                ));
            }
            out
        }
        Some(_) => return Err(unprocessable("nationalities", "must be an array")),
    };
    let stateless = f.bool("stateless", false)?;
    if stateless != nationalities.is_empty() {
        return Err(unprocessable(
            "stateless",
            "must be true exactly when nationalities is empty",
        ));
    }
    Ok(Person {
        id: new_id("RF"),
        personal_number,
        names: Names {
            surname,
            given_names,
            surname_ka,
            given_names_ka,
        },
        sex,
        birth_date: iso(birth),
        birth_place,
        nationalities,
        stateless,
        documents: Vec::new(),
        visas: Vec::new(),
        residence_permits: Vec::new(),
        work_permits: Vec::new(),
        crossings: Vec::new(),
        asylum_cases: Vec::new(),
        entry_bans: Vec::new(),
    })
}

fn parse_document(map: &Map<String, Value>, today: Date) -> Result<Document, Invalid> {
    let f = Fields::new(
        map,
        &[
            "person_id",
            "kind",
            "number",
            "issuing_state",
            "issued_on",
            "valid_until",
        ],
        "",
    )?;
    let person_id = f.code("person_id")?;
    let kind = f.one_of("kind", &DOCUMENT_KINDS)?;
    let number = f.code("number")?;
    let issuing_state = f.country("issuing_state")?;
    if kind != "passport" && issuing_state != "GE" {
        return Err(unprocessable(
            "issuing_state",
            "travel and stateless persons' documents are issued by Georgia (GE)",
        ));
    }
    let issued = f.date("issued_on")?;
    not_future(issued, today, "issued_on")?;
    let until = f.date("valid_until")?;
    in_order(issued, until, "valid_until", "issued_on")?;
    Ok(Document {
        id: new_id("DO"),
        person_id: Some(person_id),
        kind,
        number,
        issuing_state,
        issued_on: iso(issued),
        valid_until: iso(until),
    })
}

fn parse_visa(map: &Map<String, Value>) -> Result<Visa, Invalid> {
    let f = Fields::new(
        map,
        &[
            "person_id",
            "number",
            "category",
            "issuing_post",
            "valid_from",
            "valid_until",
            "entries",
        ],
        "",
    )?;
    let person_id = f.code("person_id")?;
    let number = f.code("number")?;
    let category = f.text("category", MAX_TOKEN)?;
    if !model::is_visa_category(&category) {
        let codes: Vec<&str> = model::VISA_CATEGORIES.iter().map(|(c, _)| *c).collect();
        return Err(unprocessable(
            "category",
            &format!("must be one of: {}", codes.join(", ")),
        ));
    }
    let issuing_post = f.text("issuing_post", MAX_TEXT)?;
    let from = f.date("valid_from")?;
    let until = f.date("valid_until")?;
    in_order(from, until, "valid_until", "valid_from")?;
    let entries = f.one_of("entries", &VISA_ENTRIES)?;
    Ok(Visa {
        id: new_id("VI"),
        person_id: Some(person_id),
        number,
        category,
        issuing_post,
        valid_from: iso(from),
        valid_until: iso(until),
        entries,
    })
}

fn parse_permit(map: &Map<String, Value>, today: Date) -> Result<ResidencePermit, Invalid> {
    let f = Fields::new(
        map,
        &[
            "person_id",
            "number",
            "type",
            "status",
            "valid_from",
            "valid_until",
        ],
        "",
    )?;
    let person_id = f.code("person_id")?;
    let number = f.code("number")?;
    let permit_type = f.one_of("type", &RESIDENCE_PERMIT_TYPES)?;
    let from = f.date("valid_from")?;
    let until = f.date("valid_until")?;
    in_order(from, until, "valid_until", "valid_from")?;
    let derived = if until < today { "expired" } else { "valid" };
    let status = f
        .opt_one_of("status", &PERMIT_STATUSES)?
        .unwrap_or_else(|| derived.to_owned());
    if status != "revoked" && status != derived {
        return Err(unprocessable(
            "status",
            &format!("must be {derived} or revoked for this validity"),
        ));
    }
    Ok(ResidencePermit {
        id: new_id("RP"),
        person_id: Some(person_id),
        number,
        permit_type,
        status,
        valid_from: iso(from),
        valid_until: iso(until),
    })
}

fn parse_work(map: &Map<String, Value>) -> Result<WorkPermit, Invalid> {
    let f = Fields::new(
        map,
        &[
            "person_id",
            "number",
            "employer",
            "position",
            "valid_from",
            "valid_until",
        ],
        "",
    )?;
    let person_id = f.code("person_id")?;
    let number = f.code("number")?;
    let e = Fields::new(f.object("employer")?, &["name", "tax_id"], "employer.")?;
    let name = e.text("name", MAX_TEXT)?;
    let tax_id = e.text("tax_id", MAX_TOKEN)?;
    if tax_id.len() != 9 || !tax_id.bytes().all(|c| c.is_ascii_digit()) {
        return Err(unprocessable("employer.tax_id", "must be 9 digits"));
    }
    let position = f.text("position", MAX_TEXT)?;
    let from = f.date("valid_from")?;
    let until = f.date("valid_until")?;
    in_order(from, until, "valid_until", "valid_from")?;
    Ok(WorkPermit {
        id: new_id("WP"),
        person_id: Some(person_id),
        number,
        employer: Employer { name, tax_id },
        position,
        valid_from: iso(from),
        valid_until: iso(until),
    })
}

fn parse_crossing(map: &Map<String, Value>) -> Result<Crossing, Invalid> {
    let f = Fields::new(
        map,
        &["person_id", "direction", "point", "at", "document_number"],
        "",
    )?;
    let person_id = f.code("person_id")?;
    let direction = f.one_of("direction", &DIRECTIONS)?;
    let point = f.text("point", MAX_TEXT)?;
    let point = check_one_of("point", point, &CROSSING_POINTS)?;
    let at = OffsetDateTime::parse(&f.text("at", MAX_TOKEN)?, &Rfc3339)
        .map_err(|_| unprocessable("at", "must be an RFC 3339 timestamp"))?;
    if (at - OffsetDateTime::now_utc()).whole_seconds() > CLOCK_SKEW_SECS {
        return Err(unprocessable("at", "lies in the future"));
    }
    let document_number = f.code("document_number")?;
    Ok(Crossing {
        id: new_id("CR"),
        person_id,
        direction,
        point,
        at: db::rfc3339(at),
        document_number,
    })
}

fn parse_asylum(map: &Map<String, Value>, today: Date) -> Result<AsylumCase, Invalid> {
    let f = Fields::new(
        map,
        &[
            "person_id",
            "case_number",
            "applied_on",
            "status",
            "decision_on",
        ],
        "",
    )?;
    let person_id = f.code("person_id")?;
    let case_number = f.code("case_number")?;
    let applied = f.date("applied_on")?;
    not_future(applied, today, "applied_on")?;
    let status = f
        .opt_one_of("status", &ASYLUM_STATUSES)?
        .unwrap_or_else(|| "pending".to_owned());
    let decision = f.opt_date("decision_on")?;
    match (status.as_str(), decision) {
        ("pending", None) => {}
        ("pending", Some(_)) => {
            return Err(unprocessable(
                "decision_on",
                "must be absent while the case is pending",
            ))
        }
        (_, None) => {
            return Err(unprocessable(
                "decision_on",
                "is required once the case is decided or withdrawn",
            ))
        }
        (_, Some(d)) => {
            in_order(applied, d, "decision_on", "applied_on")?;
            not_future(d, today, "decision_on")?;
        }
    }
    Ok(AsylumCase {
        id: new_id("AS"),
        person_id: Some(person_id),
        case_number,
        applied_on: iso(applied),
        status,
        decision_on: decision.map(iso),
    })
}

fn parse_ban(map: &Map<String, Value>) -> Result<EntryBan, Invalid> {
    let f = Fields::new(
        map,
        &[
            "person_id",
            "reason",
            "valid_from",
            "valid_until",
            "expulsion",
        ],
        "",
    )?;
    let person_id = f.code("person_id")?;
    let reason = f.one_of("reason", &BAN_REASONS)?;
    let from = f.date("valid_from")?;
    let until = f.date("valid_until")?;
    in_order(from, until, "valid_until", "valid_from")?;
    Ok(EntryBan {
        id: new_id("EB"),
        person_id: Some(person_id),
        reason,
        valid_from: iso(from),
        valid_until: iso(until),
        expulsion: f.bool("expulsion", false)?,
    })
}

impl NewRecord {
    /// The person the record belongs to (`None` for a new person).
    fn person_id(&self) -> Option<&str> {
        match self {
            NewRecord::Person(_) => None,
            NewRecord::Document(d) => d.person_id.as_deref(),
            NewRecord::Visa(v) => v.person_id.as_deref(),
            NewRecord::ResidencePermit(r) => r.person_id.as_deref(),
            NewRecord::WorkPermit(w) => w.person_id.as_deref(),
            NewRecord::Crossing(c) => Some(&c.person_id),
            NewRecord::AsylumCase(a) => a.person_id.as_deref(),
            NewRecord::EntryBan(b) => b.person_id.as_deref(),
        }
    }

    /// The field a unique-constraint violation is about.
    pub(crate) fn unique_field(&self) -> &'static str {
        match self {
            NewRecord::Person(_) => "personal_number",
            NewRecord::AsylumCase(_) => "case_number",
            _ => "number",
        }
    }

    /// The answer to the write: the stored record, with `person_id`.
    pub(crate) fn body(&self) -> Result<Value, Problem> {
        let v = match self {
            NewRecord::Person(p) => serde_json::to_value(p),
            NewRecord::Document(d) => serde_json::to_value(d),
            NewRecord::Visa(v) => serde_json::to_value(v),
            NewRecord::ResidencePermit(r) => serde_json::to_value(r),
            NewRecord::WorkPermit(w) => serde_json::to_value(w),
            NewRecord::Crossing(c) => serde_json::to_value(c),
            NewRecord::AsylumCase(a) => serde_json::to_value(a),
            NewRecord::EntryBan(b) => serde_json::to_value(b),
        };
        v.map_err(|_| Problem::internal())
    }

    /// Validates the record against the register: references exist and dates agree.
    pub(crate) async fn check(&self, conn: &mut AnyConnection) -> Result<(), Problem> {
        let Some(person_id) = self.person_id() else {
            return Ok(());
        };
        let birth = db::birth_date(conn, person_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| unprocessable("person_id", "no person with this id"))?;
        let birth = parse_date(&birth).ok_or_else(Problem::internal)?;
        let after_birth = |d: &str, field: &str| -> Result<(), Problem> {
            match parse_date(d) {
                Some(d) if d > birth => Ok(()),
                _ => Err(unprocessable(field, "lies before the person's birth").into()),
            }
        };
        match self {
            NewRecord::Person(_) => Ok(()),
            NewRecord::Document(d) => after_birth(&d.issued_on, "issued_on"),
            NewRecord::Visa(v) => after_birth(&v.valid_from, "valid_from"),
            NewRecord::WorkPermit(w) => after_birth(&w.valid_from, "valid_from"),
            NewRecord::AsylumCase(a) => after_birth(&a.applied_on, "applied_on"),
            NewRecord::EntryBan(b) => after_birth(&b.valid_from, "valid_from"),
            NewRecord::ResidencePermit(r) => {
                after_birth(&r.valid_from, "valid_from")?;
                // A permit is issued on a document that is valid when the permit starts.
                let docs = db::documents(conn, person_id).await.map_err(internal)?;
                if docs
                    .iter()
                    .any(|d| d.issued_on <= r.valid_from && r.valid_from <= d.valid_until)
                {
                    Ok(())
                } else {
                    Err(unprocessable(
                        "valid_from",
                        "no document of the person is valid on this day",
                    )
                    .into())
                }
            }
            NewRecord::Crossing(c) => check_crossing(conn, c).await,
        }
    }

    /// Stores the record (and, for a person, their nationalities).
    pub(crate) async fn insert(
        &self,
        conn: &mut AnyConnection,
        backend: Backend,
    ) -> Result<(), sqlx::Error> {
        match self {
            NewRecord::Person(p) => {
                let mut rows = db::PersonRows::default();
                rows.add(p);
                db::insert_persons(conn, backend, rows).await
            }
            NewRecord::Document(d) => {
                let pid = d.person_id.as_deref().unwrap_or_default();
                let rows = db::one_row(&db::document_cells(pid, d));
                db::insert(conn, backend, &db::DOCUMENTS, rows).await
            }
            NewRecord::Visa(v) => {
                let pid = v.person_id.as_deref().unwrap_or_default();
                let rows = db::one_row(&db::visa_cells(pid, v));
                db::insert(conn, backend, &db::VISAS, rows).await
            }
            NewRecord::ResidencePermit(r) => {
                let pid = r.person_id.as_deref().unwrap_or_default();
                let rows = db::one_row(&db::permit_cells(pid, r));
                db::insert(conn, backend, &db::PERMITS, rows).await
            }
            NewRecord::WorkPermit(w) => {
                let pid = w.person_id.as_deref().unwrap_or_default();
                let rows = db::one_row(&db::work_cells(pid, w));
                db::insert(conn, backend, &db::WORK_PERMITS, rows).await
            }
            NewRecord::Crossing(c) => {
                let rows = db::one_row(&db::crossing_cells(c));
                db::insert(conn, backend, &db::CROSSINGS, rows).await
            }
            NewRecord::AsylumCase(a) => {
                let pid = a.person_id.as_deref().unwrap_or_default();
                let rows = db::one_row(&db::asylum_cells(pid, a));
                db::insert(conn, backend, &db::ASYLUM, rows).await
            }
            NewRecord::EntryBan(b) => {
                let pid = b.person_id.as_deref().unwrap_or_default();
                let rows = db::one_row(&db::ban_cells(pid, b));
                db::insert(conn, backend, &db::BANS, rows).await
            }
        }
    }
}

/// A crossing uses one of the person's documents, valid that day; an entry needs no ban in
/// force, and after an expulsion a visa issued after it.
async fn check_crossing(conn: &mut AnyConnection, c: &Crossing) -> Result<(), Problem> {
    let day = c.at.get(..10).unwrap_or_default();
    let docs = db::documents(conn, &c.person_id).await.map_err(internal)?;
    let doc = docs
        .iter()
        .find(|d| d.number == c.document_number)
        .ok_or_else(|| unprocessable("document_number", "not a document of this person"))?;
    if day < doc.issued_on.as_str() || day > doc.valid_until.as_str() {
        return Err(unprocessable(
            "document_number",
            "the document is not valid on the day of the crossing",
        )
        .into());
    }
    if c.direction != "entry" {
        return Ok(());
    }
    let bans = db::entry_bans(conn, &c.person_id).await.map_err(internal)?;
    if let Some(b) = bans
        .iter()
        .find(|b| b.valid_from.as_str() <= day && day <= b.valid_until.as_str())
    {
        return Err(unprocessable(
            "person_id",
            &format!("an entry ban is in force until {}", b.valid_until),
        )
        .into());
    }
    if let Some(expelled) = bans
        .iter()
        .filter(|b| b.expulsion && b.valid_from.as_str() <= day)
        .map(|b| b.valid_from.clone())
        .max()
    {
        let visas = db::visas(conn, &c.person_id).await.map_err(internal)?;
        let covered = visas.iter().any(|v| {
            v.valid_from >= expelled
                && v.valid_from.as_str() <= day
                && day <= v.valid_until.as_str()
        });
        if !covered {
            return Err(unprocessable(
                "person_id",
                "expelled earlier: an entry needs a visa issued after the expulsion",
            )
            .into());
        }
    }
    Ok(())
}
