//! The projections' runner: a durable JetStream pull consumer whose batches are applied in
//! one Postgres transaction together with the checkpoint, then acked.
//!
//! One runner serves every projection: a [`Projection`] says its name (checkpoint row), its
//! consumer, its filter subject, its locks and how to apply one envelope. [`JobsProjection`]
//! and [`ExecutorsProjection`] are the runner with the jobs and the executors projections.
//!
//! - **Exactly-once effect.** Rows and checkpoint commit together. A message whose stream
//!   sequence is at most the checkpoint's was applied before (crash between commit and ack):
//!   it is acked without being applied. Per job, `version` guards again.
//! - **Postgres is the truth, the consumer a cursor.** On start and after any error the
//!   consumer is re-created at the checkpoint's stream sequence + 1 (all messages on first
//!   start), so a crash never leaves messages to be redelivered out of order after newer ones
//!   (JetStream redelivers unacked messages only after `ack_wait`, by which time later ones
//!   may have been delivered).
//! - **One runner at a time.** A session-level advisory lock, held on the connection the
//!   batches are written on (as the relay does); other runners stand by (`Outcome::Idle`).
//!   Two runners sharing the durable consumer would split its messages between them.
//! - **A checkpoint ahead of the stream.** After a rebuild was swapped in (`crate::swap`), the
//!   checkpoint's cursor `(tx_id, position)` may be ahead of the messages still to come (the
//!   rebuild read the event store, which the relay publishes from with a lag), and its
//!   `stream_sequence` may be 0. A message whose `(Overfly-Tx, position)` is at most the
//!   checkpoint's cursor is covered by the rows already: it is acked, not applied, and only
//!   advances the checkpoint's `stream_sequence`. The stream is in cursor order (the relay
//!   publishes in commit order), so the consumer needs no other re-positioning.
//! - **Paused by a swap.** Every batch transaction first takes [`SWAP_LOCK`] shared; a swap
//!   takes it exclusively, so no batch is in flight while the tables change under it, and the
//!   next batch reads the swapped-in checkpoint. (The runner's own [`LEADER_LOCK`] is a session
//!   lock held as long as the runner lives, so a swap cannot take that one.)
//! - **Nothing is skipped.** An event that cannot be applied stops the projection: the events
//!   before it in its batch are committed, it and everything after it are not, the error is
//!   written to `projection_checkpoints.last_error`, and every later step fails the same way
//!   until the projector is upgraded (or the stream repaired). A successful batch clears it.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use overfly_schemas::EventEnvelope;
use overfly_schemas::subjects::headers;
use sqlx::{Connection, PgConnection, PgPool};

use crate::error::ProjectionError;
use crate::jobs::{self, Applied, EventMeta};
use crate::rebuild::Cursor;

/// What the runner needs to know of one projection.
pub trait Projection: Send + Sync + 'static {
    /// Its row in `projection_checkpoints` (and its name in logs).
    fn name(&self) -> &'static str;
    /// The durable JetStream consumer's name.
    fn consumer(&self) -> &'static str;
    /// The consumer's filter subject (one: nats-server 2.9).
    fn filter_subject(&self) -> &'static str;
    /// Session advisory lock key of its runner (one runner per database).
    fn leader_lock(&self) -> i64;
    /// Transaction advisory lock taken shared by every batch, exclusively by a swap.
    fn swap_lock(&self) -> i64;
    /// Session advisory lock held by a running `rebuild` of it (one at a time per database).
    fn rebuild_lock(&self) -> i64;
    /// Its read-model tables (in `public`, besides `projection_checkpoints`), each with its
    /// primary key: what a rebuild copies, builds and swaps in, and what `verify` diffs, every
    /// column (read from the table itself, so a column added by a migration is covered).
    fn tables(&self) -> &'static [Table];
    /// The aggregate type whose events it reads from the event store (a rebuild), as its
    /// filter subject says; `None`: every event, in commit order.
    fn aggregate_type(&self) -> Option<&'static str>;
    /// Decodes (upcasting old versions) and applies one envelope in the batch's transaction.
    /// An event type the projection does not need but knows is `AlreadyApplied`; one it does
    /// not know is an error, never skipped.
    fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> impl Future<Output = Result<Applied, ProjectionError>> + Send;
    /// Applies a batch's envelopes in order in the batch's transaction, with the effect of
    /// `apply` on each in turn (which is what this default does; a projection may do it in
    /// fewer round trips). On an error, the index of the envelope that caused it; the caller
    /// rolls the transaction back.
    fn apply_batch(
        &self,
        conn: &mut PgConnection,
        envelopes: &[EventEnvelope],
    ) -> impl Future<Output = Result<Vec<Applied>, (usize, ProjectionError)>> + Send {
        async move {
            let mut applied = Vec::with_capacity(envelopes.len());
            for (index, envelope) in envelopes.iter().enumerate() {
                applied.push(self.apply(conn, envelope).await.map_err(|e| (index, e))?);
            }
            Ok(applied)
        }
    }
}

