//! The relay: Postgres event store → JetStream, in commit order, at least once on the wire and
//! exactly once in the stream.
//!
//! - **Commit order.** Rows are read in `(tx_id, global_position)` order, and only rows
//!   written by transactions older than every transaction still in flight
//!   (`pg_snapshot_xmin`): a row can never appear later *behind* the cursor, which plain
//!   `global_position` order allows (a transaction that took a lower position can commit
//!   after one with a higher position).
//! - **Position after ack.** A batch is published with all messages in flight, and the
//!   position is stored only after JetStream acked every one of them (at most every 100 ms
//!   while events keep coming, and whenever the relay catches up).
//! - **One publisher.** A session-level Postgres advisory lock, held on the connection the
//!   relay reads and writes its position with: losing the connection loses leadership and
//!   stops this relay's writes. Other instances stand by.
//! - **JetStream is made whole from Postgres.** On start and after every error (e.g. NATS
//!   restarted) the relay compares the stream's tail with its stored position: if the stream
//!   lost messages it republishes from the stream's last one; if the stream is ahead (the
//!   relay died between ack and storing its position) it skips what the stream already holds.
//!   `Nats-Msg-Id = <aggregate_id>:<sequence>` de-duplicates whatever remains.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context as _, anyhow, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use chrono::{DateTime, Utc};
use overfly_schemas::EventEnvelope;
use overfly_schemas::subjects::{self, headers};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::config::RelayConfig;

/// Advisory lock key of the relay (one per database): "overfly-relay".
const LEADER_LOCK: i64 = 0x6f76_6572_666c_7901;
/// How long to wait for JetStream to ack a whole batch.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many stream messages are inspected at start-up when the stream is ahead.
const MAX_TAIL_WALK: usize = 100_000;
/// How often the position is stored while events keep coming. A crash loses at most this
/// much progress, which the next start recovers by reading the stream's tail.
const POSITION_EVERY: Duration = Duration::from_millis(100);

/// The relay's cursor: a point in commit order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Cursor {
    pub tx: u64,
    pub position: i64,
}

pub struct Relay {
    pool: PgPool,
    jetstream: jetstream::Context,
    config: RelayConfig,
    wake: Arc<Notify>,
    acked: AtomicU64,
}

