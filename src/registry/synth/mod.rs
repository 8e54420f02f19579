//! Synthetic foreigners: plausible, internally consistent and deterministic.
//!
//! Each person is generated from `(seed, index, anchor)` alone, with its own
//! PRNG stream, so person 1 is the same whether 10 or 10,000 are seeded. The
//! anchor is the day the register is seeded: every date is an offset from it,
//! so a fresh register always looks current (valid permits, recent crossings)
//! while names, ids and numbers depend on the seed only.
//!
//! Consistency the generator keeps: documents are issued after birth; a visa
//! lies inside the validity of the document it was put in; crossings happen
//! inside a visa, permit or visa-free window *and* inside the validity of the
//! document shown, alternate entry/exit and are in the past; asylum decisions
//! follow applications; an entry ban starts after the last crossing (an
//! expulsion adds the exit).
//!
//! Numbers (documents, visas, permits, personal numbers) come from an affine
//! bijection of a per-person sequence, so they are unique without a lookup.
//!
//! [`person`] reads as the steps in the order they draw from the person's
//! stream — identity, documents, visas, residence and work permits, windows
//! of stay, crossings, asylum, entry bans — each a function below; changing
//! the order changes every generated register. The countries drawn from are
//! data in [`countries`].

use time::{Date, Duration, Month};

pub(crate) mod copy;
mod countries;

use super::dates::{iso, parse_date};
use super::model::{
    AsylumCase, BirthPlace, Crossing, Document, Employer, EntryBan, Names, Person, ResidencePermit,
    Visa, WorkPermit,
};
use super::names::to_georgian;
use countries::{Country, COUNTRIES, COUNTRY_WEIGHTS, EMPLOYERS, POSITIONS};