/// One read-model table of a projection and its primary key (a single column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    pub key: &'static str,
}

/// The jobs projection (`read_jobs`, `read_runs`): job events only.
#[derive(Debug, Clone, Copy, Default)]
pub struct Jobs;

impl Projection for Jobs {
    fn name(&self) -> &'static str {
        jobs::NAME
    }
    fn consumer(&self) -> &'static str {
        CONSUMER
    }
    fn filter_subject(&self) -> &'static str {
        FILTER
    }
    fn leader_lock(&self) -> i64 {
        LEADER_LOCK
    }
    fn swap_lock(&self) -> i64 {
        SWAP_LOCK
    }
    fn rebuild_lock(&self) -> i64 {
        crate::swap::REBUILD_LOCK
    }
    fn tables(&self) -> &'static [Table] {
        &[
            Table {
                name: "read_jobs",
                key: "job_id",
            },
            Table {
                name: "read_runs",
                key: "run_id",
            },
        ]
    }
    fn aggregate_type(&self) -> Option<&'static str> {
        Some("job")
    }
    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> Result<Applied, ProjectionError> {
        apply_envelope(conn, envelope).await
    }
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        envelopes: &[EventEnvelope],
    ) -> Result<Vec<Applied>, (usize, ProjectionError)> {
        apply_envelopes(conn, envelopes).await
    }
}

/// The executors & GPUs projection (`read_executors`, `read_gpus`): executor events and the
/// job events that take or release GPUs, so it reads the whole stream, in commit order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Executors;

/// The executors projection's durable consumer.
pub const EXECUTORS_CONSUMER: &str = "projector-executors";
/// Every event: executor and job events interleaved in commit order (one filter subject).
pub const EXECUTORS_FILTER: &str = "overfly.events.>";
/// Advisory lock key of the executors projection's runner (`…7904` is `swap::REBUILD_LOCK`).
pub const EXECUTORS_LEADER_LOCK: i64 = 0x6f76_6572_666c_7905;
/// Transaction advisory lock between the executors runner's batches and a rebuild's swap.
pub const EXECUTORS_SWAP_LOCK: i64 = 0x6f76_6572_666c_7906;
/// Session advisory lock held by a running rebuild of the executors projection.
pub const EXECUTORS_REBUILD_LOCK: i64 = 0x6f76_6572_666c_7909;

impl Projection for Executors {
    fn name(&self) -> &'static str {
        crate::executors::NAME
    }
    fn consumer(&self) -> &'static str {
        EXECUTORS_CONSUMER
    }
    fn filter_subject(&self) -> &'static str {
        EXECUTORS_FILTER
    }
    fn leader_lock(&self) -> i64 {
        EXECUTORS_LEADER_LOCK
    }
    fn swap_lock(&self) -> i64 {
        EXECUTORS_SWAP_LOCK
    }
    fn rebuild_lock(&self) -> i64 {
        EXECUTORS_REBUILD_LOCK
    }
    fn tables(&self) -> &'static [Table] {
        &[
            Table {
                name: "read_executors",
                key: "executor_id",
            },
            Table {
                name: "read_gpus",
                key: "gpu_uuid",
            },
        ]
    }
    fn aggregate_type(&self) -> Option<&'static str> {
        None
    }
    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> Result<Applied, ProjectionError> {
        crate::executors::apply_envelope(conn, envelope).await
    }
}

