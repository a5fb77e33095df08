use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{JobSpec, JobState};

/// How busy a run's GPUs actually were, summed over its GPUs from the executor's telemetry
/// (NVML utilisation samples): what the efficiency leaderboard compares with the GPU time
/// allocated. Reported with the run's end; absent where the executor sampled nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunUtilisation {
    /// GPU-seconds covered by telemetry samples (at most the run's GPUs × its duration).
    pub gpu_seconds_sampled: f64,
    /// GPU-seconds the GPUs were busy: each sample's utilisation (0..=1) × its interval.
    pub gpu_seconds_busy: f64,
    /// The highest memory use seen on any of its GPUs, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_mb: Option<u64>,
}

impl RunUtilisation {
    /// Busy over sampled GPU time, 0..=1 (`None` when nothing was sampled).
    pub fn efficiency(&self) -> Option<f64> {
        (self.gpu_seconds_sampled > 0.0).then(|| self.gpu_seconds_busy / self.gpu_seconds_sampled)
    }
}

/// Why the scheduler picked this job and these GPUs, recorded with the assignment so every
/// decision can be audited and replayed (the factors are those of Slurm's `sprio`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SchedulingDecision {
    /// The combined score the queue was ordered by (higher runs first).
    pub score: f64,
    /// The job's priority when it was picked.
    pub priority: u8,
    /// 0..=1: higher when the account used less GPU time recently.
    pub fair_share_factor: f64,
    /// 0..=1: grows with time spent waiting, so nothing starves.
    pub age_factor: f64,
    /// Queued jobs this one was placed ahead of.
    pub overtook: Vec<Uuid>,
    /// Why these GPUs (e.g. "gpu-host-1: 2 free GPUs with ≥ 40000 MiB").
    pub placement: String,
}

/// What started a new attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RetryTrigger {
    /// The previous run failed retryably and retries were left.
    Automatic,
    /// A user asked for another attempt of a failed job.
    Manual { by: String, reason: String },
}

/// Everything that happened to a job. Each variant carries the values an auditor and a
/// projection need (who, why, which run, which GPUs, which attempt) so neither has to
/// re-derive them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub enum JobEvent {
    JobSubmitted {
        job_id: Uuid,
        spec: JobSpec,
        at: DateTime<Utc>,
    },
    JobCancelled {
        by: String,
        reason: String,
        previous_state: JobState,
        /// The run that was assigned or running and must be stopped, with its executor.
        active_run: Option<Uuid>,
        active_executor: Option<String>,
        at: DateTime<Utc>,
    },
    JobPriorityChanged {
        from: u8,
        to: u8,
        by: String,
        reason: String,
        at: DateTime<Utc>,
    },
    RunAssigned {
        run_id: Uuid,
        /// 1 for the first attempt, 2 for the first retry, …
        attempt: u32,
        executor_id: String,
        gpu_uuids: Vec<String>,
        decision: SchedulingDecision,
        at: DateTime<Utc>,
    },
    RunStarted {
        run_id: Uuid,
        attempt: u32,
        executor_id: String,
        at: DateTime<Utc>,
    },
    RunProgressed {
        run_id: Uuid,
        report_seq: u64,
        progress: Option<f64>,
        metrics: BTreeMap<String, f64>,
        at: DateTime<Utc>,
    },
    RunSucceeded {
        run_id: Uuid,
        attempt: u32,
        executor_id: String,
        gpu_uuids: Vec<String>,
        started_at: Option<DateTime<Utc>>,
        /// GPU utilisation over the run, where the executor's telemetry reported it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        utilisation: Option<RunUtilisation>,
        at: DateTime<Utc>,
    },
    RunFailed {
        run_id: Uuid,
        attempt: u32,
        executor_id: String,
        gpu_uuids: Vec<String>,
        started_at: Option<DateTime<Utc>>,
        exit_code: Option<i32>,
        signal: Option<i32>,
        reason: String,
        retryable: bool,
        /// GPU utilisation over the run, where the executor's telemetry reported it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        utilisation: Option<RunUtilisation>,
        at: DateTime<Utc>,
    },
    RunTimedOut {
        run_id: Uuid,
        attempt: u32,
        executor_id: String,
        gpu_uuids: Vec<String>,
        started_at: Option<DateTime<Utc>>,
        timeout_s: u64,
        /// GPU utilisation over the run, where the executor's telemetry reported it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        utilisation: Option<RunUtilisation>,
        at: DateTime<Utc>,
    },
    RetryScheduled {
        next_attempt: u32,
        after_run: Option<Uuid>,
        /// The job may not be assigned before this instant.
        eligible_at: DateTime<Utc>,
        backoff_s: u64,
        trigger: RetryTrigger,
        at: DateTime<Utc>,
    },
    JobSucceeded {
        run_id: Uuid,
        attempts: u32,
        at: DateTime<Utc>,
    },
    JobFailed {
        reason: String,
        attempts: u32,
        last_run: Option<Uuid>,
        at: DateTime<Utc>,
    },
}

impl JobEvent {
    /// Every event type name, for schema export and the projector's "do I know this?" check.
    pub const TYPES: &[&str] = &[
        "JobSubmitted",
        "JobCancelled",
        "JobPriorityChanged",
        "RunAssigned",
        "RunStarted",
        "RunProgressed",
        "RunSucceeded",
        "RunFailed",
        "RunTimedOut",
        "RetryScheduled",
        "JobSucceeded",
        "JobFailed",
    ];

    pub fn at(&self) -> DateTime<Utc> {
        match self {
            Self::JobSubmitted { at, .. }
            | Self::JobCancelled { at, .. }
            | Self::JobPriorityChanged { at, .. }
            | Self::RunAssigned { at, .. }
            | Self::RunStarted { at, .. }
            | Self::RunProgressed { at, .. }
            | Self::RunSucceeded { at, .. }
            | Self::RunFailed { at, .. }
            | Self::RunTimedOut { at, .. }
            | Self::RetryScheduled { at, .. }
            | Self::JobSucceeded { at, .. }
            | Self::JobFailed { at, .. } => *at,
        }
    }
}

impl DomainEvent for JobEvent {
    fn event_type(&self) -> String {
        let name = match self {
            Self::JobSubmitted { .. } => "JobSubmitted",
            Self::JobCancelled { .. } => "JobCancelled",
            Self::JobPriorityChanged { .. } => "JobPriorityChanged",
            Self::RunAssigned { .. } => "RunAssigned",
            Self::RunStarted { .. } => "RunStarted",
            Self::RunProgressed { .. } => "RunProgressed",
            Self::RunSucceeded { .. } => "RunSucceeded",
            Self::RunFailed { .. } => "RunFailed",
            Self::RunTimedOut { .. } => "RunTimedOut",
            Self::RetryScheduled { .. } => "RetryScheduled",
            Self::JobSucceeded { .. } => "JobSucceeded",
            Self::JobFailed { .. } => "JobFailed",
        };
        name.to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION_1.to_string()
    }
}