/// splitmix64: tiny, fast, and good enough for test data and load generation (not for secrets).
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator whose sequence depends only on `seed`.
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A generator for person `index` under `seed`; streams of different persons do not overlap in practice.
    pub(crate) fn for_person(seed: u64, index: u64) -> Rng {
        let mut r = Rng(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`; `lo` when the range is empty.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64) / ((1u64 << 53) as f64) < p
    }

    /// One element of a non-empty slice.
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }

    /// One element of a non-empty slice, by weight.
    fn weighted<'a, T>(&mut self, xs: &'a [(T, u32)]) -> &'a T {
        let total: u64 = xs.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut n = self.below(total);
        for (x, w) in xs {
            if n < u64::from(*w) {
                return x;
            }
            n -= u64::from(*w);
        }
        &xs[xs.len() - 1].0
    }
}

/// Passport validity in years by holder age (adult / minor).
const ADULT_PASSPORT_YEARS: i32 = 10;
const MINOR_PASSPORT_YEARS: i32 = 5;

/// Generates person number `index` (1-based) for `seed`, with dates relative to `anchor` (the seeding day).
pub(crate) fn person(seed: u64, index: u64, anchor: Date) -> Person {
    let mut r = Rng::for_person(seed, index);
    let id = format!("RF-{index:07}");
    let country = r.weighted(&COUNTRY_WEIGHTS);
    let country = &COUNTRIES[*country];
    let stateless = r.chance(0.01);

    let mut nationalities = Vec::new();
    if !stateless {
        nationalities.push(country.code.to_owned());
        if r.chance(0.03) {
            let other = r.pick(COUNTRIES).code;
            if other != country.code {
                nationalities.push(other.to_owned());
            }
        }
    }

    let ctx = Ctx {
        index,
        anchor,
        country,
        stateless,
    };
    let (sex, names, birth, minor) = identity(&mut r, &ctx);
    let mut seq = Seq::new(seed, index);
    let (mut documents, current_doc) =
        documents(&mut r, &mut seq, &ctx, birth, minor, &nationalities);
    let mut windows: Vec<Window> = Vec::new();
    let visas = visas(&mut r, &mut seq, &ctx, &documents, &mut windows);
    let (residence_permits, permit_windows) = residence_permits(
        &mut r,
        &mut seq,
        &ctx,
        &documents,
        current_doc,
        &mut windows,
    );
    let personal_number = if !residence_permits.is_empty() || r.chance(0.07) {
        Some(seq.personal_number(r.pick::<&str>(&["01", "35", "60", "61", "62"])))
    } else {
        None
    };

    let work_permits = work_permits(&mut r, &mut seq, &ctx, &permit_windows, &visas);
    let last_day = anchor - Duration::days(1);
    stay_windows(&ctx, &documents, &mut windows, last_day);
    let mut crossings = crossings(&mut r, &ctx, &id, &documents, &windows);
    let asylum_cases = asylum(&mut r, &mut seq, &ctx, &crossings, &mut documents, last_day);
    let entry_bans = entry_bans(&mut r, &ctx, &id, &documents, &mut crossings, last_day);

    documents.sort_by_key(|d| d.issued);
    let documents = documents
        .into_iter()
        .enumerate()
        .map(|(i, d)| Document {
            id: format!("DO-{index:07}-{}", i + 1),
            person_id: None,
            kind: d.kind.to_owned(),
            number: d.number,
            issuing_state: d.state,
            issued_on: iso(d.issued),
            valid_until: iso(d.until),
        })
        .collect();

    let birth_country = country.code.to_owned();
    Person {
        id,
        personal_number,
        names,
        sex: sex.to_owned(),
        birth_date: iso(birth),
        birth_place: BirthPlace {
            city: (*r.pick(country.cities)).to_owned(),
            country: birth_country,
        },
        nationalities,
        stateless,
        documents,
        visas,
        residence_permits,
        work_permits,
        crossings,
        asylum_cases,
        entry_bans,
    }
}

/// What every step of [`person`] knows about the person being generated.
#[derive(Clone, Copy)]
struct Ctx {
    /// The person's number (1-based), in every record id.
    index: u64,
    /// The seeding day every date is relative to.
    anchor: Date,
    /// The country the person comes from.
    country: &'static Country,
    /// Without any nationality.
    stateless: bool,
}

/// Sex, names and birth date, as the person's country gives them.
fn identity(r: &mut Rng, ctx: &Ctx) -> (&'static str, Names, Date, bool) {
    let Ctx {
        anchor, country, ..
    } = *ctx;
    let sex = match r.below(1000) {
        0..550 => "M",
        550..995 => "F",
        _ => "X",
    };
    let given = match sex {
        "M" => *r.pick(country.male),
        "F" => *r.pick(country.female),
        _ if r.chance(0.5) => *r.pick(country.male),
        _ => *r.pick(country.female),
    };
    let mut surname = (*r.pick(country.surnames)).to_owned();
    if country.gendered && sex == "F" {
        surname = feminine(&surname);
    }

    // Mostly working-age adults; some children travelling with families.
    let age_years = match r.below(100) {
        0..10 => r.range(0, 17),
        10..90 => r.range(18, 60),
        _ => r.range(61, 80),
    };
    let birth = anchor - Duration::days(age_years * 365 + r.range(120, 364));
    let minor = age_years < 18;

    let names = Names {
        surname_ka: to_georgian(&surname),
        given_names_ka: to_georgian(given),
        surname,
        given_names: given.to_owned(),
    };
    (sex, names, birth, minor)
}

/// The person's documents, oldest first; also the index of the current one.
fn documents(
    r: &mut Rng,
    seq: &mut Seq,
    ctx: &Ctx,
    birth: Date,
    minor: bool,
    nationalities: &[String],
) -> (Vec<Doc>, usize) {
    let Ctx {
        anchor,
        country,
        stateless,
        ..
    } = *ctx;
    let mut documents: Vec<Doc> = Vec::new();
    let years = if minor {
        MINOR_PASSPORT_YEARS
    } else {
        ADULT_PASSPORT_YEARS
    };
    let (kind, state, prefix) = if stateless {
        ("stateless_document", "GE", "SD")
    } else {
        ("passport", country.code, country.passport_prefix)
    };
    let earliest = later(
        birth + Duration::days(30),
        anchor - Duration::days(i64::from(years) * 365 - 30),
    );
    let issued = day_between(r, earliest, anchor - Duration::days(20));
    let current = Doc {
        kind,
        state: state.to_owned(),
        number: seq.doc_number(prefix),
        issued,
        until: add_years(issued, years) - Duration::days(1),
    };
    if nationalities.len() == 2 && r.chance(0.6) {
        // A dual national carries the second state's passport as well, valid at the same time.
        let other = COUNTRIES
            .iter()
            .find(|c| c.code == nationalities[1])
            .unwrap_or(country);
        let issued2 = day_between(r, earliest, anchor - Duration::days(20));
        documents.push(Doc {
            kind: "passport",
            state: other.code.to_owned(),
            number: seq.doc_number(other.passport_prefix),
            issued: issued2,
            until: add_years(issued2, years) - Duration::days(1),
        });
    } else if !stateless && r.chance(0.3) {
        // The passport this one replaced, expired now.
        let prev_until =
            (current.issued + Duration::days(r.range(-90, 30))).min(anchor - Duration::days(1));
        let prev_issued = add_years(prev_until + Duration::days(1), -years);
        if prev_issued > birth + Duration::days(30) {
            documents.push(Doc {
                kind: "passport",
                state: country.code.to_owned(),
                number: seq.doc_number(prefix),
                issued: prev_issued,
                until: prev_until,
            });
        }
    }
    documents.push(current);
    documents.sort_by_key(|d| d.issued);
    let current_doc = documents.len() - 1;
    (documents, current_doc)
}

/// Visas, each inside the validity of the passport it was put in; each adds its window of stay.
fn visas(
    r: &mut Rng,
    seq: &mut Seq,
    ctx: &Ctx,
    documents: &[Doc],
    windows: &mut Vec<Window>,
) -> Vec<Visa> {
    let Ctx {
        index,
        anchor,
        country,
        ..
    } = *ctx;
    // Visas, each inside the validity of the passport it was put in.
    let mut visas = Vec::new();
    let wants_visa = if country.visa_free {
        r.chance(0.55)
    } else {
        r.chance(0.9)
    };
    if wants_visa {
        let n = if r.chance(0.25) { 2 } else { 1 };
        for _ in 0..n {
            let doc_idx = r.below(documents.len() as u64) as usize;
            let doc = &documents[doc_idx];
            let category = if country.visa_free {
                *r.weighted(&[("D1", 35), ("D3", 20), ("D4", 20), ("D6", 10), ("C3", 15)])
            } else {
                *r.weighted(&[
                    ("C1", 50),
                    ("C3", 20),
                    ("D1", 10),
                    ("D3", 10),
                    ("D4", 5),
                    ("D6", 5),
                ])
            };
            let long = category.starts_with('D');
            let days = if long {
                r.range(90, 365)
            } else {
                r.range(30, 90)
            };
            let from_lo = later(
                doc.issued + Duration::days(1),
                anchor - Duration::days(5 * 365),
            );
            let from_hi = (doc.until - Duration::days(days)).min(anchor - Duration::days(1));
            if from_hi < from_lo {
                continue;
            }
            let from = day_between(r, from_lo, from_hi);
            let until = from + Duration::days(days);
            let entries = if long {
                "multiple"
            } else {
                *r.weighted(&[("single", 50), ("double", 20), ("multiple", 30)])
            };
            windows.push(Window {
                from,
                until,
                max_stay: if long { 365 } else { 90 },
                doc: doc_idx,
            });
            visas.push(Visa {
                id: format!("VI-{index:07}-{}", visas.len() + 1),
                person_id: None,
                number: seq.visa_number(),
                category: category.to_owned(),
                issuing_post: (*r.pick(country.posts)).to_owned(),
                valid_from: iso(from),
                valid_until: iso(until),
                entries: entries.to_owned(),
            });
        }
    }
    visas.sort_by(|a, b| a.valid_from.cmp(&b.valid_from));
    visas
}

/// Residence permits (renewed on expiry, sometimes); each adds its window of stay.
fn residence_permits(
    r: &mut Rng,
    seq: &mut Seq,
    ctx: &Ctx,
    documents: &[Doc],
    current_doc: usize,
    windows: &mut Vec<Window>,
) -> (Vec<ResidencePermit>, Vec<(Date, Date, &'static str)>) {
    let Ctx {
        index,
        anchor,
        stateless,
        ..
    } = *ctx;
    // Residence permits; holders get a personal number.
    let mut residence_permits = Vec::new();
    let mut permit_windows: Vec<(Date, Date, &'static str)> = Vec::new();
    let wants_permit = r.chance(if stateless { 0.9 } else { 0.34 });
    if wants_permit {
        let ptype = if stateless {
            "stateless"
        } else {
            *r.weighted(&[
                ("work", 30),
                ("study", 18),
                ("family_reunification", 20),
                ("investment", 8),
                ("property", 5),
                ("permanent", 10),
                ("humanitarian", 2),
            ])
        };
        let years = if ptype == "permanent" {
            10
        } else {
            r.range(1, 6) as i32
        };
        let doc = &documents[current_doc];
        let from = day_between(
            r,
            later(
                doc.issued + Duration::days(1),
                anchor - Duration::days(8 * 365),
            ),
            anchor - Duration::days(30),
        );
        let until = add_years(from, years) - Duration::days(1);
        permit_windows.push((from, until, ptype));
        if until < anchor && r.chance(0.5) {
            // Renewed on expiry.
            let from2 = until + Duration::days(1);
            permit_windows.push((from2, add_years(from2, years) - Duration::days(1), ptype));
        }
        for (from, until, ptype) in &permit_windows {
            let status = if r.chance(0.04) {
                "revoked"
            } else if *until < anchor {
                "expired"
            } else {
                "valid"
            };
            windows.push(Window {
                from: *from,
                until: (*until).min(doc.until),
                max_stay: 365,
                doc: current_doc,
            });
            residence_permits.push(ResidencePermit {
                id: format!("RP-{index:07}-{}", residence_permits.len() + 1),
                person_id: None,
                number: seq.permit_number("RP"),
                permit_type: (*ptype).to_owned(),
                status: status.to_owned(),
                valid_from: iso(*from),
                valid_until: iso(*until),
            });
        }
    }
    (residence_permits, permit_windows)
}

/// A work permit after a work residence permit or a D1 visa (rarely, on its own).
fn work_permits(
    r: &mut Rng,
    seq: &mut Seq,
    ctx: &Ctx,
    permit_windows: &[(Date, Date, &str)],
    visas: &[Visa],
) -> Vec<WorkPermit> {
    let Ctx { index, anchor, .. } = *ctx;
    // Work permits follow a work residence permit or a D1 visa.
    let mut work_permits = Vec::new();
    let work_window = permit_windows
        .iter()
        .find(|(_, _, t)| *t == "work")
        .map(|(f, u, _)| (*f, *u))
        .filter(|_| r.chance(0.9))
        .or_else(|| {
            visas
                .iter()
                .find(|v| v.category == "D1")
                .and_then(|v| parse_date(&v.valid_from))
                .filter(|_| r.chance(0.25))
                .map(|f| (f, add_years(f, 1) - Duration::days(1)))
        });
    let work_window = work_window.or_else(|| {
        if r.chance(0.02) {
            let from = anchor - Duration::days(r.range(30, 900));
            Some((from, add_years(from, 1) - Duration::days(1)))
        } else {
            None
        }
    });
    if let Some((from, until)) = work_window {
        let (name, tax_id) = *r.pick(EMPLOYERS);
        work_permits.push(WorkPermit {
            id: format!("WP-{index:07}-1"),
            person_id: None,
            number: seq.permit_number("WP"),
            employer: Employer {
                name: name.to_owned(),
                tax_id: tax_id.to_owned(),
            },
            position: (*r.pick(POSITIONS)).to_owned(),
            valid_from: iso(from),
            valid_until: iso(until),
        });
    }
    work_permits
}

/// Adds the visa-free windows and trims every window to the past and to its document.
fn stay_windows(ctx: &Ctx, documents: &[Doc], windows: &mut Vec<Window>, last_day: Date) {
    let Ctx {
        anchor,
        country,
        stateless,
        ..
    } = *ctx;
    // Visa-free stays: any valid passport of a visa-free state (or Georgia's own documents).
    if country.visa_free || stateless {
        for (i, d) in documents.iter().enumerate() {
            windows.push(Window {
                from: later(d.issued, anchor - Duration::days(6 * 365)),
                until: d.until,
                max_stay: 365,
                doc: i,
            });
        }
    }
    windows.retain_mut(|w| {
        w.until = w.until.min(last_day).min(documents[w.doc].until);
        w.from = later(w.from, documents[w.doc].issued);
        w.until > w.from
    });
}

/// Crossings: trips inside the windows of stay, entries and exits alternating.
fn crossings(
    r: &mut Rng,
    ctx: &Ctx,
    id: &str,
    documents: &[Doc],
    windows: &[Window],
) -> Vec<Crossing> {
    let Ctx { country, .. } = *ctx;
    let mut crossings = Vec::new();
    let mut points: Vec<(&str, u32)> = vec![
        ("Tbilisi International Airport", 6),
        ("Kutaisi International Airport", 2),
        ("Batumi International Airport", 1),
    ];
    if let Some(p) = country.land_point {
        points.push((p, 7));
    }
    if !windows.is_empty() && r.chance(0.92) {
        let k = r.range(1, 8) as usize;
        let mut trips: Vec<(Date, Date, usize)> = Vec::new();
        for _ in 0..k.div_ceil(2) {
            let w = r.pick(windows);
            let entry = day_between(r, w.from, w.until - Duration::days(1));
            let max_exit = (entry + Duration::days(w.max_stay)).min(w.until);
            let exit = day_between(r, entry, max_exit);
            trips.push((entry, exit, w.doc));
        }
        trips.sort_by_key(|t| t.0);
        let mut kept: Vec<(Date, Date, usize)> = Vec::new();
        for t in trips {
            if kept.last().is_none_or(|p| t.0 > p.1) {
                kept.push(t);
            }
        }
        let n_kept = kept.len();
        for (i, (entry, exit, doc)) in kept.into_iter().enumerate() {
            let number = documents[doc].number.clone();
            let secs = r.range(0, 43_199);
            crossings.push(crossing(
                id,
                crossings.len(),
                "entry",
                r.weighted::<&str>(&points),
                entry,
                secs,
                &number,
            ));
            // An odd count leaves the person in Georgia after the last entry.
            let last_open = i + 1 == n_kept && k % 2 == 1;
            if !last_open {
                let secs = 43_200 + r.range(0, 43_199);
                crossings.push(crossing(
                    id,
                    crossings.len(),
                    "exit",
                    r.weighted::<&str>(&points),
                    exit,
                    secs,
                    &number,
                ));
            }
        }
    }
    crossings
}

/// Asylum: applied after arriving, decided (or withdrawn) later; a recognised refugee gets a travel document.
fn asylum(
    r: &mut Rng,
    seq: &mut Seq,
    ctx: &Ctx,
    crossings: &[Crossing],
    documents: &mut Vec<Doc>,
    last_day: Date,
) -> Vec<AsylumCase> {
    let Ctx {
        index,
        anchor,
        country,
        stateless,
        ..
    } = *ctx;
    // Asylum: applied after arriving; decided (or withdrawn) later, before today.
    let mut asylum_cases = Vec::new();
    let asylum_p = if stateless {
        0.3
    } else if country.asylum_prone {
        0.06
    } else {
        0.01
    };
    if r.chance(asylum_p) {
        let first_entry = crossings
            .first()
            .and_then(|c| c.at.get(..10))
            .and_then(parse_date);
        let applied = match first_entry {
            Some(d) => (d + Duration::days(r.range(1, 60))).min(last_day),
            None => anchor - Duration::days(r.range(30, 1500)),
        };
        let decided = applied + Duration::days(r.range(60, 400));
        let (status, decision) = if decided >= anchor {
            ("pending", None)
        } else {
            let s = *r.weighted(&[("granted", 30), ("refused", 55), ("withdrawn", 15)]);
            (s, Some(decided))
        };
        if status == "granted" {
            // Recognised refugees get a Georgian travel document (1951 Convention).
            let issued = decided + Duration::days(r.range(10, 60));
            if issued < anchor {
                documents.push(Doc {
                    kind: "travel_document",
                    state: "GE".to_owned(),
                    number: seq.doc_number("TD"),
                    issued,
                    until: add_years(issued, 2) - Duration::days(1),
                });
            }
        }
        asylum_cases.push(AsylumCase {
            id: format!("AS-{index:07}-1"),
            person_id: None,
            case_number: format!("AS-{}-{index:07}", applied.year()),
            applied_on: iso(applied),
            status: status.to_owned(),
            decision_on: decision.map(iso),
        });
    }
    asylum_cases
}

/// Entry bans start after the last crossing; a person still in Georgia is expelled (an exit is added).
fn entry_bans(
    r: &mut Rng,
    ctx: &Ctx,
    id: &str,
    documents: &[Doc],
    crossings: &mut Vec<Crossing>,
    last_day: Date,
) -> Vec<EntryBan> {
    let Ctx { index, anchor, .. } = *ctx;
    // Entry bans start after the last crossing; a person still in Georgia is expelled.
    let mut entry_bans = Vec::new();
    if r.chance(0.02) {
        let reason = *r.weighted(&[
            ("overstay", 50),
            ("public_order", 20),
            ("criminal_conviction", 15),
            ("forged_document", 15),
        ]);
        let last = crossings.last().map(|c| {
            (
                c.direction == "entry",
                c.at.clone(),
                c.document_number.clone(),
            )
        });
        let (from, expulsion) = match last {
            Some((true, at, number)) => {
                let entered = at.get(..10).and_then(parse_date).unwrap_or(last_day);
                // Expelled while the document shown on entry was still valid.
                let doc_until = documents
                    .iter()
                    .find(|d| d.number == number)
                    .map_or(last_day, |d| d.until);
                let day = day_between(r, entered, doc_until.min(last_day));
                let secs = if day == entered {
                    43_200 + r.range(0, 43_199)
                } else {
                    r.range(0, 86_399)
                };
                crossings.push(crossing(
                    id,
                    crossings.len(),
                    "exit",
                    "Tbilisi International Airport",
                    day,
                    secs,
                    &number,
                ));
                (day, true)
            }
            Some((false, at, _)) => {
                let left = at.get(..10).and_then(parse_date).unwrap_or(last_day);
                (
                    day_between(r, left, (left + Duration::days(30)).min(last_day)),
                    false,
                )
            }
            None => (anchor - Duration::days(r.range(30, 1000)), false),
        };
        entry_bans.push(EntryBan {
            id: format!("EB-{index:07}-1"),
            person_id: None,
            reason: reason.to_owned(),
            valid_from: iso(from),
            valid_until: iso(add_years(from, r.range(1, 5) as i32)),
            expulsion,
        });
    }
    entry_bans
}

/// A document while the person is being built (dates still typed).
struct Doc {
    kind: &'static str,
    state: String,
    number: String,
    issued: Date,
    until: Date,
}

/// A span in which the person may be in Georgia, and the document they show.
struct Window {
    from: Date,
    until: Date,
    max_stay: i64,
    doc: usize,
}

/// Unique numbers for one person: an affine bijection of `index * 16 + n` keeps them distinct across persons.
struct Seq {
    index: u64,
    offset: u64,
    n: u64,
}

impl Seq {
    fn new(seed: u64, index: u64) -> Seq {
        Seq {
            index,
            offset: seed % 100_000_000,
            n: 0,
        }
    }

    fn next(&mut self, modulus: u64) -> u64 {
        let k = self.index * 16 + self.n;
        self.n += 1;
        // 48271 is coprime with powers of ten, so this is a bijection below the modulus.
        (k.wrapping_mul(48_271).wrapping_add(self.offset)) % modulus
    }

    fn doc_number(&mut self, prefix: &str) -> String {
        format!("{prefix}{:08}", self.next(100_000_000))
    }

    fn visa_number(&mut self) -> String {
        format!("GE{:08}", self.next(100_000_000))
    }

    fn permit_number(&mut self, prefix: &str) -> String {
        format!("{prefix}{:09}", self.next(1_000_000_000))
    }

    fn personal_number(&mut self, office: &str) -> String {
        let v = (self.index.wrapping_mul(7_919).wrapping_add(self.offset)) % 1_000_000_000;
        format!("{office}{v:09}")
    }
}

fn crossing(
    person_id: &str,
    n: usize,
    direction: &str,
    point: &str,
    day: Date,
    secs: i64,
    document_number: &str,
) -> Crossing {
    Crossing {
        id: format!("CR-{}-{}", person_id.trim_start_matches("RF-"), n + 1),
        person_id: person_id.to_owned(),
        direction: direction.to_owned(),
        point: point.to_owned(),
        at: format!(
            "{}T{:02}:{:02}:{:02}Z",
            iso(day),
            secs / 3600,
            (secs / 60) % 60,
            secs % 60
        ),
        document_number: document_number.to_owned(),
    }
}

fn later(a: Date, b: Date) -> Date {
    a.max(b)
}

/// A day in `lo..=hi` (`lo` if the span is empty).
fn day_between(r: &mut Rng, lo: Date, hi: Date) -> Date {
    lo + Duration::days(r.range(0, (hi - lo).whole_days()))
}

/// The same calendar day `years` later (28 February for 29 February in other years).
pub(crate) fn add_years(d: Date, years: i32) -> Date {
    let y = d.year() + years;
    Date::from_calendar_date(y, d.month(), d.day())
        .or_else(|_| Date::from_calendar_date(y, Month::February, 28))
        .unwrap_or(d)
}

/// `-ov`/`-ev`/`-in` surnames take `-a` for women; `-sky` becomes `-skaya`.
fn feminine(surname: &str) -> String {
    if let Some(stem) = surname.strip_suffix("sky") {
        format!("{stem}skaya")
    } else if ["ov", "ev", "in"].iter().any(|s| surname.ends_with(s)) {
        format!("{surname}a")
    } else {
        surname.to_owned()
    }
}
