//! The executors & GPUs projection: one `read_executors` row per executor (state, session,
//! lease) and one `read_gpus` row per GPU of its inventory, with the run holding it.
//!
//! It reads two aggregates' events, in the stream's (commit) order: executor events keep the
//! executors and their inventory (a re-registration replaces the inventory); the job events
//! that say which GPUs a run holds (`RunAssigned`) or no longer holds (`RunSucceeded`,
//! `RunFailed`, `RunTimedOut`, `JobCancelled` of an active run) keep `held_by_*`. Every other
//! job event is known and irrelevant here; an unknown type or version still stops the
//! projection (decoding goes through the same `decode` functions that reject them).
//!
//! Idempotent: executor rows guard by `version` like the jobs rows; a GPU is taken by a run
//! only if it is not already held by it, and released only if still held by that run. (The
//! runner's checkpoint is the primary guard against redelivery, as for jobs: a redelivered
//! `RunAssigned` whose run was since released is only kept out by it.)

use overfly_domain::executor::ExecutorEvent;
use overfly_domain::job::JobEvent;
use overfly_schemas::EventEnvelope;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::ProjectionError;
use crate::jobs::{self, Applied, EventMeta};

/// The projection's name: its row in `projection_checkpoints`.
pub const NAME: &str = "executors";

/// Turns a stored or published executor payload of any known version into the current
/// `ExecutorEvent` (upcasters live in `crate::decode`).
pub fn decode(
    event_type: &str,
    event_version: &str,
    payload: &serde_json::Value,
) -> Result<ExecutorEvent, ProjectionError> {
    crate::decode::decode(ExecutorEvent::TYPES, event_type, event_version, payload)
}

/// Decodes and applies one envelope of any aggregate type this projection knows.
pub async fn apply_envelope(
    conn: &mut PgConnection,
    envelope: &EventEnvelope,
) -> Result<Applied, ProjectionError> {
    let meta = EventMeta {
        aggregate_id: envelope.aggregate_id.clone(),
        sequence: envelope.sequence,
        position: envelope.position,
        recorded_at: envelope.recorded_at,
    };
    match envelope.aggregate_type.as_str() {
        "executor" => {
            let event = decode(
                &envelope.event_type,
                &envelope.event_version,
                &envelope.payload,
            )?;
            apply_executor(conn, &meta, &event).await
        }
        "job" => {
            let event = jobs::decode(
                &envelope.event_type,
                &envelope.event_version,
                &envelope.payload,
            )?;
            apply_job(conn, &meta, &event).await
        }
        other => Err(ProjectionError::Malformed {
            event_type: envelope.event_type.clone(),
            reason: format!("aggregate type {other} is neither executor nor job"),
        }),
    }
}

fn int(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// Applies one executor event to `read_executors` / `read_gpus` (inside the caller's
/// transaction). Idempotent by the executor row's `version`; a sequence past `version + 1`, or
/// any event but `ExecutorRegistered` for an executor without a row, is a gap: an error.
pub async fn apply_executor(
    conn: &mut PgConnection,
    meta: &EventMeta,
    event: &ExecutorEvent,
) -> Result<Applied, ProjectionError> {
    let executor_id = meta.aggregate_id.as_str();
    let version: Option<i64> =
        sqlx::query_scalar("SELECT version FROM read_executors WHERE executor_id = $1 FOR UPDATE")
            .bind(executor_id)
            .fetch_optional(&mut *conn)
            .await?;
    let expected = version.unwrap_or(0) + 1;
    if meta.sequence < expected {
        return Ok(Applied::AlreadyApplied);
    }
    let registers = matches!(event, ExecutorEvent::ExecutorRegistered { .. });
    if meta.sequence > expected || (version.is_none() && !registers) {
        return Err(ProjectionError::ExecutorGap {
            executor_id: executor_id.to_string(),
            expected,
            got: meta.sequence,
        });
    }
    // The executor-row update of every event but `ExecutorRegistered`.
    macro_rules! executor {
        ($at:expr, $sets:expr $(, $bind:expr)* $(,)?) => {{
            let sql = format!(
                "UPDATE read_executors SET version = $2, position = $3, updated_at = $4, {} \
                  WHERE executor_id = $1",
                $sets
            );
            sqlx::query(&sql)
                .bind(executor_id)
                .bind(meta.sequence)
                .bind(meta.position)
                .bind($at)
                $(.bind($bind))*
                .execute(&mut *conn)
                .await?;
        }};
    }
    match event {
        ExecutorEvent::ExecutorRegistered {
            hostname,
            gpus,
            lease_s,
            session,
            at,
            ..
        } => {
            sqlx::query(
                "INSERT INTO read_executors (executor_id, hostname, state, session, lease_s,
                     registered_at, updated_at, version, position)
                 VALUES ($1, $2, 'registered', $3, $4, $5, $5, $6, $7)
                 ON CONFLICT (executor_id) DO UPDATE
                    SET hostname = EXCLUDED.hostname, state = 'registered',
                        session = EXCLUDED.session, lease_s = EXCLUDED.lease_s,
                        last_heartbeat_at = NULL, lease_expires_at = NULL,
                        registered_at = EXCLUDED.registered_at,
                        updated_at = EXCLUDED.updated_at, version = EXCLUDED.version,
                        position = EXCLUDED.position",
            )
            .bind(executor_id)
            .bind(hostname)
            .bind(int(*session))
            .bind(int(*lease_s))
            .bind(at)
            .bind(meta.sequence)
            .bind(meta.position)
            .execute(&mut *conn)
            .await?;
            // The new inventory replaces the old one. A GPU that stays keeps its holder: the
            // job's run events, not the executor's restart, say when a run lets go of it.
            let uuids: Vec<&str> = gpus.iter().map(|gpu| gpu.uuid.as_str()).collect();
            sqlx::query("DELETE FROM read_gpus WHERE executor_id = $1 AND gpu_uuid <> ALL($2)")
                .bind(executor_id)
                .bind(&uuids)
                .execute(&mut *conn)
                .await?;
            for gpu in gpus {
                sqlx::query(
                    "INSERT INTO read_gpus (gpu_uuid, executor_id, index, name, memory_mb,
                         compute_capability, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (gpu_uuid) DO UPDATE
                        SET executor_id = EXCLUDED.executor_id, index = EXCLUDED.index,
                            name = EXCLUDED.name, memory_mb = EXCLUDED.memory_mb,
                            compute_capability = EXCLUDED.compute_capability,
                            updated_at = EXCLUDED.updated_at",
                )
                .bind(&gpu.uuid)
                .bind(executor_id)
                .bind(int(gpu.index))
                .bind(&gpu.name)
                .bind(i64::try_from(gpu.memory_mb).unwrap_or(i64::MAX))
                .bind(&gpu.compute_capability)
                .bind(at)
                .execute(&mut *conn)
                .await?;
            }
        }
        ExecutorEvent::ExecutorActivated { at } => executor!(at, "state = 'active'"),
        ExecutorEvent::ExecutorHeartbeat {
            lease_expires_at,
            at,
        } => executor!(
            at,
            "last_heartbeat_at = $4, lease_expires_at = $5",
            lease_expires_at
        ),
        ExecutorEvent::ExecutorDraining { at, .. } => executor!(at, "state = 'draining'"),
        ExecutorEvent::ExecutorDeregistered { at, .. } => executor!(at, "state = 'gone'"),
        ExecutorEvent::ExecutorLost { at, .. } => executor!(at, "state = 'lost'"),
    }
    Ok(Applied::Applied)
}

