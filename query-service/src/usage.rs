//! GPU usage from the usage read model (`read_usage_runs`, `read_usage_jobs`, kept by the
//! projector's usage projection): GPU-seconds allocated per account in time buckets, per user
//! and per GPU model, with utilisation where the runs' telemetry reported it; and accounts
//! ranked over a window by GPU-hours, jobs succeeded, success rate, efficiency or idle
//! GPU-hours.
//!
//! Every figure is computed in SQL from the runs: each run allocates `gpu_count` GPUs from
//! `started_at` to `ended_at` (a running run up to now); its time is clipped to each bucket (or
//! window) and the parts summed as exact `numeric` seconds, converted to a float only at the
//! end. A run assigned but never started allocated nothing.

use chrono::{DateTime, TimeDelta, Utc};
use poem_openapi::Object;
use sqlx::PgPool;

/// The most buckets one answer may have.
pub const MAX_BUCKETS: i64 = 2000;
/// The default window of `GET /usage/accounts/{account}`.
pub const DEFAULT_WINDOW: TimeDelta = TimeDelta::days(7);
/// The default and the largest leaderboard window, in hours.
pub const DEFAULT_WINDOW_HOURS: i64 = 168;
pub const MAX_WINDOW_HOURS: i64 = 24 * 366;
/// The leaderboard's default and largest length.
pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;

/// A bucket's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }
    pub fn seconds(self) -> i64 {
        match self {
            Self::Hour => 3600,
            Self::Day => 86_400,
        }
    }
    /// The start of the (UTC) bucket holding `instant`.
    pub fn floor(self, instant: DateTime<Utc>) -> DateTime<Utc> {
        let step = self.seconds();
        let secs = instant.timestamp();
        DateTime::from_timestamp(secs - secs.rem_euclid(step), 0).unwrap_or(instant)
    }
    /// How many buckets cover `[from, to)`.
    pub fn buckets(self, from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
        let span = (to - self.floor(from))
            .num_microseconds()
            .unwrap_or(i64::MAX);
        let step = self.seconds() * 1_000_000;
        span / step + i64::from(span % step != 0)
    }
}

/// GPU-seconds allocated in one bucket (clipped to the requested window).
#[derive(Debug, Clone, PartialEq, Object, sqlx::FromRow)]
pub struct Bucket {
    /// The bucket's start (UTC hour or day); the first one may begin before `from`, the last
    /// one end after `to`: only the time inside `[from, to)` counts.
    pub start: DateTime<Utc>,
    pub gpu_seconds: f64,
}

/// GPU-seconds of one user, or one GPU model, in the window.
#[derive(Debug, Clone, PartialEq, Object, sqlx::FromRow)]
pub struct Share {
    /// The user (`submitted_by`) or the GPU model; absent for runs on GPUs whose model is not
    /// known (the executor's registration was not seen).
    pub key: Option<String>,
    pub gpu_seconds: f64,
}

/// One account's GPU usage over `[from, to)`.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct AccountUsage {
    pub account: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// hour or day.
    pub granularity: String,
    /// GPU-seconds allocated in the whole window (the buckets' sum, summed exactly).
    pub total_gpu_seconds: f64,
    /// GPU-seconds covered by telemetry: the runs that reported utilisation with their end
    /// (a run partly in the window counts the same fraction as of its allocated time).
    pub sampled_gpu_seconds: f64,
    /// GPU-seconds busy per that telemetry.
    pub busy_gpu_seconds: f64,
    /// Busy / sampled; absent without telemetry.
    pub efficiency: Option<f64>,
    /// Every bucket of the window in order, empty ones included.
    pub buckets: Vec<Bucket>,
    /// Per user, most first.
    pub by_user: Vec<Share>,
    /// Per GPU model, most first.
    pub by_gpu_model: Vec<Share>,
}

/// What accounts are ranked by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankBy {
    /// GPU-hours allocated in the window.
    GpuHours,
    /// Jobs that succeeded in the window.
    JobsSucceeded,
    /// Succeeded / (succeeded + failed) among jobs that ended in the window (cancelled jobs
    /// count for neither).
    SuccessRate,
    /// GPU-seconds busy / GPU-seconds sampled, over runs whose telemetry was reported.
    Efficiency,
    /// GPU-hours sampled but not busy: the idle GPU time an account held.
    IdleGpuHours,
}

