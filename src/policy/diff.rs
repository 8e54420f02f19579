//! What access each agency gains or loses between two policy sets, in words
//! a reviewer can approve (`karibche policy diff OLD NEW`).
//!
//! Access is compared per (provider, service, operation, purpose) from the
//! enforced grants: a new combination is gained, a vanished one is lost, and
//! for one present in both the fields seen and the conditions (consent, case
//! reference, validity, restricted handling) are compared. Shadow grants are
//! listed apart, as they change nothing until switched on.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::model::{Agency, Grant, Policy};
use crate::policy::FieldSet;

/// One access an agency holds, with what it releases and under which conditions.
#[derive(Default, PartialEq, Eq)]
struct Terms {
    fields: BTreeSet<String>,
    consent: bool,
    case: bool,
    restricted: bool,
    validity: BTreeSet<String>,
}

type Key = (String, String, String, String);

fn validity(g: &Grant) -> Option<String> {
    match (g.valid_from, g.valid_until) {
        (None, None) => None,
        (from, until) => Some(format!(
            "from {} to {}",
            from.map_or("-".to_owned(), |d| d.to_string()),
            until.map_or("-".to_owned(), |d| d.to_string())
        )),
    }
}

/// The agency's enforced (or shadow) access, keyed by provider, service, operation, purpose.
fn access(agency: &Agency, shadow: bool) -> BTreeMap<Key, Terms> {
    let mut out: BTreeMap<Key, Terms> = BTreeMap::new();
    for g in agency.grants.iter().filter(|g| g.shadow == shadow) {
        for op in &g.operations {
            for p in &g.purposes {
                let t = out
                    .entry((
                        g.provider.clone(),
                        g.service.clone(),
                        op.to_string(),
                        p.code.to_string(),
                    ))
                    .or_default();
                t.fields.extend(g.fields.paths());
                t.consent |= g.consent_required;
                t.case |= g.case_required;
                t.restricted |= g.restricted;
                t.validity.extend(validity(g));
            }
        }
    }
    for t in out.values_mut() {
        // Normalise: a path already inside another granted path adds nothing.
        let set = FieldSet::from_paths(&t.fields.iter().collect::<Vec<_>>());
        t.fields = set.paths().into_iter().collect();
    }
    out
}

fn what((provider, service, op, purpose): &Key) -> String {
    format!("{op} {provider}/{service} for \"{purpose}\"")
}

fn conditions(t: &Terms) -> String {
    let mut c = Vec::new();
    if t.consent {
        c.push("with the subject's consent".to_owned());
    }
    if t.case {
        c.push("with a case reference".to_owned());
    }
    if t.restricted {
        c.push("restricted handling".to_owned());
    }
    for v in &t.validity {
        c.push(format!("valid {v}"));
    }
    if c.is_empty() {
        String::new()
    } else {
        format!(" ({})", c.join(", "))
    }
}

