//! The `Job` aggregate: one submitted job and all its runs (attempts).
//!
//! Lifecycle: `queued → assigned → running → succeeded | failed | cancelled`. A retryable
//! failure sends the job back to `queued` with a backoff (`RetryScheduled.eligible_at`) until
//! its retries are spent; then `JobFailed`.

mod aggregate;
mod commands;
mod error;
mod events;
mod spec;
#[cfg(test)]
mod tests;

pub use aggregate::{Job, JobServices, JobState, RetryPolicy, Run, RunState};
pub use commands::JobCommand;
pub use error::JobError;
pub use events::{JobEvent, RetryTrigger, RunUtilisation, SchedulingDecision};
pub use spec::{
    JobSpec, MAX_GPU_MEMORY_MB, MAX_GPUS, MAX_PARAMS_BYTES, MAX_PRIORITY, MAX_RETRIES,
    MAX_TIMEOUT_S, RESERVED_ENV,
};
