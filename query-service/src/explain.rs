//! "Why is my job pending?" at any instant: the queue and the fleet are rebuilt from the
//! events recorded up to then (the same fold the scheduler keeps live), and the pure policy is
//! run in explain mode: the job's place in the queue, its factors (like Slurm's `sprio`), the
//! jobs ahead of it, and what it waits for, or where it would go now.
//!
//! The whole event store up to the instant is folded per request: cost grows with history (a
//! checkpointed fold is future work).

use chrono::{DateTime, Utc};
use overfly_domain::job::{Job, JobState};
use overfly_domain::scheduler::{self, Blocker, FleetState, Policy};
use poem_openapi::Object;
use sqlx::PgPool;
use uuid::Uuid;

/// At most this many jobs ahead are listed (all are counted).
pub const MAX_AHEAD: usize = 100;

/// A job's priority factors at one instant.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct Factors {
    pub priority: i64,
    /// 0 to 1: time waited over the aging horizon.
    pub age_factor: f64,
    /// priority + ⌊age_factor × age bonus⌋.
    pub effective_priority: f64,
    /// 0 to 1: 1 for an account without recent GPU time.
    pub fair_share_factor: f64,
    /// The account's GPU-seconds, decayed by the fair-share half-life.
    pub account_usage_gpu_seconds: f64,
    /// Waited the whole horizon: goes before every job that has not.
    pub starving: bool,
    /// The order in one number (higher first; starving jobs oldest first).
    pub score: f64,
}

/// Where the policy would place the job now.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct Placement {
    pub executor_id: String,
    pub gpu_uuids: Vec<String>,
    pub placement: String,
    /// Jobs ahead of it that it would overtake (they do not fit now).
    pub overtakes: Vec<Uuid>,
}

/// One thing the job waits for.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct Reason {
    /// backoff, no_executor_can_fit, gpus_busy or reserved.
    pub kind: String,
    /// In words.
    pub detail: String,
    /// backoff: not before this instant.
    pub until: Option<DateTime<Utc>>,
    /// gpus_busy: the executors that could host it once GPUs free up.
    pub executors: Vec<String>,
    /// reserved: the starving job the GPUs are kept for.
    pub for_job: Option<Uuid>,
}

/// Why a job is where it is.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct Explanation {
    pub job_id: Uuid,
    pub at: DateTime<Utc>,
    /// The job's state at that instant: queued, assigned, running, succeeded, failed or
    /// cancelled.
    pub state: String,
    /// One sentence.
    pub summary: String,
    /// 1 for the head of the queue; absent unless queued.
    pub position: Option<i64>,
    pub queue_length: i64,
    pub factors: Option<Factors>,
    /// How many queued jobs go before it.
    pub ahead_count: i64,
    /// The first of them, in order (at most 100).
    pub ahead: Vec<Uuid>,
    pub would_assign: Option<Placement>,
    pub waiting_for: Vec<Reason>,
}

type Row = (String, String, String, String, serde_json::Value);

