//! Field-level minimisation: a provider's JSON response is cut down, in
//! place, to the fields a grant releases before it leaves the gateway.
//!
//! A grant names fields as dotted paths (`names.surname`, `visas`). They are
//! compiled once, at policy load, into a [`FieldSet`] tree (`crate::policy::fields`); [`apply`] then
//! walks the response and the tree side by side, so the work per response is
//! one pass over the kept part of the body with no path strings built. Arrays
//! are transparent: `visas.number` keeps `number` in every element of
//! `visas`. A path names a whole subtree: `visas` keeps each visa entire.
//! Whatever is not named is removed without a trace (no nulls, no empty
//! placeholders for removed members).

use serde_json::{Map, Value};

use crate::policy::fields::Node;
use crate::policy::FieldSet;

/// What a minimised response released: for the audit record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// Granted paths present in the output, sorted and deduplicated.
    pub fields: Vec<String>,
    /// Ids of the data subjects whose records the response held, sorted and deduplicated.
    pub subjects: Vec<String>,
}

/// Reduces a provider's JSON response in place to the granted fields at any depth.
///
/// With `collection = Some(key)` and an array under that key, the fields apply
/// to each element and every other top-level key except `next` (the
/// pagination cursor) is dropped. Subject ids are read from `subject_field`
/// of each record before anything is removed, so a subject is known even when
/// its id is not released.
pub fn apply(
    body: &mut Value,
    fields: &FieldSet,
    collection: Option<&str>,
    subject_field: &str,
) -> Released {
    let mut seen = vec![false; fields.leaves.len()];
    let mut subjects = Vec::new();
    let listed = match (collection, &mut *body) {
        (Some(key), Value::Object(map)) if map.get(key).is_some_and(Value::is_array) => {
            map.retain(|k, _| k == key || k == "next");
            if let Some(Value::Array(items)) = map.get_mut(key) {
                for item in items.iter() {
                    read_subject(item, subject_field, &mut subjects);
                }
                prune_array(items, &fields.root, &mut seen);
            }
            true
        }
        _ => false,
    };
    if !listed {
        match body {
            Value::Array(items) => {
                for item in items.iter() {
                    read_subject(item, subject_field, &mut subjects);
                }
                prune_array(items, &fields.root, &mut seen);
            }
            other => {
                read_subject(other, subject_field, &mut subjects);
                if !prune(other, &fields.root, &mut seen) {
                    *other = Value::Object(Map::new());
                }
            }
        }
    }
    subjects.sort_unstable();
    subjects.dedup();
    let fields = fields
        .leaves
        .iter()
        .zip(seen)
        .filter(|&(_, present)| present)
        .map(|(path, _)| path.clone())
        .collect();
    Released { fields, subjects }
}

/// Keeps in `value` what `node` grants; false when nothing of `value` itself may stay.
fn prune(value: &mut Value, node: &Node, seen: &mut [bool]) -> bool {
    if node.all {
        if let Some(flag) = seen.get_mut(node.leaf) {
            *flag = true;
        }
        return true;
    }
    match value {
        Value::Object(map) => {
            map.retain(|key, member| match node.children.get(key.as_str()) {
                Some(child) => prune(member, child, seen),
                None => false,
            });
            true
        }
        Value::Array(items) => {
            prune_array(items, node, seen);
            true
        }
        // A scalar where the grant names members below it: it holds none of them.
        _ => false,
    }
}

/// Applies `node` to each element; scalar elements it does not grant are removed.
fn prune_array(items: &mut Vec<Value>, node: &Node, seen: &mut [bool]) {
    items.retain_mut(|item| prune(item, node, seen));
}

