//! Live feeds as Server-Sent Events, resumable without gaps or duplicates: domain events
//! ([`events`]), a job's log lines ([`logs`]) and GPU telemetry ([`telemetry`]).
//!
//! - **One JetStream subscription per stream for everyone**: a [`Fanout`] runs a single
//!   ordered consumer on every subject of its stream from the stream's tail, renders each
//!   message's JSON once, and fans it out through a bounded broadcast ring; each SSE
//!   connection filters what it needs from there.
//! - **History and resumes** (`Last-Event-ID`, a job's whole story, a log backlog) come from
//!   an ephemeral ordered consumer created for that connection ([`CatchUp`]), filtered to the
//!   subject it needs, from the sequence after the one the client saw; it is dropped (and so
//!   deleted by the server) once the connection has caught up, and the connection switches to
//!   the shared ring. Every message's `id:` is its JetStream stream sequence, so the switch
//!   drops what was already sent: no gap, no duplicate.
//! - **Bounded memory**: the ring holds `buffer` messages; a connection's feed is polled by the
//!   connection itself (the log feed, which also follows the job's events, has a task and a
//!   channel of [`CONNECTION_BUFFER`] frames); a connection whose client reads too slowly falls behind the
//!   ring, gets a `reset` event naming the last id it was sent (where to resume with
//!   `Last-Event-ID`), and is closed.
//! - Keep-alive comments every 15 s; every feed ends when the server shuts down.

pub mod events;
pub mod logs;
pub mod telemetry;

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::{Stream, StreamExt};
use poem_openapi::ApiResponse;
use poem_openapi::Object;
use poem_openapi::payload::Payload;
use poem_openapi::registry::{
    MetaMediaType, MetaResponse, MetaResponses, MetaSchema, MetaSchemaRef, Registry,
};
use poem_openapi::types::Type;
use tokio::sync::{broadcast, mpsc, watch};

/// The keep-alive comment period.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Frames queued between a log feed's task and its socket.
pub const CONNECTION_BUFFER: usize = 64;

/// One SSE message, rendered once and shared by every connection that sends it.
#[derive(Debug, Clone)]
pub struct Frame {
    /// `id:`: the JetStream stream sequence (none for a feed's closing `end`).
    pub id: Option<u64>,
    /// `event:`.
    pub event: Arc<str>,
    /// `data:`: JSON (one line: JSON strings escape their newlines).
    pub data: Arc<str>,
    /// The whole message as sent (`id:`, `event:`, `data:`, blank line): connections share
    /// these bytes, none formats or copies them.
    pub wire: bytes::Bytes,
}

impl Frame {
    pub fn new(id: Option<u64>, event: impl Into<Arc<str>>, data: &impl serde::Serialize) -> Self {
        Self::rendered(
            id,
            event.into(),
            serde_json::to_string(data)
                .expect("feed messages serialize")
                .into(),
        )
    }

    fn rendered(id: Option<u64>, event: Arc<str>, data: Arc<str>) -> Self {
        use std::fmt::Write;
        let mut wire = String::with_capacity(data.len() + event.len() + 32);
        if let Some(id) = id {
            let _ = writeln!(wire, "id: {id}");
        }
        let _ = writeln!(wire, "event: {event}");
        for line in data.lines() {
            let _ = writeln!(wire, "data: {line}");
        }
        wire.push('\n');
        Self {
            id,
            event,
            data,
            wire: wire.into(),
        }
    }

    /// The `reset` that closes a connection that fell behind: resume after `after`.
    pub fn reset(after: u64) -> Self {
        Self::new(
            Some(after),
            "reset",
            &serde_json::json!({
                "resume_after": after,
                "reason": "the client read too slowly and fell behind the server's buffer",
            }),
        )
    }
}

/// The body of a `reset` message.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct Reset {
    /// Reconnect with `Last-Event-ID` set to this to get everything after it.
    pub resume_after: i64,
    pub reason: String,
}

/// A feed as an HTTP response: `text/event-stream` of the frames' shared bytes, with a
/// keep-alive comment every [`KEEP_ALIVE`]; described in the OpenAPI document as a stream of
/// `U` (the union of what the feed sends).
pub struct SseFeed<U> {
    frames: futures::stream::BoxStream<'static, Frame>,
    _described_as: PhantomData<fn() -> U>,
}

