//! `bench-sse`: the live feed `GET /stream` of `overfly-query` with 1,000 and then 10,000
//! concurrent SSE clients on loopback while events are produced at a fixed rate, against the
//! physical ceiling of delivering the same bytes to the same number of connections, in the same
//! run, rounds alternating.
//!
//! Set-up (release binaries, all child processes): a scratch database, a private nats-server,
//! `overfly-command serve --scheduler-enabled false` (so each `POST /jobs` is exactly one event,
//! `JobSubmitted`) and `overfly-query serve`. The path of an event ("ours"): Postgres event
//! store → relay → JetStream → the query service's one shared consumer → broadcast ring → every
//! SSE connection.
//!
//! The ceiling is this same binary started again as a child process (`--ceiling-server`): a
//! minimal tokio TCP server with the same shape as the feed's fan-out (one task per connection,
//! one broadcast ring of `--feed-buffer` events) but nothing else — no HTTP framework, no
//! per-connection filtering or serialization. On each event it stamps `recorded_at` and the
//! sequence into one real feed message captured from ours during the warm-up (same fields, same
//! size), serializes it once, and writes that pre-framed SSE chunk to every connection. Both
//! sides are driven at the same rate by the same producer loop (ours: `POST /jobs` to the command
//! service; the ceiling: one line on the child's stdin), and measured by the same client code.
//! A separate process, like the query service, so the ceiling does not share the clients'
//! runtime. Like hyper, which puts every body frame already queued into one `writev`, a ceiling
//! connection writes all it finds in the ring in one write, and it leaves Nagle on as poem does:
//! a first version writing one event per syscall with `TCP_NODELAY` fell behind ours at 10,000
//! clients, which a ceiling must not.
//!
//! The default rate, 10 events/s, is 100,000 deliveries a second at 10,000 clients: on 2 cores,
//! with the clients on the same machine, that already keeps both cores busy, and the ceiling's
//! p99 sits near 250 ms. (At 1 event/s a single fan-out to 10,000 sockets still takes 60–230 ms
//! for the ceiling: the write per connection, loopback delivery included, is the floor.)
//!
//! Clients are raw tokio `TcpStream`s (`GET /stream HTTP/1.1`, chunked decoding, SSE messages
//! split at the blank line), not reqwest: 10,000 of them must stay cheap. Every client counts
//! the ids it receives; an evenly spread sample of probe clients (`--probes`) also parses each
//! `data:` for `recorded_at` and `position`. Per round and side:
//!
//! 1. connect `clients` (at most `--connect-concurrency` handshakes at a time), wait until every
//!    one has the `200` headers, settle, and read the server's `VmRSS` before and after:
//!    KiB per idle connection;
//! 2. produce `rate × seconds` events at the fixed rate, wait until every client has the last
//!    one (or `--drain-s` passed), and count per client what it got of the window's ids
//!    (missing, duplicates, resets);
//! 3. latency = probe's receive time − `recorded_at` (the event store's time of the event for
//!    ours, the emit time for the ceiling; same machine clock), p50/p99 over the probes; events
//!    delivered per second in total = deliveries to all clients ÷ (first emit → last delivery).
//!
//! After each round the clients close (with a reset: see `open_stream`) and the bench waits
//! until the server has closed its sockets again, so every round starts from the same baseline;
//! how long that took is reported. CPU is read from `/proc` for the server, for this process
//! (the clients) and for the whole machine over the load window: on 2 cores the clients take a
//! good part of it, for ours and the ceiling alike.
//!
//! For ours the bench also subscribes to the event subjects on core NATS and splits the
//! latency at the moment an event reaches NATS: relay lag (`recorded_at` → NATS) and the query
//! service's own fan-out (NATS → client). The fan-out part is what the ceiling's latency
//! compares with like for like; the end-to-end figure is the one the goal names.
//!
//! Rounds alternate (ours first in odd rounds, the ceiling first in even ones); the ratios
//! (latency p99 and delivered events/s, ours ÷ ceiling) are taken per round and their median
//! reported, as the machine is noisy. A benchmark, not a test: it reports the goals (10,000
//! clients on 2 cores, p99 < 250 ms, < 64 KiB RSS per idle connection), it does not assert them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use chrono::{DateTime, Utc};
use clap::Parser;
use futures::StreamExt;
use overfly_bench::{Processes, free_port, percentile, wait_port, wait_ready, with_database};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{ChildStdin, Command};
use tokio::sync::{Semaphore, broadcast, watch};

const GOAL_CLIENTS: usize = 10_000;
const GOAL_P99_MS: f64 = 250.0;
const GOAL_RSS_PER_IDLE_KIB: f64 = 64.0;
const DATABASE: &str = "overfly_bench_sse";
const STREAM: &str = "OVERFLY_EVENTS";

#[derive(Debug, Parser)]
#[command(
    name = "bench-sse",
    about = "SSE live feed with 1,000 and 10,000 clients vs. a bare fan-out of the same bytes"
)]
struct Args {
    /// Server to use; its database name is replaced by the scratch database's.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/overfly"
    )]
    database_url: String,
    /// Concurrent SSE clients, one level after the other.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    clients: Vec<usize>,
    /// Events produced per second while measuring. At 10,000 clients, 20/s (200,000 deliveries
    /// a second) already saturates 2 cores with the clients on the same machine, the ceiling too.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seconds of production per round.
    #[arg(long, default_value_t = 15.0)]
    seconds: f64,
    /// Rounds of ours and of the ceiling per client level (alternating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Clients that also parse every `data:` for the latency (spread evenly).
    #[arg(long, default_value_t = 100)]
    probes: usize,
    /// Connection handshakes in flight at once while connecting.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Wait after the last client got its headers before reading the idle RSS.
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// After the last event was produced, wait at most this long for every client to get it.
    #[arg(long, default_value_t = 30)]
    drain_s: u64,
    /// Events the query service's feed ring holds (`--feed-buffer`); the ceiling's ring too.
    #[arg(long, default_value_t = 4096)]
    feed_buffer: usize,
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    #[arg(long, default_value = "ops/bench/results/sse-latest.json")]
    output: PathBuf,
    /// Scratch directory (NATS store, logs).
    #[arg(long, default_value = ".overfly/bench-sse")]
    state: PathBuf,
    /// Internal: run as the ceiling server (template and emits on stdin, port on stdout).
    #[arg(long, hide = true)]
    ceiling_server: bool,
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// Resident set of a process, KiB (`VmRSS`).
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

