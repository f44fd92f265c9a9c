//! Reads a JSON body exactly one way, or refuses it. serde_json keeps the last of two equal
//! keys; Go's encoding/json (Ollama, mcp-go) matches keys case-insensitively with Unicode
//! folding, and C parsers may stop a key at U+0000. So an object whose keys collide after
//! folding (exact duplicates included), or any key holding U+0000, is refused at every
//! depth: whatever an upstream's parser does with it, the proxy's reading is the only one.
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
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = Strict
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
pub fn fold(key: &str) -> String {
    if key.is_ascii() {
        return key.to_ascii_lowercase();
    }
    key.chars()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .collect()
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
        // The keys so far, folded: built only once the object is large or a key is not
        // ASCII. Before that (nearly every object) a key is compared in place with the
        // others, ASCII case-insensitively, which is what folding does to ASCII.
        let mut folded: Option<HashSet<String>> = None;
        while let Some(key) = map.next_key::<String>()? {
            if key.contains('\0') {
                return Err(de::Error::custom(NUL));
            }
            let collides = match &mut folded {
                None if key.is_ascii() && out.len() < SCAN_MAX => {
                    out.keys().any(|k| k.eq_ignore_ascii_case(&key))
                }
                _ => {
                    let seen = folded.get_or_insert_with(|| out.keys().map(|k| fold(k)).collect());
                    !seen.insert(fold(&key))
                }
            };
            if collides {
                return Err(de::Error::custom(format_args!("{COLLIDE}{key}")));
            }
            let v = map.next_value_seed(Strict)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Up to this many keys, an object's keys are compared with each other in place.
const SCAN_MAX: usize = 16;

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

    #[test]
    fn folding_matches_go_equal_fold_on_the_known_cases() {
        assert_eq!(fold("Model"), "model");
        assert_eq!(fold("me\u{17f}\u{17f}ages"), "messages");
        assert_eq!(fold("\u{212a}ey"), "key");
    }
}
