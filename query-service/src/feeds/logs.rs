//! A job's log lines (`GET /jobs/{id}/logs`): the batches executors publish on
//! `OVERFLY_LOGS` (`overfly.logs.<job>.<run>`), the backlog (optionally only its last `tail`
//! lines) then live, and a final `end` once the job is finished.
//!
//! "Finished" is the job's terminal event (`JobSucceeded`, `JobFailed`, `JobCancelled`) with
//! no run still active: a job cancelled while running ends when its run's stop is reported.
//! An executor publishes (and JetStream acknowledges) a run's last log batch before it
//! reports the run's end, so when the job is finished its every line is in the stream: the
//! feed reads what is left up to the stream's end as it is then, sends `end`, and closes.

use std::collections::{HashSet, VecDeque};

use chrono::{DateTime, Utc};
use overfly_domain::job::JobEvent;
use overfly_schemas::wire::LogBatch;
use poem_openapi::Object;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::events::{FeedEvent, Hub};
use super::{Entry, Fanout, Frame, Message, Next};

/// The shared fan-out of the logs stream.
pub type LogHub = Fanout<Logged>;

/// One log batch as the feed carries it.
pub struct Logged(pub LogBatch);

impl Message for Logged {
    fn decode(_sequence: u64, payload: &[u8]) -> anyhow::Result<Self> {
        Ok(Self(serde_json::from_slice(payload)?))
    }

    fn event_type(&self) -> &str {
        "log"
    }

    fn render(&self) -> String {
        serde_json::to_string(&self.0).expect("log batches serialize")
    }
}

/// The `end` message: the job is finished and every line of it was sent.
#[derive(Debug, Clone, PartialEq, Object, serde::Serialize)]
pub struct LogEnd {
    pub job_id: Uuid,
    /// `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// When the job reached that state.
    pub at: DateTime<Utc>,
}

/// What the client asked for.
#[derive(Debug, Clone)]
pub struct Request {
    pub job_id: Uuid,
    /// Only this run's lines.
    pub run_id: Option<Uuid>,
    /// Keep the connection open for new lines until the job is finished.
    pub follow: bool,
    /// Only the last `tail` lines of the backlog.
    pub tail: Option<usize>,
    /// Resume after this stream sequence (`Last-Event-ID`; `tail` is then ignored).
    pub after: Option<u64>,
}

/// Whether the job is finished, folded from its events.
#[derive(Debug, Default)]
struct Progress {
    version: i64,
    active_runs: HashSet<Uuid>,
    ended: Option<(&'static str, DateTime<Utc>)>,
}

impl Progress {
    fn apply(&mut self, sequence: i64, event: &JobEvent) {
        if sequence <= self.version {
            return;
        }
        self.version = sequence;
        match event {
            JobEvent::RunAssigned { run_id, .. } => {
                self.active_runs.insert(*run_id);
            }
            JobEvent::RunSucceeded { run_id, .. }
            | JobEvent::RunFailed { run_id, .. }
            | JobEvent::RunTimedOut { run_id, .. } => {
                self.active_runs.remove(run_id);
            }
            JobEvent::JobSucceeded { at, .. } => self.ended = Some(("succeeded", *at)),
            JobEvent::JobFailed { at, .. } => self.ended = Some(("failed", *at)),
            JobEvent::JobCancelled { at, .. } => self.ended = Some(("cancelled", *at)),
            _ => {}
        }
    }

    fn end(&self, job_id: Uuid) -> Option<LogEnd> {
        match self.ended {
            Some((state, at)) if self.active_runs.is_empty() => Some(LogEnd {
                job_id,
                state: state.to_string(),
                at,
            }),
            _ => None,
        }
    }

    /// Folds the job's events from the store; `None` if the job does not exist.
    async fn load(pool: &sqlx::PgPool, job_id: Uuid) -> anyhow::Result<Option<Self>> {
        let rows: Vec<(i64, serde_json::Value)> = sqlx::query_as(
            "SELECT sequence, payload FROM events
              WHERE aggregate_type = 'job' AND aggregate_id = $1 ORDER BY sequence",
        )
        .bind(job_id.to_string())
        .fetch_all(pool)
        .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut progress = Self::default();
        for (sequence, payload) in rows {
            progress.apply(sequence, &serde_json::from_value(payload)?);
        }
        Ok(Some(progress))
    }

