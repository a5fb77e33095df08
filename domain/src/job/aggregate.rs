use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{JobCommand, JobError, JobEvent, JobSpec, RetryTrigger, RunUtilisation};
use crate::{FieldError, validate};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Assigned,
    Running,
    Succeeded,
    Failed,
    TimedOut,
}

impl RunState {
    pub fn is_ended(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::TimedOut)
    }
}

/// One attempt at running the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub run_id: Uuid,
    pub attempt: u32,
    pub executor_id: String,
    pub gpu_uuids: Vec<String>,
    pub state: RunState,
    pub started_at: Option<DateTime<Utc>>,
    pub last_report_seq: Option<u64>,
}

/// Exponential backoff between automatic retries: `base · 2^(failures-1)`, capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base_backoff_s: u64,
    pub max_backoff_s: u64,
}

/// Upper bound of any backoff, whatever the policy says (a year).
const MAX_BACKOFF_S: i64 = 365 * 24 * 3600;

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base_backoff_s: 10,
            max_backoff_s: 600,
        }
    }
}

impl RetryPolicy {
    /// Backoff after the `failed_attempt`-th attempt (1-based) failed.
    pub fn backoff_s(&self, failed_attempt: u32) -> u64 {
        let exp = failed_attempt.saturating_sub(1).min(32);
        self.base_backoff_s
            .saturating_mul(1u64 << exp)
            .min(self.max_backoff_s)
    }
}

/// What the job aggregate needs from outside: only configuration, no I/O.
#[derive(Debug, Clone, Default)]
pub struct JobServices {
    pub retry: RetryPolicy,
}

/// The state of one job, rebuilt from its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// `None` until `JobSubmitted`.
    pub spec: Option<JobSpec>,
    pub state: Option<JobState>,
    pub runs: Vec<Run>,
    /// The job may not be assigned before this instant (retry backoff).
    pub eligible_at: Option<DateTime<Utc>>,
    /// Attempts the job may make in total: `1 + max_retries`, plus one per manual retry.
    pub attempts_allowed: u32,
}

impl Job {
    fn state(&self) -> Result<JobState, JobError> {
        self.state.ok_or(JobError::NotFound)
    }

    fn spec(&self) -> &JobSpec {
        self.spec.as_ref().expect("a job with a state has a spec")
    }

    fn active_run(&self) -> Option<&Run> {
        self.runs.last().filter(|run| !run.state.is_ended())
    }

    fn run_mut(&mut self, run_id: Uuid) -> Option<&mut Run> {
        self.runs.iter_mut().find(|run| run.run_id == run_id)
    }

    fn attempts(&self) -> u32 {
        self.runs.len() as u32
    }

    fn not_terminal(&self) -> Result<JobState, JobError> {
        let state = self.state()?;
        if state.is_terminal() {
            return Err(JobError::AlreadyFinished { state });
        }
        Ok(state)
    }

    /// Finds the run a report is about and checks that the reporting executor owns it.
    fn reported_run(&self, run_id: Uuid, executor_id: &str) -> Result<&Run, JobError> {
        self.state()?;
        let run = self
            .runs
            .iter()
            .find(|run| run.run_id == run_id)
            .ok_or(JobError::RunNotAssigned(run_id))?;
        if run.executor_id != executor_id {
            return Err(JobError::WrongExecutor {
                run_id,
                assigned_to: run.executor_id.clone(),
                reported_by: executor_id.to_string(),
            });
        }
        Ok(run)
    }

    /// After a run failed or timed out: either schedule the next attempt or fail the job.
    /// A cancelled job records only the run's end.
    fn after_failure(
        &self,
        run: &Run,
        retryable: bool,
        reason: &str,
        retry: &RetryPolicy,
        at: DateTime<Utc>,
    ) -> Option<JobEvent> {
        if self.state == Some(JobState::Cancelled) {
            return None;
        }
        if retryable && self.attempts() < self.attempts_allowed {
            let backoff_s = retry.backoff_s(run.attempt);
            return Some(JobEvent::RetryScheduled {
                next_attempt: run.attempt + 1,
                after_run: Some(run.run_id),
                eligible_at: at
                    + chrono::Duration::seconds(
                        i64::try_from(backoff_s)
                            .unwrap_or(i64::MAX)
                            .min(MAX_BACKOFF_S),
                    ),
                backoff_s,
                trigger: RetryTrigger::Automatic,
                at,
            });
        }
        let reason = if retryable {
            let plural = if run.attempt == 1 { "" } else { "s" };
            format!(
                "retries exhausted after {} attempt{plural}: {reason}",
                run.attempt
            )
        } else {
            reason.to_string()
        };
        Some(JobEvent::JobFailed {
            reason,
            attempts: self.attempts(),
            last_run: Some(run.run_id),
            at,
        })
    }
}