/// The GPU usage projection (`read_usage_runs` and its own job and GPU tables): job events
/// and executor registrations, so it reads the whole stream, in commit order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage;

/// The usage projection's durable consumer.
pub const USAGE_CONSUMER: &str = "projector-usage";
/// Advisory lock key of the usage projection's runner.
pub const USAGE_LEADER_LOCK: i64 = 0x6f76_6572_666c_7907;
/// Transaction advisory lock between the usage runner's batches and a rebuild's swap.
pub const USAGE_SWAP_LOCK: i64 = 0x6f76_6572_666c_7908;
/// Session advisory lock held by a running rebuild of the usage projection.
pub const USAGE_REBUILD_LOCK: i64 = 0x6f76_6572_666c_790a;

impl Projection for Usage {
    fn name(&self) -> &'static str {
        crate::usage::NAME
    }
    fn consumer(&self) -> &'static str {
        USAGE_CONSUMER
    }
    fn filter_subject(&self) -> &'static str {
        EXECUTORS_FILTER
    }
    fn leader_lock(&self) -> i64 {
        USAGE_LEADER_LOCK
    }
    fn swap_lock(&self) -> i64 {
        USAGE_SWAP_LOCK
    }
    fn rebuild_lock(&self) -> i64 {
        USAGE_REBUILD_LOCK
    }
    fn tables(&self) -> &'static [Table] {
        &[
            Table {
                name: "read_usage_jobs",
                key: "job_id",
            },
            Table {
                name: "read_usage_gpus",
                key: "gpu_uuid",
            },
            Table {
                name: "read_usage_runs",
                key: "run_id",
            },
        ]
    }
    fn aggregate_type(&self) -> Option<&'static str> {
        None
    }
    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> Result<Applied, ProjectionError> {
        crate::usage::apply_envelope(conn, envelope).await
    }
}

/// The jobs projection, fed from JetStream.
pub type JobsProjection = Runner<Jobs>;
/// The executors & GPUs projection, fed from JetStream.
pub type ExecutorsProjection = Runner<Executors>;
/// The GPU usage projection, fed from JetStream.
pub type UsageProjection = Runner<Usage>;

/// The jobs projection's durable consumer.
pub const CONSUMER: &str = "projector-jobs";
/// Advisory lock key of the jobs projection's runner (one per database): "overfly-proj-jobs".
pub const LEADER_LOCK: i64 = 0x6f76_6572_666c_7902;
/// Transaction-level advisory lock between the runner's batches (shared) and a rebuild's swap
/// (exclusive): "overfly-swp-jobs".
pub const SWAP_LOCK: i64 = 0x6f76_6572_666c_7903;
/// Only job events (a single filter subject: nats-server 2.9).
pub const FILTER: &str = "overfly.events.job.>";

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// This many messages were fetched, applied (or found applied before) and acked.
    Processed(usize),
    /// Nothing to do: no message waiting, no stream yet, or another runner holds the lock.
    Idle,
}

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// JetStream stream carrying the events.
    pub stream: String,
    /// Messages fetched and applied per transaction.
    pub batch_size: usize,
    /// How long `run` waits before fetching again after an idle step.
    pub idle_wait: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            stream: overfly_schemas::subjects::EVENTS_STREAM.to_string(),
            batch_size: 500,
            idle_wait: Duration::from_millis(10),
        }
    }
}

