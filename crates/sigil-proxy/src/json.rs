//! Reads a JSON body exactly one way, or refuses it. serde_json keeps the last of two equal
//! keys; Go's encoding/json (Ollama, mcp-go) matches keys case-insensitively with Unicode
//! folding, and C parsers may stop a key at U+0000. So an object whose keys collide after
//! folding (exact duplicates included), or any key holding U+0000, is refused at every
//! depth: whatever an upstream's parser does with it, the proxy's reading is the only one.
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Why a body cannot be read one way.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// Not JSON (or JSON that serde_json refuses: lone surrogates, trailing data, a BOM).
    #[error("request body is not valid JSON: {0}")]
    Syntax(String),
    /// Two keys of one object that an upstream may read as the same key.
    #[error("request body has keys that collide ({0:?}): refused as ambiguous")]
    CollidingKeys(String),
    /// A key holding U+0000.
    #[error("request body has a key holding U+0000: refused as ambiguous")]
    NulInKey,
}

/// Parses `body` as strict JSON: no colliding keys in any object.
pub fn parse(body: &[u8]) -> Result<Value, JsonError> {
    read(body, Strict)
}

/// Reads `body` exactly as [`parse`] does (the same refusals, at every depth), but builds
/// only what the caller decides on: in the top-level object, and in each object directly
/// in a top-level array, only the keys `keep` accepts are kept, with their values in full.
/// Every other value is checked and dropped, never built: a chat body's messages are read
/// once, in place, without a copy of each string.
pub fn parse_picking(body: &[u8], keep: &dyn Fn(&str) -> bool) -> Result<Value, JsonError> {
    read(body, Picking { keep })
}

fn read<'de, S>(body: &'de [u8], seed: S) -> Result<Value, JsonError>
where
    S: DeserializeSeed<'de, Value = Value>,
{
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = seed
        .deserialize(&mut de)
        .map_err(|e| classify(e.to_string()))?;
    de.end().map_err(|e| JsonError::Syntax(e.to_string()))?;
    Ok(v)
}

/// serde carries our refusals as custom error text; turn them back into variants.
fn classify(message: String) -> JsonError {
    if let Some(rest) = message.strip_prefix(COLLIDE) {
        let key = rest.split(" at line ").next().unwrap_or(rest);
        JsonError::CollidingKeys(key.to_owned())
    } else if message.starts_with(NUL) {
        JsonError::NulInKey
    } else {
        JsonError::Syntax(message)
    }
}

const COLLIDE: &str = "sigil: colliding key ";
const NUL: &str = "sigil: NUL in key";

/// The key as a case-insensitive matcher sees it: simple Unicode case folding (upper then
/// lower, so `ſ` (U+017F) and `K` (U+212A, Kelvin) fold with `s` and `k` as Go's
/// `EqualFold` does).
/// Borrowed when the key is already folded (lower-case ASCII, as most are).
pub fn fold(key: &str) -> Cow<'_, str> {
    if key.is_ascii() {
        if key.bytes().any(|b| b.is_ascii_uppercase()) {
            return Cow::Owned(key.to_ascii_lowercase());
        }
        return Cow::Borrowed(key);
    }
    Cow::Owned(
        key.chars()
            .flat_map(char::to_uppercase)
            .flat_map(char::to_lowercase)
            .collect(),
    )
}

struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        let mut keys = Keys::default();
        while let Some(key) = map.next_key::<String>()? {
            keys.admit::<A::Error>(&key, out.keys().map(String::as_str))?;
            let v = map.next_value_seed(Strict)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// The refusals of one object's keys: a key holding U+0000, or one that collides after
/// folding with a key before it.
#[derive(Default)]
struct Keys {
    /// The keys so far, folded: built only once the object is large or a key is not
    /// ASCII. Before that (nearly every object) a key is compared in place with the
    /// others, ASCII case-insensitively, which is what folding does to ASCII.
    folded: Option<HashSet<String>>,
    count: usize,
}

impl Keys {
    /// Admits `key` after `before` (the object's keys so far, in any order).
    fn admit<'k, E: de::Error>(
        &mut self,
        key: &str,
        mut before: impl Iterator<Item = &'k str>,
    ) -> Result<(), E> {
        if key.contains('\0') {
            return Err(E::custom(NUL));
        }
        let collides = match &mut self.folded {
            None if key.is_ascii() && self.count < SCAN_MAX => {
                before.any(|k| k.eq_ignore_ascii_case(key))
            }
            _ => {
                let seen = self
                    .folded
                    .get_or_insert_with(|| before.map(|k| fold(k).into_owned()).collect());
                !seen.insert(fold(key).into_owned())
            }
        };
        if collides {
            return Err(E::custom(format_args!("{COLLIDE}{key}")));
        }
        self.count += 1;
        Ok(())
    }
}

