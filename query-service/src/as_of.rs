//! A job as it was at any past instant: its events recorded up to then, applied by the jobs
//! projection's own code to temporary tables that shadow the live ones for one transaction
//! (temporary tables come first in the search path), read like the live read model, then
//! rolled back.

use chrono::{DateTime, Utc};
use overfly_http::ApiError;
use overfly_projector::jobs::{self as projection, EventMeta};
use sqlx::PgPool;
use uuid::Uuid;

use crate::jobs::{self, JobDetail};

type Row = (i64, i64, String, String, serde_json::Value, DateTime<Utc>);

pub async fn job(
    pool: &PgPool,
    job_id: Uuid,
    instant: DateTime<Utc>,
) -> Result<Option<JobDetail>, ApiError> {
    let internal = |e: &dyn std::fmt::Display| ApiError::internal(e);
    let mut tx = pool.begin().await.map_err(|e| internal(&e))?;
    for table in ["read_jobs", "read_runs"] {
        sqlx::query(&format!(
            "CREATE TEMPORARY TABLE {table} (LIKE public.{table} INCLUDING ALL) ON COMMIT DROP"
        ))
        .execute(&mut *tx)
        .await
        .map_err(|e| internal(&e))?;
    }
    let events: Vec<Row> = sqlx::query_as(
        "SELECT sequence, global_position, event_type, event_version, payload, recorded_at
           FROM events
          WHERE aggregate_type = 'job' AND aggregate_id = $1 AND recorded_at <= $2
          ORDER BY sequence",
    )
    .bind(job_id.to_string())
    .bind(instant)
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| internal(&e))?;
    for (sequence, position, event_type, event_version, payload, recorded_at) in events {
        let event =
            projection::decode(&event_type, &event_version, &payload).map_err(|e| internal(&e))?;
        let meta = EventMeta {
            aggregate_id: job_id.to_string(),
            sequence,
            position,
            recorded_at,
        };
        projection::apply(&mut tx, &meta, &event)
            .await
            .map_err(|e| internal(&e))?;
    }
    let detail = jobs::get(&mut tx, job_id).await.map_err(|e| internal(&e))?;
    tx.rollback().await.map_err(|e| internal(&e))?;
    Ok(detail)
}