impl Relay {
    /// `wake` is notified by the command bus after each commit in this process.
    pub fn new(
        pool: PgPool,
        nats: async_nats::Client,
        config: RelayConfig,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            pool,
            jetstream: jetstream::new(nats),
            config,
            wake,
            acked: AtomicU64::new(0),
        }
    }

    /// Runs forever: stands by until it holds the leader lock, relays, and starts over after
    /// any error (NATS or Postgres down, lost lock) with a capped backoff. Cancel by dropping.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.lead().await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "relay interrupted; restarting"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn lead(&self) -> anyhow::Result<()> {
        let mut conn = crate::leader::acquire(&self.pool, LEADER_LOCK, "relay").await?;
        // The position is a hint the relay re-checks against the stream on every start, so
        // its writes need not wait for the WAL flush: a position lost in a Postgres crash only
        // makes the relay re-read the stream's tail. The events themselves are untouched.
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut conn)
            .await?;
        tracing::info!(stream = %self.config.stream, "relay publishing");
        let stream = self.ensure_stream().await?;
        let (mut cursor, mut already_in_stream) = self.reconcile(&mut conn, stream).await?;
        // Published but not yet stored: the position is written at most every
        // POSITION_EVERY, and whenever the relay catches up.
        let mut unsaved: Option<Cursor> = None;
        let mut saved_at = Instant::now();
        loop {
            let batch = fetch_batch(&mut conn, cursor, self.config.batch_size).await?;
            let Some(last) = batch.last() else {
                if let Some(position) = unsaved.take() {
                    store_position(&mut conn, &self.config.stream, position).await?;
                    saved_at = Instant::now();
                }
                tokio::select! {
                    () = self.wake.notified() => {
                        // Let the commits that follow this one join its batch.
                        tokio::time::sleep(self.config.linger()).await;
                    }
                    () = tokio::time::sleep(self.config.poll_interval()) => {}
                }
                continue;
            };
            let next = last.cursor;
            let to_publish: Vec<_> = batch
                .into_iter()
                .filter(|row| !already_in_stream.remove(&row.envelope.position))
                .collect();
            self.publish(&to_publish).await?;
            cursor = next;
            unsaved = Some(next);
            if saved_at.elapsed() >= POSITION_EVERY {
                store_position(&mut conn, &self.config.stream, next).await?;
                unsaved = None;
                saved_at = Instant::now();
            }
        }
    }

    async fn ensure_stream(&self) -> anyhow::Result<stream::Stream> {
        self.jetstream
            .get_or_create_stream(stream::Config {
                name: self.config.stream.clone(),
                subjects: vec![subjects::EVENTS_ALL.to_string()],
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::Limits,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("creating JetStream stream {}: {e}", self.config.stream))
    }

    /// Where to resume, and the positions the stream already holds beyond that point.
    async fn reconcile(
        &self,
        conn: &mut sqlx::PgConnection,
        mut stream: stream::Stream,
    ) -> anyhow::Result<(Cursor, HashSet<i64>)> {
        let stored = load_position(conn, &self.config.stream).await?;
        let state = stream
            .info()
            .await
            .map_err(|e| anyhow!("stream info: {e}"))?
            .state
            .clone();
        let mut present = HashSet::new();
        let mut stream_last = Cursor::default();
        let mut lowest_walked = None;
        if state.messages > 0 {
            let mut seq = state.last_sequence;
            while seq >= state.first_sequence && present.len() < MAX_TAIL_WALK {
                let message = match stream.get_raw_message(seq).await {
                    Ok(message) => message,
                    Err(e)
                        if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) =>
                    {
                        seq -= 1;
                        continue;
                    }
                    Err(e) => return Err(anyhow!("reading stream message {seq}: {e}")),
                };
                let cursor = cursor_of(&message.headers)
                    .with_context(|| format!("stream message {seq} has no relay headers"))?;
                if seq == state.last_sequence {
                    stream_last = cursor;
                }
                if cursor <= stored {
                    break;
                }
                present.insert(cursor.position);
                lowest_walked = Some(cursor);
                seq -= 1;
            }
        }
        let mut resume = stored.min(stream_last);
        if present.len() >= MAX_TAIL_WALK {
            // Pathological: far more in the stream than the relay ever stored. Trust the tail.
            resume = lowest_walked.unwrap_or(resume);
        }
        if stream_last < stored {
            tracing::warn!(
                ?stored,
                ?stream_last,
                "the stream lost events it had acknowledged; republishing them from Postgres"
            );
        }
        tracing::info!(?resume, skipping = present.len(), "relay resumes");
        Ok((resume, present))
    }

    async fn publish(&self, rows: &[Row]) -> anyhow::Result<()> {
        let mut acks = Vec::with_capacity(rows.len());
        for row in rows {
            let envelope = &row.envelope;
            let publish = PublishMessage::build()
                .payload(serde_json::to_vec(envelope)?.into())
                .headers(message_headers(envelope, row.cursor));
            let ack = self
                .jetstream
                .send_publish(envelope.subject(), publish)
                .await
                .map_err(|e| anyhow!("publishing {}: {e}", envelope.msg_id()))?;
            acks.push(ack);
        }
        let all = futures::future::try_join_all(acks.into_iter().map(|ack| ack.into_future()));
        tokio::time::timeout(ACK_TIMEOUT, all)
            .await
            .context("JetStream did not ack the batch in time")?
            .map_err(|e| anyhow!("JetStream refused a publish: {e}"))?;
        let acked = self.acked.fetch_add(rows.len() as u64, Ordering::Relaxed) + rows.len() as u64;
        if let Some(limit) = self.config.abort_after
            && acked >= limit
        {
            tracing::error!(
                acked,
                "fault injection: aborting after publish, before storing the position"
            );
            std::process::abort();
        }
        Ok(())
    }
}

