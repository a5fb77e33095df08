//! Live feeds of the event stream as Server-Sent Events, resumable without gaps or duplicates.
//!
//! - **One JetStream subscription for everyone**: the [`Hub`] runs a single ordered consumer
//!   on every event subject from the stream's tail and fans each event out through a bounded
//!   broadcast ring; each SSE connection filters what it needs from there.
//! - **History and resumes** (`Last-Event-ID`, or a job's whole story) come from an ephemeral
//!   ordered consumer created for that connection, filtered to the subject it needs, from the
//!   sequence after the one the client saw; it is dropped (and so deleted by the server) once
//!   the connection has caught up, and the connection switches to the shared ring. Every
//!   message's `id:` is its JetStream stream sequence, so the switch drops what was already
//!   sent: no gap, no duplicate.
//! - **Bounded memory**: the ring holds `buffer` events; a connection whose client reads too
//!   slowly falls behind the ring, gets a `reset` event naming the last id it was sent (where
//!   to resume with `Last-Event-ID`), and is closed.
//! - Keep-alive comments every 15 s; every feed ends when the server shuts down.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use overfly_schemas::EventEnvelope;
use poem_openapi::Object;
use tokio::sync::{broadcast, watch};

/// The keep-alive comment period.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

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

/// What a feed sends: an event, or the reset that closes a connection that fell behind.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Event(Arc<FeedEvent>),
    /// The client read too slowly; resume after `after` (also the message's `id:`).
    Reset {
        after: i64,
    },
}

/// The body of a `reset` message.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct Reset {
    /// Reconnect with `Last-Event-ID` set to this to get everything after it.
    pub resume_after: i64,
    pub reason: String,
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

/// The shared fan-out of the event stream.
#[derive(Clone)]
pub struct Hub {
    jetstream: jetstream::Context,
    /// For the account filter (the jobs read model).
    pool: sqlx::PgPool,
    stream: String,
    ring: broadcast::Sender<Arc<FeedEvent>>,
    /// The stream sequence after which the ring has every event (`None` until the shared
    /// subscription is up).
    covered_from: watch::Sender<Option<u64>>,
    shutdown: watch::Receiver<bool>,
}

impl Hub {
    /// Starts the shared subscription (retrying until the stream exists). `buffer`: events
    /// the ring holds for slow connections.
    pub fn start(
        pool: sqlx::PgPool,
        nats: async_nats::Client,
        stream: String,
        buffer: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let (ring, _) = broadcast::channel(buffer.max(16));
        let hub = Self {
            jetstream: jetstream::new(nats),
            pool,
            stream,
            ring,
            covered_from: watch::channel(None).0,
            shutdown,
        };
        tokio::spawn(hub.clone().follow());
        hub
    }

    /// Feeds the ring from one ordered consumer, from the stream's tail at the start and then
    /// contiguously: after an error it resumes right after the last event it delivered.
    async fn follow(self) {
        let mut shutdown = self.shutdown.clone();
        let mut last = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            if let Err(error) = self.follow_once(&mut last).await {
                tracing::debug!(%error, "event feed subscription interrupted; retrying");
            }
            tokio::select! {
                _ = shutdown.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    async fn follow_once(&self, last: &mut Option<u64>) -> anyhow::Result<()> {
        let mut stream = self.jetstream.get_stream(&self.stream).await?;
        let from = match *last {
            Some(last) => last,
            None => stream.info().await?.state.last_sequence,
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from + 1,
                },
                filter_subject: overfly_schemas::subjects::EVENTS_ALL.to_string(),
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        *last = Some(from);
        self.covered_from.send_if_modified(|covered| {
            let first = covered.is_none();
            covered.get_or_insert(from);
            first
        });
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                next = messages.next() => {
                    let Some(message) = next else { anyhow::bail!("the subscription ended") };
                    let event = decode(&message.map_err(|e| anyhow::anyhow!("{e}"))?)?;
                    *last = Some(event.stream_sequence as u64);
                    // No receiver is fine: nobody is listening.
                    let _ = self.ring.send(Arc::new(event));
                }
            }
        }
    }

