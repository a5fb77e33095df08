//! Turning a stored or published payload of any known version into the current domain event.
//!
//! This is where upcasters go: when an event type gets version 2, its version "1" payloads are
//! rewritten to the version 2 shape in [`upcast`] (a `match` arm per old version) before
//! deserializing. Nothing is ever skipped: an unknown type or version is an error that stops
//! the projection.

use serde::de::DeserializeOwned;

use crate::error::ProjectionError;

/// Decodes an externally tagged payload (`{"<event_type>": {…}}`) of one of `known_types`.
pub fn decode<E: DeserializeOwned>(
    known_types: &[&str],
    event_type: &str,
    event_version: &str,
    payload: &serde_json::Value,
) -> Result<E, ProjectionError> {
    if !known_types.contains(&event_type) {
        return Err(ProjectionError::UnknownEventType {
            event_type: event_type.to_string(),
            event_version: event_version.to_string(),
        });
    }
    let tagged = payload
        .as_object()
        .is_some_and(|object| object.len() == 1 && object.contains_key(event_type));
    if !tagged {
        return Err(ProjectionError::Malformed {
            event_type: event_type.to_string(),
            reason: format!("payload is not {{\"{event_type}\": {{…}}}}"),
        });
    }
    let payload = upcast(event_type, event_version, payload)?;
    serde_json::from_value(payload).map_err(|e| ProjectionError::Malformed {
        event_type: event_type.to_string(),
        reason: e.to_string(),
    })
}

/// The payload in the current version's shape.
fn upcast(
    event_type: &str,
    event_version: &str,
    payload: &serde_json::Value,
) -> Result<serde_json::Value, ProjectionError> {
    match event_version {
        overfly_domain::EVENT_VERSION_1 => Ok(payload.clone()),
        // Old versions are upcast here, e.g. `"0" => upcast_v0_to_v1(event_type, payload)`.
        _ => Err(ProjectionError::UnknownEventVersion {
            event_type: event_type.to_string(),
            event_version: event_version.to_string(),
        }),
    }
}