/// A projection fed from JetStream.
pub struct Runner<P: Projection> {
    projection: P,
    pool: PgPool,
    jetstream: jetstream::Context,
    config: RunnerConfig,
    /// `None` until positioned, and again after any error (re-positioned from the checkpoint).
    consumer: Option<consumer::PullConsumer>,
    /// The connection holding the projection's advisory lock (one runner at a time). Batches
    /// are written on it, so losing the connection loses the lock and the batch together.
    leader: Option<PgConnection>,
    /// Logged once while another runner holds the lock.
    standing_by: bool,
    /// Fault injection for tests: fail the batch after this many applied events, inside the
    /// transaction (which rolls back). Never set in production.
    pub fail_after: Option<usize>,
}

/// The checkpoint row of a projection.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Checkpoint {
    /// The relay cursor (commit order) of the last applied event, `xid8` as text.
    pub tx_id: String,
    pub position: i64,
    pub stream_sequence: i64,
    pub events_applied: i64,
    pub last_error: Option<String>,
}

impl Checkpoint {
    /// The cursor of the last applied event (zero when the text is not an `xid8`).
    pub fn cursor(&self) -> Cursor {
        Cursor::parse(&self.tx_id, self.position).unwrap_or_default()
    }
}

/// Reads the checkpoint of `projection` (through `search_path`), `None` before the first batch.
pub async fn load_checkpoint(
    conn: &mut PgConnection,
    projection: &str,
) -> Result<Option<Checkpoint>, sqlx::Error> {
    sqlx::query_as(
        "SELECT tx_id::text AS tx_id, position, stream_sequence, events_applied, last_error
           FROM projection_checkpoints WHERE projection = $1",
    )
    .bind(projection)
    .fetch_optional(conn)
    .await
}

/// Stores where a batch ended, in the batch's transaction.
pub(crate) async fn store_checkpoint(
    conn: &mut PgConnection,
    projection: &str,
    last: &Last,
    applied: usize,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints
                (projection, tx_id, position, stream_sequence, events_applied, updated_at)
         VALUES ($1, $2::text::xid8, $3, $4, $5, now())
         ON CONFLICT (projection) DO UPDATE
            SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position,
                stream_sequence = EXCLUDED.stream_sequence,
                events_applied = projection_checkpoints.events_applied + EXCLUDED.events_applied,
                updated_at = now(), last_error = NULL",
    )
    .bind(projection)
    .bind(&last.tx_id)
    .bind(last.position)
    .bind(last.stream_sequence)
    .bind(i64::try_from(applied).unwrap_or(i64::MAX))
    .execute(conn)
    .await?;
    Ok(())
}

/// Where the last applied event of a batch sits.
pub(crate) struct Last {
    pub tx_id: String,
    pub position: i64,
    pub stream_sequence: i64,
}

impl<P: Projection + Default> Runner<P> {
    pub fn new(pool: PgPool, nats: async_nats::Client, config: RunnerConfig) -> Self {
        Self::with(P::default(), pool, nats, config)
    }
}

impl<P: Projection> Runner<P> {
    pub fn with(
        projection: P,
        pool: PgPool,
        nats: async_nats::Client,
        config: RunnerConfig,
    ) -> Self {
        Self {
            projection,
            pool,
            jetstream: jetstream::new(nats),
            config,
            consumer: None,
            leader: None,
            standing_by: false,
            fail_after: None,
        }
    }

    /// Fetches one batch (without waiting), applies it with the checkpoint in one transaction,
    /// commits, then acks.
    #[tracing::instrument(name = "projector.step", skip_all, fields(projection = self.projection.name()))]
    pub async fn step(&mut self) -> Result<Outcome, ProjectionError> {
        let result = self.try_step().await;
        if let Err(error) = &result {
            // Re-position from the checkpoint, on a fresh connection, before the next step.
            self.consumer = None;
            self.leader = None;
            if error.is_poison() {
                tracing::error!(error = %error, projection = self.projection.name(), "projection stopped");
                if let Err(e) =
                    record_error(&self.pool, self.projection.name(), &error.to_string()).await
                {
                    tracing::warn!(error = %e, "could not record the projection's error");
                }
            }
        }
        result
    }