impl<U> SseFeed<U> {
    pub fn new(frames: impl Stream<Item = Frame> + Send + 'static) -> Self {
        Self {
            frames: frames.boxed(),
            _described_as: PhantomData,
        }
    }
}

impl<U: Type> Payload for SseFeed<U> {
    const CONTENT_TYPE: &'static str = "text/event-stream";

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            items: Some(Box::new(U::schema_ref())),
            ..MetaSchema::new_with_format("array", "event-stream")
        }))
    }

    fn register(registry: &mut Registry) {
        U::register(registry);
    }
}

impl<U: Type> poem::IntoResponse for SseFeed<U> {
    fn into_response(self) -> poem::Response {
        let comment = bytes::Bytes::from_static(b":\n\n");
        let mut frames = self.frames;
        let mut keep_alive =
            tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
        let body = futures::stream::poll_fn(move |cx| {
            if let std::task::Poll::Ready(frame) = frames.poll_next_unpin(cx) {
                keep_alive.reset();
                return std::task::Poll::Ready(frame.map(|f| Ok::<_, std::io::Error>(f.wire)));
            }
            keep_alive.poll_tick(cx).map(|_| Some(Ok(comment.clone())))
        });
        poem::Response::builder()
            .content_type("text/event-stream")
            .header("X-Accel-Buffering", "no")
            .header("Cache-Control", "no-cache")
            .body(poem::Body::from_bytes_stream(body))
    }
}

impl<U: Type> ApiResponse for SseFeed<U> {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "",
                status: Some(200),
                status_range: None,
                content: vec![MetaMediaType {
                    content_type: Self::CONTENT_TYPE,
                    schema: Self::schema_ref(),
                }],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        U::register(registry);
    }
}

/// What a fan-out carries: a stream message decoded and rendered.
pub trait Message: Sized + Send + Sync + 'static {
    fn decode(sequence: u64, payload: &[u8]) -> anyhow::Result<Self>;
    /// The SSE `event:` of this message.
    fn event_type(&self) -> &str;
    fn render(&self) -> String;
}

/// One stream message as the fan-out and the catch-ups hand it out.
pub struct Entry<M> {
    pub sequence: u64,
    pub message: M,
    pub frame: Frame,
}

impl<M: Message> Entry<M> {
    fn decode(message: &jetstream::Message) -> anyhow::Result<Self> {
        let sequence = message
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        let decoded = M::decode(sequence, &message.payload)?;
        let frame = Frame::rendered(
            Some(sequence),
            decoded.event_type().into(),
            decoded.render().into(),
        );
        Ok(Self {
            sequence,
            message: decoded,
            frame,
        })
    }
}

/// The shared fan-out of one JetStream stream.
pub struct Fanout<M> {
    jetstream: jetstream::Context,
    stream: String,
    subjects: String,
    ring: broadcast::Sender<Arc<Entry<M>>>,
    /// The stream sequence after which the ring has every message (`None` until the shared
    /// subscription is up).
    covered_from: watch::Sender<Option<u64>>,
    shutdown: watch::Receiver<bool>,
}

