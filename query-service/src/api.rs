//! The read API (poem-openapi).

use std::time::Duration;

use chrono::{DateTime, Utc};
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags, Union};
use sqlx::PgPool;
use uuid::Uuid;

use overfly_http::ApiError;

use crate::as_of;
use crate::executors::{self, ExecutorDetail, ExecutorSummary, Gpu};
use crate::history::{self, HistoryEvent};
use crate::jobs::{self, Cursor, Filter, JobDetail, JobSummary};
use crate::leaderboards::{self, RunLeaderboard, RunQuery};
use crate::projections::{self, ProjectionStatus};
use crate::usage::{self, AccountUsage, Granularity, Leaderboard, LeaderboardQuery, RankBy};

#[derive(Tags)]
enum Tag {
    /// Jobs and their runs, from the read models.
    Jobs,
    /// Executors, their GPUs and which run holds each GPU, from the read models.
    Executors,
    /// GPU time allocated per account, user and GPU model, with utilisation; accounts ranked.
    Usage,
    /// Runs ranked by a metric they reported.
    Leaderboards,
    /// The event store's history of any job or executor.
    Audit,
    /// Live Server-Sent Events feeds, resumable with `Last-Event-ID`.
    Feeds,
    /// Liveness, readiness and the projections' health.
    Health,
}

/// One page of jobs.
#[derive(Debug, Clone, Object)]
pub struct JobPage {
    pub items: Vec<JobSummary>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
    /// Jobs matching the filters (only with `with_total=true`).
    pub total: Option<i64>,
}

#[derive(Debug, Clone, Object)]
pub struct Health {
    pub status: String,
}

pub struct QueryApi {
    pub pool: PgPool,
    /// How long `min_position` waits for the projection.
    pub read_your_writes_wait: Duration,
    /// The scheduler's policy, for `explain`.
    pub policy: overfly_domain::scheduler::Policy,
    /// The live feeds' shared subscription; `None` without NATS (feeds answer 503).
    pub feeds: Option<crate::feeds::Feeds>,
}

/// What `GET /stream` and `GET /jobs/{id}/events` send. The SSE `event:` says which: the
/// event type, or `reset`; `id:` is the JetStream stream sequence (pass the last one seen as
/// `Last-Event-ID` to resume).
#[derive(Debug, Clone, Union)]
pub enum FeedMessage {
    Event(crate::feeds::events::FeedEvent),
    /// The client read too slowly and fell behind the server's bounded buffer: resume after
    /// `resume_after`. The connection closes after it.
    Reset(crate::feeds::Reset),
}

/// What `GET /jobs/{id}/logs` sends: `event: log` (one batch of consecutive lines of one
/// run), `event: end` (the job is finished; no `id:`; the connection closes), or `reset`.
#[derive(Debug, Clone, Union)]
pub enum LogFeedMessage {
    Log(overfly_schemas::wire::LogBatch),
    End(crate::feeds::logs::LogEnd),
    Reset(crate::feeds::Reset),
}

/// What the telemetry feeds send: `event: sample` (one GPU's sample), or `reset`.
// Only describes the feed in the OpenAPI document (the bytes are rendered by the fan-out).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Union)]
pub enum TelemetryFeedMessage {
    Sample(overfly_schemas::wire::TelemetrySample),
    Reset(crate::feeds::Reset),
}

type Feed<U> = crate::feeds::SseFeed<U>;

/// A feed's frames as an SSE response, with keep-alive comments.
fn sse<U: poem_openapi::types::Type>(
    frames: impl futures::Stream<Item = crate::feeds::Frame> + Send + 'static,
) -> Feed<U> {
    crate::feeds::SseFeed::new(frames)
}

fn bad(param: &str, detail: impl Into<String>) -> ApiError {
    ApiError::bad_request(detail, Some(param.to_string()))
}

fn uuid_param(name: &str, value: &str) -> Result<Uuid, ApiError> {
    value
        .parse()
        .map_err(|_| bad(name, format!("{name} must be a UUID, got {value:?}")))
}

