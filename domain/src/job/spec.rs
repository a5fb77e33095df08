//! What a user asks for when submitting a job, and the rules it must satisfy.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::{self, FieldError};

/// Largest `params` object accepted, serialized as JSON.
pub const MAX_PARAMS_BYTES: usize = 64 * 1024;
pub const MAX_GPUS: u8 = 8;
pub const MAX_PRIORITY: u8 = 100;
pub const MAX_RETRIES: u32 = 10;
pub const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;
pub const MAX_GPU_MEMORY_MB: u64 = 1024 * 1024;
const MAX_ARGS: usize = 256;
const MAX_ARG_BYTES: usize = 4096;
const MAX_ENV: usize = 128;
const MAX_LABELS: usize = 32;
/// Set by the executor to exactly the assigned GPUs; a job may not override it.
pub const RESERVED_ENV: &[&str] = &["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"];

/// A validated job specification. Construct it with [`JobSpec::validate`] before use;
/// the `Job` aggregate re-validates on submit, so an invalid spec never becomes an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobSpec {
    /// Human-readable name, e.g. `tiles-eu-west`.
    pub name: String,
    /// The account (team, project) whose share the job spends: `[A-Za-z0-9_-]{1,64}`.
    pub account: String,
    /// The person or service that submitted it.
    pub submitted_by: String,
    /// 0 (lowest) to 100 (highest).
    pub priority: u8,
    /// Number of GPUs, all on one executor (gang placement): 1 to 8.
    pub gpus: u8,
    /// Minimum memory per GPU in MiB; 0 means any GPU fits.
    pub gpu_memory_mb: u64,
    /// The program and its arguments (argv). Never interpreted by a shell.
    pub command: Vec<String>,
    /// Extra environment variables for the process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Free-form JSON object for the workload (at most 64 KiB serialized).
    #[serde(default = "empty_object")]
    pub params: serde_json::Value,
    /// Key/value labels for filtering and leaderboards, e.g. `benchmark=tiles-v1`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How many times a retryable failure is retried before the job fails: 0 to 10.
    #[serde(default)]
    pub max_retries: u32,
    /// Wall-clock limit of one run in seconds: 1 to 604800 (a week).
    pub timeout_s: u64,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

impl JobSpec {
    /// Checks every field and reports the first one that is wrong, naming it.
    pub fn validate(&self) -> Result<(), FieldError> {
        validate::text("name", &self.name, 128)?;
        validate::token("account", &self.account)?;
        validate::text("submitted_by", &self.submitted_by, 128)?;
        validate::range("priority", self.priority, 0, MAX_PRIORITY)?;
        validate::range("gpus", self.gpus, 1, MAX_GPUS)?;
        validate::range("gpu_memory_mb", self.gpu_memory_mb, 0, MAX_GPU_MEMORY_MB)?;
        self.validate_command()?;
        self.validate_env()?;
        self.validate_params()?;
        self.validate_labels()?;
        validate::range("max_retries", self.max_retries, 0, MAX_RETRIES)?;
        validate::range("timeout_s", self.timeout_s, 1, MAX_TIMEOUT_S)?;
        Ok(())
    }

