//! Layered configuration: defaults < TOML file < `SIGIL_*` environment < command-line flags,
//! deserialized strictly (unknown keys are errors) and validated before anything binds.
use std::path::Path;

use serde::de::DeserializeOwned;

/// A configuration problem; the process exits with EX_USAGE (64).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Builds a `T` from the optional TOML file, the environment and the flags.
///
/// `keys` are the configuration keys `T` knows; only `SIGIL_<KEY>` variables for those are
/// read, so unrelated `SIGIL_*` variables are left alone. `flags` are `(key, value)` pairs
/// from the command line, already typed as TOML values.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    keys: &[&str],
    flags: Vec<(&str, toml::Value)>,
) -> Result<T, UsageError> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| UsageError(format!("reading {}: {e}", path.display())))?;
            text.parse::<toml::Table>()
                .map_err(|e| UsageError(format!("{}: {e}", path.display())))?
        }
        None => toml::Table::new(),
    };
    for key in keys {
        let var = format!("SIGIL_{}", key.to_ascii_uppercase());
        if let Ok(raw) = std::env::var(&var) {
            table.insert((*key).to_owned(), env_value(&raw));
        }
    }
    for (key, value) in flags {
        table.insert(key.to_owned(), value);
    }
    T::deserialize(toml::Value::Table(table)).map_err(|e| UsageError(format!("configuration: {e}")))
}

/// An environment value is read as TOML when it parses as a number, boolean or array, and
/// as a plain string otherwise (so `SIGIL_DATA_DIR=/var/lib/sigil` needs no quotes).
fn env_value(raw: &str) -> toml::Value {
    let parsed = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"));
    match parsed {
        Some(v @ (toml::Value::Integer(_) | toml::Value::Boolean(_) | toml::Value::Array(_))) => v,
        _ => toml::Value::String(raw.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        name: String,
        port: u16,
    }

    #[test]
    fn layers_and_names_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "name = \"file\"\nport = 1\n").unwrap();
        let c: Cfg = load(Some(&f), &["name", "port"], vec![]).unwrap();
        assert_eq!((c.name.as_str(), c.port), ("file", 1));
        let c: Cfg = load(
            Some(&f),
            &["name", "port"],
            vec![("port", toml::Value::Integer(9))],
        )
        .unwrap();
        assert_eq!(c.port, 9);
        std::fs::write(&f, "name = \"x\"\nport = 1\ntypo = 2\n").unwrap();
        let e = load::<Cfg>(Some(&f), &[], vec![]).unwrap_err();
        assert!(e.0.contains("typo"), "{e}");
        std::fs::write(&f, "name = \"x\"\nport = \"high\"\n").unwrap();
        let e = load::<Cfg>(Some(&f), &[], vec![]).unwrap_err();
        assert!(e.0.contains("port"), "{e}");
    }

    #[test]
    fn env_values() {
        assert_eq!(env_value("42"), toml::Value::Integer(42));
        assert_eq!(
            env_value("/var/lib"),
            toml::Value::String("/var/lib".into())
        );
        assert_eq!(
            env_value("[\"a\",\"b\"]"),
            toml::Value::Array(vec!["a".into(), "b".into()])
        );
        assert_eq!(env_value("true"), toml::Value::Boolean(true));
    }
}
