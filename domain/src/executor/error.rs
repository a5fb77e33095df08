use chrono::{DateTime, Utc};

use super::ExecutorState;
use crate::FieldError;

/// Why an executor command was refused. Nothing was recorded when one of these is returned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecutorError {
    /// No executor registered under this id. An executor should register first.
    #[error("executor not found")]
    NotFound,
    /// An input field is invalid; fix the named field and send again.
    #[error("invalid {0}")]
    Invalid(FieldError),
    /// The executor was marked lost or has deregistered; it must register again (a new
    /// session) before it heartbeats or takes work.
    #[error("executor is {state:?}; register again")]
    NotRegistered { state: ExecutorState },
    /// The lease has not expired yet; the executor is not lost.
    #[error("lease still valid until {until}")]
    LeaseNotExpired { until: DateTime<Utc> },
    /// The executor already left; it can only register again.
    #[error("executor is gone")]
    Gone,
}
