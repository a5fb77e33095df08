use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{JobSpec, RunUtilisation, SchedulingDecision};

/// Everything that can be asked of a job. `at` is the time the command service received it:
/// the aggregate never reads a clock, so replaying events gives the same state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobCommand {
    /// A user submits a new job. The id is chosen by the caller (the command service).
    SubmitJob {
        job_id: Uuid,
        spec: JobSpec,
        at: DateTime<Utc>,
    },
    /// A user cancels a job that has not finished. A running process is told to stop.
    CancelJob {
        by: String,
        reason: String,
        at: DateTime<Utc>,
    },
    /// A user moves a job up or down the queue.
    ChangePriority {
        priority: u8,
        by: String,
        reason: String,
        at: DateTime<Utc>,
    },
    /// The scheduler places the job's next attempt on GPUs of one executor.
    AssignRun {
        run_id: Uuid,
        executor_id: String,
        gpu_uuids: Vec<String>,
        decision: SchedulingDecision,
        at: DateTime<Utc>,
    },
    /// The executor started the run's process.
    ReportRunStarted {
        run_id: Uuid,
        executor_id: String,
        at: DateTime<Utc>,
    },
    /// The run reported progress (0..=1) and/or metrics. `report_seq` increases per run;
    /// a report whose sequence was already recorded is ignored (safe to retry).
    ReportRunProgress {
        run_id: Uuid,
        executor_id: String,
        report_seq: u64,
        progress: Option<f64>,
        metrics: BTreeMap<String, f64>,
        at: DateTime<Utc>,
    },
    /// The run's process exited with status 0.
    ReportRunSucceeded {
        run_id: Uuid,
        executor_id: String,
        /// GPU utilisation over the run from the executor's telemetry, if it sampled any.
        utilisation: Option<RunUtilisation>,
        at: DateTime<Utc>,
    },
    /// The run failed: a non-zero exit, a signal, or the executor could not run it.
    ReportRunFailed {
        run_id: Uuid,
        executor_id: String,
        exit_code: Option<i32>,
        signal: Option<i32>,
        reason: String,
        retryable: bool,
        /// GPU utilisation over the run from the executor's telemetry, if it sampled any.
        utilisation: Option<RunUtilisation>,
        at: DateTime<Utc>,
    },
    /// The run exceeded the job's `timeout_s` and was killed.
    ReportRunTimedOut {
        run_id: Uuid,
        executor_id: String,
        /// GPU utilisation over the run from the executor's telemetry, if it sampled any.
        utilisation: Option<RunUtilisation>,
        at: DateTime<Utc>,
    },
    /// A user asks for one more attempt of a failed job.
    RetryJob {
        by: String,
        reason: String,
        at: DateTime<Utc>,
    },
}

impl JobCommand {
    /// A stable name for logs, spans and event metadata.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SubmitJob { .. } => "SubmitJob",
            Self::CancelJob { .. } => "CancelJob",
            Self::ChangePriority { .. } => "ChangePriority",
            Self::AssignRun { .. } => "AssignRun",
            Self::ReportRunStarted { .. } => "ReportRunStarted",
            Self::ReportRunProgress { .. } => "ReportRunProgress",
            Self::ReportRunSucceeded { .. } => "ReportRunSucceeded",
            Self::ReportRunFailed { .. } => "ReportRunFailed",
            Self::ReportRunTimedOut { .. } => "ReportRunTimedOut",
            Self::RetryJob { .. } => "RetryJob",
        }
    }
}
