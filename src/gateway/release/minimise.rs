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

use std::borrow::Cow;

use serde_json::value::RawValue;
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

/// The same minimisation as [`apply`], in one pass over the provider's bytes: members a
/// grant releases whole are copied as they were sent, members it does not name are
/// skipped unread, and only the objects and arrays it reaches into are taken apart, so
/// no [`Value`] tree is built.
///
/// The result is the JSON [`apply`] gives, with members in the provider's order and a
/// value copied whole in the provider's spelling of it (its escapes, its number
/// format). `seal_next` is given the top-level `next` (the provider's cursor) of what is
/// released and returns what replaces it, `None` when it cannot be sealed; a `next` that
/// is not a string or null is dropped. `None` when the body is not JSON, a cursor could
/// not be sealed, or an object repeats a key (the caller then takes the [`Value`] path,
/// which keeps the last of them).
pub fn apply_raw(
    body: &[u8],
    fields: &FieldSet,
    collection: Option<&str>,
    subject_field: &str,
    seal_next: &mut dyn FnMut(&str) -> Option<String>,
) -> Option<(Vec<u8>, Released)> {
    let mut state = Raw {
        out: Vec::with_capacity(body.len()),
        seen: vec![false; fields.leaves.len()],
        subjects: Vec::new(),
        subject_field,
        seal_next,
    };
    let listed = match collection {
        Some(key) => {
            let done = state.run(body, &fields.root, Shape::Listed { key });
            match done {
                Some(true) => true,
                // No array under `key`: the body is one record after all.
                Some(false) => {
                    state.out.clear();
                    state.subjects.clear();
                    state.seen.iter_mut().for_each(|s| *s = false);
                    false
                }
                None => return None,
            }
        }
        None => false,
    };
    if !listed {
        state.run(body, &fields.root, Shape::Top)?;
        if state.out.is_empty() {
            // A scalar holds none of the granted members.
            state.out.extend_from_slice(b"{}");
        }
    }
    let Raw {
        out,
        seen,
        mut subjects,
        ..
    } = state;
    subjects.sort_unstable();
    subjects.dedup();
    let fields = fields
        .leaves
        .iter()
        .zip(seen)
        .filter(|&(_, present)| present)
        .map(|(path, _)| path.clone())
        .collect();
    Some((out, Released { fields, subjects }))
}

/// What [`apply_raw`] writes as it reads.
struct Raw<'s> {
    out: Vec<u8>,
    seen: Vec<bool>,
    subjects: Vec<String>,
    subject_field: &'s str,
    seal_next: &'s mut dyn FnMut(&str) -> Option<String>,
}

/// Where in the body a value sits, which decides how it is read.
#[derive(Clone, Copy)]
enum Shape<'k> {
    /// The whole body, read as one record (or an array of records).
    Top,
    /// The whole body of a collection service: only the array under `key` (its
    /// elements records) and `next` are kept.
    Listed { key: &'k str },
    /// The collection's member: an array of records, or else nothing.
    Items,
    /// A record: its `subject_field` names a data subject.
    Record,
    /// Anything below a record.
    Inner,
}

impl Raw<'_> {
    /// Reads the whole body in `shape`; `Some(found)` for [`Shape::Listed`], whether the
    /// collection's array was there.
    fn run(&mut self, body: &[u8], root: &Node, shape: Shape<'_>) -> Option<bool> {
        use serde::de::DeserializeSeed;
        let mut de = serde_json::Deserializer::from_slice(body);
        let found = Prune {
            raw: self,
            node: root,
            shape,
        }
        .deserialize(&mut de)
        .ok()?;
        de.end().ok()?;
        Some(found.found)
    }

    /// Notes that the granted path ending at `node` is present.
    fn mark(&mut self, node: &Node) {
        if let Some(flag) = self.seen.get_mut(node.leaf) {
            *flag = true;
        }
    }

    /// Notes a record's subject from its `subject_field`'s value.
    fn subject(&mut self, id: &RawValue) -> Option<()> {
        match serde_json::from_str::<Value>(id.get()).ok()? {
            Value::String(id) if !id.is_empty() => self.subjects.push(id),
            Value::Number(id) => self.subjects.push(id.to_string()),
            _ => {}
        }
        Some(())
    }

    /// Writes `"key":`, after a comma unless it is the object's first member.
    fn key(&mut self, key: &str, first: bool) {
        if !first {
            self.out.push(b',');
        }
        // Writing a string to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.out, key);
        self.out.push(b':');
    }
}

