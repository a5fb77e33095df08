//! The health of each projection: how far it has applied the event store, and why it stopped
//! if it did (an event type or version it does not know is never skipped: the projection
//! stops with the reason in `projection_checkpoints.last_error`).

use chrono::{DateTime, Utc};
use poem_openapi::Object;
use sqlx::PgPool;

/// The projections the projector keeps.
pub const KNOWN: &[&str] = &[
    overfly_projector::jobs::NAME,
    overfly_projector::executors::NAME,
    overfly_projector::usage::NAME,
];

/// One projection's state.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct ProjectionStatus {
    pub name: String,
    /// `ok` (applied everything in the store), `catching_up`, `stopped` (see `last_error`;
    /// it needs a projector that knows the event, or a repaired stream) or `not_started`.
    pub status: String,
    /// Global position of the last event it applied (0 before the first).
    pub position: i64,
    /// Events in the store after that position, by position (an upper bound: positions of
    /// rolled-back transactions are never used).
    pub positions_behind: i64,
    pub events_applied: i64,
    /// When it last applied a batch (or recorded an error).
    pub updated_at: Option<DateTime<Utc>>,
    /// Why it stopped, naming the event it cannot apply.
    pub last_error: Option<String>,
}

/// name, position, events applied, updated at, last error.
type CheckpointRow = (
    String,
    Option<i64>,
    Option<i64>,
    Option<DateTime<Utc>>,
    Option<String>,
);

/// Every known projection and any other with a checkpoint row, by name.
pub async fn statuses(pool: &PgPool) -> Result<Vec<ProjectionStatus>, sqlx::Error> {
    let head: i64 = sqlx::query_scalar("SELECT COALESCE(max(global_position), 0) FROM events")
        .fetch_one(pool)
        .await?;
    let rows: Vec<CheckpointRow> = sqlx::query_as(
        "SELECT n.name, c.position, c.events_applied, c.updated_at, c.last_error
               FROM (SELECT unnest($1::text[]) AS name
                     UNION SELECT projection FROM projection_checkpoints) n
               LEFT JOIN projection_checkpoints c ON c.projection = n.name
              ORDER BY n.name",
    )
    .bind(KNOWN)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, position, events_applied, updated_at, last_error)| {
            let started = position.is_some();
            let position = position.unwrap_or(0);
            let positions_behind = (head - position).max(0);
            let status = if last_error.is_some() {
                "stopped"
            } else if !started {
                "not_started"
            } else if positions_behind == 0 {
                "ok"
            } else {
                "catching_up"
            };
            ProjectionStatus {
                name,
                status: status.into(),
                position,
                positions_behind,
                events_applied: events_applied.unwrap_or(0),
                updated_at,
                last_error,
            }
        })
        .collect())
}
