//! The jobs projection: one `read_jobs` row per job and one `read_runs` row per run, kept
//! from the job aggregate's events.
//!
//! Every column is derived from the events alone (times are the events' `at`, never the wall
//! clock), so a rebuild from the event store equals the live tables row for row.
//!
//! Timestamps on a job row are those of the *latest* transition into that state
//! (`assigned_at` / `started_at` of the current attempt); every attempt's own times are on
//! its run row. `finished_at` is set on any terminal state (succeeded, failed, cancelled).

use chrono::{DateTime, Utc};
use overfly_domain::job::{JobEvent, JobState};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::ProjectionError;

/// The projection's name: its row in `projection_checkpoints`.
pub const NAME: &str = "jobs";

/// Where an event sits: taken from its envelope (JetStream) or its `events` row (rebuild).
#[derive(Debug, Clone)]
pub struct EventMeta {
    pub aggregate_id: String,
    /// 1-based sequence within the job: becomes the row's `version`.
    pub sequence: i64,
    /// Global position in the event store: becomes the row's `position`.
    pub position: i64,
    /// When the event store recorded it. Not used by the jobs rows, whose times are the
    /// events' own `at` (what happened when, not when it was written down).
    pub recorded_at: DateTime<Utc>,
}

/// What `apply` did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The rows now include the event.
    Applied,
    /// The job row already had this event (`sequence <= version`): redelivery, nothing changed.
    AlreadyApplied,
}

/// Turns a stored or published payload of any known version into the current `JobEvent`.
///
/// Upcasters live in `crate::decode`; an unknown type or version is an error, never skipped.
pub fn decode(
    event_type: &str,
    event_version: &str,
    payload: &serde_json::Value,
) -> Result<JobEvent, ProjectionError> {
    crate::decode::decode(JobEvent::TYPES, event_type, event_version, payload)
}