fn invalid(field: &str, message: &str) -> JobError {
    JobError::Invalid(FieldError::new(field, message))
}

/// Utilisation figures are finite, not negative, and busy time is at most sampled time.
fn check_utilisation(utilisation: Option<&RunUtilisation>) -> Result<(), JobError> {
    let Some(u) = utilisation else {
        return Ok(());
    };
    for (field, value) in [
        ("utilisation.gpu_seconds_sampled", u.gpu_seconds_sampled),
        ("utilisation.gpu_seconds_busy", u.gpu_seconds_busy),
    ] {
        if !value.is_finite() || value < 0.0 {
            return Err(invalid(
                field,
                "must be a finite number of seconds, at least 0",
            ));
        }
    }
    if u.gpu_seconds_busy > u.gpu_seconds_sampled {
        return Err(invalid(
            "utilisation.gpu_seconds_busy",
            "must be at most utilisation.gpu_seconds_sampled",
        ));
    }
    Ok(())
}

fn check_text(field: &str, value: &str) -> Result<(), JobError> {
    validate::text(field, value, 1024).map_err(JobError::Invalid)
}

impl Aggregate for Job {
    const TYPE: &'static str = "job";
    type Command = JobCommand;
    type Event = JobEvent;
    type Error = JobError;
    type Services = JobServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command, services)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            JobEvent::JobSubmitted { spec, .. } => {
                self.attempts_allowed = 1 + spec.max_retries;
                self.spec = Some(spec);
                self.state = Some(JobState::Queued);
            }
            JobEvent::JobCancelled { .. } => self.state = Some(JobState::Cancelled),
            JobEvent::JobPriorityChanged { to, .. } => {
                if let Some(spec) = self.spec.as_mut() {
                    spec.priority = to;
                }
            }
            JobEvent::RunAssigned {
                run_id,
                attempt,
                executor_id,
                gpu_uuids,
                ..
            } => {
                self.runs.push(Run {
                    run_id,
                    attempt,
                    executor_id,
                    gpu_uuids,
                    state: RunState::Assigned,
                    started_at: None,
                    last_report_seq: None,
                });
                self.eligible_at = None;
                self.state = Some(JobState::Assigned);
            }
            JobEvent::RunStarted { run_id, at, .. } => {
                if let Some(run) = self.run_mut(run_id) {
                    run.state = RunState::Running;
                    run.started_at = Some(at);
                }
                self.state = Some(JobState::Running);
            }
            JobEvent::RunProgressed {
                run_id, report_seq, ..
            } => {
                if let Some(run) = self.run_mut(run_id) {
                    run.last_report_seq = Some(report_seq);
                }
            }
            JobEvent::RunSucceeded { run_id, .. } => self.end_run(run_id, RunState::Succeeded),
            JobEvent::RunFailed { run_id, .. } => self.end_run(run_id, RunState::Failed),
            JobEvent::RunTimedOut { run_id, .. } => self.end_run(run_id, RunState::TimedOut),
            JobEvent::RetryScheduled {
                eligible_at,
                trigger,
                ..
            } => {
                if matches!(trigger, RetryTrigger::Manual { .. }) {
                    self.attempts_allowed = self.attempts_allowed.max(self.attempts()) + 1;
                }
                self.eligible_at = Some(eligible_at);
                self.state = Some(JobState::Queued);
            }
            JobEvent::JobSucceeded { .. } => self.state = Some(JobState::Succeeded),
            JobEvent::JobFailed { .. } => self.state = Some(JobState::Failed),
        }
    }
}

impl Job {
    fn end_run(&mut self, run_id: Uuid, state: RunState) {
        if let Some(run) = self.run_mut(run_id) {
            run.state = state;
        }
    }