pub(crate) struct Row {
    pub cursor: Cursor,
    pub envelope: EventEnvelope,
}

type RowTuple = (
    String,
    i64,
    String,
    String,
    i64,
    String,
    String,
    serde_json::Value,
    serde_json::Value,
    DateTime<Utc>,
);

pub(crate) async fn fetch_batch(
    conn: &mut sqlx::PgConnection,
    after: Cursor,
    limit: i64,
) -> anyhow::Result<Vec<Row>> {
    let rows: Vec<RowTuple> = sqlx::query_as(
        "SELECT tx_id::text, global_position, aggregate_type, aggregate_id, sequence,
                event_type, event_version, payload, metadata, recorded_at
           FROM events
          WHERE (tx_id, global_position) > ($1::text::xid8, $2)
            AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
          ORDER BY events.tx_id, events.global_position
          LIMIT $3",
    )
    .bind(after.tx.to_string())
    .bind(after.position)
    .bind(limit)
    .fetch_all(conn)
    .await
    .context("reading new events")?;
    rows.into_iter()
        .map(
            |(
                tx,
                position,
                aggregate_type,
                aggregate_id,
                sequence,
                event_type,
                event_version,
                payload,
                metadata,
                recorded_at,
            )| {
                let serde_json::Value::Object(metadata) = metadata else {
                    bail!("event {position} has non-object metadata");
                };
                Ok(Row {
                    cursor: Cursor {
                        tx: tx.parse().context("xid8")?,
                        position,
                    },
                    envelope: EventEnvelope {
                        aggregate_type,
                        aggregate_id,
                        sequence,
                        position,
                        event_type,
                        event_version,
                        recorded_at,
                        metadata,
                        payload,
                    },
                })
            },
        )
        .collect()
}

fn message_headers(envelope: &EventEnvelope, cursor: Cursor) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(headers::MSG_ID, envelope.msg_id().as_str());
    map.insert(headers::EVENT_TYPE, envelope.event_type.as_str());
    map.insert(headers::EVENT_VERSION, envelope.event_version.as_str());
    map.insert(headers::AGGREGATE_TYPE, envelope.aggregate_type.as_str());
    map.insert(headers::AGGREGATE_ID, envelope.aggregate_id.as_str());
    map.insert(headers::SEQUENCE, envelope.sequence.to_string().as_str());
    map.insert(headers::POSITION, cursor.position.to_string().as_str());
    map.insert(headers::TX, cursor.tx.to_string().as_str());
    if let Some(serde_json::Value::String(traceparent)) = envelope.metadata.get("traceparent") {
        map.insert(headers::TRACEPARENT, traceparent.as_str());
    }
    map
}

fn cursor_of(map: &HeaderMap) -> Option<Cursor> {
    Some(Cursor {
        tx: map.get(headers::TX)?.as_str().parse().ok()?,
        position: map.get(headers::POSITION)?.as_str().parse().ok()?,
    })
}

pub async fn load_position(conn: &mut sqlx::PgConnection, stream: &str) -> anyhow::Result<Cursor> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT tx_id::text, global_position FROM relay_positions WHERE stream = $1",
    )
    .bind(stream)
    .fetch_optional(conn)
    .await
    .context("reading the relay position")?;
    Ok(match row {
        Some((tx, position)) => Cursor {
            tx: tx.parse().context("xid8")?,
            position,
        },
        None => Cursor::default(),
    })
}

async fn store_position(
    conn: &mut sqlx::PgConnection,
    stream: &str,
    cursor: Cursor,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO relay_positions (stream, tx_id, global_position, updated_at)
         VALUES ($1, $2::text::xid8, $3, now())
         ON CONFLICT (stream) DO UPDATE
            SET tx_id = EXCLUDED.tx_id, global_position = EXCLUDED.global_position,
                updated_at = EXCLUDED.updated_at",
    )
    .bind(stream)
    .bind(cursor.tx.to_string())
    .bind(cursor.position)
    .execute(conn)
    .await
    .context("storing the relay position")?;
    Ok(())
}