/// How a value came out of [`Prune`].
struct Pruned {
    /// Whether anything of it was written (a scalar under a deeper grant is not).
    kept: bool,
    /// For [`Shape::Listed`]: whether the collection's array was found.
    found: bool,
}

impl Pruned {
    const KEPT: Pruned = Pruned {
        kept: true,
        found: false,
    };
    const DROPPED: Pruned = Pruned {
        kept: false,
        found: false,
    };
}

/// Reads one value, writing what `node` grants of it.
struct Prune<'a, 'r, 's> {
    raw: &'a mut Raw<'s>,
    node: &'r Node,
    shape: Shape<'r>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Prune<'_, '_, '_> {
    type Value = Pruned;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Pruned, D::Error> {
        d.deserialize_any(self)
    }
}

/// An object key, borrowed from the body unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// A scalar: kept only where the grant releases it whole, which [`Prune`] never sees.
macro_rules! scalar {
    ($($name:ident: $ty:ty),*) => {$(
        fn $name<E>(self, _: $ty) -> Result<Pruned, E> {
            Ok(Pruned::DROPPED)
        }
    )*};
}

/// Skips the rest of an array that is not read.
fn seq_dropped<'de, A: serde::de::SeqAccess<'de>>(mut seq: A) -> Result<Pruned, A::Error> {
    while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
    Ok(Pruned::DROPPED)
}

impl<'de> serde::de::Visitor<'de> for Prune<'_, '_, '_> {
    type Value = Pruned;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }

    scalar!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

    fn visit_unit<E>(self) -> Result<Pruned, E> {
        Ok(Pruned::DROPPED)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Pruned, A::Error> {
        let Prune { raw, node, shape } = self;
        // The elements of a top-level array, or of the collection's, are records.
        let element = match shape {
            Shape::Top | Shape::Items => Shape::Record,
            // A top-level array of a collection service: read again as records (`Top`).
            Shape::Listed { .. } => return seq_dropped(seq),
            Shape::Record | Shape::Inner => Shape::Inner,
        };
        raw.out.push(b'[');
        let mut first = true;
        loop {
            let mark = raw.out.len();
            if !first {
                raw.out.push(b',');
            }
            let next = seq.next_element_seed(Prune {
                raw: &mut *raw,
                node,
                shape: element,
            })?;
            match next {
                None => {
                    raw.out.truncate(mark);
                    break;
                }
                Some(Pruned { kept: true, .. }) => first = false,
                Some(_) => raw.out.truncate(mark),
            }
        }
        raw.out.push(b']');
        Ok(Pruned::KEPT)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Pruned, A::Error> {
        use serde::de::{DeserializeSeed, Error, IgnoredAny};
        let Prune { raw, node, shape } = self;
        if let Shape::Items = shape {
            // The collection's member is no array: the body is read again as one record.
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Pruned::DROPPED);
        }
        let record = matches!(shape, Shape::Top | Shape::Record);
        let top = matches!(shape, Shape::Top | Shape::Listed { .. });
        let mut found = false;
        let mut keys: Vec<Key<'de>> = Vec::new();
        raw.out.push(b'{');
        let mut first = true;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if keys.iter().any(|k| k.0 == key.0) {
                // A repeated key: the Value path, which keeps the last one, answers instead.
                return Err(A::Error::custom("repeated key"));
            }
            let k = key.0.as_ref();
            let mark = raw.out.len();
            if let Shape::Listed { key: listed } = shape {
                if k == listed {
                    raw.key(k, first);
                    let items = map.next_value_seed(Prune {
                        raw: &mut *raw,
                        node,
                        shape: Shape::Items,
                    })?;
                    if items.kept {
                        (first, found) = (false, true);
                    } else {
                        raw.out.truncate(mark);
                    }
                } else if k == "next" {
                    let value: &'de RawValue = map.next_value()?;
                    first = next(raw, value, first).ok_or_else(|| A::Error::custom("cursor"))?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
                keys.push(key);
                continue;
            }
            let child = node.children.get(k);
            // A top-level cursor leaves only sealed, so only if released whole.
            let cursor = top && k == "next";
            let whole = child.is_some_and(|c| c.all);
            let subject = record && k == raw.subject_field;
            if whole || subject {
                let value: &'de RawValue = map.next_value()?;
                if subject {
                    raw.subject(value)
                        .ok_or_else(|| A::Error::custom("subject"))?;
                }
                match child {
                    Some(child) if child.all => {
                        raw.mark(child);
                        if cursor {
                            first = next(raw, value, first)
                                .ok_or_else(|| A::Error::custom("cursor"))?;
                        } else {
                            raw.key(k, first);
                            raw.out.extend_from_slice(value.get().as_bytes());
                            first = false;
                        }
                    }
                    Some(child) if !cursor => {
                        raw.key(k, first);
                        let mut de = serde_json::Deserializer::from_str(value.get());
                        let pruned = Prune {
                            raw: &mut *raw,
                            node: child,
                            shape: Shape::Inner,
                        }
                        .deserialize(&mut de)
                        .map_err(A::Error::custom)?;
                        if pruned.kept {
                            first = false;
                        } else {
                            raw.out.truncate(mark);
                        }
                    }
                    _ => {}
                }
            } else if let Some(child) = child.filter(|_| !cursor) {
                raw.key(k, first);
                let pruned = map.next_value_seed(Prune {
                    raw: &mut *raw,
                    node: child,
                    shape: Shape::Inner,
                })?;
                if pruned.kept {
                    first = false;
                } else {
                    raw.out.truncate(mark);
                }
            } else {
                // Not granted: skipped unread.
                map.next_value::<IgnoredAny>()?;
            }
            keys.push(key);
        }
        raw.out.push(b'}');
        Ok(Pruned { kept: true, found })
    }
}