/// A subject token filter: letters, digits, `_` and `-` (ids and type names never hold more).
fn token(name: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v)
            if v.is_empty()
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
        {
            Err(bad(name, "expected letters, digits, _ or -"))
        }
        other => Ok(other),
    }
}

/// The `Last-Event-ID` header: a stream sequence.
fn last_event_id_param(value: Option<&str>) -> Result<Option<u64>, ApiError> {
    value
        .map(|v| {
            v.trim().parse::<u64>().map_err(|_| {
                bad(
                    "Last-Event-ID",
                    "expected the id: of a message this feed sent",
                )
            })
        })
        .transpose()
}

/// A `label` parameter: `key=value`.
fn parse_label(text: &str) -> Result<(String, String), ApiError> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(bad("label", format!("expected key=value, got {text:?}"))),
    }
}

/// An `order` parameter: `desc` (the default) or `asc`; whether ascending.
fn ascending(order: Option<&str>) -> Result<bool, ApiError> {
    match order {
        None | Some("desc") => Ok(false),
        Some("asc") => Ok(true),
        Some(other) => Err(bad("order", format!("expected desc or asc, got {other:?}"))),
    }
}

fn store_error(error: sqlx::Error) -> ApiError {
    ApiError::internal(&error)
}

#[OpenApi]
impl QueryApi {
    /// List jobs, newest first (or `sort=oldest`), filtered, one page at a time.
    ///
    /// Pages are stable under concurrent submissions: follow `next_cursor` and every job
    /// appears once.
    #[oai(path = "/jobs", method = "get", tag = "Tag::Jobs")]
    #[allow(clippy::too_many_arguments)]
    async fn list_jobs(
        &self,
        /// queued, assigned, running, succeeded, failed or cancelled.
        state: Query<Option<String>>,
        account: Query<Option<String>>,
        submitted_by: Query<Option<String>>,
        /// `key=value`, e.g. `benchmark=tiles-v1`.
        label: Query<Option<String>>,
        created_after: Query<Option<DateTime<Utc>>>,
        created_before: Query<Option<DateTime<Utc>>>,
        /// `newest` (default) or `oldest`.
        sort: Query<Option<String>>,
        /// 1 to 500 (default 50).
        limit: Query<Option<i64>>,
        cursor: Query<Option<String>>,
        /// Also count all matching jobs.
        with_total: Query<Option<bool>>,
        /// Wait until the read model includes the event at this global position (the
        /// `position` a command answered with).
        min_position: Query<Option<i64>>,
    ) -> Result<Json<JobPage>, ApiError> {
        if let Some(state) = &state.0
            && !jobs::STATES.contains(&state.as_str())
        {
            return Err(bad(
                "state",
                format!("unknown state {state:?}; one of {:?}", jobs::STATES),
            ));
        }
        let label = label.0.as_deref().map(parse_label).transpose()?;
        let oldest_first = match sort.0.as_deref() {
            None | Some("newest") => false,
            Some("oldest") => true,
            Some(other) => {
                return Err(bad(
                    "sort",
                    format!("expected newest or oldest, got {other:?}"),
                ));
            }
        };
        let limit = limit.0.unwrap_or(50);
        if !(1..=jobs::MAX_LIMIT).contains(&limit) {
            return Err(bad(
                "limit",
                format!("must be between 1 and {}", jobs::MAX_LIMIT),
            ));
        }
        let after = match cursor.0 {
            None => None,
            Some(text) => Some(
                Cursor::decode(&text)
                    .ok_or_else(|| bad("cursor", "not a cursor this API issued"))?,
            ),
        };
        self.wait_for(min_position.0).await?;
        let filter = Filter {
            state: state.0,
            account: account.0,
            submitted_by: submitted_by.0,
            label,
            created_after: created_after.0,
            created_before: created_before.0,
            oldest_first,
        };
        let page = jobs::list(&self.pool, &filter, after, limit)
            .await
            .map_err(store_error)?;
        let total = if with_total.0.unwrap_or(false) {
            Some(
                jobs::count(&self.pool, &filter)
                    .await
                    .map_err(store_error)?,
            )
        } else {
            None
        };
        Ok(Json(JobPage {
            items: page.items,
            next_cursor: page.next_cursor.map(|c| c.encode()),
            total,
        }))
    }