impl RankBy {
    pub const NAMES: &[&str] = &[
        "gpu_hours",
        "jobs_succeeded",
        "success_rate",
        "efficiency",
        "idle_gpu_hours",
    ];

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "gpu_hours" => Self::GpuHours,
            "jobs_succeeded" => Self::JobsSucceeded,
            "success_rate" => Self::SuccessRate,
            "efficiency" => Self::Efficiency,
            "idle_gpu_hours" => Self::IdleGpuHours,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::GpuHours => "gpu_hours",
            Self::JobsSucceeded => "jobs_succeeded",
            Self::SuccessRate => "success_rate",
            Self::Efficiency => "efficiency",
            Self::IdleGpuHours => "idle_gpu_hours",
        }
    }

    /// The column of `figures` ranked on (a fixed name: never user text in SQL).
    fn column(self) -> &'static str {
        self.name()
    }
}

/// One account on the leaderboard, with every figure it could be ranked by.
#[derive(Debug, Clone, PartialEq, Object, sqlx::FromRow)]
pub struct Ranked {
    /// 1 for the first.
    pub rank: i64,
    pub account: String,
    /// The figure ranked by (see `by`).
    pub value: f64,
    /// GPU-hours allocated in the window (running runs up to now).
    pub gpu_hours: f64,
    /// Jobs that ended in the window, by outcome.
    pub jobs_succeeded: i64,
    pub jobs_failed: i64,
    pub jobs_cancelled: i64,
    /// Succeeded / (succeeded + failed); absent when none of its jobs ended so.
    pub success_rate: Option<f64>,
    /// GPU-hours covered by telemetry (runs that reported utilisation, clipped to the window).
    pub sampled_gpu_hours: f64,
    /// GPU-hours busy per telemetry.
    pub busy_gpu_hours: f64,
    /// Busy / sampled; absent without telemetry.
    pub efficiency: Option<f64>,
    /// Sampled but not busy.
    pub idle_gpu_hours: f64,
}

/// Accounts ranked over a window ending now.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct Leaderboard {
    /// What they are ranked by: gpu_hours, jobs_succeeded, success_rate, efficiency or
    /// idle_gpu_hours.
    pub by: String,
    /// desc (most first) or asc.
    pub order: String,
    pub window_hours: i64,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub items: Vec<Ranked>,
}

/// GPU-seconds of a `read_usage_runs` row `r` inside `[$lo, $hi)`, with `$now` ending running
/// runs, as exact numeric.
fn clipped(lo: &str, hi: &str, now: &str) -> String {
    format!(
        "r.gpu_count * GREATEST(0, EXTRACT(EPOCH FROM \
             LEAST({hi}, COALESCE(r.ended_at, {now})) - GREATEST({lo}, r.started_at)))"
    )
}

/// The runs of account `$1` overlapping `[lo, hi)`.
fn overlapping(lo: &str, hi: &str, now: &str) -> String {
    format!(
        "r.account = $1 AND r.started_at IS NOT NULL \
         AND r.started_at < {hi} AND COALESCE(r.ended_at, {now}) > {lo}"
    )
}

