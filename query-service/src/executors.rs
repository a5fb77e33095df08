//! Executors and their GPUs from the read models (`read_executors`, `read_gpus`), kept by the
//! projector's executors projection.

use chrono::{DateTime, Utc};
use poem_openapi::Object;
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

pub const STATES: &[&str] = &["registered", "active", "draining", "lost", "gone"];

/// An executor as listed.
#[derive(Debug, Clone, PartialEq, Object, sqlx::FromRow)]
pub struct ExecutorSummary {
    pub executor_id: String,
    pub hostname: String,
    /// registered, active, draining, lost or gone (deregistered).
    pub state: String,
    /// 1 for the first registration, one more per restart.
    pub session: i32,
    /// Seconds without a heartbeat before the executor counts as lost.
    pub lease_s: i32,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// When the current session registered.
    pub registered_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The executor aggregate's version applied to this row.
    pub version: i64,
    /// Global position of the executor's last applied event.
    pub position: i64,
}

/// One GPU of an executor's inventory, and the run holding it.
#[derive(Debug, Clone, PartialEq, Object, sqlx::FromRow)]
pub struct Gpu {
    pub gpu_uuid: String,
    pub executor_id: String,
    /// The host driver's index (what `CUDA_VISIBLE_DEVICES` refers to).
    pub index: i32,
    pub name: String,
    pub memory_mb: i64,
    pub compute_capability: String,
    /// The run holding this GPU; absent while free.
    pub held_by_run: Option<Uuid>,
    pub held_by_job: Option<Uuid>,
    /// When the holding run was assigned.
    pub held_since: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// An executor with its GPUs.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct ExecutorDetail {
    #[oai(flatten)]
    pub executor: ExecutorSummary,
    pub gpus: Vec<Gpu>,
}

const EXECUTOR_COLUMNS: &str = "executor_id, hostname, state, session, lease_s, \
    last_heartbeat_at, lease_expires_at, registered_at, updated_at, version, position";

const GPU_COLUMNS: &str = "gpu_uuid, executor_id, index, name, memory_mb, compute_capability, \
    held_by_run, held_by_job, held_since, updated_at";

/// Every executor (in `state`, if given), by id.
pub async fn list(pool: &PgPool, state: Option<&str>) -> sqlx::Result<Vec<ExecutorSummary>> {
    let mut query = QueryBuilder::<Postgres>::new(format!(
        "SELECT {EXECUTOR_COLUMNS} FROM read_executors WHERE TRUE"
    ));
    if let Some(state) = state {
        query.push(" AND state = ").push_bind(state);
    }
    query.push(" ORDER BY executor_id");
    query.build_query_as().fetch_all(pool).await
}

/// One executor with its GPUs (by index).
pub async fn get(pool: &PgPool, executor_id: &str) -> sqlx::Result<Option<ExecutorDetail>> {
    let executor: Option<ExecutorSummary> = sqlx::query_as(&format!(
        "SELECT {EXECUTOR_COLUMNS} FROM read_executors WHERE executor_id = $1"
    ))
    .bind(executor_id)
    .fetch_optional(pool)
    .await?;
    let Some(executor) = executor else {
        return Ok(None);
    };
    let gpus = gpus(pool, Some(executor_id), None).await?;
    Ok(Some(ExecutorDetail { executor, gpus }))
}

/// GPUs by executor and index, optionally of one executor and only free (or only held) ones.
pub async fn gpus(
    pool: &PgPool,
    executor_id: Option<&str>,
    free: Option<bool>,
) -> sqlx::Result<Vec<Gpu>> {
    let mut query =
        QueryBuilder::<Postgres>::new(format!("SELECT {GPU_COLUMNS} FROM read_gpus WHERE TRUE"));
    if let Some(executor_id) = executor_id {
        query.push(" AND executor_id = ").push_bind(executor_id);
    }
    match free {
        Some(true) => {
            query.push(" AND held_by_run IS NULL");
        }
        Some(false) => {
            query.push(" AND held_by_run IS NOT NULL");
        }
        None => {}
    }
    query.push(" ORDER BY executor_id, index");
    query.build_query_as().fetch_all(pool).await
}