/// Up to this many keys, an object's keys are compared with each other in place.
const SCAN_MAX: usize = 16;

/// [`parse_picking`]'s reading of the top level (and of a top-level array's items).
struct Picking<'k> {
    keep: &'k dyn Fn(&str) -> bool,
}

impl<'de> DeserializeSeed<'de> for Picking<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Picking<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        StrictVisitor.visit_bool(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        StrictVisitor.visit_i64(v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        StrictVisitor.visit_u64(v)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        StrictVisitor.visit_f64(v)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        StrictVisitor.visit_str(v)
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        StrictVisitor.visit_string(v)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        StrictVisitor.visit_unit()
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        StrictVisitor.visit_none()
    }
    /// A top-level array: each item read as the top level is.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Picking { keep: self.keep })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        // Every key, kept or not, for the collision check; borrowed from the body unless it
        // holds an escape.
        let mut seen: Vec<Cow<'de, str>> = Vec::new();
        let mut keys = Keys::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            keys.admit::<A::Error>(&key, seen.iter().map(|k| &**k))?;
            if (self.keep)(&key) {
                let v = map.next_value_seed(Strict)?;
                out.insert(key.clone().into_owned(), v);
            } else {
                map.next_value_seed(Check)?;
            }
            seen.push(key);
        }
        Ok(Value::Object(out))
    }
}

/// A value read and checked as [`Strict`] reads it (its keys at every depth, its numbers),
/// and dropped: nothing is built.
struct Check;

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        StrictVisitor.visit_f64(v).map(drop)
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Check)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen: Vec<Cow<'de, str>> = Vec::new();
        let mut keys = Keys::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            keys.admit::<A::Error>(&key, seen.iter().map(|k| &**k))?;
            map.next_value_seed(Check)?;
            seen.push(key);
        }
        Ok(())
    }
}