/// CPU time (user + system) of a process so far, seconds (`/proc/<pid>/stat`, USER_HZ = 100).
fn cpu_s(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    // After the command: state is field 3; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => (user + system) / 100.0,
        _ => f64::NAN,
    }
}

/// Open file descriptors of a process (sockets included).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// The soft limit on open files of this process (`/proc/self/limits`).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Report.

#[derive(Debug, Serialize)]
struct Report {
    date: DateTime<Utc>,
    machine: Value,
    settings: Value,
    levels: Vec<Level>,
    goals: Value,
}

#[derive(Debug, Serialize)]
struct Level {
    clients: usize,
    ours: SideSummary,
    ceiling: SideSummary,
    /// Median over rounds of ours' latency p99 ÷ the ceiling's (end to end for ours).
    latency_p99_ratio_median: f64,
    latency_p99_round_ratios: Vec<f64>,
    /// The same with ours' latency from the event's arrival on NATS (the query service's own
    /// fan-out, like for like with the ceiling).
    fanout_p99_ratio_median: f64,
    fanout_p99_round_ratios: Vec<f64>,
    /// Median over rounds of ours' delivered events/s ÷ the ceiling's.
    delivered_ratio_median: f64,
    delivered_round_ratios: Vec<f64>,
    rounds: Vec<RoundReport>,
}

#[derive(Debug, Serialize)]
struct SideSummary {
    /// Medians over rounds.
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    fanout_p50_ms: Option<f64>,
    fanout_p99_ms: Option<f64>,
    relay_lag_p99_ms: Option<f64>,
    delivered_events_per_s: f64,
    server_cpu_cores: f64,
    /// After the clients closed: until the server had closed its sockets.
    server_released_s: f64,
    /// The largest over rounds (the first round usually: later ones reuse freed memory).
    rss_per_idle_connection_kib: f64,
    /// Totals over rounds.
    connect_failures: usize,
    missing: u64,
    duplicates: u64,
    resets: usize,
    streams_ended: usize,
}