    fn validate_command(&self) -> Result<(), FieldError> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(FieldError::new(
                "command",
                "must name a program: a non-empty argv array",
            ));
        }
        if self.command.len() > MAX_ARGS {
            return Err(FieldError::new(
                "command",
                format!("at most {MAX_ARGS} arguments"),
            ));
        }
        for (i, arg) in self.command.iter().enumerate() {
            if arg.len() > MAX_ARG_BYTES || arg.contains('\0') {
                return Err(FieldError::new(
                    format!("command[{i}]"),
                    format!("must be at most {MAX_ARG_BYTES} bytes with no NUL"),
                ));
            }
        }
        Ok(())
    }

    fn validate_env(&self) -> Result<(), FieldError> {
        if self.env.len() > MAX_ENV {
            return Err(FieldError::new(
                "env",
                format!("at most {MAX_ENV} variables"),
            ));
        }
        for (key, value) in &self.env {
            let field = format!("env.{key}");
            let mut bytes = key.bytes();
            let valid_name = matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
                && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && key.len() <= 128;
            if !valid_name {
                return Err(FieldError::new(
                    field,
                    "variable names match [A-Za-z_][A-Za-z0-9_]* (at most 128 characters)",
                ));
            }
            if RESERVED_ENV.contains(&key.as_str()) {
                return Err(FieldError::new(
                    field,
                    "is set by the executor to the assigned GPUs and cannot be overridden",
                ));
            }
            if value.len() > MAX_ARG_BYTES || value.contains('\0') {
                return Err(FieldError::new(
                    field,
                    format!("value must be at most {MAX_ARG_BYTES} bytes with no NUL"),
                ));
            }
        }
        Ok(())
    }

    fn validate_params(&self) -> Result<(), FieldError> {
        if !self.params.is_object() {
            return Err(FieldError::new("params", "must be a JSON object"));
        }
        let size = serde_json::to_vec(&self.params).map_or(usize::MAX, |v| v.len());
        if size > MAX_PARAMS_BYTES {
            return Err(FieldError::new(
                "params",
                format!("must be at most {MAX_PARAMS_BYTES} bytes as JSON, got {size}"),
            ));
        }
        Ok(())
    }

    fn validate_labels(&self) -> Result<(), FieldError> {
        if self.labels.len() > MAX_LABELS {
            return Err(FieldError::new(
                "labels",
                format!("at most {MAX_LABELS} labels"),
            ));
        }
        for (key, value) in &self.labels {
            let field = format!("labels.{key}");
            let valid_key = !key.is_empty()
                && key.len() <= 63
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
            if !valid_key {
                return Err(FieldError::new(
                    field,
                    "label keys are 1 to 63 characters of [A-Za-z0-9._/-]",
                ));
            }
            if value.chars().count() > 256 || value.chars().any(char::is_control) {
                return Err(FieldError::new(
                    field,
                    "label values are at most 256 characters, no control characters",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec() -> JobSpec {
        JobSpec {
            name: "tiles-eu-west".into(),
            account: "geo-team".into(),
            submitted_by: "ana".into(),
            priority: 50,
            gpus: 2,
            gpu_memory_mb: 40_000,
            command: vec!["python".into(), "infer.py".into()],
            env: BTreeMap::from([("BATCH".into(), "64".into())]),
            params: serde_json::json!({"region": "eu-west"}),
            labels: BTreeMap::from([("benchmark".into(), "tiles-v1".into())]),
            max_retries: 2,
            timeout_s: 3600,
        }
    }

    fn rejected_field(mutate: impl FnOnce(&mut JobSpec)) -> String {
        let mut s = spec();
        mutate(&mut s);
        s.validate().expect_err("must be rejected").field
    }

    #[test]
    fn a_realistic_spec_is_valid() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn every_field_is_checked_and_named() {
        assert_eq!(rejected_field(|s| s.name = " ".into()), "name");
        assert_eq!(rejected_field(|s| s.account = "geo team".into()), "account");
        assert_eq!(
            rejected_field(|s| s.submitted_by = "a\nb".into()),
            "submitted_by"
        );
        assert_eq!(rejected_field(|s| s.priority = 101), "priority");
        assert_eq!(rejected_field(|s| s.gpus = 0), "gpus");
        assert_eq!(rejected_field(|s| s.gpus = 9), "gpus");
        assert_eq!(
            rejected_field(|s| s.gpu_memory_mb = u64::MAX),
            "gpu_memory_mb"
        );
        assert_eq!(rejected_field(|s| s.command.clear()), "command");
        assert_eq!(
            rejected_field(|s| s.command.push("a\0".into())),
            "command[2]"
        );
        assert_eq!(
            rejected_field(|s| {
                s.env.insert("1BAD".into(), "x".into());
            }),
            "env.1BAD"
        );
        assert_eq!(
            rejected_field(|s| {
                s.env.insert("CUDA_VISIBLE_DEVICES".into(), "0".into());
            }),
            "env.CUDA_VISIBLE_DEVICES"
        );
        assert_eq!(
            rejected_field(|s| s.params = serde_json::json!([1])),
            "params"
        );
        assert_eq!(
            rejected_field(|s| s.params = serde_json::json!({"blob": "x".repeat(MAX_PARAMS_BYTES)})),
            "params"
        );
        assert_eq!(
            rejected_field(|s| {
                s.labels.insert("bad key".into(), "v".into());
            }),
            "labels.bad key"
        );
        assert_eq!(rejected_field(|s| s.max_retries = 11), "max_retries");
        assert_eq!(rejected_field(|s| s.timeout_s = 0), "timeout_s");
    }
}