/// Applies the GPU holding a job event implies (most job events imply none).
pub async fn apply_job(
    conn: &mut PgConnection,
    meta: &EventMeta,
    event: &JobEvent,
) -> Result<Applied, ProjectionError> {
    let job_id = Uuid::parse_str(&meta.aggregate_id).map_err(|_| ProjectionError::Malformed {
        event_type: "job event".into(),
        reason: format!("aggregate id {:?} is not a UUID", meta.aggregate_id),
    })?;
    let released = match event {
        JobEvent::RunAssigned {
            run_id,
            executor_id,
            gpu_uuids,
            at,
            ..
        } => {
            // GPUs not in the executor's inventory (never registered) have no row to mark.
            let done = sqlx::query(
                "UPDATE read_gpus
                    SET held_by_run = $1, held_by_job = $2, held_since = $3, updated_at = $3
                  WHERE gpu_uuid = ANY($4) AND executor_id = $5
                    AND held_by_run IS DISTINCT FROM $1",
            )
            .bind(run_id)
            .bind(job_id)
            .bind(at)
            .bind(gpu_uuids)
            .bind(executor_id)
            .execute(&mut *conn)
            .await?;
            return Ok(if done.rows_affected() > 0 {
                Applied::Applied
            } else {
                Applied::AlreadyApplied
            });
        }
        JobEvent::RunSucceeded { run_id, at, .. }
        | JobEvent::RunFailed { run_id, at, .. }
        | JobEvent::RunTimedOut { run_id, at, .. } => Some((*run_id, *at)),
        JobEvent::JobCancelled {
            active_run: Some(run_id),
            at,
            ..
        } => Some((*run_id, *at)),
        JobEvent::JobSubmitted { .. }
        | JobEvent::JobCancelled { .. }
        | JobEvent::JobPriorityChanged { .. }
        | JobEvent::RunStarted { .. }
        | JobEvent::RunProgressed { .. }
        | JobEvent::RetryScheduled { .. }
        | JobEvent::JobSucceeded { .. }
        | JobEvent::JobFailed { .. } => None,
    };
    let Some((run_id, at)) = released else {
        return Ok(Applied::AlreadyApplied);
    };
    let done = sqlx::query(
        "UPDATE read_gpus
            SET held_by_run = NULL, held_by_job = NULL, held_since = NULL, updated_at = $2
          WHERE held_by_run = $1",
    )
    .bind(run_id)
    .bind(at)
    .execute(&mut *conn)
    .await?;
    Ok(if done.rows_affected() > 0 {
        Applied::Applied
    } else {
        Applied::AlreadyApplied
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn executor_events_of_version_1_decode_and_unknown_ones_stop() {
        let payload = json!({"ExecutorActivated": {"at": "2026-11-24T10:00:00Z"}});
        let event = decode("ExecutorActivated", "1", &payload).unwrap();
        assert!(matches!(event, ExecutorEvent::ExecutorActivated { .. }));
        let err = decode(
            "ExecutorTeleported",
            "1",
            &json!({"ExecutorTeleported": {}}),
        )
        .unwrap_err();
        assert!(
            matches!(err, ProjectionError::UnknownEventType { .. }),
            "{err}"
        );
        let err = decode("ExecutorActivated", "9", &payload).unwrap_err();
        assert!(
            matches!(err, ProjectionError::UnknownEventVersion { .. }),
            "{err}"
        );
    }
}
