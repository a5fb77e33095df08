//! Builds the jobs projection from the Postgres event store (commit order, batched), into a
//! schema of its own, beside the live tables. JetStream is not involved, so its retention
//! never matters. Issue 3's `rebuild` (swap in when caught up) and `verify` (diff against
//! live) build on this.

use overfly_schemas::EventEnvelope;
use sqlx::PgPool;

use crate::error::ProjectionError;
use crate::jobs;
use crate::runner::{Last, apply_envelope, store_checkpoint};

/// The tables of the jobs projection, copied (`LIKE … INCLUDING ALL`) into the target schema.
pub const TABLES: &[&str] = &["projection_checkpoints", "read_jobs", "read_runs"];

/// Events read and applied per transaction.
const BATCH: i64 = 2000;

/// Errors of a rebuild: a bad schema name, or the projection's own errors.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("schema name {0:?} must match [a-z_][a-z0-9_]{{0,62}} and not be public")]
    BadSchema(String),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
}

impl From<sqlx::Error> for RebuildError {
    fn from(error: sqlx::Error) -> Self {
        Self::Projection(error.into())
    }
}

fn valid_schema(schema: &str) -> bool {
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

/// Drops and re-creates the projection's tables in `schema`, applies every job event of the
/// event store to them, and returns how many events were applied. The live tables (in
/// `public`) are not touched.
pub async fn rebuild_into(pool: &PgPool, schema: &str) -> Result<u64, RebuildError> {
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

    let mut cursor = ("0".to_string(), 0_i64);
    let mut total = 0_u64;
    loop {
        let mut tx = pool.begin().await?;
        // Only the shadow schema: a table missing there is an error, not a write to live.
        sqlx::query(&format!("SET LOCAL search_path TO {schema}"))
            .execute(&mut *tx)
            .await?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT tx_id::text, global_position, aggregate_type, aggregate_id, sequence,
                    event_type, event_version, payload, metadata, recorded_at
               FROM public.events
              WHERE (tx_id, global_position) > ($1::text::xid8, $2)
                AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
                AND aggregate_type = 'job'
              ORDER BY tx_id, global_position
              LIMIT $3",
        )
        .bind(&cursor.0)
        .bind(cursor.1)
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else {
            break;
        };
        let last = Last {
            tx_id: last.0.clone(),
            position: last.1,
            stream_sequence: 0,
        };
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
            if apply_envelope(&mut tx, &envelope).await? == jobs::Applied::Applied {
                applied += 1;
            }
        }
        store_checkpoint(&mut tx, jobs::NAME, &last, applied).await?;
        tx.commit().await?;
        total += applied as u64;
        cursor = (last.tx_id, last.position);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::valid_schema;

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(valid_schema("rebuild_jobs_1"));
        assert!(!valid_schema("public"));
        assert!(!valid_schema("x; DROP TABLE events"));
        assert!(!valid_schema("Upper"));
        assert!(!valid_schema("1abc"));
        assert!(!valid_schema(""));
    }
}
