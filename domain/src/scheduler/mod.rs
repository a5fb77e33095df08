//! The scheduling policy, as pure code: given the queue, the fleet, each account's recent GPU
//! time and the current instant, which queued jobs go on which GPUs now, and why; and, for any
//! one job, why it is still pending (explain mode). No I/O and no clock: the same inputs always
//! give the same decisions, so the queue's history can be replayed and explained from the
//! events (issue #4's process manager feeds it; `GET /jobs/{id}/explain` calls [`explain`]).
//!
//! # Order
//! Jobs are ordered by **effective priority**, then **fair share**, then **age** (older first),
//! then job id:
//! - effective priority = `priority` + ⌊`age_factor` × `age_bonus`⌋, where `age_factor` grows
//!   linearly from 0 at submission (or at the end of a retry backoff) to 1 after
//!   `age_horizon_s`;
//! - fair share factor = `1 / (1 + usage / mean usage)` over the accounts in the queue, where
//!   usage is the account's GPU-seconds decayed with half-life `usage_half_life_s` (see
//!   [`decayed_gpu_seconds`]): an account that used less GPU time recently goes first.
//! - A job that has waited the whole horizon is **starving**: it goes before every job that is
//!   not, and starving jobs go oldest first. So nothing starves, whatever its priority: a
//!   stream of newer high-priority jobs cannot keep an old one waiting past the horizon plus
//!   the time its GPUs take to drain (see reservations below).
//!
//! The recorded `score` is effective priority + 0.999 × fair share factor (+ 1000 when
//! starving), like Slurm's `sprio` total: higher goes first, except that starving jobs are
//! ordered among themselves by age.
//!
//! # Placement
//! A job's GPUs are all on one **active** executor (gang), free, each with at least the job's
//! `gpu_memory_mb`. Among executors that fit, the one with the fewest free fitting GPUs is
//! chosen (best fit: large holes stay for large jobs), then by id; on it, the smallest fitting
//! GPUs, then by index.
//!
//! # Backfill and reservations
//! A job that does not fit is passed over and later jobs that fit are placed (they "overtake"
//! it, and their decision lists it). A passed-over starving job **reserves** every executor
//! that could ever host it: no later job is placed there, so their
//! GPUs drain until it fits. A large gang job therefore cannot be starved by a stream of small
//! ones.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::job::SchedulingDecision;

mod state;
#[cfg(test)]
mod tests;

pub use state::{FleetState, Stranded};

/// The policy's knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Priority points a job gains by waiting `age_horizon_s` (then no more).
    pub age_bonus: f64,
    /// Seconds of waiting for the full age bonus.
    pub age_horizon_s: f64,
    /// Half-life of past GPU time in the fair-share usage.
    pub usage_half_life_s: f64,
}

/// Added to a starving job's score (above any effective priority).
const STARVING_BOOST: f64 = 1000.0;

impl Default for Policy {
    fn default() -> Self {
        Self {
            // Up to 50 priority points for waiting; a job waiting a day is starving.
            age_bonus: 50.0,
            age_horizon_s: 86_400.0,
            usage_half_life_s: 7.0 * 86_400.0,
        }
    }
}

/// A job waiting in the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedJob {
    pub job_id: Uuid,
    pub account: String,
    /// 0 to 100.
    pub priority: u8,
    pub gpus: u8,
    /// Per GPU; 0: any.
    pub gpu_memory_mb: u64,
    /// Since when it has been waiting: submission, or the end of its last run.
    pub queued_at: DateTime<Utc>,
    /// A retry backoff: not to be placed before this instant.
    pub eligible_at: Option<DateTime<Utc>>,
}

/// Whether an executor takes work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorAvailability {
    Active,
    /// Draining, lost, gone or not yet active: nothing is placed on it.
    Unavailable,
}

/// One executor as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutorView {
    pub executor_id: String,
    pub availability: ExecutorAvailability,
    pub gpus: Vec<GpuView>,
}

/// One GPU as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuView {
    pub uuid: String,
    pub index: u32,
    pub memory_mb: u64,
    /// Held by a run.
    pub busy: bool,
}

