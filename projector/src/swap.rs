//! `rebuild`: builds a projection (any [`Projection`]: jobs, executors, usage) from event 0
//! into a shadow schema while the live one keeps serving, catches up, then swaps it in
//! atomically. The tables, locks and checkpoint row are the projection's own.
//!
//! 1. **Bulk**: every event of the store the projection reads, batched, one transaction per
//!    batch.
//! 2. **Catch up**: the tail (events after the shadow's checkpoint) again and again until a
//!    round reads at most `close_enough` events (or `max_rounds` ran).
//! 3. **Swap**, in one transaction: take its swap lock exclusively (the live runner's batches
//!    take it shared, so none is in flight and the next waits), apply the last tail, rename
//!    the live tables (and their indexes) away, move the shadow tables (indexes follow) into
//!    `public` under the live names, and write the shadow's cursor into the live checkpoint
//!    row, keeping its `stream_sequence`. The shadow read the store directly, so its cursor is
//!    at or ahead of every message the runner applied; the runner acks messages its cursor
//!    covers without applying them (see `runner`), and goes on after them.
//! 4. The old tables and the shadow schema are dropped after the commit.
//!
//! Readers never see the tables absent: `ALTER TABLE` takes an `ACCESS EXCLUSIVE` lock, a
//! query waiting on it looks the name up again once it is granted, and finds the new table.
//! Readers queue behind a swap waiting for that lock, so the swap waits at most
//! `lock_timeout` for a long-running reader, then rolls back (nothing changed, the runner
//! resumes) and tries again, up to `swap_attempts` times.
//!
//! Privileges granted on the live tables (e.g. a read-only role of the query service) are
//! granted on the new ones in the same transaction; `LIKE` copies only columns, defaults,
//! constraints and indexes. The new tables are owned by whoever ran the rebuild.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use crate::rebuild::{self, Built, Cursor, Progress, RebuildError};
use crate::runner::Projection;

/// Session advisory lock held by a running `rebuild` of the jobs projection
/// ("overfly-rbd-jobs"; the others' are in `runner`, beside their other locks).
pub const REBUILD_LOCK: i64 = 0x6f76_6572_666c_7904;

/// How a rebuild runs.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// The shadow schema (dropped and re-created; dropped at the end); `None`:
    /// `rebuild_<projection>`.
    pub schema: Option<String>,
    /// Events per transaction.
    pub batch_size: i64,
    /// Catch-up ends when a round reads at most this many events.
    pub close_enough: u64,
    /// Catch-up rounds at most before swapping anyway (the swap applies what is left).
    pub max_rounds: usize,
    /// How often progress is logged.
    pub progress_every: Duration,
    /// How long the swap waits for the live tables' locks (a long query reading them) before
    /// it rolls back and tries again: bounds how long readers queue behind it.
    pub lock_timeout: Duration,
    /// Swap transactions tried at most.
    pub swap_attempts: usize,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self {
            schema: None,
            batch_size: rebuild::BATCH,
            close_enough: 500,
            max_rounds: 20,
            progress_every: Duration::from_secs(1),
            lock_timeout: Duration::from_secs(2),
            swap_attempts: 10,
        }
    }
}

impl RebuildOptions {
    /// The shadow schema for `projection`.
    pub fn schema_for(&self, projection: &impl Projection) -> String {
        self.schema
            .clone()
            .unwrap_or_else(|| format!("rebuild_{}", projection.name()))
    }
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildSummary {
    /// The projection rebuilt.
    pub projection: &'static str,
    /// Events read from the store (bulk, catch-up and the swap's tail).
    pub events_read: u64,
    /// Events applied to the new tables.
    pub events_applied: u64,
    /// Catch-up rounds after the bulk build.
    pub catch_up_rounds: usize,
    /// Events applied inside the swap transaction (while the runner waited).
    pub swap_tail: u64,
    /// Swap transactions tried (more than one when readers held the tables past
    /// `lock_timeout`).
    pub swap_attempts: usize,
    /// The cursor the swapped-in tables are at.
    pub cursor: Cursor,
    /// The live checkpoint's JetStream sequence, kept through the swap.
    pub stream_sequence: i64,
    /// Rows of each new table, in the projection's table order.
    pub rows: Vec<(&'static str, i64)>,
    /// Wall time, and events read per second over it.
    pub elapsed: Duration,
    pub rate: f64,
    /// How long the swap transaction held the runner.
    pub swap_time: Duration,
}

impl RebuildSummary {
    /// Rows of the new `table` (0 if it is not the projection's).
    pub fn rows_of(&self, table: &str) -> i64 {
        self.rows
            .iter()
            .find(|(name, _)| *name == table)
            .map_or(0, |(_, rows)| *rows)
    }
}

impl std::fmt::Display for RebuildSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|(table, rows)| format!("{table} {rows} rows"))
            .collect();
        write!(
            f,
            "rebuilt and swapped in the {} projection: {} events read, {} applied, {}, at {}, \
             in {:.2} s ({:.0} events/s); {} catch-up rounds, {} events applied during the \
             swap ({} ms, {} attempts)",
            self.projection,
            self.events_read,
            self.events_applied,
            rows.join(", "),
            self.cursor,
            self.elapsed.as_secs_f64(),
            self.rate,
            self.catch_up_rounds,
            self.swap_tail,
            self.swap_time.as_millis(),
            self.swap_attempts,
        )
    }
}

