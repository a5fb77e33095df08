//! The domain-event feeds (`GET /stream`, `GET /jobs/{id}/events`): every event the relay
//! published on `OVERFLY_EVENTS`, filtered per connection.

use chrono::{DateTime, Utc};
use overfly_schemas::EventEnvelope;
use poem_openapi::Object;

use super::{Message, Select};

/// The shared fan-out of the event stream.
pub type Hub = super::Fanout<FeedEvent>;

/// One event as the feeds send it (`data:` of an SSE message; `id:` is `stream_sequence`,
/// `event:` is `event_type`).
#[derive(Debug, Clone, PartialEq, Object)]
pub struct FeedEvent {
    /// The JetStream stream sequence: pass the last one seen as `Last-Event-ID` to resume.
    pub stream_sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// The aggregate's version after this event.
    pub sequence: i64,
    /// Global position in the event store.
    pub position: i64,
    pub recorded_at: DateTime<Utc>,
    pub metadata: serde_json::Value,
    pub payload: serde_json::Value,
}

/// Which events a connection wants.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
    /// Only events of this account's jobs (executor events belong to no account).
    pub account: Option<String>,
}

/// Which account each job belongs to, for a connection with an account filter: from the
/// `JobSubmitted` events it sees, else from the jobs read model.
#[derive(Default)]
struct Accounts {
    of_job: std::collections::HashMap<String, Option<String>>,
}

impl Accounts {
    async fn matches(&mut self, pool: &sqlx::PgPool, filter: &Filter, event: &FeedEvent) -> bool {
        let Some(account) = &filter.account else {
            return true;
        };
        if event.aggregate_type != "job" {
            return false;
        }
        if event.event_type == "JobSubmitted" {
            let submitted = event.payload["JobSubmitted"]["spec"]["account"]
                .as_str()
                .map(str::to_string);
            self.of_job.insert(event.aggregate_id.clone(), submitted);
        }
        if !self.of_job.contains_key(&event.aggregate_id) {
            let found: Option<String> = match uuid::Uuid::parse_str(&event.aggregate_id) {
                Ok(id) => sqlx::query_scalar("SELECT account FROM read_jobs WHERE job_id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await
                    .ok()
                    .flatten(),
                Err(_) => None,
            };
            self.of_job.insert(event.aggregate_id.clone(), found);
        }
        self.of_job
            .get(&event.aggregate_id)
            .cloned()
            .flatten()
            .as_ref()
            == Some(account)
    }
}

impl Filter {
    fn matches(&self, event: &FeedEvent) -> bool {
        self.aggregate_type
            .as_ref()
            .is_none_or(|t| *t == event.aggregate_type)
            && self
                .aggregate_id
                .as_ref()
                .is_none_or(|id| *id == event.aggregate_id)
            && self
                .event_type
                .as_ref()
                .is_none_or(|t| *t == event.event_type)
    }

    /// The narrowest subject covering the filter (for a connection's catch-up consumer).
    fn subject(&self) -> String {
        let part = |p: &Option<String>| p.clone().unwrap_or_else(|| "*".to_string());
        format!(
            "{}.{}.{}.{}",
            overfly_schemas::subjects::EVENTS_PREFIX,
            part(&self.aggregate_type),
            part(&self.aggregate_id),
            part(&self.event_type)
        )
    }
}

impl Message for FeedEvent {
    fn decode(sequence: u64, payload: &[u8]) -> anyhow::Result<Self> {
        let envelope: EventEnvelope = serde_json::from_slice(payload)?;
        Ok(Self {
            stream_sequence: i64::try_from(sequence)?,
            event_type: envelope.event_type,
            event_version: envelope.event_version,
            aggregate_type: envelope.aggregate_type,
            aggregate_id: envelope.aggregate_id,
            sequence: envelope.sequence,
            position: envelope.position,
            recorded_at: envelope.recorded_at,
            metadata: serde_json::Value::Object(envelope.metadata),
            payload: envelope.payload,
        })
    }

    fn event_type(&self) -> &str {
        &self.event_type
    }

    fn render(&self) -> String {
        poem_openapi::types::ToJSON::to_json_string(self)
    }
}

/// A connection's selection: the filter, and the accounts of the jobs it has seen.
struct Selection {
    filter: Filter,
    accounts: Accounts,
    pool: sqlx::PgPool,
}

impl Select<FeedEvent> for Selection {
    async fn accepts(&mut self, event: &FeedEvent) -> bool {
        self.filter.matches(event) && self.accounts.matches(&self.pool, &self.filter, event).await
    }
}

/// The events matching `filter` after stream sequence `after` (the stored ones first, then
/// live), or from now on without it.
pub async fn feed(
    hub: &Hub,
    pool: sqlx::PgPool,
    filter: Filter,
    after: Option<u64>,
) -> anyhow::Result<impl futures::Stream<Item = super::Frame> + Send + use<>> {
    let subject = filter.subject();
    let selection = Selection {
        filter,
        accounts: Accounts::default(),
        pool,
    };
    super::feed(hub, subject, after, selection).await
}
