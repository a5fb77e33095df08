//! Runs ranked by a metric they reported (`OVERFLY {"metrics": {...}}` lines become
//! `RunProgressed` events; the jobs projection keeps each metric's latest value per run in
//! `read_runs.last_metrics`), e.g. `accuracy` among the runs of jobs labelled
//! `benchmark=tiles-v1`, best first.

use chrono::{DateTime, Utc};
use poem_openapi::Object;
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

/// The leaderboard's default and largest length.
pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;
/// Run states a leaderboard may be narrowed to.
pub const RUN_STATES: &[&str] = &["assigned", "running", "succeeded", "failed", "timed_out"];

/// Whether `metric` can be a metric name: 1 to 128 characters of letters, digits and
/// `_ . - / :` (what the progress protocol accepts in practice; anything else is a typo).
pub fn valid_metric(metric: &str) -> bool {
    (1..=128).contains(&metric.len())
        && metric
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-/:".contains(c))
}

/// Which runs, and in which order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunQuery {
    pub metric: String,
    /// `key=value` labels the run's job must all have.
    pub labels: Vec<(String, String)>,
    pub account: Option<String>,
    /// One of [`RUN_STATES`].
    pub state: Option<String>,
    /// Lowest first (for a loss) instead of highest first.
    pub ascending: bool,
    pub limit: i64,
}

/// One run on the board.
#[derive(Debug, Clone, PartialEq, Object, sqlx::FromRow)]
pub struct RankedRun {
    /// 1 for the best.
    pub rank: i64,
    /// The metric's latest reported value.
    pub value: f64,
    pub run_id: Uuid,
    pub job_id: Uuid,
    pub job_name: String,
    pub account: String,
    pub submitted_by: String,
    pub attempt: i32,
    pub executor_id: String,
    /// assigned, running, succeeded, failed or timed_out.
    pub state: String,
    /// The run's last reported progress, 0 to 1.
    pub progress: Option<f64>,
    /// When the run last reported progress or metrics.
    pub reported_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub labels: serde_json::Value,
}

/// Runs ranked by one metric.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct RunLeaderboard {
    pub metric: String,
    /// desc (highest first) or asc.
    pub order: String,
    pub items: Vec<RankedRun>,
}

/// The runs that reported `query.metric` as a number, best first (ties: the earlier report,
/// then run id), at most `query.limit`.
pub async fn runs(pool: &PgPool, query: &RunQuery) -> Result<RunLeaderboard, sqlx::Error> {
    let order = if query.ascending { "ASC" } else { "DESC" };
    let mut sql: QueryBuilder<Postgres> =
        QueryBuilder::new("SELECT row_number() OVER (ORDER BY m.value ");
    sql.push(order).push(
        ", r.progress_at, r.run_id) AS rank,
                m.value, r.run_id, r.job_id, j.name AS job_name, j.account, j.submitted_by,
                r.attempt, r.executor_id, r.state, r.last_progress AS progress,
                r.progress_at AS reported_at, r.ended_at, j.labels
           FROM read_runs r
           JOIN read_jobs j ON j.job_id = r.job_id
          CROSS JOIN LATERAL (SELECT (r.last_metrics ->> ",
    );
    sql.push_bind(&query.metric)
        .push(")::float8 AS value) m WHERE r.last_metrics ? ");
    sql.push_bind(&query.metric)
        .push(" AND jsonb_typeof(r.last_metrics -> ")
        .push_bind(&query.metric)
        .push(") = 'number'");
    if !query.labels.is_empty() {
        let labels: serde_json::Map<String, serde_json::Value> = query
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        sql.push(" AND j.labels @> ")
            .push_bind(serde_json::Value::Object(labels))
            .push("::jsonb");
    }
    if let Some(account) = &query.account {
        sql.push(" AND j.account = ").push_bind(account);
    }
    if let Some(state) = &query.state {
        sql.push(" AND r.state = ").push_bind(state);
    }
    sql.push(" ORDER BY rank LIMIT ").push_bind(query.limit);
    let items = sql.build_query_as().fetch_all(pool).await?;
    Ok(RunLeaderboard {
        metric: query.metric.clone(),
        order: if query.ascending { "asc" } else { "desc" }.into(),
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_bounded_tokens() {
        assert!(valid_metric("accuracy"));
        assert!(valid_metric("val/loss"));
        assert!(valid_metric("tiles.per_s"));
        assert!(!valid_metric(""));
        assert!(!valid_metric("acc uracy"));
        assert!(!valid_metric("a'b"));
        assert!(!valid_metric(&"x".repeat(129)));
    }
}
