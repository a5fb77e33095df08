//! Builds the jobs projection from the Postgres event store (commit order, batched), into a
//! schema of its own, beside the live tables. JetStream is not involved, so its retention
//! never matters. [`crate::verify`] (diff against live) and [`crate::swap`] (build, catch
//! up, swap in atomically) build on this.

use std::time::{Duration, Instant};

use overfly_schemas::EventEnvelope;
use sqlx::{PgConnection, PgPool};

use crate::error::ProjectionError;
use crate::jobs;
use crate::runner::{Last, apply_envelope, store_checkpoint};

/// The tables of the jobs projection, copied (`LIKE … INCLUDING ALL`) into the target schema.
pub const TABLES: &[&str] = &["projection_checkpoints", "read_jobs", "read_runs"];

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
    #[error("another rebuild of the jobs projection is running")]
    Busy,
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
    phase: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
    every: Duration,
}

impl Progress {
    pub fn new(phase: &'static str, total: u64, every: Duration) -> Self {
        let now = Instant::now();
        Self {
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
        Self::new("build", 0, Duration::MAX)
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
            projection = jobs::NAME,
            phase = self.phase,
            done = self.done,
            total = self.total,
            rate = format!("{rate:.0} events/s"),
            eta = format!("{eta_s:.0} s"),
            "rebuild progress: {}/{} events, {rate:.0} events/s, ETA {eta_s:.0} s",
            self.done,
            self.total,
        );
    }
}

/// Drops and re-creates the projection's tables in `schema` (empty, like the live ones).
pub(crate) async fn create_shadow(pool: &PgPool, schema: &str) -> Result<(), RebuildError> {
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
    for table in TABLES {
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

/// Applies the next job events after `after` (and at most up to `until`), at most `limit`, to
/// the tables of `schema`, with the schema's checkpoint, inside the caller's transaction on
/// `conn`; `None` when there was none. Leaves `search_path` set to `schema` for the rest of
/// the transaction. Only events of transactions older than every running one are read (commit
/// order: none can appear later below the cursor).
pub(crate) async fn apply_batch(
    conn: &mut PgConnection,
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
            AND aggregate_type = 'job'
          ORDER BY tx_id, global_position
          LIMIT $5",
    )
    .bind(after.tx.to_string())
    .bind(after.position)
    .bind(until.tx.to_string())
    .bind(until.position)
    .bind(limit)
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
    let mut applied = 0;
    for row in rows {
        let (
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
        ) = row;
        let envelope = EventEnvelope {
            aggregate_type,
            aggregate_id,
            sequence,
            position,
            event_type,
            event_version,
            recorded_at,
            metadata: serde_json::Map::new(),
            payload,
        };
        if apply_envelope(conn, &envelope).await? == jobs::Applied::Applied {
            applied += 1;
        }
    }
    store_checkpoint(conn, jobs::NAME, &last, applied as usize).await?;
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

/// Applies every job event after `after` (up to `until` when given) to `schema`, one
/// transaction per batch of `batch` events, reporting to `progress`.
pub(crate) async fn build(
    pool: &PgPool,
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
        let Some(done) = apply_batch(&mut tx, schema, built.cursor, until, batch).await? else {
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

/// Drops and re-creates the projection's tables in `schema`, applies every job event of the
/// event store to them, and returns how many events were applied. The live tables (in
/// `public`) are not touched.
pub async fn rebuild_into(pool: &PgPool, schema: &str) -> Result<u64, RebuildError> {
    rebuild_into_until(pool, schema, None)
        .await
        .map(|b| b.applied)
}

/// As [`rebuild_into`], but only up to the event at `until` (inclusive) when given, e.g. a
/// live projection's checkpoint, so the copy is comparable with it while events keep coming.
pub async fn rebuild_into_until(
    pool: &PgPool,
    schema: &str,
    until: Option<Cursor>,
) -> Result<Built, RebuildError> {
    create_shadow(pool, schema).await?;
    build(
        pool,
        schema,
        Cursor::ZERO,
        until,
        BATCH,
        &mut Progress::quiet(),
    )
    .await
}

/// The number of job events in the store (the total a rebuild works through).
pub(crate) async fn job_events(pool: &PgPool) -> Result<u64, RebuildError> {
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM public.events WHERE aggregate_type = 'job'")
            .fetch_one(pool)
            .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::{Cursor, valid_schema};

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