    /// The pure decision: which events a command produces from the current state.
    pub fn decide(
        &self,
        command: JobCommand,
        services: &JobServices,
    ) -> Result<Vec<JobEvent>, JobError> {
        match command {
            JobCommand::SubmitJob { job_id, spec, at } => {
                if self.state.is_some() {
                    return Err(JobError::AlreadySubmitted);
                }
                spec.validate().map_err(JobError::Invalid)?;
                Ok(vec![JobEvent::JobSubmitted { job_id, spec, at }])
            }
            JobCommand::CancelJob { by, reason, at } => {
                let previous_state = self.not_terminal()?;
                check_text("by", &by)?;
                check_text("reason", &reason)?;
                let active = self.active_run();
                Ok(vec![JobEvent::JobCancelled {
                    by,
                    reason,
                    previous_state,
                    active_run: active.map(|run| run.run_id),
                    active_executor: active.map(|run| run.executor_id.clone()),
                    at,
                }])
            }
            JobCommand::ChangePriority {
                priority,
                by,
                reason,
                at,
            } => {
                self.not_terminal()?;
                validate::range("priority", priority, 0, super::MAX_PRIORITY)
                    .map_err(JobError::Invalid)?;
                check_text("by", &by)?;
                check_text("reason", &reason)?;
                let from = self.spec().priority;
                if from == priority {
                    return Ok(vec![]);
                }
                Ok(vec![JobEvent::JobPriorityChanged {
                    from,
                    to: priority,
                    by,
                    reason,
                    at,
                }])
            }
            JobCommand::AssignRun {
                run_id,
                executor_id,
                gpu_uuids,
                decision,
                at,
            } => self.assign(run_id, executor_id, gpu_uuids, decision, at),
            JobCommand::ReportRunStarted {
                run_id,
                executor_id,
                at,
            } => {
                let run = self.reported_run(run_id, &executor_id)?;
                match run.state {
                    RunState::Running => Ok(vec![]),
                    RunState::Assigned if self.state == Some(JobState::Cancelled) => {
                        Err(JobError::Cancelled)
                    }
                    RunState::Assigned => Ok(vec![JobEvent::RunStarted {
                        run_id,
                        attempt: run.attempt,
                        executor_id,
                        at,
                    }]),
                    state => Err(JobError::RunNotActive {
                        run_id,
                        state,
                        action: "start it",
                    }),
                }
            }
            JobCommand::ReportRunProgress {
                run_id,
                executor_id,
                report_seq,
                progress,
                metrics,
                at,
            } => {
                let run = self.reported_run(run_id, &executor_id)?;
                if run.state != RunState::Running {
                    return Err(JobError::RunNotActive {
                        run_id,
                        state: run.state,
                        action: "report progress",
                    });
                }
                if run.last_report_seq.is_some_and(|seen| report_seq <= seen) {
                    return Ok(vec![]);
                }
                if let Some(p) = progress
                    && !(0.0..=1.0).contains(&p)
                {
                    return Err(invalid("progress", "must be between 0 and 1"));
                }
                if metrics.len() > 64 {
                    return Err(invalid("metrics", "at most 64 metrics per report"));
                }
                for (name, value) in &metrics {
                    if name.is_empty() || name.len() > 64 || !value.is_finite() {
                        return Err(JobError::Invalid(FieldError::new(
                            format!("metrics.{name}"),
                            "names are 1 to 64 bytes and values finite numbers",
                        )));
                    }
                }
                Ok(vec![JobEvent::RunProgressed {
                    run_id,
                    report_seq,
                    progress,
                    metrics,
                    at,
                }])
            }
            JobCommand::ReportRunSucceeded {
                run_id,
                executor_id,
                utilisation,
                at,
            } => {
                let run = self.reported_run(run_id, &executor_id)?;
                check_utilisation(utilisation.as_ref())?;
                match run.state {
                    RunState::Succeeded => return Ok(vec![]),
                    RunState::Running => {}
                    state => {
                        return Err(JobError::RunNotActive {
                            run_id,
                            state,
                            action: "report success",
                        });
                    }
                }
                let mut events = vec![JobEvent::RunSucceeded {
                    run_id,
                    attempt: run.attempt,
                    executor_id,
                    gpu_uuids: run.gpu_uuids.clone(),
                    started_at: run.started_at,
                    utilisation,
                    at,
                }];
                if self.state != Some(JobState::Cancelled) {
                    events.push(JobEvent::JobSucceeded {
                        run_id,
                        attempts: self.attempts(),
                        at,
                    });
                }
                Ok(events)
            }
            JobCommand::ReportRunFailed {
                run_id,
                executor_id,
                exit_code,
                signal,
                reason,
                retryable,
                utilisation,
                at,
            } => {
                let run = self.reported_run(run_id, &executor_id)?;
                check_text("reason", &reason)?;
                check_utilisation(utilisation.as_ref())?;
                match run.state {
                    RunState::Failed => return Ok(vec![]),
                    RunState::Assigned | RunState::Running => {}
                    state => {
                        return Err(JobError::RunNotActive {
                            run_id,
                            state,
                            action: "report failure",
                        });
                    }
                }
                let mut events = vec![JobEvent::RunFailed {
                    run_id,
                    attempt: run.attempt,
                    executor_id,
                    gpu_uuids: run.gpu_uuids.clone(),
                    started_at: run.started_at,
                    exit_code,
                    signal,
                    reason: reason.clone(),
                    retryable,
                    utilisation,
                    at,
                }];
                events.extend(self.after_failure(run, retryable, &reason, &services.retry, at));
                Ok(events)
            }
            JobCommand::ReportRunTimedOut {
                run_id,
                executor_id,
                utilisation,
                at,
            } => {
                let run = self.reported_run(run_id, &executor_id)?;
                check_utilisation(utilisation.as_ref())?;
                match run.state {
                    RunState::TimedOut => return Ok(vec![]),
                    RunState::Running => {}
                    state => {
                        return Err(JobError::RunNotActive {
                            run_id,
                            state,
                            action: "report a timeout",
                        });
                    }
                }
                let timeout_s = self.spec().timeout_s;
                let mut events = vec![JobEvent::RunTimedOut {
                    run_id,
                    attempt: run.attempt,
                    executor_id,
                    gpu_uuids: run.gpu_uuids.clone(),
                    started_at: run.started_at,
                    timeout_s,
                    utilisation,
                    at,
                }];
                let reason = format!("run exceeded its timeout of {timeout_s} s");
                events.extend(self.after_failure(run, true, &reason, &services.retry, at));
                Ok(events)
            }
            JobCommand::RetryJob { by, reason, at } => {
                let state = self.state()?;
                if state != JobState::Failed {
                    return Err(JobError::NotRetryable { state });
                }
                check_text("by", &by)?;
                check_text("reason", &reason)?;
                Ok(vec![JobEvent::RetryScheduled {
                    next_attempt: self.attempts() + 1,
                    after_run: self.runs.last().map(|run| run.run_id),
                    eligible_at: at,
                    backoff_s: 0,
                    trigger: RetryTrigger::Manual { by, reason },
                    at,
                }])
            }
        }
    }

