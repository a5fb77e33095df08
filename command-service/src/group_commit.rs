//! Group commit: the single-event appends of concurrent commands share one `INSERT` (one
//! statement, one transaction, one WAL flush), the way Postgres itself groups WAL flushes,
//! but one level up where it also saves a statement per command.
//!
//! Each command still gets its own answer: appended at a global position, or a conflict
//! when its `(aggregate_type, aggregate_id, sequence)` is taken (by another command in the
//! same batch or already in the table), which cqrs-es turns into a re-run on fresh state.
//! A command is answered only after the statement committed, so an acknowledged event is
//! durable exactly as with one statement per command.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};

/// Appends taken into one statement at most.
const MAX_BATCH: usize = 256;
/// Statements in flight at once: while one waits for its commit, the next batch forms.
const WRITERS: usize = 2;

/// One event to append, with everything the `events` row needs.
pub struct Row {
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub metadata: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed at this global position.
    Appended(i64),
    /// The aggregate's sequence number is taken: another command won the race.
    Conflict,
}

type Reply = Result<Outcome, String>;

struct Pending {
    row: Row,
    reply: oneshot::Sender<Reply>,
}

#[derive(Clone)]
pub struct GroupAppender {
    queue: mpsc::Sender<Pending>,
}

impl GroupAppender {
    /// Starts the writers; they stop when the last `GroupAppender` clone is dropped.
    pub fn start(pool: PgPool) -> Self {
        let (queue, receiver) = mpsc::channel(MAX_BATCH * 8);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..WRITERS {
            tokio::spawn(writer(pool.clone(), receiver.clone()));
        }
        Self { queue }
    }

    pub async fn append(&self, row: Row) -> Reply {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { row, reply })
            .await
            .map_err(|_| "the event writer has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the event writer dropped the append".to_string())?
    }
}

async fn writer(pool: PgPool, receiver: Arc<Mutex<mpsc::Receiver<Pending>>>) {
    loop {
        let mut batch = Vec::new();
        {
            let mut receiver = receiver.lock().await;
            match receiver.recv().await {
                Some(first) => batch.push(first),
                None => return,
            }
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        }
        write(&pool, batch).await;
    }
}

type Key = (&'static str, String, i64);

async fn write(pool: &PgPool, mut batch: Vec<Pending>) {
    // Rows in key order: two statements in flight then lock keys in the same order and can
    // never deadlock on each other.
    batch.sort_by(|a, b| {
        (a.row.aggregate_type, &a.row.aggregate_id, a.row.sequence).cmp(&(
            b.row.aggregate_type,
            &b.row.aggregate_id,
            b.row.sequence,
        ))
    });
    // The same aggregate and sequence twice in one batch: the later command lost the race.
    let mut keys = HashSet::with_capacity(batch.len());
    let mut pending = Vec::with_capacity(batch.len());
    for item in batch {
        let key = (
            item.row.aggregate_type,
            item.row.aggregate_id.clone(),
            item.row.sequence,
        );
        if keys.insert(key) {
            pending.push(item);
        } else {
            let _ = item.reply.send(Ok(Outcome::Conflict));
        }
    }
    let rows: Vec<&Row> = pending.iter().map(|item| &item.row).collect();
    match insert(pool, &rows).await {
        Ok(positions) => {
            for item in pending {
                let key = (
                    item.row.aggregate_type,
                    item.row.aggregate_id,
                    item.row.sequence,
                );
                let outcome = positions
                    .get(&key)
                    .map_or(Outcome::Conflict, |&position| Outcome::Appended(position));
                let _ = item.reply.send(Ok(outcome));
            }
        }
        Err(error) => {
            let message = error.to_string();
            for item in pending {
                let _ = item.reply.send(Err(message.clone()));
            }
        }
    }
}

async fn insert(pool: &PgPool, rows: &[&Row]) -> Result<HashMap<Key, i64>, sqlx::Error> {
    let returned: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "INSERT INTO events
                (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version,
                e.payload, e.metadata
           FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                       $6::jsonb[], $7::jsonb[]) WITH ORDINALITY
                AS e(aggregate_type, aggregate_id, sequence, event_type, event_version,
                     payload, metadata, ord)
          ORDER BY e.ord
         ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING
         RETURNING aggregate_type, aggregate_id, sequence, global_position",
    )
    .bind(rows.iter().map(|r| r.aggregate_type).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.aggregate_id.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.sequence).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.event_type.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.event_version.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| &r.payload).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| &r.metadata).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    let types: HashMap<&str, &'static str> = rows
        .iter()
        .map(|r| (r.aggregate_type, r.aggregate_type))
        .collect();
    Ok(returned
        .into_iter()
        .filter_map(|(aggregate_type, aggregate_id, sequence, position)| {
            let aggregate_type = *types.get(aggregate_type.as_str())?;
            Some(((aggregate_type, aggregate_id, sequence), position))
        })
        .collect())
}