/// One placement the policy decided.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assignment {
    pub job_id: Uuid,
    pub executor_id: String,
    pub gpu_uuids: Vec<String>,
    pub decision: SchedulingDecision,
}

/// A job's factors at one instant (Slurm's `sprio` line).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Factors {
    pub priority: u8,
    /// 0..=1, linear in time waited up to the horizon.
    pub age_factor: f64,
    /// `priority` + ⌊age_factor × age_bonus⌋.
    pub effective_priority: f64,
    /// 0..=1: 1 for an account without recent GPU time.
    pub fair_share_factor: f64,
    /// The account's decayed GPU-seconds.
    pub account_usage_gpu_seconds: f64,
    /// Waited the whole horizon: goes before every job that has not (oldest first).
    pub starving: bool,
    /// The order in one number: effective priority + 0.999 × fair share factor (+ 1000 when
    /// starving).
    pub score: f64,
}

/// GPU-seconds of a run of `gpus` GPUs from `start` to `end`, each second weighted by
/// `2^(-(now - t) / half_life)`: recent use counts fully, old use fades.
pub fn decayed_gpu_seconds(
    gpus: u32,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    now: DateTime<Utc>,
    half_life_s: f64,
) -> f64 {
    let end = end.min(now);
    if end <= start || half_life_s <= 0.0 {
        return 0.0;
    }
    let ago = |t: DateTime<Utc>| (now - t).num_milliseconds() as f64 / 1000.0;
    let k = std::f64::consts::LN_2 / half_life_s;
    f64::from(gpus) * ((-k * ago(end)).exp() - (-k * ago(start)).exp()) / k
}

/// Everything one scheduling pass looks at.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub queue: Vec<QueuedJob>,
    pub executors: Vec<ExecutorView>,
    /// Each account's decayed GPU-seconds (see [`decayed_gpu_seconds`]); missing = 0.
    pub usage: BTreeMap<String, f64>,
}

/// Why a job is not placed now.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Blocker {
    /// In a retry backoff until then.
    Backoff { until: DateTime<Utc> },
    /// No active executor has this many GPUs with enough memory, even all free.
    NoExecutorCanFit {
        gpus: u8,
        gpu_memory_mb: u64,
        /// The most fitting GPUs any active executor has.
        largest_fitting: usize,
    },
    /// Executors could host it, but not enough of their fitting GPUs are free now.
    GpusBusy { executors: Vec<String> },
    /// The executors that could host it are reserved for a starving job ahead of it.
    Reserved { for_job: Uuid },
}

/// Why a job is where it is, at one instant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    pub job_id: Uuid,
    /// 1 for the head of the queue.
    pub position: usize,
    pub queue_length: usize,
    pub factors: Factors,
    /// Queued jobs ordered before it.
    pub ahead: Vec<Uuid>,
    /// Whether the policy would place it now, and where.
    pub would_assign: Option<Assignment>,
    /// What it waits for; empty when it would be placed now.
    pub waiting_for: Vec<Blocker>,
}

/// The factors of each eligible-or-not job, and the queue in policy order.
struct Ordered<'a> {
    jobs: Vec<(&'a QueuedJob, Factors)>,
}