/// Writes the top-level `next`: a string sealed, null kept, anything else left out;
/// `Some(first)` for the member after it, `None` when it cannot be sealed.
fn next(raw: &mut Raw<'_>, value: &RawValue, first: bool) -> Option<bool> {
    match value.get().as_bytes().first() {
        Some(b'"') => {
            let position: String = serde_json::from_str(value.get()).ok()?;
            let sealed = (raw.seal_next)(&position)?;
            raw.key("next", first);
            serde_json::to_writer(&mut raw.out, &sealed).ok()?;
            Some(false)
        }
        Some(b'n') => {
            raw.key("next", first);
            raw.out.extend_from_slice(b"null");
            Some(false)
        }
        _ => Some(first),
    }
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

    /// [`apply`] followed by the cursor sealing `release` does, with `seal` as the key.
    fn through_value(
        body: &Value,
        set: &FieldSet,
        collection: Option<&str>,
        seal: fn(&str) -> String,
    ) -> (Value, Released) {
        let mut value = body.clone();
        let released = apply(&mut value, set, collection, "id");
        if let Some(map) = value.as_object_mut() {
            match map.get("next").cloned() {
                None | Some(Value::Null) => {}
                Some(Value::String(p)) => {
                    map.insert("next".into(), Value::String(seal(&p)));
                }
                Some(_) => {
                    map.remove("next");
                }
            }
        }
        (value, released)
    }

    fn through_raw(
        body: &[u8],
        set: &FieldSet,
        collection: Option<&str>,
        seal: fn(&str) -> String,
    ) -> (Value, Released) {
        let (out, released) = apply_raw(body, set, collection, "id", &mut |p| Some(seal(p)))
            .expect("JSON in, JSON out");
        let value = serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "raw output is not JSON ({e}): {}",
                String::from_utf8_lossy(&out)
            )
        });
        (value, released)
    }

    fn sealed(p: &str) -> String {
        format!("sealed:{p}")
    }

    #[test]
    fn raw_minimisation_releases_what_the_value_tree_does() {
        let cases = [
            (
                person(),
                vec![
                    "names.surname",
                    "visas.category",
                    "nationalities",
                    "entry_bans",
                ],
                None,
            ),
            (person(), vec![], None),
            (json!("secret"), vec!["id"], None),
            (
                json!({"id": "P-2", "residence_permits": []}),
                vec!["residence_permits.type", "visas", "sex"],
                None,
            ),
            (
                json!({"results": [person(), {"id": "P-9", "sex": "M"}, person()], "next": "c-2", "total": 3}),
                vec!["sex"],
                Some("results"),
            ),
            (
                json!({"results": [], "next": null}),
                vec!["sex"],
                Some("results"),
            ),
            (
                json!({"results": [{"id": 1}], "next": 7}),
                vec!["id"],
                Some("results"),
            ),
            (
                json!({"id": "P-3", "sex": "M", "results": "not an array"}),
                vec!["sex"],
                Some("results"),
            ),
            (
                json!({"names": "flat", "tags": ["a", {"code": 1, "x": 2}, 3], "top": [[{"a": 1, "b": 2}]]}),
                vec!["names.surname", "tags.code", "top.a"],
                None,
            ),
            (
                json!([{"id": "P-1", "sex": "F", "x": 1}, {"id": 7, "sex": "M"}, "stray"]),
                vec!["sex"],
                None,
            ),
            (
                json!({"id": "P-5", "next": "c-9", "sex": "F"}),
                vec!["sex", "next"],
                None,
            ),
            (
                json!({"id": "P-5", "next": {"x": 1}, "sex": "F"}),
                vec!["sex", "next"],
                None,
            ),
        ];
        for (body, paths, collection) in cases {
            let set = FieldSet::from_paths(&paths);
            let text = serde_json::to_vec(&body).unwrap();
            assert_eq!(
                through_raw(&text, &set, collection, sealed),
                through_value(&body, &set, collection, sealed),
                "{body} under {paths:?}"
            );
        }
    }

    #[test]
    fn raw_minimisation_agrees_on_random_documents() {
        use crate::registry::synth::Rng;
        const KEYS: [&str; 6] = ["id", "a", "b", "next", "c\"d", "é"];
        fn doc(rng: &mut Rng, depth: u32) -> Value {
            match rng.below(if depth == 0 { 4 } else { 7 }) {
                0 => Value::Null,
                1 => json!(rng.below(1000)),
                2 => json!(format!("s{}\u{1}\"", rng.below(50))),
                3 => json!(rng.below(2) == 0),
                4 | 5 => Value::Object(
                    (0..rng.below(5))
                        .map(|_| (KEYS[rng.below(6) as usize].to_owned(), doc(rng, depth - 1)))
                        .collect(),
                ),
                _ => Value::Array((0..rng.below(4)).map(|_| doc(rng, depth - 1)).collect()),
            }
        }
        let mut rng = Rng::new(7);
        for round in 0..3000 {
            let body = doc(&mut rng, 4);
            let paths: Vec<String> = (0..rng.below(4))
                .map(|_| {
                    (0..1 + rng.below(3))
                        .map(|_| KEYS[rng.below(6) as usize])
                        .collect::<Vec<_>>()
                        .join(".")
                })
                .filter(|p| !p.starts_with("next."))
                .collect();
            let set = FieldSet::from_paths(&paths);
            let collection = (rng.below(2) == 0).then_some("a");
            // White space, as a provider may send it.
            let text = serde_json::to_string_pretty(&body).unwrap();
            assert_eq!(
                through_raw(text.as_bytes(), &set, collection, sealed),
                through_value(&body, &set, collection, sealed),
                "round {round}: {text} under {paths:?}, collection {collection:?}"
            );
            // A repeated key is left to the Value path, which keeps the last one.
            if body.get("b").is_some() {
                let mut twice = text.clone();
                twice.insert_str(1, "\"b\": 0,");
                assert!(
                    apply_raw(twice.as_bytes(), &set, collection, "id", &mut |p| Some(
                        p.into()
                    ))
                    .is_none()
                );
            }
        }
    }

    #[test]
    fn raw_minimisation_refuses_what_is_not_json() {
        let set = FieldSet::from_paths(&["id"]);
        for body in [
            &b"{\"id\": 1"[..],
            b"",
            b"not json",
            b"{\"id\": 1} trailing",
        ] {
            assert!(apply_raw(body, &set, None, "id", &mut |p| Some(p.into())).is_none());
        }
        let unsealable = apply_raw(
            br#"{"items": [], "next": "x"}"#,
            &set,
            Some("items"),
            "id",
            &mut |_| None,
        );
        assert!(unsealable.is_none());
    }

    #[test]
    fn top_level_array_is_minimised_per_element() {
        let mut body = json!([{"id": "P-1", "sex": "F", "x": 1}, {"id": 7, "sex": "M"}, "stray"]);
        let released = apply(&mut body, &FieldSet::from_paths(&["sex"]), None, "id");
        assert_eq!(body, json!([{"sex": "F"}, {"sex": "M"}]));
        assert_eq!(released.subjects, vec!["7", "P-1"]);
    }
}