    /// Steps forever; after an error waits (100 ms doubling to 30 s) and steps again.
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.step().await {
                Ok(Outcome::Processed(_)) => backoff = Duration::from_millis(100),
                Ok(Outcome::Idle) => {
                    backoff = Duration::from_millis(100);
                    tokio::time::sleep(self.config.idle_wait).await;
                }
                Err(error) => {
                    tracing::warn!(
                        error = %error,
                        projection = self.projection.name(),
                        retry_in = ?backoff,
                        "projection step failed"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn try_step(&mut self) -> Result<Outcome, ProjectionError> {
        let Some(consumer) = self.position().await? else {
            return Ok(Outcome::Idle);
        };
        let mut batch = consumer
            .fetch()
            .max_messages(self.config.batch_size)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .map_err(ProjectionError::nats)?;
        let mut messages = Vec::new();
        while let Some(message) = batch.next().await {
            messages.push(message.map_err(ProjectionError::nats)?);
        }
        if messages.is_empty() {
            return Ok(Outcome::Idle);
        }

        match self.commit_batch(&messages).await {
            Ok(applied) => {
                ack(&messages).await?;
                tracing::debug!(messages = messages.len(), applied, "batch applied");
                Ok(Outcome::Processed(messages.len()))
            }
            Err((index, error)) if error.is_poison() && index > 0 => {
                // Keep what came before the event that cannot be applied, so the checkpoint
                // points right before it.
                let before = &messages[..index];
                self.commit_batch(before).await.map_err(|(_, e)| e)?;
                ack(before).await?;
                Err(error)
            }
            Err((_, error)) => Err(error),
        }
    }

    /// Applies `messages` and stores the checkpoint in one transaction, and commits; the number
    /// of events applied. On error nothing is committed, and the error comes with the index of
    /// the message that caused it.
    async fn commit_batch(
        &mut self,
        messages: &[jetstream::Message],
    ) -> Result<usize, (usize, ProjectionError)> {
        let at_start = |e: sqlx::Error| (0, ProjectionError::from(e));
        let conn = self
            .leader
            .as_mut()
            .ok_or_else(|| at_start(sqlx::Error::PoolClosed))?;
        let mut tx = conn.begin().await.map_err(at_start)?;
        // Waits while a rebuild swaps the tables in (then reads its checkpoint below).
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(self.projection.swap_lock())
            .execute(&mut *tx)
            .await
            .map_err(at_start)?;
        let checkpoint = load_checkpoint(&mut tx, self.projection.name())
            .await
            .map_err(at_start)?
            .unwrap_or_default();
        let done = checkpoint.stream_sequence;
        let mut cursor = checkpoint.cursor();
        let mut sequence = done;
        // Which messages to apply, in order (an unreadable one fails the batch at its index
        // before anything is applied), then all of them in one call.
        let mut envelopes = Vec::with_capacity(messages.len());
        let mut sent: Vec<(usize, Sent)> = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            match read_message(message, done, cursor).map_err(|e| (index, e))? {
                Handled::Before => {}
                Handled::Covered { stream_sequence } => {
                    sequence = sequence.max(stream_sequence);
                }
                Handled::Apply { envelope, last } => {
                    cursor = cursor.max(last.cursor);
                    envelopes.push(envelope);
                    sent.push((index, last));
                }
            }
        }
        let results = self
            .projection
            .apply_batch(&mut tx, &envelopes)
            .await
            .map_err(|(i, e)| (sent.get(i).map_or(0, |(index, _)| *index), e))?;
        let mut applied = 0;
        for ((index, last), how) in sent.iter().zip(results) {
            if how == Applied::Applied {
                applied += 1;
            }
            sequence = sequence.max(last.stream_sequence);
            if let Some(limit) = self.fail_after
                && applied >= limit
            {
                return Err((*index, ProjectionError::Injected(applied)));
            }
        }
        let at_end = |e: sqlx::Error| (messages.len(), ProjectionError::from(e));
        if sequence > done {
            let last = Last {
                tx_id: cursor.tx.to_string(),
                position: cursor.position,
                stream_sequence: sequence,
            };
            store_checkpoint(&mut tx, self.projection.name(), &last, applied)
                .await
                .map_err(at_end)?;
        }
        tx.commit().await.map_err(at_end)?;
        Ok(applied)
    }

    /// The consumer, (re-)created at the checkpoint if needed; `None` while there is no stream.
    async fn position(&mut self) -> Result<Option<consumer::PullConsumer>, ProjectionError> {
        if let Some(consumer) = &self.consumer {
            return Ok(Some(consumer.clone()));
        }
        if self.leader.is_none() {
            let mut conn = self.pool.acquire().await?.detach();
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(self.projection.leader_lock())
                .fetch_one(&mut conn)
                .await?;
            if !locked {
                if !self.standing_by {
                    tracing::info!(
                        projection = self.projection.name(),
                        "another runner holds the projection; standing by"
                    );
                    self.standing_by = true;
                }
                return Ok(None);
            }
            self.standing_by = false;
            self.leader = Some(conn);
        }
        let stream = match self.jetstream.get_stream(&self.config.stream).await {
            Ok(stream) => stream,
            Err(e)
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(js)
                if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                tracing::debug!(stream = %self.config.stream, "no event stream yet");
                return Ok(None);
            }
            Err(e) => return Err(ProjectionError::nats(e)),
        };
        let conn = self.leader.as_mut().expect("the lock was taken above");
        let done = load_checkpoint(conn, self.projection.name())
            .await?
            .map_or(0, |c| c.stream_sequence);
        let deliver_policy = if done == 0 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: u64::try_from(done).unwrap_or(0) + 1,
            }
        };
        let name = self.projection.consumer();
        match stream.delete_consumer(name).await {
            Ok(_) => {}
            Err(e)
                if matches!(e.kind(), jetstream::stream::ConsumerErrorKind::JetStream(js)
                if js.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) => {}
            Err(e) => return Err(ProjectionError::nats(e)),
        }
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.to_string()),
                description: Some(format!(
                    "{} projection (overfly-projector)",
                    self.projection.name()
                )),
                deliver_policy,
                // Acking a batch's last message acks the whole batch (one ack per batch).
                ack_policy: consumer::AckPolicy::All,
                ack_wait: Duration::from_secs(30),
                filter_subject: self.projection.filter_subject().to_string(),
                ..Default::default()
            })
            .await
            .map_err(ProjectionError::nats)?;
        tracing::info!(
            consumer = name,
            from_stream_sequence = done + 1,
            "consumer positioned"
        );
        self.consumer = Some(consumer.clone());
        Ok(Some(consumer))
    }
}

