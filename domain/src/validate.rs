//! Small validation helpers shared by the job spec and executor inventory.

use serde::Serialize;

/// One rejected input field: which field (a JSON path such as `env.PATH` or `gpus[2].uuid`)
/// and why. Callers show it to the user as is; HTTP maps it to 422 problem+json.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Free text shown to people (names, reasons, actors): bounded, no control characters.
pub(crate) fn text(field: &str, value: &str, max_chars: usize) -> Result<(), FieldError> {
    if value.trim().is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.chars().count() > max_chars {
        return Err(FieldError::new(
            field,
            format!("must be at most {max_chars} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// An identifier that also appears as a NATS subject token: `[A-Za-z0-9_-]`, 1..=64 chars.
pub(crate) fn token(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() || value.len() > 64 {
        return Err(FieldError::new(field, "must be 1 to 64 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(FieldError::new(
            field,
            "may contain only letters, digits, '_' and '-'",
        ));
    }
    Ok(())
}

pub(crate) fn range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), FieldError> {
    if value < min || value > max {
        return Err(FieldError::new(
            field,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(())
}