    /// One job with its spec and every run; with `as_of`, as it was at that instant.
    ///
    /// `as_of` rebuilds the job from its events recorded up to that instant with the very
    /// projection code that keeps the live read model, so both answers have one meaning.
    #[oai(path = "/jobs/:job_id", method = "get", tag = "Tag::Jobs")]
    async fn get_job(
        &self,
        job_id: Path<String>,
        /// An RFC 3339 instant: the job as it was then, rebuilt from the event store.
        as_of: Query<Option<DateTime<Utc>>>,
        /// Wait until the read model includes the event at this global position.
        min_position: Query<Option<i64>>,
    ) -> Result<Json<JobDetail>, ApiError> {
        let job_id = uuid_param("job_id", &job_id)?;
        let detail = match as_of.0 {
            Some(instant) => as_of::job(&self.pool, job_id, instant).await?,
            None => {
                self.wait_for(min_position.0).await?;
                let mut conn = self.pool.acquire().await.map_err(store_error)?;
                jobs::get(&mut conn, job_id).await.map_err(store_error)?
            }
        };
        detail
            .map(Json)
            .ok_or_else(|| ApiError::not_found(format!("job {job_id} not found")))
    }

    /// List executors by id, optionally in one state.
    #[oai(path = "/executors", method = "get", tag = "Tag::Executors")]
    async fn list_executors(
        &self,
        /// registered, active, draining, lost or gone.
        state: Query<Option<String>>,
    ) -> Result<Json<Vec<ExecutorSummary>>, ApiError> {
        if let Some(state) = &state.0
            && !executors::STATES.contains(&state.as_str())
        {
            return Err(bad(
                "state",
                format!("unknown state {state:?}; one of {:?}", executors::STATES),
            ));
        }
        let items = executors::list(&self.pool, state.0.as_deref())
            .await
            .map_err(store_error)?;
        Ok(Json(items))
    }

