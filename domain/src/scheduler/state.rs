//! What the scheduler knows, folded from the events: the queue, the fleet (which GPUs are
//! held, which executors take work, whose lease ran out) and each account's GPU time. The
//! process manager keeps one up to date from the live stream; `explain ?at=` folds the events
//! up to an instant into a fresh one. Same events, same state, same decisions.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    ExecutorAvailability, ExecutorView, GpuView, Policy, QueuedJob, Snapshot, decayed_gpu_seconds,
};
use crate::executor::ExecutorEvent;
use crate::job::JobEvent;

/// One job the scheduler tracks (until it ends).
#[derive(Debug, Clone, PartialEq)]
struct JobEntry {
    account: String,
    priority: u8,
    gpus: u8,
    gpu_memory_mb: u64,
    /// Waiting since (submission or retry) while queued.
    queued_at: DateTime<Utc>,
    eligible_at: Option<DateTime<Utc>>,
    /// The run holding GPUs, with its executor, while assigned or running.
    active: Option<ActiveRun>,
    /// Failed: out of the queue unless retried by hand.
    failed: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct ActiveRun {
    run_id: Uuid,
    executor_id: String,
    gpu_uuids: Vec<String>,
    started_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
struct ExecutorEntry {
    gpus: Vec<(String, u32, u64)>,
    state: ExecutorPhase,
    lease_expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExecutorPhase {
    Registered,
    Active,
    Draining,
    Gone,
}

/// Finished runs' GPU time per account, decayed to `as_of`.
#[derive(Debug, Clone, Default, PartialEq)]
struct Usage {
    gpu_seconds: f64,
    as_of: Option<DateTime<Utc>>,
}

/// A run on an executor whose lease expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stranded {
    pub job_id: Uuid,
    pub run_id: Uuid,
}

/// The scheduler's view, folded from job and executor events.
#[derive(Debug, Clone, Default)]
pub struct FleetState {
    jobs: BTreeMap<Uuid, JobEntry>,
    executors: BTreeMap<String, ExecutorEntry>,
    usage: BTreeMap<String, Usage>,
}

impl FleetState {
    /// Folds one job event (of job `job_id`).
    pub fn apply_job(&mut self, job_id: Uuid, event: &JobEvent, policy: &Policy) {
        match event {
            JobEvent::JobSubmitted { spec, at, .. } => {
                self.jobs.insert(
                    job_id,
                    JobEntry {
                        account: spec.account.clone(),
                        priority: spec.priority,
                        gpus: spec.gpus,
                        gpu_memory_mb: spec.gpu_memory_mb,
                        queued_at: *at,
                        eligible_at: None,
                        active: None,
                        failed: false,
                    },
                );
            }
            JobEvent::JobPriorityChanged { to, .. } => {
                if let Some(job) = self.jobs.get_mut(&job_id) {
                    job.priority = *to;
                }
            }
            JobEvent::RunAssigned {
                run_id,
                executor_id,
                gpu_uuids,
                ..
            } => {
                if let Some(job) = self.jobs.get_mut(&job_id) {
                    job.active = Some(ActiveRun {
                        run_id: *run_id,
                        executor_id: executor_id.clone(),
                        gpu_uuids: gpu_uuids.clone(),
                        started_at: None,
                    });
                }
            }
            JobEvent::RunStarted { run_id, at, .. } => {
                if let Some(active) = self.active_run(job_id, *run_id) {
                    active.started_at = Some(*at);
                }
            }
            JobEvent::RunSucceeded { run_id, at, .. }
            | JobEvent::RunFailed { run_id, at, .. }
            | JobEvent::RunTimedOut { run_id, at, .. } => {
                self.end_run(job_id, *run_id, *at, policy)
            }
            JobEvent::JobCancelled { at, .. } => {
                if let Some(run_id) = self
                    .jobs
                    .get(&job_id)
                    .and_then(|j| j.active.as_ref())
                    .map(|a| a.run_id)
                {
                    self.end_run(job_id, run_id, *at, policy);
                }
                self.jobs.remove(&job_id);
            }
            JobEvent::RetryScheduled {
                eligible_at, at, ..
            } => {
                if let Some(job) = self.jobs.get_mut(&job_id) {
                    job.queued_at = *at;
                    job.eligible_at = Some(*eligible_at);
                    job.failed = false;
                }
            }
            JobEvent::JobSucceeded { .. } => {
                self.jobs.remove(&job_id);
            }
            // A failed job may be retried by hand: keep it out of the queue until then.
            JobEvent::JobFailed { .. } => {
                if let Some(job) = self.jobs.get_mut(&job_id) {
                    job.failed = true;
                }
            }
            JobEvent::RunProgressed { .. } => {}
        }
    }

    fn active_run(&mut self, job_id: Uuid, run_id: Uuid) -> Option<&mut ActiveRun> {
        self.jobs
            .get_mut(&job_id)?
            .active
            .as_mut()
            .filter(|a| a.run_id == run_id)
    }

    /// Frees the run's GPUs and adds its GPU time to its account.
    fn end_run(&mut self, job_id: Uuid, run_id: Uuid, at: DateTime<Utc>, policy: &Policy) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let Some(active) = job.active.take_if(|a| a.run_id == run_id) else {
            return;
        };
        if let Some(started) = active.started_at {
            let usage = self.usage.entry(job.account.clone()).or_default();
            let half_life = policy.usage_half_life_s;
            let as_of = usage.as_of.map_or(at, |t| t.max(at));
            if let Some(previous) = usage.as_of {
                usage.gpu_seconds *= decay(previous, as_of, half_life);
            }
            usage.gpu_seconds +=
                decayed_gpu_seconds(active.gpu_uuids.len() as u32, started, at, as_of, half_life);
            usage.as_of = Some(as_of);
        }
    }

    /// Folds one executor event (of executor `executor_id`).
    pub fn apply_executor(&mut self, executor_id: &str, event: &ExecutorEvent) {
        match event {
            ExecutorEvent::ExecutorRegistered {
                gpus, lease_s, at, ..
            } => {
                self.executors.insert(
                    executor_id.to_string(),
                    ExecutorEntry {
                        gpus: gpus
                            .iter()
                            .map(|g| (g.uuid.clone(), g.index, g.memory_mb))
                            .collect(),
                        state: ExecutorPhase::Registered,
                        lease_expires_at: *at + chrono::TimeDelta::seconds(i64::from(*lease_s)),
                    },
                );
            }
            ExecutorEvent::ExecutorActivated { .. } => {
                self.set_phase(executor_id, ExecutorPhase::Active)
            }
            ExecutorEvent::ExecutorHeartbeat {
                lease_expires_at, ..
            } => {
                if let Some(executor) = self.executors.get_mut(executor_id) {
                    executor.lease_expires_at = *lease_expires_at;
                }
            }
            ExecutorEvent::ExecutorDraining { .. } => {
                self.set_phase(executor_id, ExecutorPhase::Draining)
            }
            ExecutorEvent::ExecutorDeregistered { .. } | ExecutorEvent::ExecutorLost { .. } => {
                self.set_phase(executor_id, ExecutorPhase::Gone);
            }
        }
    }

    fn set_phase(&mut self, executor_id: &str, phase: ExecutorPhase) {
        if let Some(executor) = self.executors.get_mut(executor_id) {
            executor.state = phase;
        }
    }

    /// The policy's input at `now`.
    pub fn snapshot(&self, now: DateTime<Utc>, policy: &Policy) -> Snapshot {
        let held: BTreeMap<&str, ()> = self
            .jobs
            .values()
            .filter_map(|j| j.active.as_ref())
            .flat_map(|a| a.gpu_uuids.iter().map(|u| (u.as_str(), ())))
            .collect();
        let executors = self
            .executors
            .iter()
            .map(|(id, e)| ExecutorView {
                executor_id: id.clone(),
                availability: if e.state == ExecutorPhase::Active && e.lease_expires_at > now {
                    ExecutorAvailability::Active
                } else {
                    ExecutorAvailability::Unavailable
                },
                gpus: e
                    .gpus
                    .iter()
                    .map(|(uuid, index, memory_mb)| GpuView {
                        uuid: uuid.clone(),
                        index: *index,
                        memory_mb: *memory_mb,
                        busy: held.contains_key(uuid.as_str()),
                    })
                    .collect(),
            })
            .collect();
        let queue = self
            .jobs
            .iter()
            .filter(|(_, j)| j.active.is_none() && !j.failed)
            .map(|(id, j)| QueuedJob {
                job_id: *id,
                account: j.account.clone(),
                priority: j.priority,
                gpus: j.gpus,
                gpu_memory_mb: j.gpu_memory_mb,
                queued_at: j.queued_at,
                eligible_at: j.eligible_at,
            })
            .collect();
        Snapshot {
            queue,
            executors,
            usage: self.usage_at(now, policy),
        }
    }

    /// Each account's decayed GPU-seconds at `now`: finished runs, and running ones so far.
    pub fn usage_at(&self, now: DateTime<Utc>, policy: &Policy) -> BTreeMap<String, f64> {
        let half_life = policy.usage_half_life_s;
        let mut usage: BTreeMap<String, f64> = self
            .usage
            .iter()
            .map(|(account, u)| {
                let factor = u.as_of.map_or(1.0, |t| decay(t, now, half_life));
                (account.clone(), u.gpu_seconds * factor)
            })
            .collect();
        for job in self.jobs.values() {
            if let Some(ActiveRun {
                started_at: Some(started),
                gpu_uuids,
                ..
            }) = &job.active
            {
                *usage.entry(job.account.clone()).or_default() +=
                    decayed_gpu_seconds(gpu_uuids.len() as u32, *started, now, now, half_life);
            }
        }
        usage
    }

    /// Executors that take or hold work and whose lease ran out before `now`.
    pub fn expired_leases(&self, now: DateTime<Utc>) -> Vec<String> {
        self.executors
            .iter()
            .filter(|(_, e)| e.state != ExecutorPhase::Gone && e.lease_expires_at <= now)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The runs holding GPUs of `executor_id` (to fail when it is lost).
    pub fn runs_on(&self, executor_id: &str) -> Vec<Stranded> {
        self.jobs
            .iter()
            .filter_map(|(job_id, j)| {
                j.active
                    .as_ref()
                    .filter(|a| a.executor_id == executor_id)
                    .map(|a| Stranded {
                        job_id: *job_id,
                        run_id: a.run_id,
                    })
            })
            .collect()
    }

    /// Whether `job_id` is queued (waiting for GPUs).
    pub fn is_queued(&self, job_id: Uuid) -> bool {
        self.jobs
            .get(&job_id)
            .is_some_and(|j| j.active.is_none() && !j.failed)
    }
}

/// `2^(-(to - from) / half_life)`.
fn decay(from: DateTime<Utc>, to: DateTime<Utc>, half_life_s: f64) -> f64 {
    let seconds = (to - from).num_milliseconds() as f64 / 1000.0;
    if half_life_s <= 0.0 {
        return 0.0;
    }
    (-std::f64::consts::LN_2 * seconds.max(0.0) / half_life_s).exp()
}