fn read_subject(record: &Value, subject_field: &str, subjects: &mut Vec<String>) {
    match record.get(subject_field) {
        Some(Value::String(id)) if !id.is_empty() => subjects.push(id.clone()),
        Some(Value::Number(id)) => subjects.push(id.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn person() -> Value {
        json!({
            "id": "P-1",
            "personal_number": "01001012345",
            "names": {"surname": "Doe", "given_names": "Jane", "surname_ka": "დო"},
            "sex": "F",
            "nationalities": ["ARM", "UKR"],
            "visas": [
                {"id": "V-1", "number": "GE123", "category": "C1", "entries": 2},
                {"id": "V-2", "number": "GE456", "category": "D3", "entries": 1}
            ],
            "residence_permits": [],
            "entry_bans": [{"id": "B-1", "reason": "overstay", "expulsion": {"ordered_on": "2020-01-01", "by": "court"}}]
        })
    }

    #[test]
    fn normalises_paths() {
        let set = FieldSet::from_paths(&["visas.number", "visas", "names.surname", "", "sex"]);
        assert_eq!(set.paths(), vec!["names.surname", "sex", "visas"]);
        assert!(set.covers("visas.number"));
        assert!(set.covers("names.surname"));
        assert!(!set.covers("names"));
        assert!(!set.covers("names.given_names"));
        assert!(set.overlaps("names"));
        assert!(set.overlaps("visas.number.x"));
        assert!(!set.overlaps("names.given_names"));
        assert!(FieldSet::from_paths::<&str>(&[]).is_empty());
    }

    #[test]
    fn keeps_nested_members_and_whole_subtrees() {
        let mut body = person();
        let set = FieldSet::from_paths(&[
            "names.surname",
            "visas.category",
            "nationalities",
            "entry_bans",
        ]);
        let released = apply(&mut body, &set, None, "id");
        assert_eq!(
            body,
            json!({
                "names": {"surname": "Doe"},
                "nationalities": ["ARM", "UKR"],
                "visas": [{"category": "C1"}, {"category": "D3"}],
                "entry_bans": [{"id": "B-1", "reason": "overstay", "expulsion": {"ordered_on": "2020-01-01", "by": "court"}}]
            })
        );
        assert_eq!(
            released.fields,
            vec![
                "entry_bans",
                "names.surname",
                "nationalities",
                "visas.category"
            ]
        );
        assert_eq!(released.subjects, vec!["P-1"]);
        let text = body.to_string();
        for secret in ["01001012345", "Jane", "GE123", "P-1", "personal_number"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }

    #[test]
    fn nothing_granted_gives_empty_object() {
        let mut body = person();
        let released = apply(&mut body, &FieldSet::default(), None, "id");
        assert_eq!(body, json!({}));
        assert!(released.fields.is_empty());
        assert_eq!(released.subjects, vec!["P-1"]);

        let mut scalar = json!("secret");
        apply(&mut scalar, &FieldSet::default(), None, "id");
        assert_eq!(scalar, json!({}));
    }

    #[test]
    fn absent_fields_are_not_reported() {
        let mut body = json!({"id": "P-2", "residence_permits": []});
        let set = FieldSet::from_paths(&["residence_permits.type", "visas", "sex"]);
        let released = apply(&mut body, &set, None, "id");
        assert_eq!(body, json!({"residence_permits": []}));
        assert!(released.fields.is_empty());
    }

    #[test]
    fn collection_applies_per_record_and_drops_other_keys() {
        let mut body = json!({
            "results": [person(), {"id": "P-9", "sex": "M", "names": {"surname": "Roe"}}, person()],
            "next": "cursor-2",
            "total": 3,
            "debug": {"query": "surname=Doe"}
        });
        let set = FieldSet::from_paths(&["sex"]);
        let released = apply(&mut body, &set, Some("results"), "id");
        assert_eq!(
            body,
            json!({"results": [{"sex": "F"}, {"sex": "M"}, {"sex": "F"}], "next": "cursor-2"})
        );
        assert_eq!(released.subjects, vec!["P-1", "P-9"]);
        assert_eq!(released.fields, vec!["sex"]);
    }

    #[test]
    fn collection_missing_falls_back_to_single_record() {
        let mut body = json!({"id": "P-3", "sex": "M", "results": "not an array"});
        let released = apply(
            &mut body,
            &FieldSet::from_paths(&["sex"]),
            Some("results"),
            "id",
        );
        assert_eq!(body, json!({"sex": "M"}));
        assert_eq!(released.subjects, vec!["P-3"]);
    }

    #[test]
    fn written_records_use_their_subject_field() {
        let mut body = json!({"id": "X-1", "person_id": "P-4", "direction": "entry", "point": "Sarpi", "document_number": "A1"});
        let released = apply(
            &mut body,
            &FieldSet::from_paths(&["id", "point"]),
            None,
            "person_id",
        );
        assert_eq!(body, json!({"id": "X-1", "point": "Sarpi"}));
        assert_eq!(released.subjects, vec!["P-4"]);
        assert_eq!(released.fields, vec!["id", "point"]);
    }

    #[test]
    fn scalars_under_deeper_grants_are_removed() {
        let mut body = json!({"names": "flat string", "tags": ["a", {"code": 1, "x": 2}, 3], "top": [[{"a": 1, "b": 2}]]});
        let set = FieldSet::from_paths(&["names.surname", "tags.code", "top.a"]);
        let released = apply(&mut body, &set, None, "id");
        assert_eq!(body, json!({"tags": [{"code": 1}], "top": [[{"a": 1}]]}));
        assert_eq!(released.fields, vec!["tags.code", "top.a"]);
        assert!(released.subjects.is_empty());
    }

    #[test]
    fn top_level_array_is_minimised_per_element() {
        let mut body = json!([{"id": "P-1", "sex": "F", "x": 1}, {"id": 7, "sex": "M"}, "stray"]);
        let released = apply(&mut body, &FieldSet::from_paths(&["sex"]), None, "id");
        assert_eq!(body, json!([{"sex": "F"}, {"sex": "M"}]));
        assert_eq!(released.subjects, vec!["7", "P-1"]);
    }
}
