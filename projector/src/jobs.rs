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
///
/// The common case costs no extra round trip: the job row's write is guarded by the version
/// it expects (`version = sequence - 1`, or no row for `JobSubmitted` 1) and comes first, so
/// when the guard does not hold nothing was written, and only then is the row read (locked)
/// to tell a redelivery from a gap.
pub async fn apply(
    conn: &mut PgConnection,
    meta: &EventMeta,
    event: &JobEvent,
) -> Result<Applied, ProjectionError> {
    let job_id = job_id(meta)?;
    let submits = matches!(event, JobEvent::JobSubmitted { .. });
    if (!submits || meta.sequence == 1) && write(conn, job_id, meta, event, true).await? {
        return Ok(Applied::Applied);
    }
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
    if version.is_none() && !submits {
        return Err(ProjectionError::Gap {
            job_id,
            expected: 1,
            got: meta.sequence,
        });
    }
    write(conn, job_id, meta, event, false).await?;
    Ok(Applied::Applied)
}

/// `UPDATE read_jobs` setting version ($2), position ($3) and `updated_at` ($4) together with
/// `sets`, whose parameters start at `$5`; `guarded`: only if the row is at `version = $2 - 1`.
fn update_job(sets: &str, guarded: bool) -> String {
    let sep = if sets.is_empty() { "" } else { ", " };
    let guard = if guarded { " AND version = $2 - 1" } else { "" };
    format!(
        "UPDATE read_jobs SET version = $2, position = $3, updated_at = $4{sep}{sets} \
          WHERE job_id = $1{guard}"
    )
}

/// `UPDATE read_runs` of run `$1` with `sets`, whose parameters start at `$2`.
fn update_run(sets: &str) -> String {
    format!("UPDATE read_runs SET {sets} WHERE run_id = $1")
}

