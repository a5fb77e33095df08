//! Builds any projection from the Postgres event store (commit order, batched), into a
//! schema of its own, beside the live tables. JetStream is not involved, so its retention
//! never matters. [`crate::verify`] (diff against live) and [`crate::swap`] (build, catch
//! up, swap in atomically) build on this.
//!
//! Everything here is driven by the [`Projection`] trait: its tables (copied `LIKE … INCLUDING
//! ALL`, so a column a migration adds is copied too), the aggregate type it reads, its apply
//! function (the very code the live runner applies with) and its checkpoint row.
//! [`AnyProjection`] names the projections for the command line.

use std::time::{Duration, Instant};

use overfly_schemas::EventEnvelope;
use sqlx::{PgConnection, PgPool};

use crate::error::ProjectionError;
use crate::jobs;
use crate::runner::{Executors, Jobs, Last, Projection, Table, Usage, store_checkpoint};

/// The checkpoints table, copied into every shadow schema besides the projection's tables
/// (the shadow keeps its own checkpoint row, in the same transactions as its rows).
pub const CHECKPOINTS: &str = "projection_checkpoints";

/// The projections, by the names the command line takes.
pub const PROJECTIONS: &[&str] = &[
    crate::jobs::NAME,
    crate::executors::NAME,
    crate::usage::NAME,
];

/// Any of the projections, chosen by name at run time; delegates to the one it holds.
#[derive(Debug, Clone, Copy)]
pub enum AnyProjection {
    Jobs(Jobs),
    Executors(Executors),
    Usage(Usage),
}

impl AnyProjection {
    /// Every projection, in [`PROJECTIONS`] order.
    pub fn all() -> Vec<Self> {
        vec![
            Self::Jobs(Jobs),
            Self::Executors(Executors),
            Self::Usage(Usage),
        ]
    }

    /// The projection called `name`; an error listing the known names otherwise.
    pub fn from_name(name: &str) -> Result<Self, RebuildError> {
        Self::all()
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| RebuildError::UnknownProjection(name.to_string()))
    }
}

impl std::str::FromStr for AnyProjection {
    type Err = RebuildError;
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::from_name(name)
    }
}

/// Delegates to the projection held.
macro_rules! delegate {
    ($self:ident, $p:ident => $e:expr) => {
        match $self {
            AnyProjection::Jobs($p) => $e,
            AnyProjection::Executors($p) => $e,
            AnyProjection::Usage($p) => $e,
        }
    };
}

impl Projection for AnyProjection {
    fn name(&self) -> &'static str {
        delegate!(self, p => p.name())
    }
    fn consumer(&self) -> &'static str {
        delegate!(self, p => p.consumer())
    }
    fn filter_subject(&self) -> &'static str {
        delegate!(self, p => p.filter_subject())
    }
    fn leader_lock(&self) -> i64 {
        delegate!(self, p => p.leader_lock())
    }
    fn swap_lock(&self) -> i64 {
        delegate!(self, p => p.swap_lock())
    }
    fn rebuild_lock(&self) -> i64 {
        delegate!(self, p => p.rebuild_lock())
    }
    fn tables(&self) -> &'static [Table] {
        delegate!(self, p => p.tables())
    }
    fn aggregate_type(&self) -> Option<&'static str> {
        delegate!(self, p => p.aggregate_type())
    }
    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> Result<jobs::Applied, ProjectionError> {
        delegate!(self, p => p.apply(conn, envelope).await)
    }
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        envelopes: &[EventEnvelope],
    ) -> Result<Vec<jobs::Applied>, (usize, ProjectionError)> {
        delegate!(self, p => p.apply_batch(conn, envelopes).await)
    }
}

/// Events read and applied per transaction.
pub const BATCH: i64 = 2000;

/// A place in the event store's commit order: the relay's cursor `(tx_id, global_position)`.
/// Ordered as Postgres orders the pair, so `a <= b` means "a was published no later than b".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    /// The writing transaction's id (`xid8`).
    pub tx: u64,
    /// The event's global position.
    pub position: i64,
}

impl Cursor {
    /// Before every event.
    pub const ZERO: Self = Self { tx: 0, position: 0 };