fn fields_list(fields: &BTreeSet<String>) -> String {
    if fields.is_empty() {
        "no fields".to_owned()
    } else {
        fields.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// Paths of `a` that `b` does not release (neither the path nor a path containing it).
fn not_in(a: &BTreeSet<String>, b: &BTreeSet<String>) -> Vec<String> {
    let set = FieldSet::from_paths(&b.iter().collect::<Vec<_>>());
    a.iter().filter(|p| !set.covers(p)).cloned().collect()
}

fn compare(
    out: &mut Vec<String>,
    old: &BTreeMap<Key, Terms>,
    new: &BTreeMap<Key, Terms>,
    tag: &str,
) {
    for (key, t) in new {
        match old.get(key) {
            None => out.push(format!(
                "  + {tag}may now {} and see: {}{}",
                what(key),
                fields_list(&t.fields),
                conditions(t)
            )),
            Some(o) if o != t => {
                let gained = not_in(&t.fields, &o.fields);
                let lost = not_in(&o.fields, &t.fields);
                if !gained.is_empty() {
                    out.push(format!(
                        "  + {tag}when they {}, now also sees: {}",
                        what(key),
                        gained.join(", ")
                    ));
                }
                if !lost.is_empty() {
                    out.push(format!(
                        "  - {tag}when they {}, no longer sees: {}",
                        what(key),
                        lost.join(", ")
                    ));
                }
                let flag = |out: &mut Vec<String>, before: bool, after: bool, name: &str| {
                    if before != after {
                        out.push(format!(
                            "  {} {tag}to {}, {name} is {} required",
                            if after { "-" } else { "+" },
                            what(key),
                            if after { "now" } else { "no longer" }
                        ));
                    }
                };
                flag(out, o.consent, t.consent, "the subject's consent");
                flag(out, o.case, t.case, "a case reference");
                flag(out, o.restricted, t.restricted, "restricted handling");
                if o.validity != t.validity {
                    out.push(format!(
                        "  ~ {tag}to {}, validity changes from [{}] to [{}]",
                        what(key),
                        o.validity.iter().cloned().collect::<Vec<_>>().join("; "),
                        t.validity.iter().cloned().collect::<Vec<_>>().join("; ")
                    ));
                }
            }
            Some(_) => {}
        }
    }
    for (key, t) in old {
        if !new.contains_key(key) {
            out.push(format!(
                "  - {tag}may no longer {} (saw: {}{})",
                what(key),
                fields_list(&t.fields),
                conditions(t)
            ));
        }
    }
}

/// The differences in access between `old` and `new`, one paragraph per agency; empty when nothing changes.
pub fn diff(old: &Policy, new: &Policy) -> String {
    let mut text = String::new();
    let ids: BTreeSet<&str> = old
        .agencies()
        .chain(new.agencies())
        .map(|a| a.id.as_str())
        .collect();
    let empty = BTreeMap::new();
    for id in ids {
        let (o, n) = (old.agency(id), new.agency(id));
        let mut lines = Vec::new();
        let (oa, na) = (o.map(|a| access(a, false)), n.map(|a| access(a, false)));
        compare(
            &mut lines,
            oa.as_ref().unwrap_or(&empty),
            na.as_ref().unwrap_or(&empty),
            "",
        );
        let (os, ns) = (o.map(|a| access(a, true)), n.map(|a| access(a, true)));
        compare(
            &mut lines,
            os.as_ref().unwrap_or(&empty),
            ns.as_ref().unwrap_or(&empty),
            "(shadow, not enforced) ",
        );
        if let (Some(o), Some(n)) = (o, n) {
            if o.certificate != n.certificate {
                lines.push(format!(
                    "  ! the certificates accepted as {id}'s change: {:?} -> {:?}",
                    o.certificate, n.certificate
                ));
            }
            if o.require_bound_tokens != n.require_bound_tokens {
                lines.push(format!(
                    "  ! tokens bound to the certificate are {} required",
                    if n.require_bound_tokens {
                        "now"
                    } else {
                        "no longer"
                    }
                ));
            }
        }
        if lines.is_empty() {
            continue;
        }
        let header = match (o, n) {
            (None, Some(a)) => format!("{id} ({}): new agency", a.name),
            (Some(a), None) => format!("{id} ({}): agency removed, loses all access", a.name),
            (Some(_), Some(a)) => format!("{id} ({})", a.name),
            (None, None) => id.to_owned(),
        };
        let _ = writeln!(text, "{header}");
        for l in lines {
            let _ = writeln!(text, "{l}");
        }
    }
    for p in new.purposes() {
        match old.purpose(&p.code) {
            None => {
                let _ = writeln!(text, "purpose \"{}\" added: {}", p.code, p.legal_basis);
            }
            Some(o) if o.legal_basis != p.legal_basis => {
                let _ = writeln!(
                    text,
                    "purpose \"{}\": legal basis changes from {:?} to {:?}",
                    p.code, o.legal_basis, p.legal_basis
                );
            }
            Some(_) => {}
        }
    }
    for p in old.purposes() {
        if new.purpose(&p.code).is_none() {
            let _ = writeln!(text, "purpose \"{}\" removed", p.code);
        }
    }
    text
}
