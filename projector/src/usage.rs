//! The GPU usage projection: one `read_usage_runs` row per assigned run (account, user,
//! executor, GPUs and their model, start and end), from which the query service computes
//! GPU-seconds per account, user, GPU model and time bucket (a running run counts up to now).
//!
//! It keeps its own `read_usage_jobs` (account and user of each job, from `JobSubmitted`) and
//! `read_usage_gpus` (model of each GPU, from `ExecutorRegistered`), so it depends on no other
//! projection's tables. It reads the whole stream (`overfly.events.>`) in commit order, like
//! the executors projection; an unknown type or version stops it (decoding goes through the
//! same `decode` functions that reject them).
//!
//! It also keeps each run's GPU utilisation as its end reported it (`gpu_seconds_sampled`,
//! `gpu_seconds_busy`, from the executor's telemetry) and each job's outcome and end time, for
//! the efficiency, jobs-succeeded and success-rate leaderboards.
//!
//! Idempotent: job events guard by the job's `version` in `read_usage_jobs` (a gap is an
//! error, as for the jobs rows); GPU models are upserts. The runner's checkpoint is the primary
//! guard against redelivery.

use overfly_domain::executor::ExecutorEvent;
use overfly_domain::job::JobEvent;
use overfly_schemas::EventEnvelope;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::ProjectionError;
use crate::jobs::{self, Applied, EventMeta};

/// The projection's name: its row in `projection_checkpoints`.
pub const NAME: &str = "usage";

/// Decodes and applies one envelope of any aggregate type this projection knows.
pub async fn apply_envelope(
    conn: &mut PgConnection,
    envelope: &EventEnvelope,
) -> Result<Applied, ProjectionError> {
    let meta = EventMeta {
        aggregate_id: envelope.aggregate_id.clone(),
        sequence: envelope.sequence,
        position: envelope.position,
        recorded_at: envelope.recorded_at,
    };
    match envelope.aggregate_type.as_str() {
        "executor" => {
            let event = crate::executors::decode(
                &envelope.event_type,
                &envelope.event_version,
                &envelope.payload,
            )?;
            apply_executor(conn, &event).await
        }
        "job" => {
            let event = jobs::decode(
                &envelope.event_type,
                &envelope.event_version,
                &envelope.payload,
            )?;
            apply_job(conn, &meta, &event).await
        }
        other => Err(ProjectionError::Malformed {
            event_type: envelope.event_type.clone(),
            reason: format!("aggregate type {other} is neither executor nor job"),
        }),
    }
}

/// Keeps the model of each registered GPU (a re-registration overwrites it).
pub async fn apply_executor(
    conn: &mut PgConnection,
    event: &ExecutorEvent,
) -> Result<Applied, ProjectionError> {
    let ExecutorEvent::ExecutorRegistered { gpus, .. } = event else {
        return Ok(Applied::AlreadyApplied);
    };
    for gpu in gpus {
        sqlx::query(
            "INSERT INTO read_usage_gpus (gpu_uuid, model) VALUES ($1, $2)
             ON CONFLICT (gpu_uuid) DO UPDATE SET model = EXCLUDED.model",
        )
        .bind(&gpu.uuid)
        .bind(&gpu.name)
        .execute(&mut *conn)
        .await?;
    }
    Ok(Applied::Applied)
}

