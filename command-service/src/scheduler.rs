//! The scheduler: a process manager that follows the event store in commit order, keeps the
//! queue and the fleet ([`FleetState`], folded from job and executor events), runs the pure
//! policy ([`overfly_domain::scheduler::schedule`]) and issues `AssignRun` with the decision and
//! its reasons. It also watches executor leases: an executor whose lease ran out is marked lost
//! and its runs fail as retryable (they go back to the queue after their backoff).
//!
//! - **One scheduler at a time**: a session advisory lock; others stand by.
//! - **Restart-safe**: on start it folds the whole event store (the truth), then follows it.
//!   Its commands are ordinary commands through the bus, so a decision that lost a race (the
//!   job was cancelled meanwhile) is refused by the aggregate and changes nothing.
//! - **Prompt**: woken by every commit in this process, and polls otherwise (other
//!   command-service instances, backoffs ending, leases expiring).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use overfly_domain::executor::{ExecutorCommand, ExecutorEvent};
use overfly_domain::job::{JobCommand, JobEvent};
use overfly_domain::scheduler::{ExecutorAvailability, FleetState, Policy, schedule};
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::bus::{CommandBus, CommandContext, CommandError};
use crate::relay::{Cursor, fetch_batch};

/// Advisory lock key of the scheduler ("overfly-…-sched").
const LEADER_LOCK: i64 = 0x6f76_6572_666c_7909;
/// Events folded per read.
const BATCH: i64 = 5000;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub policy: Policy,
    /// How often it looks again when nothing woke it.
    pub poll: Duration,
}

pub struct Scheduler {
    pool: PgPool,
    bus: Arc<CommandBus>,
    config: SchedulerConfig,
    wake: Arc<Notify>,
}

impl Scheduler {
    pub fn new(
        pool: PgPool,
        bus: Arc<CommandBus>,
        config: SchedulerConfig,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            pool,
            bus,
            config,
            wake,
        }
    }

    /// Runs forever; starts over (refolding from the store) after any error.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Err(error) = self.lead().await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "scheduler interrupted; restarting"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }

    async fn lead(&self) -> anyhow::Result<()> {
        let mut conn = crate::leader::acquire(&self.pool, LEADER_LOCK, "scheduler").await?;
        let policy = self.config.policy;
        let mut state = FleetState::default();
        let mut cursor = Cursor::default();
        loop {
            // Fold everything committed so far.
            loop {
                let batch = fetch_batch(&mut conn, cursor, BATCH).await?;
                let Some(last) = batch.last() else { break };
                cursor = last.cursor;
                for row in &batch {
                    fold(&mut state, &row.envelope, &policy)?;
                }
            }
            let now = Utc::now();
            self.expire_leases(&mut state, now).await;
            // Different jobs: the commands run concurrently (and share group commits).
            let snapshot = state.snapshot(now, &policy);
            let free_gpu = snapshot.executors.iter().any(|e| {
                e.availability == ExecutorAvailability::Active && e.gpus.iter().any(|g| !g.busy)
            });
            // Nothing can be placed without a free GPU: skip ordering the queue.
            let assignments = if free_gpu {
                schedule(&snapshot, now, &policy)
            } else {
                Vec::new()
            };
            let outcomes = futures::future::join_all(assignments.into_iter().map(|a| async {
                let run_id = Uuid::new_v4();
                let command = JobCommand::AssignRun {
                    run_id,
                    executor_id: a.executor_id.clone(),
                    gpu_uuids: a.gpu_uuids.clone(),
                    decision: a.decision.clone(),
                    at: now,
                };
                let outcome = self.bus.job(a.job_id, command, &context()).await;
                (a, run_id, outcome)
            }))
            .await;
            for (a, run_id, outcome) in outcomes {
                match outcome {
                    Ok(_) => {
                        // Held at once, so the next pass does not place it again before the
                        // event is read back (folding it twice changes nothing).
                        let event = JobEvent::RunAssigned {
                            run_id,
                            attempt: 0,
                            executor_id: a.executor_id,
                            gpu_uuids: a.gpu_uuids,
                            decision: a.decision,
                            at: now,
                        };
                        state.apply_job(a.job_id, &event, &policy);
                    }
                    Err(CommandError::Domain(error)) => {
                        tracing::debug!(job_id = %a.job_id, %error, "assignment refused; the state catches up");
                    }
                    Err(error) => {
                        return Err(anyhow::anyhow!("assigning {}: {error}", a.job_id));
                    }
                }
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.config.poll) => {}
            }
        }
    }

    /// Marks executors whose lease ran out lost and fails their runs as retryable.
    async fn expire_leases(&self, state: &mut FleetState, now: chrono::DateTime<Utc>) {
        for executor_id in state.expired_leases(now) {
            let stranded = state.runs_on(&executor_id);
            match self
                .bus
                .executor(
                    &executor_id,
                    ExecutorCommand::MarkLost { at: now },
                    &context(),
                )
                .await
            {
                Ok(_) | Err(CommandError::Domain(_)) => {}
                Err(error) => {
                    tracing::warn!(%executor_id, %error, "could not mark the executor lost");
                    continue;
                }
            }
            tracing::warn!(%executor_id, runs = stranded.len(), "executor lost: its lease expired");
            state.apply_executor(
                &executor_id,
                &ExecutorEvent::ExecutorLost {
                    last_heartbeat_at: None,
                    lease_expired_at: now,
                    at: now,
                },
            );
            for run in stranded {
                let command = JobCommand::ReportRunFailed {
                    run_id: run.run_id,
                    executor_id: executor_id.clone(),
                    exit_code: None,
                    signal: None,
                    reason: format!("executor {executor_id} lost: its lease expired"),
                    retryable: true,
                    utilisation: None,
                    at: now,
                };
                if let Err(error) = self.bus.job(run.job_id, command, &context()).await {
                    tracing::warn!(job_id = %run.job_id, %error, "could not fail a lost run");
                }
            }
        }
    }
}

fn context() -> CommandContext {
    CommandContext {
        actor: "scheduler".into(),
        correlation_id: Uuid::new_v4().to_string(),
        causation_id: None,
        traceparent: None,
    }
}

/// Folds one stored event. An event version it does not know stops the scheduler (it would
/// otherwise decide on a wrong picture of the fleet).
fn fold(
    state: &mut FleetState,
    envelope: &overfly_schemas::EventEnvelope,
    policy: &Policy,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        envelope.event_version == overfly_domain::EVENT_VERSION_1,
        "event {} at position {} has version {}, which this scheduler does not know",
        envelope.event_type,
        envelope.position,
        envelope.event_version
    );
    match envelope.aggregate_type.as_str() {
        "job" => {
            let job_id: Uuid = envelope.aggregate_id.parse().context("job id")?;
            let event: JobEvent = serde_json::from_value(envelope.payload.clone())
                .with_context(|| format!("decoding event {}", envelope.position))?;
            state.apply_job(job_id, &event, policy);
        }
        "executor" => {
            let event: ExecutorEvent = serde_json::from_value(envelope.payload.clone())
                .with_context(|| format!("decoding event {}", envelope.position))?;
            state.apply_executor(&envelope.aggregate_id, &event);
        }
        other => anyhow::bail!(
            "event {} of unknown aggregate type {other}",
            envelope.position
        ),
    }
    Ok(())
}