#[derive(Debug, Clone, Serialize)]
struct RoundReport {
    side: &'static str,
    round: usize,
    clients: usize,
    connected: usize,
    connect_failures: usize,
    /// A sample of the connect errors, if any.
    connect_error: Option<String>,
    connect_s: f64,
    server_rss_before_kib: u64,
    server_rss_idle_kib: u64,
    rss_per_idle_connection_kib: f64,
    /// Events produced in the window (every connected client should get each one).
    events: u64,
    /// Window events received, all clients together.
    deliveries: u64,
    missing: u64,
    duplicates: u64,
    resets: usize,
    /// Streams the server ended (or that failed) before the round was over.
    streams_ended: usize,
    /// First emit → last delivery.
    span_s: f64,
    delivered_events_per_s: f64,
    /// Last emit → every client had the last event.
    drain_s: f64,
    latency_samples: usize,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    latency_max_ms: f64,
    /// Ours: from the event's arrival on NATS to the client.
    fanout_p50_ms: Option<f64>,
    fanout_p99_ms: Option<f64>,
    /// Ours: from `recorded_at` to the event's arrival on NATS.
    relay_lag_p50_ms: Option<f64>,
    relay_lag_p99_ms: Option<f64>,
    /// CPU of the server process (query service or ceiling) while producing and draining.
    server_cpu_cores: f64,
    /// CPU of this process (the clients) over the same time.
    bench_cpu_cores: f64,
    /// CPU of the whole machine over the same time (every process, the kernel's network work).
    machine_cpu_cores: f64,
    /// After the clients closed their connections: until the server had closed its sockets.
    server_released_s: f64,
    /// CPU of the server while every client was connected and no event came (the settle time).
    server_idle_cpu_cores: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn ms(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e3
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// One latency sample of a probe client.
#[derive(Debug, Clone, Copy)]
struct Sample {
    id: u64,
    position: i64,
    recorded_at: DateTime<Utc>,
    received: DateTime<Utc>,
}

#[derive(Debug, Deserialize)]
struct ProbeData {
    recorded_at: DateTime<Utc>,
    position: i64,
}

#[derive(Debug, Default)]
struct ClientResult {
    connected: bool,
    connect_error: Option<String>,
    /// The server closed the stream, or reading failed, before the round ended.
    ended: bool,
    reset: bool,
    ids: Vec<u64>,
    /// When the last event arrived.
    last_at: Option<Instant>,
    samples: Vec<Sample>,
    /// The last message's event type and data (the warm-up's template for the ceiling).
    last_message: Option<(String, String)>,
}

/// Shared by a round's clients.
struct Clients {
    port: u16,
    gate: Semaphore,
    connected: AtomicUsize,
    failed: AtomicUsize,
    /// Per client: the last id received; `u64::MAX` once it stopped.
    last_id: Vec<AtomicU64>,
}

enum Chunk {
    Size,
    Data(usize),
    Crlf(usize),
    Done,
}

/// HTTP/1.1 chunked decoding, then SSE messages split at the blank line.
struct SseParser {
    chunked: bool,
    state: Chunk,
    raw: Vec<u8>,
    body: Vec<u8>,
    /// Bytes of `body` already searched for a message end.
    scanned: usize,
    probe: bool,
    keep_last: bool,
}

impl SseParser {
    fn new(chunked: bool, probe: bool, keep_last: bool) -> Self {
        Self {
            chunked,
            state: Chunk::Size,
            raw: Vec::new(),
            body: Vec::with_capacity(2048),
            scanned: 0,
            probe,
            keep_last,
        }
    }

    fn feed(&mut self, input: &[u8], out: &mut ClientResult) -> Result<()> {
        if self.chunked {
            self.dechunk(input)?;
        } else {
            self.body.extend_from_slice(input);
        }
        self.messages(out)
    }

    fn dechunk(&mut self, input: &[u8]) -> Result<()> {
        self.raw.extend_from_slice(input);
        let raw = &self.raw;
        let mut pos = 0;
        loop {
            match self.state {
                Chunk::Size => {
                    let Some(end) = raw[pos..].windows(2).position(|w| w == b"\r\n") else {
                        break;
                    };
                    let line = std::str::from_utf8(&raw[pos..pos + end])?;
                    let size =
                        usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                            .with_context(|| format!("bad chunk size {line:?}"))?;
                    pos += end + 2;
                    self.state = if size == 0 {
                        Chunk::Done
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    let take = left.min(raw.len() - pos);
                    self.body.extend_from_slice(&raw[pos..pos + take]);
                    pos += take;
                    if take < left {
                        self.state = Chunk::Data(left - take);
                        break;
                    }
                    self.state = Chunk::Crlf(2);
                }
                Chunk::Crlf(left) => {
                    let take = left.min(raw.len() - pos);
                    pos += take;
                    if take < left {
                        self.state = Chunk::Crlf(left - take);
                        break;
                    }
                    self.state = Chunk::Size;
                }
                Chunk::Done => {
                    pos = raw.len();
                    break;
                }
            }
        }
        self.raw.drain(..pos);
        Ok(())
    }

    fn messages(&mut self, out: &mut ClientResult) -> Result<()> {
        let received = (self.probe || self.keep_last).then(Utc::now);
        let mut start = 0;
        let mut at = self.scanned;
        loop {
            let Some(p) = self.body[at..].iter().position(|&b| b == b'\n') else {
                at = self.body.len();
                break;
            };
            let newline = at + p;
            match self.body.get(newline + 1) {
                // The next byte decides: look at this newline again then.
                None => {
                    at = newline;
                    break;
                }
                Some(b'\n') => {
                    let message = &self.body[start..newline];
                    message_done(message, self.probe, self.keep_last, received, out)?;
                    start = newline + 2;
                    at = start;
                }
                Some(_) => at = newline + 1,
            }
        }
        self.body.drain(..start);
        self.scanned = at - start;
        Ok(())
    }
}

fn message_done(
    message: &[u8],
    probe: bool,
    keep_last: bool,
    received: Option<DateTime<Utc>>,
    out: &mut ClientResult,
) -> Result<()> {
    let (mut id, mut event, mut data) = (None, None, None);
    for line in message.split(|&b| b == b'\n') {
        let value = |prefix: &[u8]| {
            line.strip_prefix(prefix)
                .map(|v| v.strip_prefix(b" ").unwrap_or(v))
        };
        if let Some(v) = value(b"id:") {
            id = Some(std::str::from_utf8(v)?.trim().parse::<u64>()?);
        } else if let Some(v) = value(b"event:") {
            event = Some(v);
        } else if let Some(v) = value(b"data:") {
            data = Some(v);
        }
    }
    if event == Some(b"reset".as_slice()) {
        out.reset = true;
        return Ok(());
    }
    let Some(id) = id else {
        return Ok(()); // a keep-alive comment
    };
    out.ids.push(id);
    out.last_at = Some(Instant::now());
    if let (true, Some(data), Some(received)) = (probe, data, received) {
        let parsed: ProbeData = serde_json::from_slice(data).context("data: of an event")?;
        out.samples.push(Sample {
            id,
            position: parsed.position,
            recorded_at: parsed.recorded_at,
            received,
        });
    }
    if keep_last {
        out.last_message = Some((
            String::from_utf8_lossy(event.unwrap_or(b"message")).into_owned(),
            String::from_utf8_lossy(data.unwrap_or_default()).into_owned(),
        ));
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Connects and reads the response head: the stream and what came after the head.
async fn open_stream(port: u16) -> Result<(TcpStream, bool, Vec<u8>)> {
    let mut socket = TcpStream::connect(("127.0.0.1", port)).await?;
    socket.set_nodelay(true)?;
    // Closed with a reset, not a FIN: no TIME_WAIT on the client's port, so back-to-back rounds
    // of 10,000 connections do not run the ephemeral port range dry (a FIN close left 10,000
    // TIME_WAIT sockets and made the next round's connects take 20 s). Also, the query service
    // notices a FIN only when a write fails, the second one after the close (an event or a
    // keep-alive, up to 30 s on an idle feed); a reset it notices at once.
    socket.set_zero_linger()?;
    socket
        .write_all(
            format!(
                "GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let end = loop {
        let n = socket.read(&mut buf).await?;
        ensure!(n > 0, "connection closed before the response head");
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find(&head, b"\r\n\r\n") {
            break end;
        }
        ensure!(head.len() < 16 * 1024, "response head too long");
    };
    let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
    let status = text.lines().next().unwrap_or("");
    ensure!(status.starts_with("http/1.1 200"), "answered {status:?}");
    let chunked = text
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    Ok((socket, chunked, head[end + 4..].to_vec()))
}

async fn client(
    index: usize,
    probe: bool,
    shared: Arc<Clients>,
    mut stop: watch::Receiver<bool>,
) -> ClientResult {
    let mut result = ClientResult::default();
    let opened = {
        let _permit = shared.gate.acquire().await;
        open_stream(shared.port).await
    };
    let (mut socket, chunked, rest) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            result.connect_error = Some(format!("{error:#}"));
            shared.last_id[index].store(u64::MAX, Ordering::Relaxed);
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return result;
        }
    };
    result.connected = true;
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let mut parser = SseParser::new(chunked, probe, false);
    let mut buf = vec![0u8; 8192];
    let mut outcome = parser.feed(&rest, &mut result);
    while outcome.is_ok() && !result.reset {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            read = socket.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    result.ended = true;
                    break;
                }
                Ok(n) => {
                    outcome = parser.feed(&buf[..n], &mut result);
                    if let Some(&last) = result.ids.last() {
                        shared.last_id[index].store(last, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    if outcome.is_err() || result.reset {
        result.ended = true;
    }
    shared.last_id[index].store(u64::MAX, Ordering::Relaxed);
    result
}

// ---------------------------------------------------------------------------------------------
// The ceiling server (a child process: this binary with `--ceiling-server`).

#[derive(Debug, Serialize, Deserialize)]
struct Template {
    event_type: String,
    data: Value,
}

async fn ceiling_server(buffer: usize) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{port}")?;
        stdout.flush()?;
    }
    let (ring, _) = broadcast::channel::<Arc<[u8]>>(buffer.max(16));
    let accept_ring = ring.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            // Subscribed before the head is answered, as the feed does.
            tokio::spawn(ceiling_connection(socket, accept_ring.subscribe()));
        }
    });
    // Stdin on a thread of its own (blocking reads): the template, then one line per event.
    tokio::task::spawn_blocking(move || -> Result<()> {
        use std::io::BufRead;
        let mut lines = std::io::stdin().lock().lines();
        let first = lines.next().context("no template")??;
        let mut template: Template = serde_json::from_str(&first)?;
        let mut sequence = 0u64;
        for line in lines {
            line?;
            sequence += 1;
            template.data["recorded_at"] = json!(Utc::now());
            template.data["stream_sequence"] = json!(sequence);
            template.data["position"] = json!(sequence);
            let message = format!(
                "id: {sequence}\nevent: {}\ndata: {}\n\n",
                template.event_type,
                serde_json::to_string(&template.data)?
            );
            let chunk = format!("{:X}\r\n{message}\r\n", message.len());
            let _ = ring.send(Arc::from(chunk.into_bytes()));
        }
        Ok(())
    })
    .await?
}

async fn ceiling_connection(mut socket: TcpStream, mut ring: broadcast::Receiver<Arc<[u8]>>) {
    // Socket options as the query service's (poem leaves Nagle on).
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if find(&head, b"\r\n\r\n").is_some() {
            break;
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
    if socket.write_all(answer).await.is_err() {
        return;
    }
    let (mut reader, mut writer) = socket.split();
    let mut out = Vec::new();
    loop {
        tokio::select! {
            // The client went away (or sent something): done, as a server notices a close.
            _ = reader.read(&mut buf) => return,
            next = ring.recv() => {
                let Ok(chunk) = next else { return };
                // Whatever else is already in the ring goes in the same write (one syscall per
                // wake-up, as hyper batches queued body frames into one writev).
                out.clear();
                out.extend_from_slice(&chunk);
                while let Ok(chunk) = ring.try_recv() {
                    out.extend_from_slice(&chunk);
                }
                if writer.write_all(&out).await.is_err() {
                    return;
                }
                if out.capacity() > 64 * 1024 {
                    out = Vec::new();
                }
            }
        }
    }
}

/// Busy CPU time of the whole machine so far, seconds (`/proc/stat`: all but idle and iowait).
fn machine_busy_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return f64::NAN;
    };
    let Some(line) = stat.lines().next() else {
        return f64::NAN;
    };
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    if ticks.len() < 8 {
        return f64::NAN;
    }
    (ticks.iter().sum::<f64>() - ticks[3] - ticks[4]) / 100.0
}

// ---------------------------------------------------------------------------------------------
// The run.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Ours,
    Ceiling,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Ours => "ours",
            Side::Ceiling => "ceiling",
        }
    }
}

