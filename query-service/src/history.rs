//! Audit history straight from the event store: every event of one aggregate, in order, with
//! who, when, why and the trace it belongs to.

use chrono::{DateTime, Utc};
use poem_openapi::Object;
use sqlx::PgPool;

/// One event of an aggregate's history.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct HistoryEvent {
    /// 1-based position within the aggregate.
    pub sequence: i64,
    /// Position in the global event log.
    pub position: i64,
    pub event_type: String,
    pub event_version: String,
    /// When the event store recorded it.
    pub recorded_at: DateTime<Utc>,
    /// Who caused it: a user, `executor:<id>` or `scheduler`.
    pub actor: Option<String>,
    /// The command that recorded it, e.g. `CancelJob`.
    pub command: Option<String>,
    pub command_id: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    /// W3C trace id of the request that caused it.
    pub trace_id: Option<String>,
    /// The event itself, `{ "<event_type>": { … } }` (JSON Schemas in `schemas/json/`).
    pub payload: serde_json::Value,
}

type Row = (
    i64,
    i64,
    String,
    String,
    DateTime<Utc>,
    serde_json::Value,
    serde_json::Value,
);

/// The events of one aggregate in sequence order, optionally only those recorded at or before
/// `until`.
pub async fn of(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    until: Option<DateTime<Utc>>,
) -> sqlx::Result<Vec<HistoryEvent>> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT sequence, global_position, event_type, event_version, recorded_at, metadata, payload
           FROM events
          WHERE aggregate_type = $1 AND aggregate_id = $2
            AND ($3::timestamptz IS NULL OR recorded_at <= $3)
          ORDER BY sequence",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(until)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(history_event).collect())
}

fn history_event(
    (sequence, position, event_type, event_version, recorded_at, metadata, payload): Row,
) -> HistoryEvent {
    let text = |key: &str| {
        metadata
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let trace_id = text("traceparent").and_then(|tp| trace_id(&tp));
    HistoryEvent {
        sequence,
        position,
        event_type,
        event_version,
        recorded_at,
        actor: text("actor"),
        command: text("command"),
        command_id: text("command_id"),
        correlation_id: text("correlation_id"),
        causation_id: text("causation_id"),
        trace_id,
        payload,
    }
}

/// The trace id of a `traceparent` (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit())).then(|| trace.to_string())
}

#[cfg(test)]
mod tests {
    use super::trace_id;

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("garbage"), None);
        assert_eq!(trace_id("00-xyz-00f067aa0ba902b7-01"), None);
    }
}
