//! JSON Schemas of every event version, generated from the Rust types.
//!
//! `generate()` returns file name → schema; the checked-in copies in `schemas/json/` must
//! equal it (see the drift test). Regenerate with `OVERFLY_BLESS=1 cargo test -p overfly-schemas`.

use std::collections::BTreeMap;

use overfly_domain::EVENT_VERSION_1;
use overfly_domain::executor::ExecutorEvent;
use overfly_domain::job::JobEvent;
use schemars::{JsonSchema, schema_for};
use serde_json::{Value, json};

use crate::EventEnvelope;

/// File name (relative to `schemas/json/`) → JSON Schema document.
pub fn generate() -> BTreeMap<String, Value> {
    let mut files = BTreeMap::new();
    files.insert(
        "envelope.json".to_string(),
        serde_json::to_value(schema_for!(EventEnvelope)).expect("schema serializes"),
    );
    split_variants::<JobEvent>("job", &mut files);
    split_variants::<ExecutorEvent>("executor", &mut files);
    files
}

/// One schema per event type: the enum's `oneOf` arm for that variant, with the shared
/// definitions it refers to.
fn split_variants<T: JsonSchema>(aggregate: &str, files: &mut BTreeMap<String, Value>) {
    let root = serde_json::to_value(schema_for!(T)).expect("schema serializes");
    let defs = root.get("$defs").cloned().unwrap_or_else(|| json!({}));
    let arms = root
        .get("oneOf")
        .and_then(Value::as_array)
        .expect("an event enum is a oneOf of its variants");
    for arm in arms {
        let event_type = arm
            .get("properties")
            .and_then(Value::as_object)
            .and_then(|props| props.keys().next())
            .expect("externally tagged variant")
            .clone();
        let mut schema = arm.clone();
        let object = schema.as_object_mut().expect("arm is an object");
        object.insert(
            "$schema".into(),
            json!("https://json-schema.org/draft/2020-12/schema"),
        );
        object.insert(
            "title".into(),
            json!(format!("{event_type} v{EVENT_VERSION_1}")),
        );
        object.insert("$defs".into(), defs.clone());
        files.insert(
            format!("events/{aggregate}/{event_type}.v{EVENT_VERSION_1}.json"),
            schema,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn every_event_type_has_a_schema() {
        let files = generate();
        for event_type in JobEvent::TYPES {
            assert!(files.contains_key(&format!("events/job/{event_type}.v1.json")));
        }
        for event_type in ExecutorEvent::TYPES {
            assert!(files.contains_key(&format!("events/executor/{event_type}.v1.json")));
        }
        assert_eq!(
            files.len(),
            1 + JobEvent::TYPES.len() + ExecutorEvent::TYPES.len()
        );
    }

    /// The checked-in schemas are the contract other teams build against: they must not
    /// change without someone noticing.
    #[test]
    fn checked_in_schemas_match_the_code() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json");
        let bless = std::env::var_os("OVERFLY_BLESS").is_some();
        let mut drift = Vec::new();
        for (name, schema) in generate() {
            let path = dir.join(&name);
            let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
            if bless {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &text).unwrap();
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                drift.push(name);
            }
        }
        assert!(
            drift.is_empty(),
            "schemas drifted from the code: {drift:?}; review, then regenerate with \
             OVERFLY_BLESS=1 cargo test -p overfly-schemas"
        );
    }
}