struct Bench {
    args: Args,
    http: reqwest::Client,
    command_url: String,
    query_port: u16,
    query_pid: u32,
    ceiling_port: u16,
    ceiling_pid: u32,
    ceiling_stdin: ChildStdin,
    /// Events the ceiling server emitted so far (its last sequence).
    ceiling_emitted: u64,
    jetstream: async_nats::jetstream::Context,
    /// Ours: when each event (by global position) arrived on core NATS.
    arrivals: Arc<Mutex<HashMap<i64, DateTime<Utc>>>>,
}

fn job_body(n: u64) -> Value {
    let account = ["geo", "vision", "nlp", "ops"][(n % 4) as usize];
    json!({"name": format!("sse-bench-{n}"), "account": account,
           "submitted_by": "bench", "priority": (n * 7) % 101, "gpus": 1,
           "command": ["true"], "max_retries": 0, "timeout_s": 600})
}

impl Bench {
    async fn stream_last_sequence(&self) -> Result<u64> {
        let mut stream = self
            .jetstream
            .get_stream(STREAM)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(stream
            .info()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .state
            .last_sequence)
    }

    /// `count` events at `rate` per second; how many were produced.
    async fn produce(&mut self, side: Side, count: u64) -> Result<u64> {
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / self.args.rate));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        match side {
            Side::Ours => {
                let mut posts = Vec::new();
                for n in 0..count {
                    ticker.tick().await;
                    let http = self.http.clone();
                    let url = format!("{}/jobs", self.command_url);
                    posts.push(tokio::spawn(async move {
                        http.post(url)
                            .json(&job_body(n))
                            .send()
                            .await
                            .and_then(reqwest::Response::error_for_status)
                    }));
                }
                let mut accepted = 0;
                for post in posts {
                    match post.await? {
                        Ok(_) => accepted += 1,
                        Err(error) => eprintln!("bench-sse: a submit failed: {error}"),
                    }
                }
                Ok(accepted)
            }
            Side::Ceiling => {
                for _ in 0..count {
                    ticker.tick().await;
                    self.ceiling_stdin.write_all(b"e\n").await?;
                    self.ceiling_stdin.flush().await?;
                }
                self.ceiling_emitted += count;
                Ok(count)
            }
        }
    }

    async fn round(&mut self, side: Side, clients: usize, round: usize) -> Result<RoundReport> {
        let (port, pid) = match side {
            Side::Ours => (self.query_port, self.query_pid),
            Side::Ceiling => (self.ceiling_port, self.ceiling_pid),
        };
        let rss_before = rss_kib(pid)?;
        let fds_before = open_fds(pid);
        let shared = Arc::new(Clients {
            port,
            gate: Semaphore::new(self.args.connect_concurrency.max(1)),
            connected: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            last_id: (0..clients).map(|_| AtomicU64::new(0)).collect(),
        });
        let (stop, stopped) = watch::channel(false);
        let probe_every = (clients / self.args.probes.max(1)).max(1);
        let started = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                tokio::spawn(client(
                    i,
                    i % probe_every == 0,
                    shared.clone(),
                    stopped.clone(),
                ))
            })
            .collect();
        loop {
            let done =
                shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
            if done >= clients {
                break;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(300),
                "only {done} of {clients} clients connected in 300 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let connect_s = started.elapsed().as_secs_f64();
        let connected = shared.connected.load(Ordering::Relaxed);
        let idle_cpu0 = cpu_s(&pid.to_string());
        let settle = Instant::now();
        tokio::time::sleep(Duration::from_millis(self.args.settle_ms)).await;
        let idle_cpu = (cpu_s(&pid.to_string()) - idle_cpu0) / settle.elapsed().as_secs_f64();
        let rss_idle = rss_kib(pid)?;

        // The window: events after `from`, up to and including `to`.
        let from = match side {
            Side::Ours => self.stream_last_sequence().await?,
            Side::Ceiling => self.ceiling_emitted,
        };
        self.arrivals.lock().expect("arrivals").clear();
        let pid_text = pid.to_string();
        let (server_cpu0, bench_cpu0, machine0) =
            (cpu_s(&pid_text), cpu_s("self"), machine_busy_s());
        let count = (self.args.rate * self.args.seconds).round().max(1.0) as u64;
        let first_emit = Instant::now();
        let produced = self.produce(side, count).await?;
        let last_emit = Instant::now();
        let to = match side {
            Side::Ours => {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let last = self.stream_last_sequence().await?;
                    if last >= from + produced || Instant::now() > deadline {
                        break last;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Side::Ceiling => self.ceiling_emitted,
        };
        let deadline = Instant::now() + Duration::from_secs(self.args.drain_s);
        while Instant::now() < deadline
            && shared
                .last_id
                .iter()
                .any(|id| id.load(Ordering::Relaxed) < to)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drained = last_emit.elapsed().as_secs_f64();
        let cpu_wall = first_emit.elapsed().as_secs_f64();
        let server_cpu = (cpu_s(&pid_text) - server_cpu0) / cpu_wall;
        let bench_cpu = (cpu_s("self") - bench_cpu0) / cpu_wall;
        let machine_cpu = (machine_busy_s() - machine0) / cpu_wall;
        let _ = stop.send(true);
        let mut results = Vec::with_capacity(clients);
        for task in tasks {
            results.push(task.await?);
        }

        let events = to - from;
        let in_window = |id: u64| id > from && id <= to;
        let (mut deliveries, mut duplicates, mut missing) = (0u64, 0u64, 0u64);
        let (mut resets, mut ended) = (0, 0);
        let mut last_at = first_emit;
        let mut latencies = Vec::new();
        let mut fanout = Vec::new();
        let mut relay_lag = Vec::new();
        let arrivals = self.arrivals.lock().expect("arrivals").clone();
        for result in results.iter().filter(|r| r.connected) {
            let mut ids: Vec<u64> = result
                .ids
                .iter()
                .copied()
                .filter(|&i| in_window(i))
                .collect();
            let received = ids.len() as u64;
            ids.sort_unstable();
            ids.dedup();
            deliveries += ids.len() as u64;
            duplicates += received - ids.len() as u64;
            missing += events - ids.len() as u64;
            resets += usize::from(result.reset);
            ended += usize::from(result.ended);
            if let Some(at) = result.last_at {
                last_at = last_at.max(at);
            }
            for sample in result.samples.iter().filter(|s| in_window(s.id)) {
                latencies.push(ms(sample.recorded_at, sample.received));
                if let Some(&arrived) = arrivals.get(&sample.position) {
                    fanout.push(ms(arrived, sample.received));
                }
            }
        }
        if side == Side::Ours {
            // Relay lag of each window event, once (from any probe's copy of its recorded_at).
            let mut seen = HashMap::new();
            for s in results.iter().flat_map(|r| &r.samples) {
                seen.entry(s.position).or_insert(s.recorded_at);
            }
            for (position, recorded_at) in seen {
                if let Some(&arrived) = arrivals.get(&position) {
                    relay_lag.push(ms(recorded_at, arrived));
                }
            }
        }
        let span_s = last_at.duration_since(first_emit).as_secs_f64();
        let connect_error = results.iter().find_map(|r| r.connect_error.clone());
        drop(results);
        // Wait until the server has let go of the closed connections (its descriptors are back
        // to where they were), so the next round starts from the same baseline.
        let closed = Instant::now();
        while open_fds(pid) > fds_before + 16 && closed.elapsed() < Duration::from_secs(40) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let released_s = closed.elapsed().as_secs_f64();
        let some = |v: &mut Vec<f64>, p: f64| (side == Side::Ours).then(|| percentile(v, p));
        Ok(RoundReport {
            side: side.name(),
            round,
            clients,
            connected,
            connect_failures: clients - connected,
            connect_error,
            connect_s,
            server_rss_before_kib: rss_before,
            server_rss_idle_kib: rss_idle,
            rss_per_idle_connection_kib: (rss_idle as f64 - rss_before as f64)
                / connected.max(1) as f64,
            events,
            deliveries,
            missing,
            duplicates,
            resets,
            streams_ended: ended,
            span_s,
            delivered_events_per_s: deliveries as f64 / span_s.max(1e-9),
            drain_s: drained,
            latency_samples: latencies.len(),
            latency_p50_ms: percentile(&mut latencies, 50.0),
            latency_p99_ms: percentile(&mut latencies, 99.0),
            latency_max_ms: percentile(&mut latencies, 100.0),
            fanout_p50_ms: some(&mut fanout, 50.0),
            fanout_p99_ms: some(&mut fanout, 99.0),
            relay_lag_p50_ms: some(&mut relay_lag, 50.0),
            relay_lag_p99_ms: some(&mut relay_lag, 99.0),
            server_cpu_cores: server_cpu,
            bench_cpu_cores: bench_cpu,
            machine_cpu_cores: machine_cpu,
            server_released_s: released_s,
            server_idle_cpu_cores: idle_cpu,
        })
    }
}

/// One feed message from ours (the ceiling's template); also proves the path works end to end.
async fn warm_up(http: &reqwest::Client, command_url: &str, query_port: u16) -> Result<Template> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0u64;
    // The first submit creates the stream; the query service subscribes once it exists.
    loop {
        let _ = http
            .post(format!("{command_url}/jobs"))
            .json(&job_body(n))
            .send()
            .await?
            .error_for_status()?;
        n += 1;
        let (mut socket, chunked, rest) = open_stream(query_port).await?;
        let mut parser = SseParser::new(chunked, true, true);
        let mut result = ClientResult::default();
        parser.feed(&rest, &mut result)?;
        let mut buf = vec![0u8; 8192];
        let mut next_submit = Instant::now();
        let try_until = Instant::now() + Duration::from_secs(3);
        while result.last_message.is_none() && Instant::now() < try_until {
            if Instant::now() >= next_submit {
                http.post(format!("{command_url}/jobs"))
                    .json(&job_body(n))
                    .send()
                    .await?
                    .error_for_status()?;
                n += 1;
                next_submit = Instant::now() + Duration::from_millis(500);
            }
            if let Ok(read) =
                tokio::time::timeout(Duration::from_millis(100), socket.read(&mut buf)).await
            {
                let read = read?;
                ensure!(read > 0, "the feed closed during the warm-up");
                parser.feed(&buf[..read], &mut result)?;
            }
        }
        if let Some((event_type, data)) = result.last_message {
            return Ok(Template {
                event_type,
                data: serde_json::from_str(&data)?,
            });
        }
        ensure!(
            Instant::now() < deadline,
            "no event reached the feed in 60 s (see the logs under the state directory)"
        );
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.ceiling_server {
        return ceiling_server(args.feed_buffer).await;
    }
    ensure!(
        args.rate > 0.0 && args.seconds > 0.0,
        "--rate and --seconds must be positive"
    );
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let most = args.clients.iter().copied().max().unwrap_or(0);
    if let Some(limit) = open_files_limit() {
        ensure!(
            limit >= most as u64 + 256,
            "the open-files limit is {limit}, {most} clients need about {}: raise it (`ulimit -n`; \
             ops/bench/sse sets the soft limit to the hard one)",
            most + 256
        );
    }
    let bin = |name: &str| args.bin_dir.join(name);
    for name in ["overfly-command", "overfly-query"] {
        ensure!(
            bin(name).exists(),
            "{} missing: make bench-sse (cargo build --release)",
            bin(name).display()
        );
    }
    let _ = std::fs::remove_dir_all(&args.state);
    std::fs::create_dir_all(&args.state)?;
    let log = |name: &str| -> Result<std::fs::File> {
        Ok(std::fs::File::create(
            args.state.join(format!("{name}.log")),
        )?)
    };
    let mut processes = Processes(Vec::new());

    // Scratch database, private nats-server.
    let admin = with_database(&args.database_url, "postgres");
    {
        let mut conn = PgConnection::connect(&admin).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
            .execute(&mut conn)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
            .execute(&mut conn)
            .await?;
    }
    let db_url = with_database(&args.database_url, DATABASE);
    let nats_port = free_port()?;
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    processes.0.push(
        Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &nats_port.to_string(),
                "-sd",
            ])
            .arg(args.state.join("nats"))
            .stdout(log("nats")?)
            .stderr(Stdio::from(log("nats-err")?))
            .spawn()
            .context("nats-server")?,
    );
    wait_port(nats_port).await?;

    // The command service (no scheduler: one event per submit) and the query service.
    let command_port = free_port()?;
    let mut command = Command::new(bin("overfly-command"))
        .args(["serve", "--scheduler-enabled", "false"])
        .env("DATABASE_URL", &db_url)
        .env("NATS_URL", &nats_url)
        .env("OVERFLY_COMMAND_ADDR", format!("127.0.0.1:{command_port}"))
        .env("NO_COLOR", "1")
        .stdout(log("command")?)
        .stderr(Stdio::from(log("command-err")?))
        .spawn()
        .context("overfly-command")?;
    let command_url = format!("http://127.0.0.1:{command_port}");
    wait_ready(
        &format!("{command_url}/readyz"),
        &mut command,
        "overfly-command",
    )
    .await?;
    processes.0.push(command);
    let query_port = free_port()?;
    let mut query = Command::new(bin("overfly-query"))
        .arg("serve")
        .env("DATABASE_URL", &db_url)
        .env("NATS_URL", &nats_url)
        .env("OVERFLY_QUERY_ADDR", format!("127.0.0.1:{query_port}"))
        .env("OVERFLY_FEED_BUFFER", args.feed_buffer.to_string())
        .env("NO_COLOR", "1")
        .stdout(log("query")?)
        .stderr(Stdio::from(log("query-err")?))
        .spawn()
        .context("overfly-query")?;
    wait_ready(
        &format!("http://127.0.0.1:{query_port}/readyz"),
        &mut query,
        "overfly-query",
    )
    .await?;
    let query_pid = query.id().context("query pid")?;
    processes.0.push(query);

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .build()?;
    let template = warm_up(&http, &command_url, query_port).await?;
    eprintln!(
        "bench-sse: services up; a feed message is {} bytes of data ({})",
        serde_json::to_string(&template.data)?.len(),
        template.event_type
    );

    // Arrivals on core NATS (ours' split of the latency).
    let nats = async_nats::connect(&nats_url).await?;
    let mut subscriber = nats
        .subscribe(overfly_schemas::subjects::EVENTS_ALL)
        .await?;
    let arrivals: Arc<Mutex<HashMap<i64, DateTime<Utc>>>> = Arc::default();
    {
        #[derive(Deserialize)]
        struct Envelope {
            position: i64,
        }
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                let at = Utc::now();
                if let Ok(envelope) = serde_json::from_slice::<Envelope>(&message.payload) {
                    arrivals
                        .lock()
                        .expect("arrivals")
                        .insert(envelope.position, at);
                }
            }
        });
    }

    // The ceiling server.
    let mut ceiling = Command::new(std::env::current_exe()?)
        .args([
            "--ceiling-server",
            "--feed-buffer",
            &args.feed_buffer.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log("ceiling-err")?))
        .kill_on_drop(true)
        .spawn()
        .context("the ceiling server")?;
    let mut ceiling_stdin = ceiling.stdin.take().context("stdin")?;
    let mut ceiling_out = BufReader::new(ceiling.stdout.take().context("stdout")?).lines();
    let ceiling_port: u16 = ceiling_out
        .next_line()
        .await?
        .context("the ceiling server said nothing")?
        .trim()
        .parse()?;
    ceiling_stdin
        .write_all(format!("{}\n", serde_json::to_string(&template)?).as_bytes())
        .await?;
    ceiling_stdin.flush().await?;
    let ceiling_pid = ceiling.id().context("ceiling pid")?;
    processes.0.push(ceiling);

    let mut bench = Bench {
        http,
        command_url,
        query_port,
        query_pid,
        ceiling_port,
        ceiling_pid,
        ceiling_stdin,
        ceiling_emitted: 0,
        jetstream: async_nats::jetstream::new(nats.clone()),
        arrivals,
        args,
    };

    let mut levels = Vec::new();
    let clients_levels = bench.args.clients.clone();
    for &clients in &clients_levels {
        let mut rounds = Vec::new();
        for round in 1..=bench.args.rounds {
            let order = if round % 2 == 1 {
                [Side::Ours, Side::Ceiling]
            } else {
                [Side::Ceiling, Side::Ours]
            };
            for side in order {
                let r = bench.round(side, clients, round).await?;
                eprintln!(
                    "bench-sse: {clients} clients, round {round}, {:7}: connected {}/{} in {:.1} s, \
                     {:.1} KiB/idle conn, latency p50 {:.1} ms p99 {:.1} ms{}, {:.0} events/s delivered, \
                     missing {}, resets {}, cpu: server {:.2} clients {:.2} machine {:.2} cores, \
                     server closed the connections after {:.1} s, idle server cpu {:.2}",
                    r.side,
                    r.connected,
                    r.clients,
                    r.connect_s,
                    r.rss_per_idle_connection_kib,
                    r.latency_p50_ms,
                    r.latency_p99_ms,
                    r.fanout_p99_ms
                        .map(|f| format!(" (fan-out p99 {f:.1} ms)"))
                        .unwrap_or_default(),
                    r.delivered_events_per_s,
                    r.missing,
                    r.resets,
                    r.server_cpu_cores,
                    r.bench_cpu_cores,
                    r.machine_cpu_cores,
                    r.server_released_s,
                    r.server_idle_cpu_cores
                );
                rounds.push(r);
            }
        }
        levels.push(level(clients, rounds));
    }

    let goals = match levels.iter().find(|l| l.clients >= GOAL_CLIENTS) {
        Some(l) => {
            let served = l.ours.connect_failures == 0
                && l.ours.missing == 0
                && l.ours.resets == 0
                && l.ours.streams_ended == 0;
            json!({
                "clients_served": {"goal": GOAL_CLIENTS, "clients": l.clients, "met": served},
                "latency_p99_ms": {"goal": GOAL_P99_MS, "value": l.ours.latency_p99_ms,
                                   "met": l.ours.latency_p99_ms < GOAL_P99_MS},
                "rss_per_idle_connection_kib": {"goal": GOAL_RSS_PER_IDLE_KIB,
                                                "value": l.ours.rss_per_idle_connection_kib,
                                                "met": l.ours.rss_per_idle_connection_kib < GOAL_RSS_PER_IDLE_KIB},
            })
        }
        None => json!({"note": format!("no level with {GOAL_CLIENTS} clients was run")}),
    };
    let report = Report {
        date: Utc::now(),
        machine: json!({
            "cores": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
            "build": "release",
            "network": "loopback; clients, servers, NATS and Postgres share the cores",
        }),
        settings: json!({
            "rate_events_per_s": bench.args.rate,
            "seconds_per_round": bench.args.seconds,
            "rounds": bench.args.rounds,
            "probes": bench.args.probes,
            "feed_buffer": bench.args.feed_buffer,
            "event_type": template.event_type,
            "data_bytes": serde_json::to_string(&template.data)?.len(),
        }),
        levels,
        goals,
    };
    print_summary(&report);
    let output = &bench.args.output;
    if let Some(parent) = output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(output, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("bench-sse: written {}", output.display());

    drop(bench);
    drop(processes);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = PgConnection::connect(&admin).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    Ok(())
}