/// The explanation of `job_id` at `at`; `None` when the job did not exist then.
pub async fn explain(
    pool: &PgPool,
    job_id: Uuid,
    at: DateTime<Utc>,
    policy: &Policy,
) -> anyhow::Result<Option<Explanation>> {
    let mut state = FleetState::default();
    let mut job = Job::default();
    let mut exists = false;
    let mut after = (String::from("0"), 0i64);
    loop {
        let rows: Vec<(
            String,
            i64,
            String,
            String,
            String,
            String,
            serde_json::Value,
        )> = sqlx::query_as(
            "SELECT tx_id::text, global_position, aggregate_type, aggregate_id, event_type,
                        event_version, payload
                   FROM events
                  WHERE (tx_id, global_position) > ($1::text::xid8, $2) AND recorded_at <= $3
                  ORDER BY events.tx_id, events.global_position
                  LIMIT 5000",
        )
        .bind(&after.0)
        .bind(after.1)
        .bind(at)
        .fetch_all(pool)
        .await?;
        let Some(last) = rows.last() else { break };
        after = (last.0.clone(), last.1);
        for (_, _, aggregate_type, aggregate_id, event_type, version, payload) in rows {
            let row: Row = (aggregate_type, aggregate_id, event_type, version, payload);
            fold(&mut state, &mut job, &mut exists, job_id, row, policy)?;
        }
    }
    if !exists {
        return Ok(None);
    }
    let job_state = job.state.unwrap_or(JobState::Queued);
    let state_name = serde_json::to_value(job_state)?
        .as_str()
        .unwrap_or("queued")
        .to_string();
    let snapshot = state.snapshot(at, policy);
    let queue_length = snapshot.queue.len() as i64;
    let Some(why) = scheduler::explain(&snapshot, job_id, at, policy) else {
        return Ok(Some(Explanation {
            job_id,
            at,
            summary: format!("not waiting: the job is {state_name}"),
            state: state_name,
            position: None,
            queue_length,
            factors: None,
            ahead_count: 0,
            ahead: Vec::new(),
            would_assign: None,
            waiting_for: Vec::new(),
        }));
    };
    let waiting_for: Vec<Reason> = why.waiting_for.iter().map(reason).collect();
    let summary = match (&why.would_assign, waiting_for.first()) {
        (Some(a), _) => format!(
            "position {} of {}: it fits now on {} and is placed at the scheduler's next pass",
            why.position, why.queue_length, a.executor_id
        ),
        (None, Some(first)) => format!(
            "position {} of {} ({} ahead): {}",
            why.position,
            why.queue_length,
            why.ahead.len(),
            first.detail
        ),
        (None, None) => format!("position {} of {}", why.position, why.queue_length),
    };
    Ok(Some(Explanation {
        job_id,
        at,
        state: state_name,
        summary,
        position: Some(why.position as i64),
        queue_length,
        factors: Some(Factors {
            priority: i64::from(why.factors.priority),
            age_factor: why.factors.age_factor,
            effective_priority: why.factors.effective_priority,
            fair_share_factor: why.factors.fair_share_factor,
            account_usage_gpu_seconds: why.factors.account_usage_gpu_seconds,
            starving: why.factors.starving,
            score: why.factors.score,
        }),
        ahead_count: why.ahead.len() as i64,
        ahead: why.ahead.iter().take(MAX_AHEAD).copied().collect(),
        would_assign: why.would_assign.map(|a| Placement {
            executor_id: a.executor_id,
            gpu_uuids: a.gpu_uuids,
            placement: a.decision.placement,
            overtakes: a.decision.overtook,
        }),
        waiting_for,
    }))
}

fn fold(
    state: &mut FleetState,
    job: &mut Job,
    exists: &mut bool,
    job_id: Uuid,
    (aggregate_type, aggregate_id, event_type, version, payload): Row,
    policy: &Policy,
) -> anyhow::Result<()> {
    match aggregate_type.as_str() {
        "job" => {
            let event = overfly_projector::jobs::decode(&event_type, &version, &payload)?;
            let id: Uuid = aggregate_id.parse()?;
            if id == job_id {
                *exists = true;
                cqrs_es::Aggregate::apply(job, event.clone());
            }
            state.apply_job(id, &event, policy);
        }
        "executor" => {
            let event = overfly_projector::executors::decode(&event_type, &version, &payload)?;
            state.apply_executor(&aggregate_id, &event);
        }
        other => anyhow::bail!("unknown aggregate type {other}"),
    }
    Ok(())
}

fn reason(blocker: &Blocker) -> Reason {
    let empty = Reason {
        kind: String::new(),
        detail: String::new(),
        until: None,
        executors: Vec::new(),
        for_job: None,
    };
    match blocker {
        Blocker::Backoff { until } => Reason {
            kind: "backoff".into(),
            detail: format!("retry backoff until {until}"),
            until: Some(*until),
            ..empty
        },
        Blocker::NoExecutorCanFit {
            gpus,
            gpu_memory_mb,
            largest_fitting,
        } => Reason {
            kind: "no_executor_can_fit".into(),
            detail: format!(
                "no active executor has {gpus} GPUs with ≥ {gpu_memory_mb} MiB \
                 (the most any has is {largest_fitting})"
            ),
            ..empty
        },
        Blocker::GpusBusy { executors } => Reason {
            kind: "gpus_busy".into(),
            detail: format!("waiting for GPUs to free up on {}", executors.join(", ")),
            executors: executors.clone(),
            ..empty
        },
        Blocker::Reserved { for_job } => Reason {
            kind: "reserved".into(),
            detail: format!("its executors are kept for starving job {for_job}"),
            for_job: Some(*for_job),
            ..empty
        },
    }
}