    /// The stream's last sequence now (0 before the first event): where a feed without
    /// `Last-Event-ID` starts, fixed when the client connects.
    pub async fn now(&self) -> anyhow::Result<u64> {
        match self.jetstream.get_stream(&self.stream).await {
            Ok(mut stream) => Ok(stream.info().await?.state.last_sequence),
            Err(e)
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                Ok(0)
            }
            Err(e) => Err(anyhow::anyhow!("{e}")),
        }
    }

    /// A feed of the events matching `filter`: those after stream sequence `after` first
    /// (from JetStream, when given), then live.
    pub fn feed(
        &self,
        filter: Filter,
        after: Option<u64>,
    ) -> impl Stream<Item = Item> + Send + use<> {
        // Subscribed before catching up: nothing published meanwhile is missed.
        let mut live = self.ring.subscribe();
        let hub = self.clone();
        let mut shutdown = self.shutdown.clone();
        let mut covered = self.covered_from.subscribe();
        async_stream_items(move |tx| async move {
            // Until the shared subscription is up, the ring may miss events: wait for it.
            if covered.wait_for(Option::is_some).await.is_err() {
                return;
            }
            let mut accounts = Accounts::default();
            let mut last = after.unwrap_or(0) as i64;
            if let Some(after) = after {
                match hub.catch_up(&filter, &mut accounts, after, &tx).await {
                    Ok(Some(sent)) => last = sent,
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(%error, "catching a feed up failed");
                        return;
                    }
                }
            }
            loop {
                let next = tokio::select! {
                    _ = shutdown.changed() => return,
                    () = tx.closed() => return,
                    next = live.recv() => next,
                };
                match next {
                    Ok(event) => {
                        if event.stream_sequence <= last
                            || !filter.matches(&event)
                            || !accounts.matches(&hub.pool, &filter, &event).await
                        {
                            continue;
                        }
                        last = event.stream_sequence;
                        if tx.send(Item::Event(event)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(Item::Reset { after: last }).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    }

    /// Sends the stored events matching `filter` after `after`, up to the stream's end as it
    /// is now; the last stream sequence sent.
    async fn catch_up(
        &self,
        filter: &Filter,
        accounts: &mut Accounts,
        after: u64,
        tx: &tokio::sync::mpsc::Sender<Item>,
    ) -> anyhow::Result<Option<i64>> {
        let mut stream = self.jetstream.get_stream(&self.stream).await?;
        let end = stream.info().await?.state.last_sequence;
        if end <= after {
            return Ok(None);
        }
        let mut consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                filter_subject: filter.subject(),
                ..Default::default()
            })
            .await?;
        if consumer.info().await?.num_pending == 0 {
            // Nothing stored matches: covered up to the end as it is now.
            return Ok(Some(end as i64));
        }
        let mut messages = consumer.messages().await?;
        let mut sent = None;
        loop {
            // The filtered consumer says how many are left; none: caught up.
            let pending = match tokio::time::timeout(Duration::from_secs(5), messages.next()).await
            {
                Ok(Some(message)) => {
                    let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
                    let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                    let (sequence, pending) = (info.stream_sequence, info.pending);
                    let event = decode(&message)?;
                    if sequence > end {
                        break;
                    }
                    if filter.matches(&event) && accounts.matches(&self.pool, filter, &event).await
                    {
                        sent = Some(event.stream_sequence);
                        if tx.send(Item::Event(Arc::new(event))).await.is_err() {
                            return Ok(sent);
                        }
                    }
                    if sequence >= end {
                        break;
                    }
                    pending
                }
                // Nothing more matches the subject before the end.
                Ok(None) | Err(_) => break,
            };
            if pending == 0 {
                break;
            }
        }
        Ok(sent.or(Some(end as i64)).map(|s| s.max(after as i64)))
    }
}

/// The stream message as a feed event.
fn decode(message: &jetstream::Message) -> anyhow::Result<FeedEvent> {
    let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
    let envelope: EventEnvelope = serde_json::from_slice(&message.payload)?;
    Ok(FeedEvent {
        stream_sequence: i64::try_from(info.stream_sequence)?,
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

/// A stream fed by a task through a small channel (the task stops when the client goes).
fn async_stream_items<F, Fut>(producer: F) -> impl Stream<Item = Item> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<Item>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(producer(tx));
    tokio_stream_from(rx)
}

fn tokio_stream_from(mut rx: tokio::sync::mpsc::Receiver<Item>) -> impl Stream<Item = Item> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
