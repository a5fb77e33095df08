//! What stops a projection. Callers match on it: `is_poison` errors (the event itself cannot
//! be applied) are recorded in `projection_checkpoints.last_error` and retrying does not help
//! until the projector is upgraded or the event stream repaired; the others are transient
//! (Postgres or NATS unavailable) and retried with backoff.

use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// An event type this projector does not know (a newer producer): upgrade the projector.
    #[error("unknown event type {event_type} (version {event_version}): upgrade the projector")]
    UnknownEventType {
        event_type: String,
        event_version: String,
    },
    /// A known type in a version with neither a decoder nor an upcaster: upgrade the projector.
    #[error("unknown version {event_version} of event type {event_type}: upgrade the projector")]
    UnknownEventVersion {
        event_type: String,
        event_version: String,
    },
    /// The payload or envelope does not match the event's declared type and version.
    #[error("malformed {event_type} event: {reason}")]
    Malformed { event_type: String, reason: String },
    /// A job event arrived out of order or after a lost one: the stream must be repaired
    /// (or the projection rebuilt) before it can go on.
    #[error("job {job_id}: expected event sequence {expected}, got {got} (events missing)")]
    Gap {
        job_id: Uuid,
        expected: i64,
        got: i64,
    },
    /// An executor event arrived out of order or after a lost one (executors projection).
    #[error(
        "executor {executor_id}: expected event sequence {expected}, got {got} (events missing)"
    )]
    ExecutorGap {
        executor_id: String,
        expected: i64,
        got: i64,
    },
    /// A run event for a run the projection never saw assigned.
    #[error("job {job_id}: run {run_id} has no row (its RunAssigned is missing)")]
    MissingRun { job_id: Uuid, run_id: Uuid },
    /// Fault injection (tests only): the batch failed after the configured number of events.
    #[error("injected failure after {0} events")]
    Injected(usize),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("NATS: {0}")]
    Nats(String),
}

impl ProjectionError {
    /// The event cannot be applied: retrying the same event fails the same way.
    pub fn is_poison(&self) -> bool {
        matches!(
            self,
            Self::UnknownEventType { .. }
                | Self::UnknownEventVersion { .. }
                | Self::Malformed { .. }
                | Self::Gap { .. }
                | Self::ExecutorGap { .. }
                | Self::MissingRun { .. }
        )
    }

    pub(crate) fn nats(error: impl std::fmt::Display) -> Self {
        Self::Nats(error.to_string())
    }
}