fn level(clients: usize, rounds: Vec<RoundReport>) -> Level {
    let summary = |side: &str| {
        let of: Vec<&RoundReport> = rounds.iter().filter(|r| r.side == side).collect();
        let values = |f: &dyn Fn(&RoundReport) -> f64| of.iter().map(|r| f(r)).collect::<Vec<_>>();
        let optional = |f: &dyn Fn(&RoundReport) -> Option<f64>| {
            let v: Vec<f64> = of.iter().filter_map(|r| f(r)).collect();
            (!v.is_empty()).then(|| median(v))
        };
        SideSummary {
            latency_p50_ms: median(values(&|r| r.latency_p50_ms)),
            latency_p99_ms: median(values(&|r| r.latency_p99_ms)),
            fanout_p50_ms: optional(&|r| r.fanout_p50_ms),
            fanout_p99_ms: optional(&|r| r.fanout_p99_ms),
            relay_lag_p99_ms: optional(&|r| r.relay_lag_p99_ms),
            delivered_events_per_s: median(values(&|r| r.delivered_events_per_s)),
            server_cpu_cores: median(values(&|r| r.server_cpu_cores)),
            server_released_s: median(values(&|r| r.server_released_s)),
            rss_per_idle_connection_kib: values(&|r| r.rss_per_idle_connection_kib)
                .into_iter()
                .fold(f64::NAN, f64::max),
            connect_failures: of.iter().map(|r| r.connect_failures).sum(),
            missing: of.iter().map(|r| r.missing).sum(),
            duplicates: of.iter().map(|r| r.duplicates).sum(),
            resets: of.iter().map(|r| r.resets).sum(),
            streams_ended: of.iter().map(|r| r.streams_ended).sum(),
        }
    };
    let ratios = |f: &dyn Fn(&RoundReport) -> Option<f64>, g: &dyn Fn(&RoundReport) -> f64| {
        let ours = rounds.iter().filter(|r| r.side == "ours");
        ours.filter_map(|o| {
            let c = rounds
                .iter()
                .find(|c| c.side == "ceiling" && c.round == o.round)?;
            Some(f(o)? / g(c))
        })
        .collect::<Vec<f64>>()
    };
    let latency = ratios(&|r| Some(r.latency_p99_ms), &|r| r.latency_p99_ms);
    let fanout = ratios(&|r| r.fanout_p99_ms, &|r| r.latency_p99_ms);
    let delivered = ratios(&|r| Some(r.delivered_events_per_s), &|r| {
        r.delivered_events_per_s
    });
    Level {
        clients,
        ours: summary("ours"),
        ceiling: summary("ceiling"),
        latency_p99_ratio_median: median(latency.clone()),
        latency_p99_round_ratios: latency,
        fanout_p99_ratio_median: median(fanout.clone()),
        fanout_p99_round_ratios: fanout,
        delivered_ratio_median: median(delivered.clone()),
        delivered_round_ratios: delivered,
        rounds,
    }
}

