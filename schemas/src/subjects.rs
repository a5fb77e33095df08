//! JetStream names. Subjects name aggregate type, aggregate id and event type, so a consumer
//! can filter on any of them:
//!
//! `overfly.events.<aggregate_type>.<aggregate_id>.<event_type>`
//!
//! e.g. `overfly.events.job.5f0c….RunAssigned`, or `overfly.events.executor.*.ExecutorLost`.
//! Aggregate ids are UUIDs or `[A-Za-z0-9_-]` tokens, so they never contain `.`, `*` or `>`.

/// The stream holding every domain event (file storage, no age limit: it is the event bus).
pub const EVENTS_STREAM: &str = "OVERFLY_EVENTS";
pub const EVENTS_PREFIX: &str = "overfly.events";
/// Matches every event subject.
pub const EVENTS_ALL: &str = "overfly.events.>";

pub fn event_subject(aggregate_type: &str, aggregate_id: &str, event_type: &str) -> String {
    format!("{EVENTS_PREFIX}.{aggregate_type}.{aggregate_id}.{event_type}")
}

/// Message headers set by the relay on every event message.
pub mod headers {
    /// JetStream de-duplication: `<aggregate_id>:<sequence>`.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    pub const EVENT_TYPE: &str = "Overfly-Event-Type";
    pub const EVENT_VERSION: &str = "Overfly-Event-Version";
    pub const AGGREGATE_TYPE: &str = "Overfly-Aggregate-Type";
    pub const AGGREGATE_ID: &str = "Overfly-Aggregate-Id";
    pub const SEQUENCE: &str = "Overfly-Sequence";
    /// The event's global position in the Postgres event store.
    pub const POSITION: &str = "Overfly-Position";
    /// The id of the transaction that wrote it (with POSITION, the relay's cursor).
    pub const TX: &str = "Overfly-Tx";
    /// W3C trace context of the command that caused the event.
    pub const TRACEPARENT: &str = "traceparent";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_type_id_and_event() {
        assert_eq!(
            event_subject("job", "abc", "JobSubmitted"),
            "overfly.events.job.abc.JobSubmitted"
        );
        assert!(event_subject("job", "abc", "JobSubmitted").starts_with(&EVENTS_ALL[..15]));
    }
}