    fn apply_feed_event(&mut self, job_id: Uuid, event: &FeedEvent) {
        if event.aggregate_type != "job" || event.aggregate_id != job_id.to_string() {
            return;
        }
        match serde_json::from_value::<JobEvent>(event.payload.clone()) {
            Ok(job_event) => self.apply(event.sequence, &job_event),
            Err(error) => {
                tracing::warn!(%error, event_type = %event.event_type, "job event not understood by the log feed")
            }
        }
    }
}

/// The job's log feed; `None` if the job does not exist.
pub async fn feed(
    logs: &LogHub,
    events: &Hub,
    pool: sqlx::PgPool,
    request: Request,
) -> anyhow::Result<Option<impl futures::Stream<Item = Frame> + Send + use<>>> {
    // Subscribed before folding and catching up: nothing that happens meanwhile is missed.
    let mut live_logs = logs.subscribe();
    let mut live_events = events.subscribe();
    let Some(progress) = Progress::load(&pool, request.job_id).await? else {
        return Ok(None);
    };
    let logs = logs.clone();
    Ok(Some(super::frames(move |tx| async move {
        if !live_logs.ready().await || !live_events.ready().await {
            return;
        }
        let mut feed = Feed {
            logs,
            pool,
            request,
            progress,
            last: 0,
            tx,
        };
        if let Err(error) = feed.run(&mut live_logs, &mut live_events).await {
            tracing::debug!(%error, "log feed ended");
        }
    })))
}

struct Feed {
    logs: LogHub,
    pool: sqlx::PgPool,
    request: Request,
    progress: Progress,
    /// The last stream sequence covered (sent, or not this job's).
    last: u64,
    tx: mpsc::Sender<Frame>,
}

impl Feed {
    fn subject(&self) -> String {
        let run = self
            .request
            .run_id
            .map_or_else(|| "*".to_string(), |run| run.to_string());
        overfly_schemas::subjects::log_subject(&self.request.job_id.to_string(), &run)
    }

    fn wanted(&self, batch: &LogBatch) -> bool {
        batch.job_id == self.request.job_id
            && self.request.run_id.is_none_or(|run| run == batch.run_id)
    }

    async fn run(
        &mut self,
        live_logs: &mut super::Live<Logged>,
        live_events: &mut super::Live<FeedEvent>,
    ) -> anyhow::Result<()> {
        self.backlog().await?;
        if !self.request.follow {
            return self.end_if_finished().await;
        }
        if self.progress.end(self.request.job_id).is_some() {
            return self.finish().await;
        }
        loop {
            tokio::select! {
                () = self.tx.closed() => return Ok(()),
                next = live_logs.next() => match next {
                    Next::Entry(entry) => {
                        if entry.sequence <= self.last {
                            continue;
                        }
                        self.last = entry.sequence;
                        if self.wanted(&entry.message.0) {
                            self.tx.send(entry.frame.clone()).await?;
                        }
                    }
                    Next::Lagged => {
                        self.tx.send(Frame::reset(self.last)).await?;
                        return Ok(());
                    }
                    Next::Closed => return Ok(()),
                },
                next = live_events.next() => {
                    match next {
                        Next::Entry(entry) => {
                            self.progress.apply_feed_event(self.request.job_id, &entry.message);
                        }
                        // Missed job events: read them from the store instead.
                        Next::Lagged => {
                            if let Some(progress) = Progress::load(&self.pool, self.request.job_id).await? {
                                self.progress = progress;
                            }
                        }
                        Next::Closed => return Ok(()),
                    }
                    if self.progress.end(self.request.job_id).is_some() {
                        return self.finish().await;
                    }
                }
            }
        }
    }

    /// The stored lines after the start point (only the last `tail` of them, when asked).
    async fn backlog(&mut self) -> anyhow::Result<()> {
        let after = self.request.after.unwrap_or(0);
        let tail = self.request.tail.filter(|_| self.request.after.is_none());
        let mut catch_up = self.logs.catch_up(self.subject(), after).await?;
        let mut kept: VecDeque<Entry<Logged>> = VecDeque::new();
        let mut kept_lines = 0usize;
        while let Some(entry) = catch_up.next().await? {
            self.last = self.last.max(entry.sequence);
            if !self.wanted(&entry.message.0) {
                continue;
            }
            let Some(tail) = tail else {
                self.tx.send(entry.frame).await?;
                continue;
            };
            kept_lines += entry.message.0.lines.len();
            kept.push_back(entry);
            while let Some(front) = kept.front() {
                if kept_lines - front.message.0.lines.len() < tail {
                    break;
                }
                kept_lines -= front.message.0.lines.len();
                kept.pop_front();
            }
        }
        self.last = self.last.max(catch_up.end()).max(after);
        if let Some(tail) = tail {
            let mut surplus = kept_lines.saturating_sub(tail);
            for entry in kept {
                let frame = if surplus > 0 {
                    // The oldest batch kept starts before the tail: send only its last lines
                    // (fewer than it holds, by the loop above).
                    let mut batch = entry.message.0;
                    batch.lines.drain(..surplus.min(batch.lines.len()));
                    surplus = 0;
                    Frame::new(Some(entry.sequence), "log", &batch)
                } else {
                    entry.frame
                };
                self.tx.send(frame).await?;
            }
        }
        Ok(())
    }

    async fn end_if_finished(&mut self) -> anyhow::Result<()> {
        if let Some(end) = self.progress.end(self.request.job_id) {
            self.tx.send(Frame::new(None, "end", &end)).await?;
        }
        Ok(())
    }

    /// The job is finished: its last lines are in the stream by now; send them, then `end`.
    async fn finish(&mut self) -> anyhow::Result<()> {
        let mut rest = self.logs.catch_up(self.subject(), self.last).await?;
        while let Some(entry) = rest.next().await? {
            if self.wanted(&entry.message.0) {
                self.tx.send(entry.frame).await?;
            }
        }
        self.end_if_finished().await
    }
}