fn print_summary(report: &Report) {
    println!(
        "\nSSE feed, {} events/s for {} s per round, {} rounds, {} cores (medians over rounds)",
        report.settings["rate_events_per_s"],
        report.settings["seconds_per_round"],
        report.settings["rounds"],
        report.machine["cores"]
    );
    println!(
        "{:>7} {:>8} {:>9} {:>9} {:>11} {:>12} {:>10} {:>9} {:>8} {:>7}",
        "clients",
        "side",
        "p50 ms",
        "p99 ms",
        "fan-out p99",
        "delivered/s",
        "KiB/idle",
        "cpu cores",
        "missing",
        "resets"
    );
    for level in &report.levels {
        for (name, s) in [("ours", &level.ours), ("ceiling", &level.ceiling)] {
            println!(
                "{:>7} {:>8} {:>9.1} {:>9.1} {:>11} {:>12.0} {:>10.1} {:>9.2} {:>8} {:>7}",
                level.clients,
                name,
                s.latency_p50_ms,
                s.latency_p99_ms,
                s.fanout_p99_ms
                    .map(|f| format!("{f:.1}"))
                    .unwrap_or_else(|| "-".into()),
                s.delivered_events_per_s,
                s.rss_per_idle_connection_kib,
                s.server_cpu_cores,
                s.missing,
                s.resets
            );
        }
        println!(
            "{:>7} ratios ours/ceiling (median of rounds): latency p99 {:.2} {:?}, fan-out p99 {:.2} {:?}, delivered/s {:.3} {:?}",
            level.clients,
            level.latency_p99_ratio_median,
            round2(&level.latency_p99_round_ratios),
            level.fanout_p99_ratio_median,
            round2(&level.fanout_p99_round_ratios),
            level.delivered_ratio_median,
            round2(&level.delivered_round_ratios),
        );
    }
    println!("goals: {}", report.goals);
}

fn round2(values: &[f64]) -> Vec<f64> {
    values.iter().map(|v| (v * 100.0).round() / 100.0).collect()
}
