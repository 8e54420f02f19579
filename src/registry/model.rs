//! The register's records as the API shows them, and the closed vocabularies
//! (crossing points, visa categories, permit types…) that both the synthetic
//! data and the write endpoints draw from.
//!
//! Field names here are part of the contract: the gateway's policy files name
//! them as field paths (`names.surname`, `visas.category`, …).

use serde::Serialize;

/// One foreigner with every record the register holds about them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Person {
    /// Register id, `RF-` and seven digits.
    pub id: String,
    /// Georgian personal number (11 digits), assigned to residents only.
    pub personal_number: Option<String>,
    /// Names in Latin and Georgian script.
    pub names: Names,
    /// `F`, `M` or `X`.
    pub sex: String,
    /// ISO 8601 date.
    pub birth_date: String,
    /// City and ISO 3166 alpha-2 country of birth.
    pub birth_place: BirthPlace,
    /// ISO 3166 alpha-2 codes; empty for stateless persons.
    pub nationalities: Vec<String>,
    /// Whether Georgia recognised the person as stateless.
    pub stateless: bool,
    /// Passports and travel documents.
    pub documents: Vec<Document>,
    /// Georgian visas.
    pub visas: Vec<Visa>,
    /// Georgian residence permits.
    pub residence_permits: Vec<ResidencePermit>,
    /// Work permits.
    pub work_permits: Vec<WorkPermit>,
    /// Border crossings, oldest first.
    pub crossings: Vec<Crossing>,
    /// International protection (asylum) cases.
    pub asylum_cases: Vec<AsylumCase>,
    /// Entry bans, with whether the person was expelled.
    pub entry_bans: Vec<EntryBan>,
}

/// A person's names; `_ka` fields are in Georgian (Mkhedruli) script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Names {
    /// Surname in Latin script, as in the passport.
    pub surname: String,
    /// Given names in Latin script.
    pub given_names: String,
    /// Surname transliterated into Georgian script.
    pub surname_ka: String,
    /// Given names transliterated into Georgian script.
    pub given_names_ka: String,
}

/// Where a person was born.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BirthPlace {
    /// City name in Latin script.
    pub city: String,
    /// ISO 3166 alpha-2 code.
    pub country: String,
}

/// A passport or travel document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Document {
    /// Record id.
    pub id: String,
    /// The person it belongs to; shown only where a document stands alone (the POST answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub person_id: Option<String>,
    /// `passport`, `travel_document` or `stateless_document`.
    pub kind: String,
    /// Document number.
    pub number: String,
    /// ISO 3166 alpha-2 code of the issuing state.
    pub issuing_state: String,
    /// Date of issue.
    pub issued_on: String,
    /// Last day of validity.
    pub valid_until: String,
}

/// A Georgian visa.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Visa {
    /// Record id.
    pub id: String,
    /// The person it belongs to; shown only where a visa stands alone (the POST answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub person_id: Option<String>,
    /// Visa sticker number.
    pub number: String,
    /// Category code, one of [`VISA_CATEGORIES`].
    pub category: String,
    /// The consulate or portal that issued it.
    pub issuing_post: String,
    /// First day of validity.
    pub valid_from: String,
    /// Last day of validity.
    pub valid_until: String,
    /// `single`, `double` or `multiple`.
    pub entries: String,
}

/// A Georgian residence permit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResidencePermit {
    /// Record id.
    pub id: String,
    /// The person it belongs to; shown only in the POST answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub person_id: Option<String>,
    /// Permit card number.
    pub number: String,
    /// Permit type, one of [`RESIDENCE_PERMIT_TYPES`].
    #[serde(rename = "type")]
    pub permit_type: String,
    /// `valid`, `expired` or `revoked`.
    pub status: String,
    /// First day of validity.
    pub valid_from: String,
    /// Last day of validity.
    pub valid_until: String,
}

/// A work permit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkPermit {
    /// Record id.
    pub id: String,
    /// The person it belongs to; shown only in the POST answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub person_id: Option<String>,
    /// Permit number.
    pub number: String,
    /// The Georgian employer.
    pub employer: Employer,
    /// Job title.
    pub position: String,
    /// First day of validity.
    pub valid_from: String,
    /// Last day of validity.
    pub valid_until: String,
}

/// An employer named in a work permit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Employer {
    /// Company name.
    pub name: String,
    /// Georgian company identification number (9 digits).
    pub tax_id: String,
}