fn int(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// Writes the event's rows. The job row is written first: `guarded`, only if it is at the
/// version before this event (for `JobSubmitted`: only if there is none), and `false` when it
/// was not, before anything was written. Unguarded, it writes whatever the row's version.
async fn write(
    conn: &mut PgConnection,
    job_id: Uuid,
    meta: &EventMeta,
    event: &JobEvent,
    guarded: bool,
) -> Result<bool, ProjectionError> {
    let at = event.at();
    // The job-row update of every event but `JobSubmitted`: its SQL, then its extra binds.
    // Always the event's first statement, so a failed guard has written nothing.
    macro_rules! job {
        ($sets:expr $(, $bind:expr)* $(,)?) => {{
            let sql = update_job($sets, guarded);
            let done = sqlx::query(&sql)
                .bind(job_id)
                .bind(meta.sequence)
                .bind(meta.position)
                .bind(at)
                $(.bind($bind))*
                .execute(&mut *conn)
                .await?;
            if guarded && done.rows_affected() != 1 {
                return Ok(false);
            }
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
            let sql = format!(
                "INSERT INTO read_jobs (job_id, name, account, submitted_by, priority, gpus,
                     gpu_memory_mb, state, spec, labels, max_retries, attempts, submitted_at,
                     updated_at, version, position)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, $9, $10, 0, $11, $11, $12, $13){}",
                if guarded {
                    " ON CONFLICT (job_id) DO NOTHING"
                } else {
                    ""
                }
            );
            let done = sqlx::query(&sql)
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
            if guarded && done.rows_affected() != 1 {
                return Ok(false);
            }
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
            job!(
                "state = 'assigned', attempts = $5, current_run_id = $6, eligible_at = NULL,
                 assigned_at = $4, started_at = NULL",
                int(*attempt),
                run_id,
            );
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
        }
        JobEvent::RunStarted { run_id, .. } => {
            job!("state = 'running', started_at = $4");
            run!(run_id, "state = 'running', started_at = $2", at);
        }
        JobEvent::RunProgressed {
            run_id,
            progress,
            metrics,
            ..
        } => {
            // A report without a progress value keeps the last one; metrics merge, so each
            // metric keeps its latest reported value (what the run leaderboards rank).
            job!("");
            run!(
                run_id,
                "last_progress = COALESCE($2, last_progress),
                 last_metrics = COALESCE(last_metrics, '{}'::jsonb) || $3, progress_at = $4",
                progress,
                json(metrics),
                at,
            );
        }
        JobEvent::RunSucceeded {
            run_id, started_at, ..
        } => {
            job!("");
            run!(
                run_id,
                "state = 'succeeded', ended_at = $2, started_at = COALESCE(started_at, $3)",
                at,
                started_at,
            );
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
            job!("");
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
        }
        JobEvent::RunTimedOut {
            run_id,
            started_at,
            timeout_s,
            ..
        } => {
            // Same wording as the job's failure reason when retries run out.
            job!("");
            run!(
                run_id,
                "state = 'timed_out', ended_at = $2, started_at = COALESCE(started_at, $3),
                 failure_reason = $4, retryable = true",
                at,
                started_at,
                format!("run exceeded its timeout of {timeout_s} s"),
            );
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
    Ok(true)
}

/// Applies `events` in order inside the caller's transaction, exactly as [`apply`] on each in
/// turn would, with a handful of statements for the whole batch instead of one to three per
/// event: the batch's job and run rows are read (and locked) at once, the events applied to
/// them in memory, and the changed rows written back with one `UNNEST` upsert per table.
///
/// Anything out of the ordinary (a gap, a missing run, a run assigned twice, a job row that is
/// not as this projection writes it) is left to [`apply`], event by event, for the whole
/// batch: it reports exactly the error the per-event path reports, at the same event. On an
/// error nothing this call wrote is left but what the caller's transaction rolls back; the
/// error comes with the index of the event that caused it.
pub async fn apply_batch(
    conn: &mut PgConnection,
    events: &[(EventMeta, JobEvent)],
) -> Result<Vec<Applied>, (usize, ProjectionError)> {
    if events.len() > 1 {
        match bulk::apply(conn, events).await {
            Ok(Some(applied)) => return Ok(applied),
            Ok(None) => {}
            Err(error) => return Err((0, error)),
        }
    }
    let mut applied = Vec::with_capacity(events.len());
    for (index, (meta, event)) in events.iter().enumerate() {
        applied.push(apply(conn, meta, event).await.map_err(|e| (index, e))?);
    }
    Ok(applied)
}

/// The in-memory batch path of [`apply_batch`]. Each arm mirrors the SQL of [`write`]: keep
/// the two in step.
mod bulk {
    use std::collections::HashMap;

    use chrono::{DateTime, Utc};
    use overfly_domain::job::JobEvent;
    use sqlx::PgConnection;
    use uuid::Uuid;

    use super::{Applied, EventMeta, int, json};
    use crate::error::ProjectionError;

    /// Every column of `read_jobs`.
    #[derive(Debug, Clone, sqlx::FromRow)]
    struct JobRow {
        job_id: Uuid,
        name: String,
        account: String,
        submitted_by: String,
        priority: i16,
        gpus: i16,
        gpu_memory_mb: i64,
        state: String,
        spec: serde_json::Value,
        labels: serde_json::Value,
        max_retries: i32,
        attempts: i32,
        current_run_id: Option<Uuid>,
        eligible_at: Option<DateTime<Utc>>,
        failure_reason: Option<String>,
        submitted_at: DateTime<Utc>,
        assigned_at: Option<DateTime<Utc>>,
        started_at: Option<DateTime<Utc>>,
        finished_at: Option<DateTime<Utc>>,
        cancelled_at: Option<DateTime<Utc>>,
        updated_at: DateTime<Utc>,
        version: i64,
        position: i64,
    }

    /// Every column of `read_runs`.
    #[derive(Debug, Clone, sqlx::FromRow)]
    struct RunRow {
        run_id: Uuid,
        job_id: Uuid,
        attempt: i32,
        executor_id: String,
        gpu_uuids: Vec<String>,
        state: String,
        decision: serde_json::Value,
        assigned_at: DateTime<Utc>,
        started_at: Option<DateTime<Utc>>,
        ended_at: Option<DateTime<Utc>>,
        exit_code: Option<i32>,
        signal: Option<i32>,
        failure_reason: Option<String>,
        retryable: Option<bool>,
        last_progress: Option<f64>,
        last_metrics: Option<serde_json::Value>,
        progress_at: Option<DateTime<Utc>>,
    }

    const JOB_COLUMNS: &str = "job_id, name, account, submitted_by, priority, gpus, \
        gpu_memory_mb, state, spec, labels, max_retries, attempts, current_run_id, eligible_at, \
        failure_reason, submitted_at, assigned_at, started_at, finished_at, cancelled_at, \
        updated_at, version, position";
    const RUN_COLUMNS: &str = "run_id, job_id, attempt, executor_id, gpu_uuids, state, \
        decision, assigned_at, started_at, ended_at, exit_code, signal, failure_reason, \
        retryable, last_progress, last_metrics, progress_at";

    fn run_of(event: &JobEvent) -> Option<Uuid> {
        match event {
            JobEvent::RunAssigned { run_id, .. }
            | JobEvent::RunStarted { run_id, .. }
            | JobEvent::RunProgressed { run_id, .. }
            | JobEvent::RunSucceeded { run_id, .. }
            | JobEvent::RunFailed { run_id, .. }
            | JobEvent::RunTimedOut { run_id, .. } => Some(*run_id),
            _ => None,
        }
    }

    /// `None`: the batch needs the per-event path (nothing was written).
    pub(super) async fn apply(
        conn: &mut PgConnection,
        events: &[(EventMeta, JobEvent)],
    ) -> Result<Option<Vec<Applied>>, ProjectionError> {
        let mut job_ids = Vec::with_capacity(events.len());
        for (meta, _) in events {
            match Uuid::parse_str(&meta.aggregate_id) {
                Ok(id) => job_ids.push(id),
                Err(_) => return Ok(None),
            }
        }
        let mut wanted: Vec<Uuid> = job_ids.clone();
        wanted.sort_unstable();
        wanted.dedup();
        let mut jobs: HashMap<Uuid, JobRow> = sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {JOB_COLUMNS} FROM read_jobs WHERE job_id = ANY($1) ORDER BY job_id FOR UPDATE"
        ))
        .bind(&wanted)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|row| (row.job_id, row))
        .collect();
        let mut run_ids: Vec<Uuid> = events.iter().filter_map(|(_, e)| run_of(e)).collect();
        run_ids.sort_unstable();
        run_ids.dedup();
        let mut runs: HashMap<Uuid, RunRow> = if run_ids.is_empty() {
            HashMap::new()
        } else {
            sqlx::query_as::<_, RunRow>(&format!(
                "SELECT {RUN_COLUMNS} FROM read_runs WHERE run_id = ANY($1) ORDER BY run_id FOR UPDATE"
            ))
            .bind(&run_ids)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|row| (row.run_id, row))
            .collect()
        };

        let mut dirty_jobs: Vec<Uuid> = Vec::new();
        let mut dirty_runs: Vec<Uuid> = Vec::new();
        let mut applied = Vec::with_capacity(events.len());
        for ((meta, event), job_id) in events.iter().zip(job_ids) {
            let version = jobs.get(&job_id).map(|job| job.version);
            let expected = version.unwrap_or(0) + 1;
            if meta.sequence < expected {
                applied.push(Applied::AlreadyApplied);
                continue;
            }
            let submits = matches!(event, JobEvent::JobSubmitted { .. });
            if meta.sequence > expected || version.is_none() != submits {
                return Ok(None);
            }
            if !step(&mut jobs, &mut runs, &mut dirty_runs, job_id, meta, event) {
                return Ok(None);
            }
            dirty_jobs.push(job_id);
            applied.push(Applied::Applied);
        }
        dirty_jobs.sort_unstable();
        dirty_jobs.dedup();
        dirty_runs.sort_unstable();
        dirty_runs.dedup();
        write_jobs(conn, dirty_jobs.iter().map(|id| &jobs[id])).await?;
        write_runs(conn, dirty_runs.iter().map(|id| &runs[id])).await?;
        Ok(Some(applied))
    }

    /// Applies one event to the rows in memory; `false` when the per-event path must decide.
    fn step(
        jobs: &mut HashMap<Uuid, JobRow>,
        runs: &mut HashMap<Uuid, RunRow>,
        dirty_runs: &mut Vec<Uuid>,
        job_id: Uuid,
        meta: &EventMeta,
        event: &JobEvent,
    ) -> bool {
        let at = event.at();
        if let JobEvent::JobSubmitted { spec, .. } = event {
            jobs.insert(
                job_id,
                JobRow {
                    job_id,
                    name: spec.name.clone(),
                    account: spec.account.clone(),
                    submitted_by: spec.submitted_by.clone(),
                    priority: i16::from(spec.priority),
                    gpus: i16::from(spec.gpus),
                    gpu_memory_mb: i64::try_from(spec.gpu_memory_mb).unwrap_or(i64::MAX),
                    state: "queued".into(),
                    spec: json(spec),
                    labels: json(&spec.labels),
                    max_retries: int(spec.max_retries),
                    attempts: 0,
                    current_run_id: None,
                    eligible_at: None,
                    failure_reason: None,
                    submitted_at: at,
                    assigned_at: None,
                    started_at: None,
                    finished_at: None,
                    cancelled_at: None,
                    updated_at: at,
                    version: meta.sequence,
                    position: meta.position,
                },
            );
            return true;
        }
        let Some(job) = jobs.get_mut(&job_id) else {
            return false;
        };
        // Every event but `JobSubmitted` moves the job row (`update_job`).
        job.version = meta.sequence;
        job.position = meta.position;
        job.updated_at = at;
        match event {
            JobEvent::JobSubmitted { .. } => unreachable!("handled above"),
            JobEvent::JobCancelled { .. } => {
                job.state = "cancelled".into();
                job.cancelled_at = Some(at);
                job.finished_at = Some(at);
                job.eligible_at = None;
            }
            JobEvent::JobPriorityChanged { to, .. } => {
                let Some(spec) = job.spec.as_object_mut() else {
                    return false;
                };
                job.priority = i16::from(*to);
                spec.insert("priority".into(), serde_json::Value::from(i16::from(*to)));
            }
            JobEvent::RunAssigned {
                run_id,
                attempt,
                executor_id,
                gpu_uuids,
                decision,
                ..
            } => {
                if runs.contains_key(run_id) {
                    return false;
                }
                job.state = "assigned".into();
                job.attempts = int(*attempt);
                job.current_run_id = Some(*run_id);
                job.eligible_at = None;
                job.assigned_at = Some(at);
                job.started_at = None;
                runs.insert(
                    *run_id,
                    RunRow {
                        run_id: *run_id,
                        job_id,
                        attempt: int(*attempt),
                        executor_id: executor_id.clone(),
                        gpu_uuids: gpu_uuids.clone(),
                        state: "assigned".into(),
                        decision: json(decision),
                        assigned_at: at,
                        started_at: None,
                        ended_at: None,
                        exit_code: None,
                        signal: None,
                        failure_reason: None,
                        retryable: None,
                        last_progress: None,
                        last_metrics: None,
                        progress_at: None,
                    },
                );
                dirty_runs.push(*run_id);
            }
            JobEvent::RunStarted { run_id, .. } => {
                job.state = "running".into();
                job.started_at = Some(at);
                let Some(run) = touch(runs, dirty_runs, run_id) else {
                    return false;
                };
                run.state = "running".into();
                run.started_at = Some(at);
            }
            JobEvent::RunProgressed {
                run_id,
                progress,
                metrics,
                ..
            } => {
                let Some(run) = touch(runs, dirty_runs, run_id) else {
                    return false;
                };
                // `last_metrics = COALESCE(last_metrics, '{}') || $metrics`.
                let mut merged = match run.last_metrics.take() {
                    None => serde_json::Map::new(),
                    Some(serde_json::Value::Object(map)) => map,
                    Some(other) => {
                        run.last_metrics = Some(other);
                        return false;
                    }
                };
                let serde_json::Value::Object(reported) = json(metrics) else {
                    return false;
                };
                merged.extend(reported);
                run.last_metrics = Some(serde_json::Value::Object(merged));
                run.last_progress = progress.or(run.last_progress);
                run.progress_at = Some(at);
            }
            JobEvent::RunSucceeded {
                run_id, started_at, ..
            } => {
                let Some(run) = touch(runs, dirty_runs, run_id) else {
                    return false;
                };
                run.state = "succeeded".into();
                run.ended_at = Some(at);
                run.started_at = run.started_at.or(*started_at);
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
                let Some(run) = touch(runs, dirty_runs, run_id) else {
                    return false;
                };
                run.state = "failed".into();
                run.ended_at = Some(at);
                run.started_at = run.started_at.or(*started_at);
                run.exit_code = *exit_code;
                run.signal = *signal;
                run.failure_reason = Some(reason.clone());
                run.retryable = Some(*retryable);
            }
            JobEvent::RunTimedOut {
                run_id,
                started_at,
                timeout_s,
                ..
            } => {
                let Some(run) = touch(runs, dirty_runs, run_id) else {
                    return false;
                };
                run.state = "timed_out".into();
                run.ended_at = Some(at);
                run.started_at = run.started_at.or(*started_at);
                run.failure_reason = Some(format!("run exceeded its timeout of {timeout_s} s"));
                run.retryable = Some(true);
            }
            JobEvent::RetryScheduled { eligible_at, .. } => {
                job.state = "queued".into();
                job.eligible_at = Some(*eligible_at);
                job.failure_reason = None;
                job.finished_at = None;
            }
            JobEvent::JobSucceeded { attempts, .. } => {
                job.state = "succeeded".into();
                job.attempts = int(*attempts);
                job.finished_at = Some(at);
                job.eligible_at = None;
            }
            JobEvent::JobFailed {
                reason, attempts, ..
            } => {
                job.state = "failed".into();
                job.attempts = int(*attempts);
                job.failure_reason = Some(reason.clone());
                job.finished_at = Some(at);
                job.eligible_at = None;
            }
        }
        true
    }

    /// The run row an event changes, marked changed.
    fn touch<'a>(
        runs: &'a mut HashMap<Uuid, RunRow>,
        dirty_runs: &mut Vec<Uuid>,
        run_id: &Uuid,
    ) -> Option<&'a mut RunRow> {
        dirty_runs.push(*run_id);
        runs.get_mut(run_id)
    }

    /// `SET c = EXCLUDED.c` for every column but the key.
    fn excluded(columns: &str) -> String {
        columns
            .split(',')
            .map(str::trim)
            .skip(1)
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    async fn write_jobs<'a>(
        conn: &mut PgConnection,
        rows: impl Iterator<Item = &'a JobRow>,
    ) -> Result<(), sqlx::Error> {
        let rows: Vec<&JobRow> = rows.collect();
        if rows.is_empty() {
            return Ok(());
        }
        macro_rules! col {
            ($field:ident) => {
                rows.iter().map(|r| r.$field.clone()).collect::<Vec<_>>()
            };
        }
        let sql = format!(
            "INSERT INTO read_jobs ({JOB_COLUMNS})
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int2[],
                 $6::int2[], $7::int8[], $8::text[], $9::jsonb[], $10::jsonb[], $11::int4[],
                 $12::int4[], $13::uuid[], $14::timestamptz[], $15::text[], $16::timestamptz[],
                 $17::timestamptz[], $18::timestamptz[], $19::timestamptz[], $20::timestamptz[],
                 $21::timestamptz[], $22::int8[], $23::int8[])
             ON CONFLICT (job_id) DO UPDATE SET {}",
            excluded(JOB_COLUMNS)
        );
        sqlx::query(&sql)
            .bind(col!(job_id))
            .bind(col!(name))
            .bind(col!(account))
            .bind(col!(submitted_by))
            .bind(col!(priority))
            .bind(col!(gpus))
            .bind(col!(gpu_memory_mb))
            .bind(col!(state))
            .bind(col!(spec))
            .bind(col!(labels))
            .bind(col!(max_retries))
            .bind(col!(attempts))
            .bind(col!(current_run_id))
            .bind(col!(eligible_at))
            .bind(col!(failure_reason))
            .bind(col!(submitted_at))
            .bind(col!(assigned_at))
            .bind(col!(started_at))
            .bind(col!(finished_at))
            .bind(col!(cancelled_at))
            .bind(col!(updated_at))
            .bind(col!(version))
            .bind(col!(position))
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// A Postgres array literal of `items` (each quoted), for a `text[]` cell of an UNNEST.
    fn text_array(items: &[String]) -> String {
        let mut out = String::from("{");
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            for c in item.chars() {
                if c == '"' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
        }
        out.push('}');
        out
    }

    async fn write_runs<'a>(
        conn: &mut PgConnection,
        rows: impl Iterator<Item = &'a RunRow>,
    ) -> Result<(), sqlx::Error> {
        let rows: Vec<&RunRow> = rows.collect();
        if rows.is_empty() {
            return Ok(());
        }
        macro_rules! col {
            ($field:ident) => {
                rows.iter().map(|r| r.$field.clone()).collect::<Vec<_>>()
            };
        }
        // `text[]` cells cannot be unnested from a `text[][]` (ragged): each travels as the text
        // of its array literal and is cast back.
        let gpu_uuids: Vec<String> = rows.iter().map(|r| text_array(&r.gpu_uuids)).collect();
        let sql = format!(
            "INSERT INTO read_runs ({RUN_COLUMNS})
             SELECT run_id, job_id, attempt, executor_id, gpu_uuids::text[], state, decision,
                    assigned_at, started_at, ended_at, exit_code, signal, failure_reason,
                    retryable, last_progress, last_metrics, progress_at
               FROM UNNEST($1::uuid[], $2::uuid[], $3::int4[], $4::text[], $5::text[], $6::text[],
                    $7::jsonb[], $8::timestamptz[], $9::timestamptz[], $10::timestamptz[],
                    $11::int4[], $12::int4[], $13::text[], $14::bool[], $15::float8[],
                    $16::jsonb[], $17::timestamptz[])
                 AS u({RUN_COLUMNS})
             ON CONFLICT (run_id) DO UPDATE SET {}",
            excluded(RUN_COLUMNS)
        );
        sqlx::query(&sql)
            .bind(col!(run_id))
            .bind(col!(job_id))
            .bind(col!(attempt))
            .bind(col!(executor_id))
            .bind(gpu_uuids)
            .bind(col!(state))
            .bind(col!(decision))
            .bind(col!(assigned_at))
            .bind(col!(started_at))
            .bind(col!(ended_at))
            .bind(col!(exit_code))
            .bind(col!(signal))
            .bind(col!(failure_reason))
            .bind(col!(retryable))
            .bind(col!(last_progress))
            .bind(col!(last_metrics))
            .bind(col!(progress_at))
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::text_array;

        #[test]
        fn array_literals_quote_their_items() {
            assert_eq!(text_array(&[]), "{}");
            let items = ["GPU-1".to_string(), r#"a"b\c"#.to_string()];
            assert_eq!(text_array(&items), r#"{"GPU-1","a\"b\\c"}"#);
        }
    }
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