    fn assign(
        &self,
        run_id: Uuid,
        executor_id: String,
        gpu_uuids: Vec<String>,
        decision: super::SchedulingDecision,
        at: DateTime<Utc>,
    ) -> Result<Vec<JobEvent>, JobError> {
        match self.state()? {
            JobState::Queued => {}
            JobState::Cancelled => return Err(JobError::Cancelled),
            state => return Err(JobError::NotQueued { state }),
        }
        if let Some(until) = self.eligible_at
            && at < until
        {
            return Err(JobError::InBackoff { until });
        }
        if self.runs.iter().any(|run| run.run_id == run_id) {
            return Err(JobError::DuplicateRun(run_id));
        }
        validate::token("executor_id", &executor_id).map_err(JobError::Invalid)?;
        let wanted = usize::from(self.spec().gpus);
        if gpu_uuids.len() != wanted {
            return Err(invalid(
                "gpu_uuids",
                &format!(
                    "the job needs exactly {wanted} GPUs, got {}",
                    gpu_uuids.len()
                ),
            ));
        }
        let mut distinct = gpu_uuids.clone();
        distinct.sort();
        distinct.dedup();
        if distinct.len() != gpu_uuids.len() || gpu_uuids.iter().any(String::is_empty) {
            return Err(invalid(
                "gpu_uuids",
                "GPU uuids must be non-empty and distinct",
            ));
        }
        Ok(vec![JobEvent::RunAssigned {
            run_id,
            attempt: self.attempts() + 1,
            executor_id,
            gpu_uuids,
            decision,
            at,
        }])
    }
}
