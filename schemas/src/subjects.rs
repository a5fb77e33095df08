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

/// Workload log lines, batched by the executor (file storage, kept 7 days).
pub const LOGS_STREAM: &str = "OVERFLY_LOGS";
pub const LOGS_PREFIX: &str = "overfly.logs";
/// Matches every log subject.
pub const LOGS_ALL: &str = "overfly.logs.>";
pub const LOGS_MAX_AGE_S: u64 = 7 * 24 * 3600;

/// `overfly.logs.<job_id>.<run_id>`: one subject per run.
pub fn log_subject(job_id: &str, run_id: &str) -> String {
    format!("{LOGS_PREFIX}.{job_id}.{run_id}")
}

/// GPU telemetry samples, one message per GPU per sample (kept 1 hour).
pub const TELEMETRY_STREAM: &str = "OVERFLY_TELEMETRY";
pub const TELEMETRY_PREFIX: &str = "overfly.telemetry";
/// Matches every telemetry subject.
pub const TELEMETRY_ALL: &str = "overfly.telemetry.>";
pub const TELEMETRY_MAX_AGE_S: u64 = 3600;

/// `overfly.telemetry.<executor_id>.<gpu_index>`.
pub fn telemetry_subject(executor_id: &str, gpu_index: u32) -> String {
    format!("{TELEMETRY_PREFIX}.{executor_id}.{gpu_index}")
}

/// Every job event of one type, e.g. `overfly.events.job.*.RunAssigned` (one filter subject
/// per consumer: nats-server 2.9 has no multi-filter consumers).
pub fn job_events_of_type(event_type: &str) -> String {
    format!("{EVENTS_PREFIX}.job.*.{event_type}")
}

/// Durable consumers of one executor on the events stream: its assignments and the
/// cancellations of its runs. Durable, so an executor restart loses neither.
pub fn executor_assignments_consumer(executor_id: &str) -> String {
    format!("executor-{executor_id}")
}

pub fn executor_cancellations_consumer(executor_id: &str) -> String {
    format!("executor-{executor_id}-cancel")
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

    #[test]
    fn log_telemetry_and_executor_subjects() {
        assert_eq!(log_subject("j1", "r1"), "overfly.logs.j1.r1");
        assert!(log_subject("j1", "r1").starts_with(&LOGS_ALL[..LOGS_ALL.len() - 1]));
        assert_eq!(
            telemetry_subject("gpu-host-1", 3),
            "overfly.telemetry.gpu-host-1.3"
        );
        assert!(telemetry_subject("h", 0).starts_with(&TELEMETRY_ALL[..TELEMETRY_ALL.len() - 1]));
        assert_eq!(
            job_events_of_type("RunAssigned"),
            "overfly.events.job.*.RunAssigned"
        );
        assert_eq!(executor_assignments_consumer("h1"), "executor-h1");
        assert_eq!(executor_cancellations_consumer("h1"), "executor-h1-cancel");
    }
}
