//! Jobs and runs from the read models (`read_jobs`, `read_runs`), kept by the projector.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use poem_openapi::Object;
use sqlx::{FromRow, PgConnection, PgPool, Postgres, QueryBuilder, Row};
use uuid::Uuid;

pub const STATES: &[&str] = &[
    "queued",
    "assigned",
    "running",
    "succeeded",
    "failed",
    "cancelled",
];
pub const MAX_LIMIT: i64 = 500;

/// A job as listed.
#[derive(Debug, Clone, PartialEq, Object, sqlx::FromRow)]
pub struct JobSummary {
    pub job_id: Uuid,
    pub name: String,
    pub account: String,
    pub submitted_by: String,
    pub priority: i16,
    pub gpus: i16,
    pub gpu_memory_mb: i64,
    /// queued, assigned, running, succeeded, failed or cancelled.
    pub state: String,
    pub labels: serde_json::Value,
    /// Runs started so far (attempts).
    pub attempts: i32,
    pub max_retries: i32,
    pub current_run_id: Option<Uuid>,
    /// While queued after a failure: not assigned before this instant (retry backoff).
    pub eligible_at: Option<DateTime<Utc>>,
    pub failure_reason: Option<String>,
    pub submitted_at: DateTime<Utc>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The job aggregate's version applied to this row.
    pub version: i64,
    /// Global position of the job's last applied event.
    pub position: i64,
}

/// One attempt at running a job.
#[derive(Debug, Clone, PartialEq, Object, sqlx::FromRow)]
pub struct RunDetail {
    pub run_id: Uuid,
    pub attempt: i32,
    pub executor_id: String,
    pub gpu_uuids: Vec<String>,
    /// assigned, running, succeeded, failed or timed_out.
    pub state: String,
    /// The scheduler's reasons: priority breakdown, jobs overtaken, placement.
    pub decision: serde_json::Value,
    pub assigned_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub failure_reason: Option<String>,
    pub retryable: Option<bool>,
    pub last_progress: Option<f64>,
    pub last_metrics: Option<serde_json::Value>,
    pub progress_at: Option<DateTime<Utc>>,
}

/// A job with its spec and every run.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct JobDetail {
    #[oai(flatten)]
    pub job: JobSummary,
    /// The submitted spec (command, env, params, timeout, …).
    pub spec: serde_json::Value,
    pub runs: Vec<RunDetail>,
}

const SUMMARY_COLUMNS: &str = "job_id, name, account, submitted_by, priority, gpus, gpu_memory_mb, \
    state, labels, attempts, max_retries, current_run_id, eligible_at, failure_reason, submitted_at, \
    assigned_at, started_at, finished_at, cancelled_at, updated_at, version, position";

const RUN_COLUMNS: &str = "run_id, attempt, executor_id, gpu_uuids, state, decision, assigned_at, \
    started_at, ended_at, exit_code, signal, failure_reason, retryable, last_progress, \
    last_metrics, progress_at";

/// One job with its runs. Takes a connection so that a point-in-time rebuild (temporary
/// tables of the same names) is read the same way as the live read model.
pub async fn get(conn: &mut PgConnection, job_id: Uuid) -> sqlx::Result<Option<JobDetail>> {
    let row = sqlx::query(&format!(
        "SELECT spec, {SUMMARY_COLUMNS} FROM read_jobs WHERE job_id = $1"
    ))
    .bind(job_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let summary = JobSummary::from_row(&row)?;
    let spec: serde_json::Value = row.try_get("spec")?;
    let runs: Vec<RunDetail> = sqlx::query_as(&format!(
        "SELECT {RUN_COLUMNS} FROM read_runs WHERE job_id = $1 ORDER BY attempt"
    ))
    .bind(job_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(JobDetail {
        job: summary,
        spec,
        runs,
    }))
}

/// Where a page ends: the last row's sort key. Opaque to clients (base64url).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub submitted_at: DateTime<Utc>,
    pub job_id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!(
            "{}|{}",
            self.submitted_at.timestamp_micros(),
            self.job_id
        ))
    }

    pub fn decode(text: &str) -> Option<Self> {
        let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(text).ok()?).ok()?;
        let (micros, id) = raw.split_once('|')?;
        Some(Self {
            submitted_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            job_id: id.parse().ok()?,
        })
    }
}