fn order<'a>(snapshot: &'a Snapshot, now: DateTime<Utc>, policy: &Policy) -> Ordered<'a> {
    let accounts: BTreeSet<&str> = snapshot.queue.iter().map(|j| j.account.as_str()).collect();
    let usage_of = |account: &str| snapshot.usage.get(account).copied().unwrap_or(0.0).max(0.0);
    let mean = if accounts.is_empty() {
        0.0
    } else {
        accounts.iter().map(|a| usage_of(a)).sum::<f64>() / accounts.len() as f64
    };
    let mut jobs: Vec<(&QueuedJob, Factors)> = snapshot
        .queue
        .iter()
        .map(|job| {
            let since = job
                .eligible_at
                .map_or(job.queued_at, |e| e.max(job.queued_at));
            let waited = ((now - since).num_milliseconds() as f64 / 1000.0).max(0.0);
            let age_factor = if policy.age_horizon_s > 0.0 {
                (waited / policy.age_horizon_s).min(1.0)
            } else {
                1.0
            };
            let effective_priority =
                f64::from(job.priority) + (age_factor * policy.age_bonus).floor();
            let usage = usage_of(&job.account);
            let fair_share_factor = if mean > 0.0 {
                1.0 / (1.0 + usage / mean)
            } else {
                1.0
            };
            let starving = age_factor >= 1.0;
            let factors = Factors {
                priority: job.priority,
                age_factor,
                effective_priority,
                fair_share_factor,
                account_usage_gpu_seconds: usage,
                starving,
                score: effective_priority
                    + 0.999 * fair_share_factor
                    + if starving { STARVING_BOOST } else { 0.0 },
            };
            (job, factors)
        })
        .collect();
    jobs.sort_by(|(a, fa), (b, fb)| {
        let since = |j: &QueuedJob| j.eligible_at.map_or(j.queued_at, |e| e.max(j.queued_at));
        fb.starving
            .cmp(&fa.starving)
            .then_with(|| {
                if fa.starving && fb.starving {
                    since(a).cmp(&since(b))
                } else {
                    fb.effective_priority
                        .total_cmp(&fa.effective_priority)
                        .then(fb.fair_share_factor.total_cmp(&fa.fair_share_factor))
                        .then(a.queued_at.cmp(&b.queued_at))
                }
            })
            .then(a.job_id.cmp(&b.job_id))
    });
    Ordered { jobs }
}

/// The GPUs of `executor` that `job` may use: free, with enough memory.
fn fitting(executor: &ExecutorView, gpu_memory_mb: u64, free_only: bool) -> Vec<&GpuView> {
    let mut gpus: Vec<&GpuView> = executor
        .gpus
        .iter()
        .filter(|g| g.memory_mb >= gpu_memory_mb && (!free_only || !g.busy))
        .collect();
    gpus.sort_by(|a, b| a.memory_mb.cmp(&b.memory_mb).then(a.index.cmp(&b.index)));
    gpus
}

/// Best fit: the active executor with the fewest free fitting GPUs that are still enough.
fn place(
    executors: &[ExecutorView],
    reserved: &BTreeMap<String, Uuid>,
    job: &QueuedJob,
) -> Option<(String, Vec<String>, String)> {
    let needed = usize::from(job.gpus);
    executors
        .iter()
        .filter(|e| {
            e.availability == ExecutorAvailability::Active && !reserved.contains_key(&e.executor_id)
        })
        .filter_map(|e| {
            let free = fitting(e, job.gpu_memory_mb, true);
            (free.len() >= needed).then_some((e, free))
        })
        .min_by(|(a, fa), (b, fb)| {
            fa.len()
                .cmp(&fb.len())
                .then(a.executor_id.cmp(&b.executor_id))
        })
        .map(|(e, free)| {
            let why = format!(
                "{}: {} of its {} free GPUs with ≥ {} MiB (best fit: fewest free fitting GPUs)",
                e.executor_id,
                needed,
                free.len(),
                job.gpu_memory_mb
            );
            let uuids = free[..needed].iter().map(|g| g.uuid.clone()).collect();
            (e.executor_id.clone(), uuids, why)
        })
}

/// Whether `executor` could ever host `job` (all its GPUs free).
fn could_host(executor: &ExecutorView, job: &QueuedJob) -> bool {
    executor.availability == ExecutorAvailability::Active
        && fitting(executor, job.gpu_memory_mb, false).len() >= usize::from(job.gpus)
}

/// One pass of the policy.
struct Pass<'a> {
    ordered: Ordered<'a>,
    /// Per job in order: its assignment, or why not.
    outcomes: Vec<Result<Assignment, Vec<Blocker>>>,
}