/// One account's usage over `[from, to)` in buckets of `granularity`, running runs counted up
/// to `now`. The caller bounds the number of buckets.
pub async fn account(
    pool: &PgPool,
    account: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    granularity: Granularity,
    now: DateTime<Utc>,
) -> Result<AccountUsage, sqlx::Error> {
    // $1 account, $2 from, $3 to, $4 bucket seconds, $5 first bucket start, $6 now.
    let sql = format!(
        "WITH buckets AS (
             SELECT b AS start, GREATEST(b, $2) AS lo,
                    LEAST(b + $4::float8 * interval '1 second', $3) AS hi
               FROM generate_series($5::timestamptz, $3::timestamptz - interval '1 microsecond',
                                    $4::float8 * interval '1 second') AS b
         )
         SELECT buckets.start, COALESCE(SUM({clip}), 0)::float8 AS gpu_seconds
           FROM buckets LEFT JOIN read_usage_runs r ON {overlap}
          GROUP BY buckets.start
          ORDER BY buckets.start",
        clip = clipped("buckets.lo", "buckets.hi", "$6"),
        overlap = overlapping("buckets.lo", "buckets.hi", "$6"),
    );
    let buckets: Vec<Bucket> = sqlx::query_as(&sql)
        .bind(account)
        .bind(from)
        .bind(to)
        .bind(granularity.seconds() as f64)
        .bind(granularity.floor(from))
        .bind(now)
        .fetch_all(pool)
        .await?;
    let clip = clipped("$2", "$3", "$4");
    // The part of an ended run's time inside the window.
    let fraction = format!(
        "({clip}) / NULLIF(r.gpu_count * EXTRACT(EPOCH FROM r.ended_at - r.started_at), 0)"
    );
    let total_sql = format!(
        "SELECT COALESCE(SUM({clip}), 0)::float8,
                COALESCE(SUM(r.gpu_seconds_sampled * {fraction}), 0)::float8,
                COALESCE(SUM(r.gpu_seconds_busy * {fraction}), 0)::float8
           FROM read_usage_runs r WHERE {overlap}",
        overlap = overlapping("$2", "$3", "$4"),
    );
    let (total_gpu_seconds, sampled_gpu_seconds, busy_gpu_seconds): (f64, f64, f64) =
        sqlx::query_as(&total_sql)
            .bind(account)
            .bind(from)
            .bind(to)
            .bind(now)
            .fetch_one(pool)
            .await?;
    let share = |column: &str| {
        format!(
            "SELECT r.{column} AS key, SUM({clip})::float8 AS gpu_seconds
               FROM read_usage_runs r WHERE {overlap}
              GROUP BY r.{column}
              ORDER BY gpu_seconds DESC, key NULLS LAST",
            clip = clipped("$2", "$3", "$4"),
            overlap = overlapping("$2", "$3", "$4"),
        )
    };
    let mut shares = Vec::with_capacity(2);
    for column in ["submitted_by", "gpu_model"] {
        let rows: Vec<Share> = sqlx::query_as(&share(column))
            .bind(account)
            .bind(from)
            .bind(to)
            .bind(now)
            .fetch_all(pool)
            .await?;
        shares.push(rows);
    }
    let by_gpu_model = shares.pop().unwrap_or_default();
    let by_user = shares.pop().unwrap_or_default();
    Ok(AccountUsage {
        account: account.to_string(),
        from,
        to,
        granularity: granularity.name().to_string(),
        total_gpu_seconds,
        sampled_gpu_seconds,
        busy_gpu_seconds,
        efficiency: (sampled_gpu_seconds > 0.0).then(|| busy_gpu_seconds / sampled_gpu_seconds),
        buckets,
        by_user,
        by_gpu_model,
    })
}

/// How a leaderboard is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderboardQuery {
    pub by: RankBy,
    /// Least first instead of most first (e.g. the least efficient accounts).
    pub ascending: bool,
    pub window_hours: i64,
    pub limit: i64,
    /// For `success_rate`: only accounts with at least this many jobs that succeeded or failed
    /// (so one lucky job does not top the board).
    pub min_jobs: i64,
}