    /// One executor with its GPU inventory and the run holding each GPU.
    #[oai(
        path = "/executors/:executor_id",
        method = "get",
        tag = "Tag::Executors"
    )]
    async fn get_executor(
        &self,
        executor_id: Path<String>,
    ) -> Result<Json<ExecutorDetail>, ApiError> {
        executors::get(&self.pool, &executor_id)
            .await
            .map_err(store_error)?
            .map(Json)
            .ok_or_else(|| ApiError::not_found(format!("executor {} not found", executor_id.0)))
    }

    /// List GPUs by executor and index, optionally of one executor, free or held.
    #[oai(path = "/gpus", method = "get", tag = "Tag::Executors")]
    async fn list_gpus(
        &self,
        executor_id: Query<Option<String>>,
        /// `true`: only GPUs no run holds; `false`: only held ones.
        free: Query<Option<bool>>,
    ) -> Result<Json<Vec<Gpu>>, ApiError> {
        let gpus = executors::gpus(&self.pool, executor_id.0.as_deref(), free.0)
            .await
            .map_err(store_error)?;
        Ok(Json(gpus))
    }

    /// GPU-seconds one account was allocated over `[from, to)`, per hour or day bucket, per
    /// user and per GPU model.
    ///
    /// Each started run counts `gpu_count` GPUs from its start to its end (a running run up to
    /// now), clipped to each bucket. Buckets are UTC hours or days.
    #[oai(path = "/usage/accounts/:account", method = "get", tag = "Tag::Usage")]
    async fn account_usage(
        &self,
        account: Path<String>,
        /// RFC 3339; default: 7 days before `to`.
        from: Query<Option<DateTime<Utc>>>,
        /// RFC 3339, exclusive; default: now.
        to: Query<Option<DateTime<Utc>>>,
        /// `hour` or `day` (default).
        granularity: Query<Option<String>>,
    ) -> Result<Json<AccountUsage>, ApiError> {
        let granularity = match granularity.0.as_deref() {
            None => Granularity::Day,
            Some(text) => Granularity::parse(text)
                .ok_or_else(|| bad("granularity", format!("expected hour or day, got {text:?}")))?,
        };
        let now = Utc::now();
        let to = to.0.unwrap_or(now);
        let from = from.0.unwrap_or(to - usage::DEFAULT_WINDOW);
        if from >= to {
            return Err(bad(
                "from",
                format!("from ({from}) must be before to ({to})"),
            ));
        }
        let buckets = granularity.buckets(from, to);
        if buckets > usage::MAX_BUCKETS {
            return Err(bad(
                "from",
                format!(
                    "the window spans {buckets} {} buckets, at most {} are answered: narrow \
                     from/to or use a coarser granularity",
                    granularity.name(),
                    usage::MAX_BUCKETS
                ),
            ));
        }
        let answer = usage::account(&self.pool, &account, from, to, granularity, now)
            .await
            .map_err(store_error)?;
        Ok(Json(answer))
    }

    /// Accounts ranked over the last `window` hours by GPU-hours allocated, jobs succeeded,
    /// success rate, efficiency (GPU time busy per telemetry / GPU time sampled) or idle
    /// GPU-hours (sampled but not busy: the "idle GPU" ranking).
    ///
    /// Each item carries every figure, whichever one it is ranked by. Accounts without the
    /// ranked figure are left out (no ended jobs for success_rate, no telemetry for efficiency).
    #[oai(path = "/usage/leaderboard", method = "get", tag = "Tag::Usage")]
    async fn usage_leaderboard(
        &self,
        /// Hours before now, 1 to 8784 (default 168: a week).
        window: Query<Option<i64>>,
        /// gpu_hours (default), jobs_succeeded, success_rate, efficiency or idle_gpu_hours.
        by: Query<Option<String>>,
        /// desc (default: most first) or asc (e.g. the least efficient accounts first).
        order: Query<Option<String>>,
        /// 1 to 500 (default 50).
        limit: Query<Option<i64>>,
        /// For success_rate: only accounts with at least this many succeeded or failed jobs
        /// in the window (default 1).
        min_jobs: Query<Option<i64>>,
    ) -> Result<Json<Leaderboard>, ApiError> {
        let by = match by.0.as_deref() {
            None => RankBy::GpuHours,
            Some(text) => RankBy::parse(text).ok_or_else(|| {
                bad(
                    "by",
                    format!("expected one of {:?}, got {text:?}", RankBy::NAMES),
                )
            })?,
        };
        let window = window.0.unwrap_or(usage::DEFAULT_WINDOW_HOURS);
        if !(1..=usage::MAX_WINDOW_HOURS).contains(&window) {
            return Err(bad(
                "window",
                format!("must be between 1 and {} hours", usage::MAX_WINDOW_HOURS),
            ));
        }
        let limit = limit.0.unwrap_or(usage::DEFAULT_LIMIT);
        if !(1..=usage::MAX_LIMIT).contains(&limit) {
            return Err(bad(
                "limit",
                format!("must be between 1 and {}", usage::MAX_LIMIT),
            ));
        }
        let min_jobs = min_jobs.0.unwrap_or(1);
        if min_jobs < 1 {
            return Err(bad("min_jobs", "must be at least 1"));
        }
        let query = LeaderboardQuery {
            by,
            ascending: ascending(order.0.as_deref())?,
            window_hours: window,
            limit,
            min_jobs,
        };
        let answer = usage::leaderboard(&self.pool, query, Utc::now())
            .await
            .map_err(store_error)?;
        Ok(Json(answer))
    }

    /// Runs ranked by a metric they reported (its latest value per run), best first: e.g.
    /// `/leaderboards/accuracy?label=benchmark=tiles-v1`, or `order=asc` for a loss.
    #[oai(
        path = "/leaderboards/:metric",
        method = "get",
        tag = "Tag::Leaderboards"
    )]
    async fn run_leaderboard(
        &self,
        /// The metric's name as the runs reported it, e.g. `accuracy`.
        metric: Path<String>,
        /// `key=value`; repeat for several (the job must have all).
        label: Query<Vec<String>>,
        /// Only runs of this account's jobs.
        account: Query<Option<String>>,
        /// Only runs in this state: assigned, running, succeeded, failed or timed_out.
        state: Query<Option<String>>,
        /// desc (default: highest first) or asc (lowest first).
        order: Query<Option<String>>,
        /// 1 to 500 (default 50).
        limit: Query<Option<i64>>,
    ) -> Result<Json<RunLeaderboard>, ApiError> {
        if !leaderboards::valid_metric(&metric) {
            return Err(bad(
                "metric",
                "expected 1 to 128 letters, digits or _ . - / :",
            ));
        }
        let labels = label
            .0
            .iter()
            .map(|text| parse_label(text))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(state) = &state.0
            && !leaderboards::RUN_STATES.contains(&state.as_str())
        {
            return Err(bad(
                "state",
                format!(
                    "unknown run state {state:?}; one of {:?}",
                    leaderboards::RUN_STATES
                ),
            ));
        }
        let limit = limit.0.unwrap_or(leaderboards::DEFAULT_LIMIT);
        if !(1..=leaderboards::MAX_LIMIT).contains(&limit) {
            return Err(bad(
                "limit",
                format!("must be between 1 and {}", leaderboards::MAX_LIMIT),
            ));
        }
        let query = RunQuery {
            metric: metric.0,
            labels,
            account: account.0,
            state: state.0,
            ascending: ascending(order.0.as_deref())?,
            limit,
        };
        let answer = leaderboards::runs(&self.pool, &query)
            .await
            .map_err(store_error)?;
        Ok(Json(answer))
    }

    /// Why is this job pending? Its place in the queue, its priority factors (priority, age,
    /// fair share: like Slurm's `sprio`), the jobs ahead of it and what it waits for (no
    /// executor with enough GPUs or memory, GPUs busy, a retry backoff, GPUs reserved for a
    /// starving job), or where it would be placed now.
    ///
    /// With `at`, for any past instant: the queue and fleet are rebuilt from the events
    /// recorded up to then and the scheduler's policy is run in explain mode.
    #[oai(path = "/jobs/:job_id/explain", method = "get", tag = "Tag::Audit")]
    async fn explain_job(
        &self,
        job_id: Path<String>,
        /// RFC 3339; default: now.
        at: Query<Option<DateTime<Utc>>>,
    ) -> Result<Json<crate::explain::Explanation>, ApiError> {
        let job_id = uuid_param("job_id", &job_id)?;
        let at = at.0.unwrap_or_else(Utc::now);
        match crate::explain::explain(&self.pool, job_id, at, &self.policy).await {
            Ok(Some(explanation)) => Ok(Json(explanation)),
            Ok(None) => Err(ApiError::not_found(format!(
                "job {job_id} did not exist at {at}"
            ))),
            Err(error) => Err(ApiError::internal(&error)),
        }
    }

    /// Every event, live, as Server-Sent Events; filter by account, aggregate type, aggregate
    /// id and event type. Reconnect with `Last-Event-ID` to get exactly what was missed.
    #[oai(path = "/stream", method = "get", tag = "Tag::Feeds")]
    #[allow(clippy::too_many_arguments)]
    async fn stream(
        &self,
        /// Only events of this account's jobs.
        account: Query<Option<String>>,
        /// job or executor.
        aggregate_type: Query<Option<String>>,
        /// A job id or executor id.
        aggregate_id: Query<Option<String>>,
        /// E.g. `RunAssigned`.
        event_type: Query<Option<String>>,
        /// The `id:` of the last message received: the feed resumes right after it.
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> Result<Feed<FeedMessage>, ApiError> {
        let filter = crate::feeds::events::Filter {
            aggregate_type: token("aggregate_type", aggregate_type.0)?,
            aggregate_id: token("aggregate_id", aggregate_id.0)?,
            event_type: token("event_type", event_type.0)?,
            account: token("account", account.0)?,
        };
        let after = last_event_id_param(last_event_id.0.as_deref())?;
        self.feed(filter, after).await
    }

    /// One job's events as Server-Sent Events: its whole history first (so a late client has
    /// the whole story), then live. Reconnect with `Last-Event-ID` to resume.
    #[oai(path = "/jobs/:job_id/events", method = "get", tag = "Tag::Feeds")]
    async fn job_events(
        &self,
        job_id: Path<String>,
        /// The `id:` of the last message received: the feed resumes right after it.
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> Result<Feed<FeedMessage>, ApiError> {
        let job_id = uuid_param("job_id", &job_id)?;
        let filter = crate::feeds::events::Filter {
            aggregate_type: Some("job".into()),
            aggregate_id: Some(job_id.to_string()),
            event_type: None,
            account: None,
        };
        let after = last_event_id_param(last_event_id.0.as_deref())?.or(Some(0));
        self.feed(filter, after).await
    }

    /// A job's log lines as Server-Sent Events, in the order each run printed them: the
    /// backlog (the last `tail` lines with `tail`), then with `follow=true` live until the job
    /// is finished, when a final `end` message closes the feed (also sent without `follow`
    /// when the job is already finished). Reconnect with `Last-Event-ID` to resume.
    #[oai(path = "/jobs/:job_id/logs", method = "get", tag = "Tag::Feeds")]
    async fn job_logs(
        &self,
        job_id: Path<String>,
        /// Keep the feed open for new lines until the job is finished (default false).
        follow: Query<Option<bool>>,
        /// Only the last N lines of the backlog (at most 100000).
        tail: Query<Option<u64>>,
        /// Only this run's lines.
        run_id: Query<Option<String>>,
        /// The `id:` of the last message received: the feed resumes right after it (`tail`
        /// is then ignored).
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> Result<Feed<LogFeedMessage>, ApiError> {
        const MAX_TAIL: u64 = 100_000;
        let job_id = uuid_param("job_id", &job_id)?;
        let run_id = run_id.0.map(|run| uuid_param("run_id", &run)).transpose()?;
        let tail = match tail.0 {
            Some(tail) if tail > MAX_TAIL => {
                return Err(bad("tail", format!("at most {MAX_TAIL} lines, got {tail}")));
            }
            other => other.map(|t| t as usize),
        };
        let after = last_event_id_param(last_event_id.0.as_deref())?;
        let feeds = self.feeds()?;
        let request = crate::feeds::logs::Request {
            job_id,
            run_id,
            follow: follow.0.unwrap_or(false),
            tail,
            after,
        };
        match crate::feeds::logs::feed(&feeds.logs, &feeds.events, self.pool.clone(), request).await
        {
            Ok(Some(frames)) => Ok(sse(frames)),
            Ok(None) => Err(ApiError::not_found(format!("job {job_id} not found"))),
            Err(error) => Err(ApiError::unavailable(format!(
                "the log feed is unavailable: {error}"
            ))),
        }
    }

    /// Every GPU's telemetry samples, live, as Server-Sent Events (optionally one
    /// executor's). Reconnect with `Last-Event-ID` to resume (samples are kept one hour).
    #[oai(path = "/gpus/stream", method = "get", tag = "Tag::Feeds")]
    async fn gpus_stream(
        &self,
        /// Only this executor's GPUs.
        executor_id: Query<Option<String>>,
        /// The `id:` of the last message received: the feed resumes right after it.
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> Result<Feed<TelemetryFeedMessage>, ApiError> {
        let executor_id = token("executor_id", executor_id.0)?;
        let after = last_event_id_param(last_event_id.0.as_deref())?;
        self.telemetry(executor_id, after).await
    }

    /// One executor's GPU telemetry samples, live, as Server-Sent Events. Reconnect with
    /// `Last-Event-ID` to resume (samples are kept one hour).
    #[oai(
        path = "/executors/:executor_id/telemetry",
        method = "get",
        tag = "Tag::Feeds"
    )]
    async fn executor_telemetry(
        &self,
        executor_id: Path<String>,
        /// The `id:` of the last message received: the feed resumes right after it.
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> Result<Feed<TelemetryFeedMessage>, ApiError> {
        let executor_id = token("executor_id", Some(executor_id.0))?.unwrap_or_default();
        let after = last_event_id_param(last_event_id.0.as_deref())?;
        let known: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_type = 'executor' AND aggregate_id = $1)",
        )
        .bind(&executor_id)
        .fetch_one(&self.pool)
        .await
        .map_err(store_error)?;
        if !known {
            return Err(ApiError::not_found(format!(
                "executor {executor_id} not found"
            )));
        }
        self.telemetry(Some(executor_id), after).await
    }

    /// Every event of a job, in order, with who, when, why and its trace.
    #[oai(path = "/jobs/:job_id/history", method = "get", tag = "Tag::Audit")]
    async fn job_history(&self, job_id: Path<String>) -> Result<Json<Vec<HistoryEvent>>, ApiError> {
        let job_id = uuid_param("job_id", &job_id)?;
        self.history("job", &job_id.to_string()).await
    }

    /// Every event of an executor, in order, with who, when, why and its trace.
    #[oai(
        path = "/executors/:executor_id/history",
        method = "get",
        tag = "Tag::Audit"
    )]
    async fn executor_history(
        &self,
        executor_id: Path<String>,
    ) -> Result<Json<Vec<HistoryEvent>>, ApiError> {
        self.history("executor", &executor_id).await
    }

    /// Liveness: the process answers.
    #[oai(path = "/healthz", method = "get", tag = "Tag::Health")]
    async fn healthz(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
        })
    }

    /// Each projection's progress and health: `stopped` with the reason when it met an
    /// event it cannot apply (it never skips one), `catching_up` while behind the store.
    #[oai(path = "/projections", method = "get", tag = "Tag::Health")]
    async fn projections(&self) -> Result<Json<Vec<ProjectionStatus>>, ApiError> {
        let statuses = projections::statuses(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(Json(statuses))
    }

    /// Readiness: Postgres is reachable.
    #[oai(path = "/readyz", method = "get", tag = "Tag::Health")]
    async fn readyz(&self) -> Result<Json<Health>, ApiError> {
        let ping = tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&self.pool),
        )
        .await;
        if !matches!(ping, Ok(Ok(_))) {
            return Err(ApiError::unavailable("Postgres is not reachable"));
        }
        Ok(Json(Health {
            status: "ready".into(),
        }))
    }
}