pub fn job_state(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Assigned => "assigned",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

fn job_id(meta: &EventMeta) -> Result<Uuid, ProjectionError> {
    Uuid::parse_str(&meta.aggregate_id).map_err(|_| ProjectionError::Malformed {
        event_type: "job event".into(),
        reason: format!("aggregate id {:?} is not a UUID", meta.aggregate_id),
    })
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("domain types serialize to JSON")
}

/// Applies one job event to `read_jobs` / `read_runs` on `conn` (inside the caller's
/// transaction; tables are unqualified so `search_path` picks live or shadow copies).
///
/// Idempotent by the job row's `version`: an event whose sequence is at most the version is
/// skipped. A sequence that is not `version + 1`, or any event but `JobSubmitted` for a job
/// without a row, means events were lost: an error, never skipped.
pub async fn apply(
    conn: &mut PgConnection,
    meta: &EventMeta,
    event: &JobEvent,
) -> Result<Applied, ProjectionError> {
    let job_id = job_id(meta)?;
    let version: Option<i64> =
        sqlx::query_scalar("SELECT version FROM read_jobs WHERE job_id = $1 FOR UPDATE")
            .bind(job_id)
            .fetch_optional(&mut *conn)
            .await?;
    let expected = version.unwrap_or(0) + 1;
    if meta.sequence < expected {
        return Ok(Applied::AlreadyApplied);
    }
    if meta.sequence > expected {
        return Err(ProjectionError::Gap {
            job_id,
            expected,
            got: meta.sequence,
        });
    }
    if version.is_none() && !matches!(event, JobEvent::JobSubmitted { .. }) {
        return Err(ProjectionError::Gap {
            job_id,
            expected: 1,
            got: meta.sequence,
        });
    }
    apply_unchecked(conn, job_id, meta, event).await?;
    Ok(Applied::Applied)
}

/// `UPDATE read_jobs` setting version ($2), position ($3) and `updated_at` ($4) together with
/// `sets`, whose parameters start at `$5`.
fn update_job(sets: &str) -> String {
    let sep = if sets.is_empty() { "" } else { ", " };
    format!(
        "UPDATE read_jobs SET version = $2, position = $3, updated_at = $4{sep}{sets} \
          WHERE job_id = $1"
    )
}

/// `UPDATE read_runs` of run `$1` with `sets`, whose parameters start at `$2`.
fn update_run(sets: &str) -> String {
    format!("UPDATE read_runs SET {sets} WHERE run_id = $1")
}

fn int(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

async fn apply_unchecked(
    conn: &mut PgConnection,
    job_id: Uuid,
    meta: &EventMeta,
    event: &JobEvent,
) -> Result<(), ProjectionError> {
    let at = event.at();
    // The job-row update of every event but `JobSubmitted`: its SQL, then its extra binds.
    macro_rules! job {
        ($sets:expr $(, $bind:expr)* $(,)?) => {{
            let sql = update_job($sets);
            sqlx::query(&sql)
                .bind(job_id)
                .bind(meta.sequence)
                .bind(meta.position)
                .bind(at)
                $(.bind($bind))*
                .execute(&mut *conn)
                .await?;
        }};
    }
    macro_rules! run {
        ($run_id:expr, $sets:expr $(, $bind:expr)* $(,)?) => {{
            let sql = update_run($sets);
            let done = sqlx::query(&sql)
                .bind($run_id)
                $(.bind($bind))*
                .execute(&mut *conn)
                .await?;
            if done.rows_affected() != 1 {
                return Err(ProjectionError::MissingRun { job_id, run_id: *$run_id });
            }
        }};
    }
    match event {
        JobEvent::JobSubmitted { spec, .. } => {
            sqlx::query(
                "INSERT INTO read_jobs (job_id, name, account, submitted_by, priority, gpus,
                     gpu_memory_mb, state, spec, labels, max_retries, attempts, submitted_at,
                     updated_at, version, position)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, $9, $10, 0, $11, $11, $12, $13)",
            )
            .bind(job_id)
            .bind(&spec.name)
            .bind(&spec.account)
            .bind(&spec.submitted_by)
            .bind(i16::from(spec.priority))
            .bind(i16::from(spec.gpus))
            .bind(i64::try_from(spec.gpu_memory_mb).unwrap_or(i64::MAX))
            .bind(json(spec))
            .bind(json(&spec.labels))
            .bind(int(spec.max_retries))
            .bind(at)
            .bind(meta.sequence)
            .bind(meta.position)
            .execute(&mut *conn)
            .await?;
        }
        JobEvent::JobCancelled { .. } => {
            job!("state = 'cancelled', cancelled_at = $4, finished_at = $4, eligible_at = NULL");
        }
        JobEvent::JobPriorityChanged { to, .. } => {
            // The spec mirrors the aggregate's, whose priority the change rewrites.
            job!(
                "priority = $5, spec = jsonb_set(spec, '{priority}', to_jsonb($5))",
                i16::from(*to)
            );
        }
        JobEvent::RunAssigned {
            run_id,
            attempt,
            executor_id,
            gpu_uuids,
            decision,
            ..
        } => {
            sqlx::query(
                "INSERT INTO read_runs (run_id, job_id, attempt, executor_id, gpu_uuids, state,
                     decision, assigned_at)
                 VALUES ($1, $2, $3, $4, $5, 'assigned', $6, $7)",
            )
            .bind(run_id)
            .bind(job_id)
            .bind(int(*attempt))
            .bind(executor_id)
            .bind(gpu_uuids)
            .bind(json(decision))
            .bind(at)
            .execute(&mut *conn)
            .await?;
            job!(
                "state = 'assigned', attempts = $5, current_run_id = $6, eligible_at = NULL,
                 assigned_at = $4, started_at = NULL",
                int(*attempt),
                run_id,
            );
        }
        JobEvent::RunStarted { run_id, .. } => {
            run!(run_id, "state = 'running', started_at = $2", at);
            job!("state = 'running', started_at = $4");
        }
        JobEvent::RunProgressed {
            run_id,
            progress,
            metrics,
            ..
        } => {
            // A report without a progress value keeps the last one; metrics merge, so each
            // metric keeps its latest reported value (what the run leaderboards rank).
            run!(
                run_id,
                "last_progress = COALESCE($2, last_progress),
                 last_metrics = COALESCE(last_metrics, '{}'::jsonb) || $3, progress_at = $4",
                progress,
                json(metrics),
                at,
            );
            job!("");
        }
        JobEvent::RunSucceeded {
            run_id, started_at, ..
        } => {
            run!(
                run_id,
                "state = 'succeeded', ended_at = $2, started_at = COALESCE(started_at, $3)",
                at,
                started_at,
            );
            job!("");
        }
        JobEvent::RunFailed {
            run_id,
            started_at,
            exit_code,
            signal,
            reason,
            retryable,
            ..
        } => {
            run!(
                run_id,
                "state = 'failed', ended_at = $2, started_at = COALESCE(started_at, $3),
                 exit_code = $4, signal = $5, failure_reason = $6, retryable = $7",
                at,
                started_at,
                exit_code,
                signal,
                reason,
                retryable,
            );
            job!("");
        }
        JobEvent::RunTimedOut {
            run_id,
            started_at,
            timeout_s,
            ..
        } => {
            // Same wording as the job's failure reason when retries run out.
            run!(
                run_id,
                "state = 'timed_out', ended_at = $2, started_at = COALESCE(started_at, $3),
                 failure_reason = $4, retryable = true",
                at,
                started_at,
                format!("run exceeded its timeout of {timeout_s} s"),
            );
            job!("");
        }
        JobEvent::RetryScheduled { eligible_at, .. } => {
            // Also after a manual retry of a failed job: it is no longer finished.
            job!(
                "state = 'queued', eligible_at = $5, failure_reason = NULL, finished_at = NULL",
                eligible_at,
            );
        }
        JobEvent::JobSucceeded { attempts, .. } => {
            job!(
                "state = 'succeeded', attempts = $5, finished_at = $4, eligible_at = NULL",
                int(*attempts),
            );
        }
        JobEvent::JobFailed {
            reason, attempts, ..
        } => {
            job!(
                "state = 'failed', attempts = $5, failure_reason = $6, finished_at = $4,
                 eligible_at = NULL",
                int(*attempts),
                reason,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn known_types_of_version_1_decode() {
        let payload = json!({"JobPriorityChanged": {
            "from": 1, "to": 2, "by": "ana", "reason": "x", "at": "2026-11-24T10:00:00Z"
        }});
        let event = decode("JobPriorityChanged", "1", &payload).unwrap();
        assert!(matches!(event, JobEvent::JobPriorityChanged { to: 2, .. }));
    }

    #[test]
    fn unknown_types_and_versions_are_errors_not_skips() {
        let err = decode("JobTeleported", "1", &json!({"JobTeleported": {}})).unwrap_err();
        assert!(matches!(err, ProjectionError::UnknownEventType { .. }));
        assert!(err.to_string().contains("JobTeleported"), "{err}");
        let payload = json!({"JobPriorityChanged": {}});
        let err = decode("JobPriorityChanged", "7", &payload).unwrap_err();
        assert!(matches!(err, ProjectionError::UnknownEventVersion { .. }));
        assert!(err.to_string().contains("version 7"), "{err}");
    }

    #[test]
    fn a_payload_of_another_type_is_malformed() {
        let payload = json!({"JobFailed": {"reason": "x", "attempts": 1, "last_run": null,
            "at": "2026-11-24T10:00:00Z"}});
        let err = decode("JobSucceeded", "1", &payload).unwrap_err();
        assert!(matches!(err, ProjectionError::Malformed { .. }), "{err}");
    }

    #[test]
    fn state_names_are_the_domain_serde_names() {
        for state in [
            JobState::Queued,
            JobState::Assigned,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(
                json!(job_state(state)),
                serde_json::to_value(state).unwrap()
            );
        }
    }
}