    /// From the text form of an `xid8` (as stored in checkpoints and the `Overfly-Tx` header).
    pub fn parse(tx: &str, position: i64) -> Option<Self> {
        Some(Self {
            tx: tx.parse().ok()?,
            position,
        })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(tx {}, position {})", self.tx, self.position)
    }
}

/// Errors of a rebuild: a bad schema name, or the projection's own errors.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("schema name {0:?} must match [a-z_][a-z0-9_]{{0,62}} and not be public")]
    BadSchema(String),
    /// Another `rebuild` of this projection is running (on this database): wait for it.
    #[error("another rebuild of the {0} projection is running")]
    Busy(&'static str),
    /// No projection has this name.
    #[error("unknown projection {0:?}; the projections are: {known}", known = PROJECTIONS.join(", "))]
    UnknownProjection(String),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
}

impl From<sqlx::Error> for RebuildError {
    fn from(error: sqlx::Error) -> Self {
        Self::Projection(error.into())
    }
}

pub(crate) fn valid_schema(schema: &str) -> bool {
    let mut chars = schema.chars();
    schema.len() <= 63
        && schema != "public"
        && !schema.starts_with("pg_")
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

type Row = (
    String,
    i64,
    String,
    String,
    i64,
    String,
    String,
    serde_json::Value,
    serde_json::Value,
    chrono::DateTime<chrono::Utc>,
);

/// Progress of a long build, logged (tracing `info`) at most once per `every`: events done /
/// total, rate and ETA.
#[derive(Debug)]
pub struct Progress {
    projection: &'static str,
    phase: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
    every: Duration,
}

impl Progress {
    pub fn new(projection: &'static str, phase: &'static str, total: u64, every: Duration) -> Self {
        let now = Instant::now();
        Self {
            projection,
            phase,
            total,
            done: 0,
            started: now,
            last_log: now,
            every,
        }
    }

    /// Quiet: never logs (callers that report their own way, or tests).
    pub fn quiet() -> Self {
        Self::new("", "build", 0, Duration::MAX)
    }

    pub fn set_phase(&mut self, phase: &'static str) {
        self.phase = phase;
    }

    /// The total grows while events keep arriving.
    pub fn set_total(&mut self, total: u64) {
        self.total = total.max(self.done);
    }

    pub fn done(&self) -> u64 {
        self.done
    }

    /// Events per second since the start.
    pub fn rate(&self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn advance(&mut self, events: u64) {
        self.done += events;
        self.total = self.total.max(self.done);
        if self.last_log.elapsed() >= self.every {
            self.last_log = Instant::now();
            self.log();
        }
    }

    pub fn log(&self) {
        let rate = self.rate();
        let left = self.total.saturating_sub(self.done);
        let eta_s = if rate > 0.0 {
            (left as f64 / rate).ceil()
        } else {
            0.0
        };
        tracing::info!(
            projection = self.projection,
            phase = self.phase,
            done = self.done,
            total = self.total,
            rate = format!("{rate:.0} events/s"),
            eta = format!("{eta_s:.0} s"),
            "{} {} progress: {}/{} events, {rate:.0} events/s, ETA {eta_s:.0} s",
            self.projection,
            self.phase,
            self.done,
            self.total,
        );
    }
}

/// The tables of a shadow copy: the checkpoints and the projection's own.
fn shadow_tables(projection: &impl Projection) -> impl Iterator<Item = &'static str> {
    std::iter::once(CHECKPOINTS).chain(projection.tables().iter().map(|t| t.name))
}

/// Drops and re-creates the projection's tables in `schema` (empty, like the live ones).
pub(crate) async fn create_shadow(
    pool: &PgPool,
    projection: &impl Projection,
    schema: &str,
) -> Result<(), RebuildError> {
    if !valid_schema(schema) {
        return Err(RebuildError::BadSchema(schema.to_string()));
    }
    let mut tx = pool.begin().await?;
    // No "does not exist, skipping" notices in the log.
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(&mut *tx)
        .await?;
    for table in shadow_tables(projection) {
        sqlx::query(&format!("DROP TABLE IF EXISTS {schema}.{table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)"
        ))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Drops `schema` and everything in it (a shadow copy).
pub(crate) async fn drop_shadow(pool: &PgPool, schema: &str) -> Result<(), RebuildError> {
    if !valid_schema(schema) {
        return Err(RebuildError::BadSchema(schema.to_string()));
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// What one batch did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batch {
    /// The cursor of the batch's last event.
    pub cursor: Cursor,
    /// Events read.
    pub read: u64,
    /// Events applied (not found applied before).
    pub applied: u64,
}

/// Applies the projection's next events after `after` (and at most up to `until`), at most
/// `limit`, to the tables of `schema`, with the schema's checkpoint, inside the caller's
/// transaction on `conn`; `None` when there was none. Leaves `search_path` set to `schema` for
/// the rest of the transaction. Only events of transactions older than every running one are
/// read (commit order: none can appear later below the cursor).
pub(crate) async fn apply_batch(
    conn: &mut PgConnection,
    projection: &impl Projection,
    schema: &str,
    after: Cursor,
    until: Option<Cursor>,
    limit: i64,
) -> Result<Option<Batch>, RebuildError> {
    // Only the shadow schema: a table missing there is an error, not a write to live.
    sqlx::query(&format!("SET LOCAL search_path TO {schema}"))
        .execute(&mut *conn)
        .await?;
    let until = until.unwrap_or(Cursor {
        tx: i64::MAX as u64,
        position: i64::MAX,
    });
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT tx_id::text, global_position, aggregate_type, aggregate_id, sequence,
                event_type, event_version, payload, metadata, recorded_at
           FROM public.events
          WHERE (tx_id, global_position) > ($1::text::xid8, $2)
            AND (tx_id, global_position) <= ($3::text::xid8, $4)
            AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
            AND ($6::text IS NULL OR aggregate_type = $6)
          ORDER BY events.tx_id, events.global_position
          LIMIT $5",
    )
    .bind(after.tx.to_string())
    .bind(after.position)
    .bind(until.tx.to_string())
    .bind(until.position)
    .bind(limit)
    .bind(projection.aggregate_type())
    .fetch_all(&mut *conn)
    .await?;
    let Some(last) = rows.last() else {
        return Ok(None);
    };
    let last = Last {
        tx_id: last.0.clone(),
        position: last.1,
        stream_sequence: 0,
    };
    let read = rows.len() as u64;
    let envelopes: Vec<EventEnvelope> = rows
        .into_iter()
        .map(
            |(
                _tx,
                position,
                aggregate_type,
                aggregate_id,
                sequence,
                event_type,
                event_version,
                payload,
                _metadata,
                recorded_at,
            )| EventEnvelope {
                aggregate_type,
                aggregate_id,
                sequence,
                position,
                event_type,
                event_version,
                recorded_at,
                metadata: serde_json::Map::new(),
                payload,
            },
        )
        .collect();
    // The projection's batch path (one round trip per table where it has one).
    let applied = projection
        .apply_batch(conn, &envelopes)
        .await
        .map_err(|(_, error)| error)?
        .into_iter()
        .filter(|a| *a == jobs::Applied::Applied)
        .count() as u64;
    store_checkpoint(conn, projection.name(), &last, applied as usize).await?;
    let cursor =
        Cursor::parse(&last.tx_id, last.position).ok_or_else(|| ProjectionError::Malformed {
            event_type: "events row".into(),
            reason: format!("tx_id {:?} is not an xid8", last.tx_id),
        })?;
    Ok(Some(Batch {
        cursor,
        read,
        applied,
    }))
}

/// What a build into a schema reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Built {
    /// The cursor of the last event applied (where the build was before, if none was).
    pub cursor: Cursor,
    /// Events read.
    pub read: u64,
    /// Events applied.
    pub applied: u64,
}

/// Applies every event of the projection after `after` (up to `until` when given) to
/// `schema`, one transaction per batch of `batch` events, reporting to `progress`.
pub(crate) async fn build(
    pool: &PgPool,
    projection: &impl Projection,
    schema: &str,
    after: Cursor,
    until: Option<Cursor>,
    batch: i64,
    progress: &mut Progress,
) -> Result<Built, RebuildError> {
    let mut built = Built {
        cursor: after,
        ..Built::default()
    };
    loop {
        let mut tx = pool.begin().await?;
        let Some(done) =
            apply_batch(&mut tx, projection, schema, built.cursor, until, batch).await?
        else {
            break;
        };
        tx.commit().await?;
        built.cursor = done.cursor;
        built.read += done.read;
        built.applied += done.applied;
        progress.advance(done.read);
    }
    Ok(built)
}

/// The jobs projection into `schema`: [`rebuild_projection_into`] with [`Jobs`]; how many
/// events were applied.
pub async fn rebuild_into(pool: &PgPool, schema: &str) -> Result<u64, RebuildError> {
    rebuild_projection_into(pool, &Jobs, schema)
        .await
        .map(|b| b.applied)
}

/// Drops and re-creates the projection's tables in `schema`, applies every event of the event
/// store it reads to them, and says how far it got. The live tables (in `public`) are not
/// touched.
pub async fn rebuild_projection_into(
    pool: &PgPool,
    projection: &impl Projection,
    schema: &str,
) -> Result<Built, RebuildError> {
    rebuild_into_until(pool, projection, schema, None).await
}

/// As [`rebuild_projection_into`], but only up to the event at `until` (inclusive) when given,
/// e.g. a live projection's checkpoint, so the copy is comparable with it while events keep
/// coming. Logs progress every second.
pub async fn rebuild_into_until(
    pool: &PgPool,
    projection: &impl Projection,
    schema: &str,
    until: Option<Cursor>,
) -> Result<Built, RebuildError> {
    create_shadow(pool, projection, schema).await?;
    let mut progress = Progress::new(
        projection.name(),
        "build",
        event_count(pool, projection).await?,
        Duration::from_secs(1),
    );
    build(
        pool,
        projection,
        schema,
        Cursor::ZERO,
        until,
        BATCH,
        &mut progress,
    )
    .await
}

/// The number of events in the store the projection reads (the total a rebuild works through).
pub(crate) async fn event_count(
    pool: &PgPool,
    projection: &impl Projection,
) -> Result<u64, RebuildError> {
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM public.events WHERE $1::text IS NULL OR aggregate_type = $1",
    )
    .bind(projection.aggregate_type())
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::{AnyProjection, Cursor, PROJECTIONS, RebuildError, valid_schema};
    use crate::runner::Projection;

    #[test]
    fn projections_are_found_by_name_and_unknown_names_list_the_known_ones() {
        let names: Vec<&str> = AnyProjection::all().iter().map(|p| p.name()).collect();
        assert_eq!(names, PROJECTIONS);
        for name in PROJECTIONS {
            assert_eq!(AnyProjection::from_name(name).unwrap().name(), *name);
        }
        let error = AnyProjection::from_name("leaderboard").unwrap_err();
        assert!(matches!(error, RebuildError::UnknownProjection(_)));
        assert_eq!(
            error.to_string(),
            "unknown projection \"leaderboard\"; the projections are: jobs, executors, usage"
        );
    }

    /// What a rebuild reads from the store is what the runner's filter subject takes from the
    /// stream; every table has a key, and no two projections share a table.
    #[test]
    fn each_projection_reads_what_its_subject_says_and_owns_its_tables() {
        let mut tables = std::collections::HashSet::new();
        for projection in AnyProjection::all() {
            let expected = match projection.aggregate_type() {
                Some(aggregate) => {
                    format!("{}.{aggregate}.>", overfly_schemas::subjects::EVENTS_PREFIX)
                }
                None => overfly_schemas::subjects::EVENTS_ALL.to_string(),
            };
            assert_eq!(
                projection.filter_subject(),
                expected,
                "{}",
                projection.name()
            );
            assert!(!projection.tables().is_empty());
            for table in projection.tables() {
                assert!(
                    valid_schema(table.name) && valid_schema(table.key),
                    "{table:?}"
                );
                assert!(
                    tables.insert(table.name),
                    "{} is in two projections",
                    table.name
                );
            }
        }
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(valid_schema("rebuild_jobs_1"));
        assert!(!valid_schema("public"));
        assert!(!valid_schema("x; DROP TABLE events"));
        assert!(!valid_schema("Upper"));
        assert!(!valid_schema("1abc"));
        assert!(!valid_schema(""));
    }

    #[test]
    fn cursors_order_by_transaction_then_position() {
        let a = Cursor { tx: 5, position: 9 };
        let b = Cursor { tx: 6, position: 1 };
        assert!(a < b);
        assert!(Cursor { tx: 6, position: 2 } > b);
        assert_eq!(Cursor::parse("6", 1), Some(b));
        assert_eq!(Cursor::parse("x", 1), None);
        assert!(Cursor::ZERO < a);
    }
}