/// One passage of a border crossing point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Crossing {
    /// Record id.
    pub id: String,
    /// The person who crossed.
    pub person_id: String,
    /// `entry` or `exit`.
    pub direction: String,
    /// Crossing point, one of [`CROSSING_POINTS`].
    pub point: String,
    /// RFC 3339 UTC timestamp.
    pub at: String,
    /// Number of the document shown.
    pub document_number: String,
}

/// An application for international protection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AsylumCase {
    /// Record id.
    pub id: String,
    /// The person it belongs to; shown only in the POST answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub person_id: Option<String>,
    /// Case file number.
    pub case_number: String,
    /// Date of application.
    pub applied_on: String,
    /// `pending`, `granted`, `refused` or `withdrawn`.
    pub status: String,
    /// Date of decision or withdrawal; `null` while pending.
    pub decision_on: Option<String>,
}

/// A ban on entering Georgia.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryBan {
    /// Record id.
    pub id: String,
    /// The person it concerns; shown only in the POST answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub person_id: Option<String>,
    /// `overstay`, `criminal_conviction`, `public_order` or `forged_document`.
    pub reason: String,
    /// First day of the ban.
    pub valid_from: String,
    /// Last day of the ban.
    pub valid_until: String,
    /// Whether the person was expelled when the ban was imposed.
    pub expulsion: bool,
}

/// The sub-resources of a person, as named in `/persons/{id}/{kind}`.
pub const RECORD_KINDS: [&str; 7] = [
    "documents",
    "visas",
    "residence_permits",
    "work_permits",
    "crossings",
    "asylum_cases",
    "entry_bans",
];

/// Georgia's border crossing points the register knows.
pub const CROSSING_POINTS: [&str; 10] = [
    "Tbilisi International Airport",
    "Batumi International Airport",
    "Kutaisi International Airport",
    "Sarpi",
    "Larsi (Kazbegi)",
    "Red Bridge",
    "Sadakhlo",
    "Vale",
    "Poti sea port",
    "Batumi sea port",
];

/// Georgian visa categories: code and purpose (A diplomatic, B/C short stay, D immigration).
pub const VISA_CATEGORIES: [(&str, &str); 14] = [
    ("A1", "diplomatic"),
    ("A2", "official"),
    ("B1", "international organisation"),
    ("C1", "tourism"),
    ("C2", "medical treatment"),
    ("C3", "business"),
    ("C4", "conference, culture or sport"),
    ("C5", "visiting relatives"),
    ("D1", "work"),
    ("D2", "business activity"),
    ("D3", "study"),
    ("D4", "family reunification"),
    ("D5", "humanitarian"),
    ("D6", "investment"),
];

/// Residence permit types.
pub const RESIDENCE_PERMIT_TYPES: [&str; 8] = [
    "work",
    "study",
    "family_reunification",
    "investment",
    "property",
    "permanent",
    "humanitarian",
    "stateless",
];

/// Identity document kinds.
pub const DOCUMENT_KINDS: [&str; 3] = ["passport", "travel_document", "stateless_document"];

/// Residence permit statuses.
pub const PERMIT_STATUSES: [&str; 3] = ["valid", "expired", "revoked"];

/// Asylum case statuses; every status but `pending` carries a decision date.
pub const ASYLUM_STATUSES: [&str; 4] = ["pending", "granted", "refused", "withdrawn"];

/// Reason categories of entry bans.
pub const BAN_REASONS: [&str; 4] = [
    "overstay",
    "criminal_conviction",
    "public_order",
    "forged_document",
];

/// Sexes as recorded in travel documents (ICAO 9303: `X` unspecified).
pub const SEXES: [&str; 3] = ["F", "M", "X"];

/// ISO 3166-1 alpha-2 codes of every assigned country and territory.
pub const COUNTRY_CODES: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ \
BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ \
CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ \
EC EE EG EH ER ES ET FI FJ FK FM FO FR \
GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU \
ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ \
LA LB LC LI LK LR LS LT LU LV LY \
MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ \
NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA \
RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ \
TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ \
VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

/// Whether `code` is an ISO 3166-1 alpha-2 code.
pub fn is_country(code: &str) -> bool {
    code.len() == 2 && COUNTRY_CODES.split(' ').any(|c| c == code)
}

/// Visa entry counts.
pub const VISA_ENTRIES: [&str; 3] = ["single", "double", "multiple"];

/// Crossing directions.
pub const DIRECTIONS: [&str; 2] = ["entry", "exit"];

/// Whether `code` is a known visa category.
pub fn is_visa_category(code: &str) -> bool {
    VISA_CATEGORIES.iter().any(|(c, _)| *c == code)
}