impl<M> Clone for Fanout<M> {
    fn clone(&self) -> Self {
        Self {
            jetstream: self.jetstream.clone(),
            stream: self.stream.clone(),
            subjects: self.subjects.clone(),
            ring: self.ring.clone(),
            covered_from: self.covered_from.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

fn stream_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(error.kind(), jetstream::context::GetStreamErrorKind::JetStream(js)
        if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

impl<M: Message> Fanout<M> {
    /// Starts the shared subscription on `subjects` of `stream` (retrying until it works).
    /// `buffer`: messages the ring holds for slow connections.
    pub fn start(
        jetstream: jetstream::Context,
        stream: impl Into<String>,
        subjects: impl Into<String>,
        buffer: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let (ring, _) = broadcast::channel(buffer.max(16));
        let fanout = Self {
            jetstream,
            stream: stream.into(),
            subjects: subjects.into(),
            ring,
            covered_from: watch::channel(None).0,
            shutdown,
        };
        tokio::spawn(fanout.clone().follow());
        fanout
    }

    /// Feeds the ring from one ordered consumer, from the stream's tail at the start and then
    /// contiguously: after an error it resumes right after the last message it delivered.
    async fn follow(self) {
        let mut shutdown = self.shutdown.clone();
        let mut last = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            if let Err(error) = self.follow_once(&mut last).await {
                tracing::debug!(stream = %self.stream, %error, "feed subscription interrupted; retrying");
            }
            tokio::select! {
                _ = shutdown.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    fn covered(&self, from: u64) {
        self.covered_from.send_if_modified(|covered| {
            let first = covered.is_none();
            covered.get_or_insert(from);
            first
        });
    }

    async fn follow_once(&self, last: &mut Option<u64>) -> anyhow::Result<()> {
        let mut stream = match self.jetstream.get_stream(&self.stream).await {
            Ok(stream) => stream,
            Err(error) if stream_not_found(&error) => {
                // Nothing was ever published: the ring will cover everything from the start.
                last.get_or_insert(0);
                self.covered(0);
                anyhow::bail!("stream {} does not exist yet", self.stream);
            }
            Err(error) => return Err(error.into()),
        };
        let from = match *last {
            Some(last) => last,
            None => stream.info().await?.state.last_sequence,
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from + 1,
                },
                filter_subject: self.subjects.clone(),
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        *last = Some(from);
        self.covered(from);
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                next = messages.next() => {
                    let Some(message) = next else { anyhow::bail!("the subscription ended") };
                    let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
                    match Entry::decode(&message) {
                        Ok(entry) => {
                            *last = Some(entry.sequence);
                            // No receiver is fine: nobody is listening.
                            let _ = self.ring.send(Arc::new(entry));
                        }
                        Err(error) => {
                            // Not ours to judge: skip what does not decode, keep the rest flowing.
                            let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
                            tracing::warn!(stream = %self.stream, sequence, %error, "undecodable message skipped by the feed");
                            *last = Some(sequence.max(last.unwrap_or(0)));
                        }
                    }
                }
            }
        }
    }

    /// The stream's last sequence now (0 before the first message, or without the stream).
    pub async fn now(&self) -> anyhow::Result<u64> {
        match self.jetstream.get_stream(&self.stream).await {
            Ok(mut stream) => Ok(stream.info().await?.state.last_sequence),
            Err(error) if stream_not_found(&error) => Ok(0),
            Err(error) => Err(anyhow::anyhow!("{error}")),
        }
    }

    /// A receiver on the ring: everything the shared subscription delivers from now on.
    /// Subscribe before catching up, so that nothing published meanwhile is missed.
    pub fn subscribe(&self) -> Live<M> {
        Live {
            ring: self.ring.subscribe(),
            covered: self.covered_from.subscribe(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// The stored messages on `subject` after `after`, up to the stream's end as it is now.
    pub async fn catch_up(&self, subject: String, after: u64) -> anyhow::Result<CatchUp<M>> {
        let mut stream = match self.jetstream.get_stream(&self.stream).await {
            Ok(stream) => stream,
            Err(error) if stream_not_found(&error) => return Ok(CatchUp::empty(after)),
            Err(error) => return Err(error.into()),
        };
        let end = stream.info().await?.state.last_sequence;
        if end <= after {
            return Ok(CatchUp::empty(after));
        }
        // Named, so that it is deleted as soon as the connection is done with it (the server
        // would drop an idle ordered consumer only after 30 s).
        let name = format!("overfly-feed-{}", uuid::Uuid::new_v4().simple());
        let mut consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                name: Some(name.clone()),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                filter_subject: subject,
                ..Default::default()
            })
            .await?;
        let mut catch_up = CatchUp::empty(end);
        catch_up.consumer = Some((stream, name));
        if consumer.info().await?.num_pending > 0 {
            catch_up.messages = Some(consumer.messages().await?);
        }
        Ok(catch_up)
    }
}

/// One connection's view of the ring.
pub struct Live<M> {
    ring: broadcast::Receiver<Arc<Entry<M>>>,
    covered: watch::Receiver<Option<u64>>,
    shutdown: watch::Receiver<bool>,
}

pub enum Next<M> {
    Entry(Arc<Entry<M>>),
    /// The connection fell behind the ring: it must be reset.
    Lagged,
    /// Server shutdown.
    Closed,
}

impl<M> Live<M> {
    /// Waits until the shared subscription is up (before that, the ring may miss messages);
    /// false on shutdown.
    pub async fn ready(&mut self) -> bool {
        tokio::select! {
            covered = self.covered.wait_for(Option::is_some) => covered.is_ok(),
            _ = self.shutdown.wait_for(|closing| *closing) => false,
        }
    }

    pub async fn next(&mut self) -> Next<M> {
        if *self.shutdown.borrow() {
            return Next::Closed;
        }
        tokio::select! {
            _ = self.shutdown.changed() => Next::Closed,
            next = self.ring.recv() => match next {
                Ok(entry) => Next::Entry(entry),
                Err(broadcast::error::RecvError::Lagged(_)) => Next::Lagged,
                Err(broadcast::error::RecvError::Closed) => Next::Closed,
            },
        }
    }
}

/// A connection's catch-up: an ephemeral ordered consumer, deleted when dropped.
pub struct CatchUp<M> {
    messages: Option<consumer::pull::Ordered>,
    /// The consumer to delete when done.
    consumer: Option<(jetstream::stream::Stream, String)>,
    end: u64,
    _message: PhantomData<fn() -> M>,
}

impl<M> Drop for CatchUp<M> {
    fn drop(&mut self) {
        self.messages = None;
        if let Some((stream, name)) = self.consumer.take() {
            tokio::spawn(async move {
                if let Err(error) = stream.delete_consumer(&name).await {
                    tracing::debug!(%error, consumer = %name, "deleting a feed's catch-up consumer failed; the server drops it when idle");
                }
            });
        }
    }
}

impl<M: Message> CatchUp<M> {
    fn empty(end: u64) -> Self {
        Self {
            messages: None,
            consumer: None,
            end,
            _message: PhantomData,
        }
    }

    /// The last stream sequence this catch-up covers.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The next stored message on the subject, up to [`Self::end`]; `None` when caught up.
    pub async fn next(&mut self) -> anyhow::Result<Option<Entry<M>>> {
        let Some(messages) = self.messages.as_mut() else {
            return Ok(None);
        };
        // Nothing more before the end: the consumer waits for new messages, so a quiet
        // subject ends the catch-up after a short wait (the pending count normally ends it).
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
        let message = match next {
            Ok(Some(message)) => message.map_err(|e| anyhow::anyhow!("{e}"))?,
            Ok(None) | Err(_) => {
                self.messages = None;
                return Ok(None);
            }
        };
        let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        if sequence > self.end {
            self.messages = None;
            return Ok(None);
        }
        if sequence >= self.end || pending == 0 {
            self.messages = None;
        }
        Entry::decode(&message).map(Some)
    }
}

/// A stream of frames fed by a task through a bounded channel; the task stops when the
/// client goes (the channel closes).
pub fn frames<F, Fut>(producer: F) -> impl Stream<Item = Frame> + Send + use<F, Fut>
where
    F: FnOnce(mpsc::Sender<Frame>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(CONNECTION_BUFFER);
    tokio::spawn(producer(tx));
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Which messages of a fan-out a connection wants (may look things up, hence async).
pub trait Select<M>: Send + 'static {
    fn accepts(&mut self, message: &M) -> impl std::future::Future<Output = bool> + Send;
}

/// The common feed: the stored messages on `subject` after `after` (when given), then live
/// from the ring, those `select` accepts, each once, in stream order; a `reset` if the
/// client falls behind. Without `after` the feed starts after the stream's end at connect
/// time, straight from the ring (no catch-up consumer).
///
/// The stream is polled by the connection itself (no task, no channel per connection): a
/// client that stops reading stops the polling, falls behind the ring, and on its next read
/// gets the `reset`.
pub async fn feed<M: Message, S: Select<M>>(
    fanout: &Fanout<M>,
    subject: String,
    after: Option<u64>,
    select: S,
) -> anyhow::Result<impl Stream<Item = Frame> + Send + use<M, S>> {
    let live = fanout.subscribe();
    // Without `after`: the stream's end now, read after subscribing (everything after it
    // reaches the receiver) and at connect time, not when the body is first polled.
    let start = match after {
        Some(after) => Start::CatchUp(after),
        None => Start::Live(fanout.now().await?),
    };
    let state = FeedState {
        live,
        fanout: fanout.clone(),
        select,
        subject,
        last: 0,
        phase: Phase::Start(start),
    };
    Ok(futures::stream::unfold(state, |mut state| async move {
        let frame = state.next().await?;
        Some((frame, state))
    }))
}

enum Start {
    /// Send the stored messages after this sequence, then live.
    CatchUp(u64),
    /// Live after this sequence (the stream's end at connect).
    Live(u64),
}

enum Phase<M> {
    Start(Start),
    /// Boxed: a live connection does not carry a catch-up's size.
    CatchingUp(Box<CatchUp<M>>),
    Live,
    Done,
}

struct FeedState<M, S> {
    fanout: Fanout<M>,
    live: Live<M>,
    select: S,
    subject: String,
    /// The last stream sequence covered (sent, or not selected).
    last: u64,
    phase: Phase<M>,
}

impl<M: Message, S: Select<M>> FeedState<M, S> {
    async fn next(&mut self) -> Option<Frame> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::Done) {
                Phase::Done => return None,
                Phase::Start(start) => {
                    if !self.live.ready().await {
                        return None;
                    }
                    // The ring has everything after where the shared subscription started; a
                    // live start before that (the service just started) catches up the rest.
                    let covered = (*self.live.covered.borrow()).unwrap_or(0);
                    match start {
                        Start::Live(now) if now >= covered => {
                            self.last = now;
                            self.phase = Phase::Live;
                        }
                        Start::Live(after) | Start::CatchUp(after) => {
                            self.last = after;
                            match self.fanout.catch_up(self.subject.clone(), after).await {
                                Ok(catch_up) => self.phase = Phase::CatchingUp(Box::new(catch_up)),
                                Err(error) => {
                                    tracing::debug!(%error, "catching a feed up failed");
                                    return None;
                                }
                            }
                        }
                    }
                }
                Phase::CatchingUp(mut catch_up) => match catch_up.next().await {
                    Ok(Some(entry)) => {
                        self.last = self.last.max(entry.sequence);
                        self.phase = Phase::CatchingUp(catch_up);
                        if self.select.accepts(&entry.message).await {
                            return Some(entry.frame);
                        }
                    }
                    // Caught up: the catch-up (and its consumer) goes.
                    Ok(None) => {
                        self.last = self.last.max(catch_up.end());
                        self.phase = Phase::Live;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "catching a feed up failed");
                        return None;
                    }
                },
                Phase::Live => match self.live.next().await {
                    Next::Entry(entry) => {
                        self.phase = Phase::Live;
                        if entry.sequence <= self.last {
                            continue;
                        }
                        self.last = entry.sequence;
                        if self.select.accepts(&entry.message).await {
                            return Some(entry.frame.clone());
                        }
                    }
                    // Then `Done`: the connection closes after the reset.
                    Next::Lagged => return Some(Frame::reset(self.last)),
                    Next::Closed => return None,
                },
            }
        }
    }
}

/// The query service's fan-outs: events, logs, telemetry.
#[derive(Clone)]
pub struct Feeds {
    pub events: events::Hub,
    pub logs: logs::LogHub,
    pub telemetry: telemetry::TelemetryHub,
}

impl Feeds {
    /// Starts the three shared subscriptions; `buffer`: messages each ring holds.
    pub fn start(
        nats: async_nats::Client,
        events_stream: String,
        buffer: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        use overfly_schemas::subjects;
        let js = jetstream::new(nats);
        Self {
            events: Fanout::start(
                js.clone(),
                events_stream,
                subjects::EVENTS_ALL,
                buffer,
                shutdown.clone(),
            ),
            logs: Fanout::start(
                js.clone(),
                subjects::LOGS_STREAM,
                subjects::LOGS_ALL,
                buffer,
                shutdown.clone(),
            ),
            telemetry: Fanout::start(
                js,
                subjects::TELEMETRY_STREAM,
                subjects::TELEMETRY_ALL,
                buffer,
                shutdown,
            ),
        }
    }
}