/// Accounts ranked over `[now - window_hours, now)`, ties by account. Accounts without the
/// ranked figure (no ended jobs for `success_rate`, no telemetry for `efficiency`, nothing at
/// all for the sums) are left out.
///
/// Utilisation is reported per run with its end; a run that overlaps the window only partly
/// counts the same fraction of its sampled and busy time as of its allocated time.
pub async fn leaderboard(
    pool: &PgPool,
    query: LeaderboardQuery,
    now: DateTime<Utc>,
) -> Result<Leaderboard, sqlx::Error> {
    let from = now - TimeDelta::hours(query.window_hours);
    // $1 from, $2 to (= now), $3 limit, $4 min_jobs.
    let clip = clipped("$1", "$2", "$2");
    let whole = "r.gpu_count * EXTRACT(EPOCH FROM r.ended_at - r.started_at)";
    let fraction = format!("({clip}) / NULLIF({whole}, 0)");
    let sql = format!(
        "WITH runs AS (
             SELECT r.account,
                    SUM({clip}) AS allocated,
                    COALESCE(SUM(r.gpu_seconds_sampled * {fraction}), 0) AS sampled,
                    COALESCE(SUM(r.gpu_seconds_busy * {fraction}), 0) AS busy
               FROM read_usage_runs r
              WHERE r.started_at IS NOT NULL AND r.started_at < $2
                AND COALESCE(r.ended_at, $2) > $1
              GROUP BY r.account
         ), outcomes AS (
             SELECT account,
                    COUNT(*) FILTER (WHERE outcome = 'succeeded') AS succeeded,
                    COUNT(*) FILTER (WHERE outcome = 'failed') AS failed,
                    COUNT(*) FILTER (WHERE outcome = 'cancelled') AS cancelled
               FROM read_usage_jobs
              WHERE finished_at >= $1 AND finished_at < $2
              GROUP BY account
         ), figures AS (
             SELECT account,
                    (COALESCE(runs.allocated, 0) / 3600)::float8 AS gpu_hours,
                    COALESCE(o.succeeded, 0) AS jobs_succeeded,
                    COALESCE(o.failed, 0) AS jobs_failed,
                    COALESCE(o.cancelled, 0) AS jobs_cancelled,
                    (o.succeeded::numeric / NULLIF(o.succeeded + o.failed, 0))::float8
                        AS success_rate,
                    (COALESCE(runs.sampled, 0) / 3600)::float8 AS sampled_gpu_hours,
                    (COALESCE(runs.busy, 0) / 3600)::float8 AS busy_gpu_hours,
                    (runs.busy / NULLIF(runs.sampled, 0))::float8 AS efficiency,
                    ((COALESCE(runs.sampled, 0) - COALESCE(runs.busy, 0)) / 3600)::float8
                        AS idle_gpu_hours,
                    COALESCE(o.succeeded + o.failed, 0) AS ended
               FROM runs FULL JOIN outcomes o USING (account)
         )
         SELECT row_number() OVER (ORDER BY {column} {order}, account) AS rank,
                account, {column}::float8 AS value, gpu_hours, jobs_succeeded, jobs_failed,
                jobs_cancelled, success_rate, sampled_gpu_hours, busy_gpu_hours, efficiency,
                idle_gpu_hours
           FROM figures
          WHERE {present}
          ORDER BY rank
          LIMIT $3",
        column = query.by.column(),
        order = if query.ascending { "ASC" } else { "DESC" },
        present = match query.by {
            RankBy::GpuHours => "gpu_hours > 0",
            RankBy::JobsSucceeded => "jobs_succeeded > 0",
            RankBy::SuccessRate => "success_rate IS NOT NULL AND ended >= $4",
            RankBy::Efficiency => "efficiency IS NOT NULL",
            RankBy::IdleGpuHours => "sampled_gpu_hours > 0",
        },
    );
    let items: Vec<Ranked> = sqlx::query_as(&sql)
        .bind(from)
        .bind(now)
        .bind(query.limit)
        .bind(query.min_jobs)
        .fetch_all(pool)
        .await?;
    Ok(Leaderboard {
        by: query.by.name().into(),
        order: if query.ascending { "asc" } else { "desc" }.into(),
        window_hours: query.window_hours,
        from,
        to: now,
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_aligned_to_utc_hours_and_days_and_counted() {
        let at = |text: &str| text.parse::<DateTime<Utc>>().unwrap();
        let from = at("2026-11-24T10:30:00Z");
        assert_eq!(Granularity::Hour.floor(from), at("2026-11-24T10:00:00Z"));
        assert_eq!(Granularity::Day.floor(from), at("2026-11-24T00:00:00Z"));
        assert_eq!(
            Granularity::Hour.buckets(from, at("2026-11-24T11:00:00Z")),
            1
        );
        assert_eq!(
            Granularity::Hour.buckets(from, at("2026-11-24T11:00:01Z")),
            2
        );
        assert_eq!(
            Granularity::Day.buckets(from, at("2026-12-01T10:30:00Z")),
            8
        );
        assert_eq!(Granularity::parse("week"), None);
    }
}
