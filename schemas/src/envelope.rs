use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One event as it travels on JetStream (the message body), and as the audit API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventEnvelope {
    /// `job` or `executor`.
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// 1-based position of the event within its aggregate.
    pub sequence: i64,
    /// Position in the global event log (insertion order; the relay publishes in commit order).
    pub position: i64,
    /// E.g. `JobSubmitted`.
    pub event_type: String,
    /// The payload's schema version, e.g. `1`.
    pub event_version: String,
    /// When the event was written to the event store.
    pub recorded_at: DateTime<Utc>,
    /// Who and why: `actor`, `command`, `command_id`, `correlation_id`, `causation_id`,
    /// `traceparent`.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The event itself, `{ "<event_type>": { … } }`, as described by its JSON Schema.
    pub payload: serde_json::Value,
}

impl EventEnvelope {
    /// The JetStream message id that makes publishing idempotent.
    pub fn msg_id(&self) -> String {
        format!("{}:{}", self.aggregate_id, self.sequence)
    }

    pub fn subject(&self) -> String {
        crate::subjects::event_subject(&self.aggregate_type, &self.aggregate_id, &self.event_type)
    }
}