/// Filters of `GET /jobs`, already validated.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub state: Option<String>,
    pub account: Option<String>,
    pub submitted_by: Option<String>,
    pub label: Option<(String, String)>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    pub oldest_first: bool,
}

impl Filter {
    fn push_where<'a>(&'a self, query: &mut QueryBuilder<'a, Postgres>) {
        query.push(" WHERE TRUE");
        if let Some(state) = &self.state {
            query.push(" AND state = ").push_bind(state);
        }
        if let Some(account) = &self.account {
            query.push(" AND account = ").push_bind(account);
        }
        if let Some(submitted_by) = &self.submitted_by {
            query.push(" AND submitted_by = ").push_bind(submitted_by);
        }
        if let Some((key, value)) = &self.label {
            query
                .push(" AND labels @> ")
                .push_bind(serde_json::json!({ key: value }));
        }
        if let Some(after) = self.created_after {
            query.push(" AND submitted_at > ").push_bind(after);
        }
        if let Some(before) = self.created_before {
            query.push(" AND submitted_at < ").push_bind(before);
        }
    }
}

pub struct Page {
    pub items: Vec<JobSummary>,
    pub next_cursor: Option<Cursor>,
}

/// One page in `(submitted_at, job_id)` order. Keyset pagination: rows inserted meanwhile
/// sort before (newest first) or after (oldest first) what was already read, so no row is
/// returned twice or skipped.
pub async fn list(
    pool: &PgPool,
    filter: &Filter,
    after: Option<Cursor>,
    limit: i64,
) -> sqlx::Result<Page> {
    let mut query = QueryBuilder::new(format!("SELECT {SUMMARY_COLUMNS} FROM read_jobs"));
    filter.push_where(&mut query);
    let (comparison, order) = if filter.oldest_first {
        (">", "ASC")
    } else {
        ("<", "DESC")
    };
    if let Some(cursor) = after {
        query
            .push(format!(" AND (submitted_at, job_id) {comparison} ("))
            .push_bind(cursor.submitted_at)
            .push(", ")
            .push_bind(cursor.job_id)
            .push(")");
    }
    query.push(format!(
        " ORDER BY submitted_at {order}, job_id {order} LIMIT "
    ));
    query.push_bind(limit + 1);
    let mut items: Vec<JobSummary> = query.build_query_as().fetch_all(pool).await?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|last| Cursor {
            submitted_at: last.submitted_at,
            job_id: last.job_id,
        })
    } else {
        None
    };
    Ok(Page { items, next_cursor })
}

pub async fn count(pool: &PgPool, filter: &Filter) -> sqlx::Result<i64> {
    let mut query = QueryBuilder::new("SELECT count(*) FROM read_jobs");
    filter.push_where(&mut query);
    query.build_query_scalar().fetch_one(pool).await
}

/// Whether the jobs read model reflects the event at global position `position`: no job
/// event between the projection's checkpoint and that event (in commit order) is left to
/// apply. The position may be any event's (an executor command's too); an unknown position
/// is not reflected yet.
pub async fn applied(pool: &PgPool, position: i64) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events WHERE global_position = $1)
            AND NOT EXISTS (
                SELECT 1
                  FROM events target
                  LEFT JOIN projection_checkpoints c ON c.projection = 'jobs'
                  JOIN events e
                    ON e.aggregate_type = 'job'
                   AND (e.tx_id, e.global_position) <= (target.tx_id, target.global_position)
                   AND (e.tx_id, e.global_position)
                       > (COALESCE(c.tx_id, '0'::xid8), COALESCE(c.position, 0))
                 WHERE target.global_position = $1)",
    )
    .bind(position)
    .fetch_one(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = Cursor {
            submitted_at: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            job_id: Uuid::from_u128(42),
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        assert_eq!(Cursor::decode("not-a-cursor"), None);
        assert_eq!(Cursor::decode(&URL_SAFE_NO_PAD.encode("12|x")), None);
    }
}
