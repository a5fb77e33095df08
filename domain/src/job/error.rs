use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{JobState, RunState};
use crate::FieldError;

/// Why a job command was refused. Nothing was recorded when one of these is returned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// No job with this id was ever submitted. Check the id.
    #[error("job not found")]
    NotFound,
    /// A job with this id exists already. A client retrying a submit should use an
    /// `Idempotency-Key` instead of reusing ids.
    #[error("job already submitted")]
    AlreadySubmitted,
    /// An input field is invalid; fix the named field and send again.
    #[error("invalid {0}")]
    Invalid(FieldError),
    /// The job already ended (`succeeded`, `failed` or `cancelled`); nothing can change it
    /// except a manual retry of a failed job.
    #[error("job already finished ({state:?})")]
    AlreadyFinished { state: JobState },
    /// The job was cancelled: do not assign or start it. An executor that started it
    /// should stop the process and report the run's end.
    #[error("job was cancelled")]
    Cancelled,
    /// Only a queued job can be assigned; the scheduler's view was stale. Re-read and retry.
    #[error("job is not queued ({state:?})")]
    NotQueued { state: JobState },
    /// The job waits for its retry backoff; assign it after `until`.
    #[error("job is in retry backoff until {until}")]
    InBackoff { until: DateTime<Utc> },
    /// The run id is already used by another run of this job.
    #[error("run {0} already exists")]
    DuplicateRun(Uuid),
    /// The run was never assigned to this job (a report for a run that does not exist).
    #[error("run {0} was never assigned to this job")]
    RunNotAssigned(Uuid),
    /// The run belongs to another executor; only its own executor may report on it.
    #[error("run {run_id} is assigned to executor {assigned_to}, not {reported_by}")]
    WrongExecutor {
        run_id: Uuid,
        assigned_to: String,
        reported_by: String,
    },
    /// The report does not fit the run's state (e.g. success of a run that never started,
    /// or a failure report for a run that already succeeded).
    #[error("run {run_id} is {state:?}; cannot {action}")]
    RunNotActive {
        run_id: Uuid,
        state: RunState,
        action: &'static str,
    },
    /// Manual retry is for failed jobs only.
    #[error("only a failed job can be retried ({state:?})")]
    NotRetryable { state: JobState },
}