/// What became of one message.
enum Handled {
    /// Its stream sequence is at most the checkpoint's: applied before.
    Before,
    /// Its cursor is at most the checkpoint's (a rebuild swapped in covers it): not applied.
    Covered { stream_sequence: i64 },
    /// To be applied (or found applied by the projection's own guard).
    Apply { envelope: EventEnvelope, last: Sent },
}

/// Where an applied message sits.
struct Sent {
    cursor: Cursor,
    stream_sequence: i64,
}

/// Reads one message: to be applied unless its stream sequence is at most `done` or its
/// cursor at most `covered`.
fn read_message(
    message: &jetstream::Message,
    done: i64,
    covered: Cursor,
) -> Result<Handled, ProjectionError> {
    let info = message.info().map_err(ProjectionError::nats)?;
    let stream_sequence = i64::try_from(info.stream_sequence).unwrap_or(i64::MAX);
    if stream_sequence <= done {
        return Ok(Handled::Before);
    }
    let envelope: EventEnvelope =
        serde_json::from_slice(&message.payload).map_err(|e| ProjectionError::Malformed {
            event_type: "envelope".into(),
            reason: format!("stream message {stream_sequence}: {e}"),
        })?;
    let tx_id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::TX))
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .ok_or_else(|| ProjectionError::Malformed {
            event_type: envelope.event_type.clone(),
            reason: format!(
                "stream message {stream_sequence} has no valid {} header",
                headers::TX
            ),
        })?;
    let cursor = Cursor {
        tx: tx_id,
        position: envelope.position,
    };
    if cursor <= covered {
        return Ok(Handled::Covered { stream_sequence });
    }
    let last = Sent {
        cursor,
        stream_sequence,
    };
    Ok(Handled::Apply { envelope, last })
}