fn run<'a>(snapshot: &'a Snapshot, now: DateTime<Utc>, policy: &Policy) -> Pass<'a> {
    let ordered = order(snapshot, now, policy);
    let mut executors = snapshot.executors.clone();
    let mut reserved: BTreeMap<String, Uuid> = BTreeMap::new();
    let mut passed_over: Vec<Uuid> = Vec::new();
    let mut outcomes = Vec::with_capacity(ordered.jobs.len());
    for (job, factors) in &ordered.jobs {
        if let Some(until) = job.eligible_at.filter(|until| *until > now) {
            outcomes.push(Err(vec![Blocker::Backoff { until }]));
            continue;
        }
        match place(&executors, &reserved, job) {
            Some((executor_id, gpu_uuids, placement)) => {
                let executor = executors
                    .iter_mut()
                    .find(|e| e.executor_id == executor_id)
                    .expect("placed on a known executor");
                for gpu in &mut executor.gpus {
                    if gpu_uuids.contains(&gpu.uuid) {
                        gpu.busy = true;
                    }
                }
                outcomes.push(Ok(Assignment {
                    job_id: job.job_id,
                    executor_id,
                    gpu_uuids,
                    decision: SchedulingDecision {
                        score: factors.score,
                        priority: job.priority,
                        fair_share_factor: factors.fair_share_factor,
                        age_factor: factors.age_factor,
                        overtook: passed_over.clone(),
                        placement,
                    },
                }));
            }
            None => {
                outcomes.push(Err(blockers(&executors, &reserved, job)));
                passed_over.push(job.job_id);
                if factors.starving {
                    for executor in &executors {
                        if could_host(executor, job) {
                            reserved
                                .entry(executor.executor_id.clone())
                                .or_insert(job.job_id);
                        }
                    }
                }
            }
        }
    }
    Pass { ordered, outcomes }
}

fn blockers(
    executors: &[ExecutorView],
    reserved: &BTreeMap<String, Uuid>,
    job: &QueuedJob,
) -> Vec<Blocker> {
    let hosts: Vec<&ExecutorView> = executors.iter().filter(|e| could_host(e, job)).collect();
    if hosts.is_empty() {
        let largest_fitting = executors
            .iter()
            .filter(|e| e.availability == ExecutorAvailability::Active)
            .map(|e| fitting(e, job.gpu_memory_mb, false).len())
            .max()
            .unwrap_or(0);
        return vec![Blocker::NoExecutorCanFit {
            gpus: job.gpus,
            gpu_memory_mb: job.gpu_memory_mb,
            largest_fitting,
        }];
    }
    let mut found = Vec::new();
    let busy: Vec<String> = hosts
        .iter()
        .filter(|e| fitting(e, job.gpu_memory_mb, true).len() < usize::from(job.gpus))
        .map(|e| e.executor_id.clone())
        .collect();
    if !busy.is_empty() {
        found.push(Blocker::GpusBusy { executors: busy });
    }
    if let Some(for_job) = hosts.iter().find_map(|e| reserved.get(&e.executor_id)) {
        found.push(Blocker::Reserved { for_job: *for_job });
    }
    found
}

/// The placements the policy makes now, in queue order.
pub fn schedule(snapshot: &Snapshot, now: DateTime<Utc>, policy: &Policy) -> Vec<Assignment> {
    run(snapshot, now, policy)
        .outcomes
        .into_iter()
        .filter_map(Result::ok)
        .collect()
}

/// Why `job_id` is where it is in the queue at `now`; `None` when it is not queued.
pub fn explain(
    snapshot: &Snapshot,
    job_id: Uuid,
    now: DateTime<Utc>,
    policy: &Policy,
) -> Option<Explanation> {
    let pass = run(snapshot, now, policy);
    let index = pass
        .ordered
        .jobs
        .iter()
        .position(|(j, _)| j.job_id == job_id)?;
    let (_, factors) = &pass.ordered.jobs[index];
    let (would_assign, waiting_for) = match &pass.outcomes[index] {
        Ok(assignment) => (Some(assignment.clone()), Vec::new()),
        Err(blockers) => (None, blockers.clone()),
    };
    Some(Explanation {
        job_id,
        position: index + 1,
        queue_length: pass.ordered.jobs.len(),
        factors: factors.clone(),
        ahead: pass.ordered.jobs[..index]
            .iter()
            .map(|(j, _)| j.job_id)
            .collect(),
        would_assign,
        waiting_for,
    })
}

/// The queue in policy order with each job's factors (`sprio` for the whole queue).
pub fn queue_order(
    snapshot: &Snapshot,
    now: DateTime<Utc>,
    policy: &Policy,
) -> Vec<(Uuid, Factors)> {
    order(snapshot, now, policy)
        .jobs
        .into_iter()
        .map(|(job, factors)| (job.job_id, factors))
        .collect()
}