/// Applies one job event to `read_usage_jobs` / `read_usage_runs`. Idempotent by the job's
/// `version`; a sequence past `version + 1`, or any event but `JobSubmitted` for a job without
/// a row, is a gap: an error.
pub async fn apply_job(
    conn: &mut PgConnection,
    meta: &EventMeta,
    event: &JobEvent,
) -> Result<Applied, ProjectionError> {
    let job_id = Uuid::parse_str(&meta.aggregate_id).map_err(|_| ProjectionError::Malformed {
        event_type: "job event".into(),
        reason: format!("aggregate id {:?} is not a UUID", meta.aggregate_id),
    })?;
    let version: Option<i64> =
        sqlx::query_scalar("SELECT version FROM read_usage_jobs WHERE job_id = $1 FOR UPDATE")
            .bind(job_id)
            .fetch_optional(&mut *conn)
            .await?;
    let expected = version.unwrap_or(0) + 1;
    if meta.sequence < expected {
        return Ok(Applied::AlreadyApplied);
    }
    let submits = matches!(event, JobEvent::JobSubmitted { .. });
    if meta.sequence > expected || (version.is_none() && !submits) {
        return Err(ProjectionError::Gap {
            job_id,
            expected,
            got: meta.sequence,
        });
    }
    match event {
        JobEvent::JobSubmitted { spec, .. } => {
            sqlx::query(
                "INSERT INTO read_usage_jobs (job_id, account, submitted_by, version)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(job_id)
            .bind(&spec.account)
            .bind(&spec.submitted_by)
            .bind(meta.sequence)
            .execute(&mut *conn)
            .await?;
            return Ok(Applied::Applied);
        }
        JobEvent::RunAssigned {
            run_id,
            executor_id,
            gpu_uuids,
            ..
        } => {
            sqlx::query(
                "INSERT INTO read_usage_runs (run_id, job_id, account, submitted_by, executor_id,
                     gpu_count, gpu_uuids, gpu_model)
                 SELECT $1, j.job_id, j.account, j.submitted_by, $2, $3, $4,
                        (SELECT g.model FROM read_usage_gpus g WHERE g.gpu_uuid = ($4)[1])
                   FROM read_usage_jobs j WHERE j.job_id = $5
                 ON CONFLICT (run_id) DO NOTHING",
            )
            .bind(run_id)
            .bind(executor_id)
            .bind(i32::try_from(gpu_uuids.len()).unwrap_or(i32::MAX))
            .bind(gpu_uuids)
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
        }
        JobEvent::RunStarted { run_id, at, .. } => {
            close_or_start(conn, job_id, *run_id, "started_at", *at).await?;
        }
        JobEvent::RunSucceeded {
            run_id,
            utilisation,
            at,
            ..
        }
        | JobEvent::RunFailed {
            run_id,
            utilisation,
            at,
            ..
        }
        | JobEvent::RunTimedOut {
            run_id,
            utilisation,
            at,
            ..
        } => {
            close_or_start(conn, job_id, *run_id, "ended_at", *at).await?;
            if let Some(u) = utilisation {
                sqlx::query(
                    "UPDATE read_usage_runs
                        SET gpu_seconds_sampled = $2, gpu_seconds_busy = $3, peak_memory_mb = $4
                      WHERE run_id = $1",
                )
                .bind(run_id)
                .bind(u.gpu_seconds_sampled)
                .bind(u.gpu_seconds_busy)
                .bind(
                    u.peak_memory_mb
                        .map(|mb| i64::try_from(mb).unwrap_or(i64::MAX)),
                )
                .execute(&mut *conn)
                .await?;
            }
        }
        JobEvent::JobCancelled { active_run, at, .. } => {
            if let Some(run_id) = active_run {
                close_or_start(conn, job_id, *run_id, "ended_at", *at).await?;
            }
            finish(conn, job_id, "cancelled", *at).await?;
        }
        JobEvent::JobSucceeded { at, .. } => finish(conn, job_id, "succeeded", *at).await?,
        JobEvent::JobFailed { at, .. } => finish(conn, job_id, "failed", *at).await?,
        // A manual retry of a failed job reopens it: no outcome until it ends again.
        JobEvent::RetryScheduled { .. } => {
            sqlx::query(
                "UPDATE read_usage_jobs SET outcome = NULL, finished_at = NULL WHERE job_id = $1",
            )
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
        }
        JobEvent::JobPriorityChanged { .. } | JobEvent::RunProgressed { .. } => {}
    }
    sqlx::query("UPDATE read_usage_jobs SET version = $2 WHERE job_id = $1")
        .bind(job_id)
        .bind(meta.sequence)
        .execute(&mut *conn)
        .await?;
    Ok(Applied::Applied)
}

/// Records how a job ended.
async fn finish(
    conn: &mut PgConnection,
    job_id: Uuid,
    outcome: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), ProjectionError> {
    sqlx::query("UPDATE read_usage_jobs SET outcome = $2, finished_at = $3 WHERE job_id = $1")
        .bind(job_id)
        .bind(outcome)
        .bind(at)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Sets a run's `started_at` or `ended_at` (only if still unset); a run without a row is an
/// error (its `RunAssigned` is missing).
async fn close_or_start(
    conn: &mut PgConnection,
    job_id: Uuid,
    run_id: Uuid,
    column: &'static str,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), ProjectionError> {
    let sql = format!(
        "UPDATE read_usage_runs SET {column} = COALESCE({column}, $3)
          WHERE run_id = $1 AND job_id = $2"
    );
    let done = sqlx::query(&sql)
        .bind(run_id)
        .bind(job_id)
        .bind(at)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ProjectionError::MissingRun { job_id, run_id });
    }
    Ok(())
}