/// Acks `messages` (one batch, in stream order) with one ack of the last: the consumer's
/// `AckPolicy::All` acks every message before it too.
async fn ack(messages: &[jetstream::Message]) -> Result<(), ProjectionError> {
    if let Some(last) = messages.last() {
        last.ack().await.map_err(ProjectionError::nats)?;
    }
    Ok(())
}

/// Decodes (upcasting old versions) and applies one envelope to the jobs projection.
pub async fn apply_envelope(
    conn: &mut PgConnection,
    envelope: &EventEnvelope,
) -> Result<Applied, ProjectionError> {
    let (meta, event) = job_event(envelope)?;
    jobs::apply(conn, &meta, &event).await
}

/// Decodes and applies a batch of envelopes to the jobs projection, in order, with the effect
/// of [`apply_envelope`] on each (`jobs::apply_batch`); on an error, the envelope's index.
pub async fn apply_envelopes(
    conn: &mut PgConnection,
    envelopes: &[EventEnvelope],
) -> Result<Vec<Applied>, (usize, ProjectionError)> {
    let mut events = Vec::with_capacity(envelopes.len());
    for (index, envelope) in envelopes.iter().enumerate() {
        events.push(job_event(envelope).map_err(|e| (index, e))?);
    }
    jobs::apply_batch(conn, &events).await
}

/// A job envelope's place and decoded (upcast) event.
fn job_event(
    envelope: &EventEnvelope,
) -> Result<(EventMeta, overfly_domain::job::JobEvent), ProjectionError> {
    if envelope.aggregate_type != "job" {
        return Err(ProjectionError::Malformed {
            event_type: envelope.event_type.clone(),
            reason: format!("aggregate type {} is not job", envelope.aggregate_type),
        });
    }
    let event = jobs::decode(
        &envelope.event_type,
        &envelope.event_version,
        &envelope.payload,
    )?;
    let meta = EventMeta {
        aggregate_id: envelope.aggregate_id.clone(),
        sequence: envelope.sequence,
        position: envelope.position,
        recorded_at: envelope.recorded_at,
    };
    Ok((meta, event))
}

/// Writes why the projection stopped (outside the rolled-back batch).
async fn record_error(pool: &PgPool, projection: &str, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, last_error) VALUES ($1, $2)
         ON CONFLICT (projection) DO UPDATE SET last_error = EXCLUDED.last_error, updated_at = now()",
    )
    .bind(projection)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advisory_lock_keys_are_distinct() {
        // The relay's leader lock (command-service) is `…7901`.
        let keys = [
            0x6f76_6572_666c_7901,
            LEADER_LOCK,
            SWAP_LOCK,
            crate::swap::REBUILD_LOCK,
            EXECUTORS_LEADER_LOCK,
            EXECUTORS_SWAP_LOCK,
            USAGE_LEADER_LOCK,
            USAGE_SWAP_LOCK,
            EXECUTORS_REBUILD_LOCK,
            USAGE_REBUILD_LOCK,
        ];
        let distinct: std::collections::HashSet<i64> = keys.into_iter().collect();
        assert_eq!(distinct.len(), keys.len());
        assert_ne!(Jobs.consumer(), Executors.consumer());
        assert_ne!(Jobs.name(), Executors.name());
        let consumers = [Jobs.consumer(), Executors.consumer(), Usage.consumer()];
        let names = [Jobs.name(), Executors.name(), Usage.name()];
        for list in [consumers, names] {
            let distinct: std::collections::HashSet<&str> = list.into_iter().collect();
            assert_eq!(distinct.len(), list.len());
        }
    }
}