impl QueryApi {
    fn feeds(&self) -> Result<&crate::feeds::Feeds, ApiError> {
        self.feeds
            .as_ref()
            .ok_or_else(|| ApiError::unavailable("live feeds need NATS (none is configured)"))
    }

    async fn feed(
        &self,
        filter: crate::feeds::events::Filter,
        after: Option<u64>,
    ) -> Result<Feed<FeedMessage>, ApiError> {
        let feeds = self.feeds()?;
        let frames = crate::feeds::events::feed(&feeds.events, self.pool.clone(), filter, after)
            .await
            .map_err(|e| ApiError::unavailable(format!("the event stream is unavailable: {e}")))?;
        Ok(sse(frames))
    }

    async fn telemetry(
        &self,
        executor_id: Option<String>,
        after: Option<u64>,
    ) -> Result<Feed<TelemetryFeedMessage>, ApiError> {
        let feeds = self.feeds()?;
        let frames = crate::feeds::telemetry::feed(&feeds.telemetry, executor_id, after)
            .await
            .map_err(|e| {
                ApiError::unavailable(format!("the telemetry stream is unavailable: {e}"))
            })?;
        Ok(sse(frames))
    }

    async fn history(
        &self,
        aggregate_type: &str,
        id: &str,
    ) -> Result<Json<Vec<HistoryEvent>>, ApiError> {
        let events = history::of(&self.pool, aggregate_type, id, None)
            .await
            .map_err(store_error)?;
        if events.is_empty() {
            return Err(ApiError::not_found(format!(
                "{aggregate_type} {id} not found"
            )));
        }
        Ok(Json(events))
    }

    /// Read-your-writes: waits, up to the configured bound, until the jobs projection has
    /// applied the event at `position`; else 503 with `Retry-After`.
    async fn wait_for(&self, position: Option<i64>) -> Result<(), ApiError> {
        let Some(position) = position else {
            return Ok(());
        };
        if position < 1 {
            return Err(bad(
                "min_position",
                "must be a position a command returned (≥ 1)",
            ));
        }
        let deadline = tokio::time::Instant::now() + self.read_your_writes_wait;
        loop {
            if jobs::applied(&self.pool, position)
                .await
                .map_err(store_error)?
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::retry_after(
                    format!("the read model has not applied position {position} yet"),
                    1,
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