/// Rebuilds `projection` from event 0 beside the live one and swaps it in.
#[tracing::instrument(name = "projector.rebuild", skip_all, fields(projection = projection.name()))]
pub async fn rebuild(
    pool: &PgPool,
    projection: &impl Projection,
    options: &RebuildOptions,
) -> Result<RebuildSummary, RebuildError> {
    let schema = options.schema_for(projection);
    let schema = schema.as_str();
    // One rebuild at a time: held on this connection until the end (or its loss).
    let mut guard = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(projection.rebuild_lock())
        .fetch_one(&mut *guard)
        .await?;
    if !locked {
        return Err(RebuildError::Busy(projection.name()));
    }
    let result = async {
        rebuild::create_shadow(pool, projection, schema).await?;
        rebuild_in(pool, projection, schema, options).await
    }
    .await;
    if result.is_err()
        && let Err(error) = rebuild::drop_shadow(pool, schema).await
    {
        tracing::warn!(schema, error = %error, "could not drop the shadow schema");
    }
    if let Err(error) = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(projection.rebuild_lock())
        .execute(&mut *guard)
        .await
    {
        // The connection is gone, and the lock with it.
        tracing::warn!(error = %error, "could not release the rebuild lock");
        guard.detach();
    }
    result
}

async fn rebuild_in(
    pool: &PgPool,
    projection: &impl Projection,
    schema: &str,
    options: &RebuildOptions,
) -> Result<RebuildSummary, RebuildError> {
    let name = projection.name();
    let total = rebuild::event_count(pool, projection).await?;
    tracing::info!(
        projection = name,
        schema,
        total,
        "rebuilding the {name} projection from event 0"
    );
    let mut progress = Progress::new(name, "bulk", total, options.progress_every);
    let bulk = rebuild::build(
        pool,
        projection,
        schema,
        Cursor::ZERO,
        None,
        options.batch_size,
        &mut progress,
    )
    .await?;
    let mut built = bulk;
    progress.set_phase("catch-up");
    let mut rounds = 0;
    while rounds < options.max_rounds {
        progress.set_total(rebuild::event_count(pool, projection).await?);
        let tail = rebuild::build(
            pool,
            projection,
            schema,
            built.cursor,
            None,
            options.batch_size,
            &mut progress,
        )
        .await?;
        rounds += 1;
        built = Built {
            cursor: tail.cursor,
            read: built.read + tail.read,
            applied: built.applied + tail.applied,
        };
        if tail.read <= options.close_enough {
            break;
        }
    }
    progress.log();

    let swap_started = std::time::Instant::now();
    let mut attempts = 0;
    let (swap_tail, stream_sequence) = loop {
        attempts += 1;
        match swap(pool, projection, schema, options, &mut built).await {
            Ok(done) => break done,
            Err(error) if attempts < options.swap_attempts && is_lock_timeout(&error) => {
                tracing::warn!(
                    attempt = attempts,
                    lock_timeout = ?options.lock_timeout,
                    "a reader held the live tables too long; swapping again"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => return Err(error),
        }
    };
    progress.advance(swap_tail);
    let swap_time = swap_started.elapsed();
    tracing::info!(projection = name, cursor = %built.cursor, attempts, swap_ms = swap_time.as_millis() as u64, "swapped in");
    let mut rows = Vec::new();
    for table in projection.tables() {
        let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM public.{}", table.name))
            .fetch_one(pool)
            .await?;
        rows.push((table.name, count));
    }

    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await?;
    for table in projection.tables() {
        let table = table.name;
        sqlx::query(&format!("DROP TABLE IF EXISTS public.{table}_old"))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    rebuild::drop_shadow(pool, schema).await?;

    let summary = RebuildSummary {
        projection: name,
        events_read: built.read,
        events_applied: built.applied,
        catch_up_rounds: rounds,
        swap_tail,
        swap_attempts: attempts,
        cursor: built.cursor,
        stream_sequence,
        rows,
        elapsed: progress.elapsed(),
        rate: progress.rate(),
        swap_time,
    };
    tracing::info!(summary = %summary, "rebuild done");
    Ok(summary)
}

/// One swap transaction: pauses the runner, applies the last tail to the shadow, swaps the
/// tables and the checkpoint, commits. On error nothing happened (and `built` is as before);
/// on success the events read in it and the kept stream sequence.
async fn swap(
    pool: &PgPool,
    projection: &impl Projection,
    schema: &str,
    options: &RebuildOptions,
    built: &mut Built,
) -> Result<(u64, i64), RebuildError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(projection.swap_lock())
        .execute(&mut *tx)
        .await?;
    let mut done = *built;
    let mut swap_tail = 0;
    while let Some(batch) = rebuild::apply_batch(
        &mut tx,
        projection,
        schema,
        done.cursor,
        None,
        options.batch_size,
    )
    .await?
    {
        done.cursor = batch.cursor;
        done.read += batch.read;
        done.applied += batch.applied;
        swap_tail += batch.read;
    }
    sqlx::query("SET LOCAL search_path TO public")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await?;
    let timeout = format!(
        "SET LOCAL lock_timeout = {}",
        options.lock_timeout.as_millis().max(1)
    );
    sqlx::query(&timeout).execute(&mut *tx).await?;
    for table in projection.tables() {
        swap_table(&mut tx, schema, table.name).await?;
    }
    let (events_applied,): (i64,) = sqlx::query_as(&format!(
        "SELECT events_applied FROM {schema}.projection_checkpoints WHERE projection = $1"
    ))
    .bind(projection.name())
    .fetch_optional(&mut *tx)
    .await?
    .unwrap_or((0,));
    // The rows are the shadow's now: so is the cursor. The stream sequence stays the runner's
    // (the last message it applied, which the new cursor covers).
    let stream_sequence: i64 = sqlx::query_scalar(
        "INSERT INTO public.projection_checkpoints
                (projection, tx_id, position, stream_sequence, events_applied, updated_at)
         VALUES ($1, $2::text::xid8, $3, 0, $4, now())
         ON CONFLICT (projection) DO UPDATE
            SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position,
                events_applied = EXCLUDED.events_applied, updated_at = now(), last_error = NULL
         RETURNING stream_sequence",
    )
    .bind(projection.name())
    .bind(done.cursor.tx.to_string())
    .bind(done.cursor.position)
    .bind(events_applied)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    *built = done;
    Ok((swap_tail, stream_sequence))
}

/// A statement gave up waiting for a lock (`lock_timeout`, SQLSTATE 55P03).
fn is_lock_timeout(error: &RebuildError) -> bool {
    matches!(
        error,
        RebuildError::Projection(crate::ProjectionError::Database(sqlx::Error::Database(db)))
            if db.code().as_deref() == Some("55P03")
    )
}

/// Index name → definition (from ` USING …`), of the indexes of `schema.table`.
async fn indexes(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<Vec<(String, String)>, RebuildError> {
    let rows = sqlx::query_as(
        "SELECT c.relname::text, substring(pg_get_indexdef(i.indexrelid) from ' USING .*$')
           FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid
          WHERE i.indrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass
          ORDER BY c.relname",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

/// Inside the swap transaction: `public.table` becomes `public.table_old` (its indexes
/// `…_old`), `schema.table` becomes `public.table`, gets the old one's grants, and its indexes
/// are renamed to the live names (matched by definition), so the schema after a swap reads as
/// the migrations wrote it.
async fn swap_table(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<(), RebuildError> {
    let old = indexes(conn, "public", table).await?;
    let new = indexes(conn, schema, table).await?;
    let grants: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END,
                a.privilege_type, a.is_grantable
           FROM pg_class c, aclexplode(c.relacl) a
          WHERE c.oid = ('public.' || quote_ident($1))::regclass AND a.grantee <> c.relowner",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query(&format!("DROP TABLE IF EXISTS public.{table}_old"))
        .execute(&mut *conn)
        .await?;
    for (name, _) in &old {
        sqlx::query(&format!(
            "ALTER INDEX public.\"{name}\" RENAME TO \"{name}_old\""
        ))
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(&format!("ALTER TABLE public.{table} RENAME TO {table}_old"))
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!("ALTER TABLE {schema}.{table} SET SCHEMA public"))
        .execute(&mut *conn)
        .await?;
    for (grantee, privilege, grantable) in &grants {
        let option = if *grantable { " WITH GRANT OPTION" } else { "" };
        sqlx::query(&format!(
            "GRANT {privilege} ON public.{table} TO {grantee}{option}"
        ))
        .execute(&mut *conn)
        .await?;
    }
    for (name, definition) in &new {
        let Some((live_name, _)) = old.iter().find(|(_, d)| d == definition) else {
            continue;
        };
        if live_name != name {
            sqlx::query(&format!(
                "ALTER INDEX public.\"{name}\" RENAME TO \"{live_name}\""
            ))
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}