/// An object's key, borrowed from the body when it holds no escape.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_json_like_serde_json() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi \u00e9"}],"n":1,"t":0.5,"x":null,"b":true}"#;
        assert_eq!(
            parse(body).unwrap(),
            serde_json::from_slice::<Value>(body).unwrap()
        );
        assert_eq!(
            parse(b" [1, -2, 3.5] ").unwrap(),
            serde_json::json!([1, -2, 3.5])
        );
    }

    #[test]
    fn refuses_keys_that_collide_anywhere() {
        for bad in [
            &br#"{"model":"b","model":"a"}"#[..],
            br#"{"model":"a","Model":"b"}"#,
            br#"{"model":"a","MODEL":"b"}"#,
            // U+017F LATIN SMALL LETTER LONG S folds with "s"; U+212A KELVIN SIGN with "k".
            "{\"messages\":[],\"me\u{17f}\u{17f}ages\":[]}".as_bytes(),
            "{\"tools\":{\"as\u{212a}\":1,\"ask\":2}}".as_bytes(),
            // Escapes are decoded before comparing.
            br#"{"model":"a","mod\u0065l":"b"}"#,
            // Deep inside an array of objects.
            br#"{"a":[{"name":"x"},{"name":"y","Name":"z"}]}"#,
        ] {
            assert!(
                matches!(parse(bad), Err(JsonError::CollidingKeys(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse(br#"{"model":"a","model\u0000":"b"}"#),
            Err(JsonError::NulInKey)
        );
    }

    #[test]
    fn refuses_keys_that_collide_in_large_objects_and_after_a_non_ascii_key() {
        let many: Vec<String> = (0..40).map(|i| format!("\"key{i}\":{i}")).collect();
        for last in ["\"KEY0\":0", "\"key39\":0", "\"\\u212aey7\":0"] {
            let body = format!("{{{},{last}}}", many.join(","));
            assert!(
                matches!(parse(body.as_bytes()), Err(JsonError::CollidingKeys(_))),
                "{last}"
            );
        }
        // Each order of an ASCII key and the non-ASCII key it folds with.
        for bad in [
            "{\"ask\":1,\"as\u{212a}\":2}",
            "{\"as\u{212a}\":1,\"ASK\":2}",
        ] {
            assert!(
                matches!(parse(bad.as_bytes()), Err(JsonError::CollidingKeys(_))),
                "{bad}"
            );
        }
        let body = format!("{{{}}}", many.join(","));
        assert_eq!(
            parse(body.as_bytes()).unwrap().as_object().unwrap().len(),
            40
        );
    }

    #[test]
    fn refuses_what_serde_json_refuses() {
        for bad in [
            &b"{"[..],
            b"{\"a\":1} x",
            b"\xef\xbb\xbf{\"a\":1}",
            br#"{"a":"\ud800"}"#,
            b"{\"a\":\"\xff\"}",
            br#"{"a":NaN}"#,
            b"",
        ] {
            assert!(
                matches!(parse(bad), Err(JsonError::Syntax(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Everything `parse` refuses, at any depth, kept or dropped.
    fn refused() -> Vec<Vec<u8>> {
        let mut bad: Vec<Vec<u8>> = [
            &br#"{"model":"b","model":"a"}"#[..],
            br#"{"model":"a","Model":"b"}"#,
            br#"{"messages":[{"role":"user","Role":"x"}]}"#,
            br#"{"messages":[{"content":{"a":1,"A":2}}],"model":"m"}"#,
            br#"{"x":{"mod\u0065l":1,"model":2},"model":"m"}"#,
            br#"{"x":{"a\u0000":1},"model":"m"}"#,
            br#"{"model":"a","model\u0000":"b"}"#,
            br#"[{"model":"a"},{"x":[{"k":1,"K":2}]}]"#,
            br#"{"model":"m","x":"\ud800"}"#,
            b"{\"model\":\"m\",\"x\":\"\xff\"}",
            br#"{"model":"m","x":1e400}"#,
            br#"{"model":"m","x":NaN}"#,
            br#"{"model":"m"} x"#,
            b"{",
            b"",
        ]
        .iter()
        .map(|b| b.to_vec())
        .collect();
        bad.push("{\"model\":\"m\",\"x\":{\"as\u{212a}\":1,\"ask\":2}}".into());
        let many: Vec<String> = (0..40).map(|i| format!("\"key{i}\":{i}")).collect();
        bad.push(
            format!(
                "{{\"model\":\"m\",\"x\":{{{},\"KEY3\":1}}}}",
                many.join(",")
            )
            .into(),
        );
        bad
    }

    #[test]
    fn picking_refuses_exactly_what_parse_refuses() {
        let keep = |k: &str| fold(k) == "model";
        for bad in refused() {
            let whole = parse(&bad);
            assert!(whole.is_err(), "{}", String::from_utf8_lossy(&bad));
            assert_eq!(
                parse_picking(&bad, &keep).map(drop),
                whole.map(drop),
                "{}",
                String::from_utf8_lossy(&bad)
            );
        }
    }

    #[test]
    fn picking_builds_only_the_kept_keys_of_the_top_level() {
        let keep = |k: &str| matches!(&*fold(k), "model" | "fallbacks");
        let body = br#"{"messages":[{"role":"user","content":"hi \u00e9"}],"Model":"m","fallbacks":[{"model":"f","x":{"y":1}}],"n":1.5}"#;
        assert_eq!(
            parse_picking(body, &keep).unwrap(),
            serde_json::json!({"Model": "m", "fallbacks": [{"model": "f", "x": {"y": 1}}]})
        );
        // A top-level array: each object in it is picked; other items are kept as they are.
        let body = br#"[{"model":"a","input":"x"},{"input":"y"},3]"#;
        assert_eq!(
            parse_picking(body, &keep).unwrap(),
            serde_json::json!([{"model": "a"}, {}, 3])
        );
        // Not an object: read as parse reads it.
        assert_eq!(
            parse_picking(b" \"s\" ", &keep).unwrap(),
            serde_json::json!("s")
        );
    }

    #[test]
    fn folding_matches_go_equal_fold_on_the_known_cases() {
        assert_eq!(fold("Model"), "model");
        assert_eq!(fold("me\u{17f}\u{17f}ages"), "messages");
        assert_eq!(fold("\u{212a}ey"), "key");
    }
}
