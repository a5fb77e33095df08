//! `bench-append`: how fast the command-service turns `POST /jobs` into committed events, measured
//! against the raw Postgres ceiling in the same run, plus the relay's publish lag.
//!
//! For each concurrency level it alternates rounds of ours (HTTP submits) and the ceiling (pgbench
//! inserting the same event row into `bench_events`, a copy of `events`), because the machine is
//! noisy and only the ratio between neighbouring rounds means anything. Meanwhile a core NATS
//! subscriber on the events subjects times every `JobSubmitted` from its row's `recorded_at` to its
//! arrival. This is a benchmark, not a test: it never asserts the goals, it reports them; it exits
//! non-zero only when a submit failed or an accepted job's event never arrived.
//!
//! Run it through `ops/bench/append`, which prepares a scratch database and starts the service.
//! It must not point at a database that matters: it drops and recreates `bench_events` there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::{DateTime, Utc};
use clap::Parser;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use uuid::Uuid;

/// Subjects the relay publishes job events on.
const JOB_EVENTS_SUBJECT: &str = "overfly.events.job.>";
/// The event a `POST /jobs` appends.
const SUBMITTED_EVENT: &str = "JobSubmitted";
/// Goal from the issue: ours ÷ ceiling at every level.
const GOAL_RATIO: f64 = 0.6;
/// Goal from the issue: relay lag p99, milliseconds.
const GOAL_LAG_P99_MS: f64 = 50.0;
/// How many failed submits are kept verbatim for the report.
const ERROR_SAMPLES: usize = 5;

#[derive(Debug, Parser)]
#[command(
    name = "bench-append",
    about = "Job submit throughput vs. the raw Postgres ceiling, and relay lag"
)]
struct Args {
    /// Base URL of the command-service under test.
    #[arg(
        long,
        env = "OVERFLY_BENCH_COMMAND_URL",
        default_value = "http://127.0.0.1:18080"
    )]
    command_url: String,
    /// The scratch database the service writes to; pgbench and `bench_events` go there too.
    #[arg(
        long,
        env = "OVERFLY_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/overfly_bench"
    )]
    database_url: String,
    /// NATS server the service's relay publishes to.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Jobs per round at concurrency 1.
    #[arg(long, default_value_t = 400)]
    count_1: usize,
    /// Jobs per round at concurrency 16.
    #[arg(long, default_value_t = 3000)]
    count_16: usize,
    /// Jobs per round at concurrency 64.
    #[arg(long, default_value_t = 6000)]
    count_64: usize,
    /// Rounds per level; each round is one run of ours followed by one of pgbench.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Submits before measuring (not counted); one of them provides the event row pgbench inserts.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    warmup: u64,
    /// Give up waiting for the relay after this many seconds without a new event.
    #[arg(long, default_value_t = 15)]
    relay_patience_s: u64,
    /// Measure only the Postgres ceiling, with a synthetic JobSubmitted row (no service needed).
    #[arg(long)]
    ceiling_only: bool,
    /// The pgbench executable.
    #[arg(long, default_value = "pgbench")]
    pgbench: PathBuf,
    /// The psql executable.
    #[arg(long, default_value = "psql")]
    psql: PathBuf,
    /// Where the figures are written as JSON.
    #[arg(long, default_value = "ops/bench/results/append-latest.json")]
    output: PathBuf,
}

impl Args {
    fn levels(&self) -> [Level; 3] {
        [(1, self.count_1), (16, self.count_16), (64, self.count_64)]
            .map(|(concurrency, count)| Level { concurrency, count })
    }
}

#[derive(Debug, Clone, Copy)]
struct Level {
    concurrency: usize,
    count: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let report = run(&args).await?;
    print_report(&report);
    write_json(&args.output, &report)?;
    println!("\nwritten: {}", args.output.display());
    let failures = report.failures();
    ensure!(
        failures.is_empty(),
        "benchmark run had failures: {}",
        failures.join("; ")
    );
    Ok(())
}

async fn run(args: &Args) -> Result<Report> {
    let db = Psql {
        exe: args.psql.clone(),
        url: args.database_url.clone(),
    };
    let mut ours = if args.ceiling_only {
        None
    } else {
        Some(Ours::start(args).await?)
    };
    let template = match &ours {
        Some(ours) => ours.warm_up(&db, args.warmup).await?,
        None => EventTemplate::synthetic(),
    };
    db.exec(
        "DROP TABLE IF EXISTS bench_events; CREATE TABLE bench_events (LIKE events INCLUDING ALL)",
    )
    .await
    .context("creating bench_events from events (has the database been migrated?)")?;
    let ceiling = Ceiling {
        pgbench: args.pgbench.clone(),
        db,
        template,
    };

    let mut levels = Vec::new();
    for level in args.levels() {
        eprintln!(
            "level c={} ({} per round, {} rounds)",
            level.concurrency, level.count, args.rounds
        );
        levels.push(bench_level(level, args.rounds, ours.as_mut(), &ceiling).await?);
    }
    let relay_lag = ours.as_ref().map(Ours::lag_overall);
    let relay_counts = ours.as_ref().map(Ours::counts);
    Ok(Report {
        date: Utc::now(),
        machine: Machine::detect(),
        command_url: (!args.ceiling_only).then(|| args.command_url.clone()),
        rounds: args.rounds,
        warmup: if args.ceiling_only { 0 } else { args.warmup },
        event: ceiling.template.describe(),
        levels,
        relay_lag,
        relay_counts,
        goals: Goals {
            ratio_min: GOAL_RATIO,
            relay_lag_p99_max_ms: GOAL_LAG_P99_MS,
        },
    })
}

/// One level: `rounds` × (ours, then pgbench), each on a freshly checkpointed server.
async fn bench_level(
    level: Level,
    rounds: u32,
    ours: Option<&mut Ours>,
    ceiling: &Ceiling,
) -> Result<LevelReport> {
    let mut round_reports = Vec::new();
    let mut latencies_ms = Vec::new();
    let mut accepted_ids = Vec::new();
    let mut error_samples = Vec::new();
    for round in 1..=rounds {
        let ours_round = match ours.as_deref() {
            Some(ours) => {
                ceiling.db.checkpoint().await;
                let phase = format!("c{}-r{round}", level.concurrency);
                let submitted = ours.submit(&phase, level).await?;
                // Let the relay drain before pgbench runs; what never arrives is counted per level.
                ours.await_relay(&submitted.accepted).await;
                Some(submitted)
            }
            None => None,
        };
        let pgbench = ceiling.run(level).await?;
        let report = RoundReport::new(round, ours_round.as_ref(), &pgbench);
        eprintln!("  round {round}: {}", report.summary());
        round_reports.push(report);
        if let Some(submitted) = ours_round {
            latencies_ms.extend(submitted.latencies_ms);
            accepted_ids.extend(submitted.accepted);
            error_samples.extend(submitted.error_samples);
        }
    }
    latencies_ms.sort_by(f64::total_cmp);
    error_samples.truncate(ERROR_SAMPLES);
    let relay_lag = ours.map(|ours| {
        let lag = ours.lag_of(&accepted_ids);
        ours.measured.extend(accepted_ids);
        lag
    });
    Ok(LevelReport {
        concurrency: level.concurrency,
        count: level.count,
        cmds_per_s: median_of(&round_reports, |r| r.ours_cmds_per_s),
        latency_p50_ms: percentile(&latencies_ms, 50.0),
        latency_p99_ms: percentile(&latencies_ms, 99.0),
        pgbench_tps: median_of(&round_reports, |r| Some(r.pgbench_tps)),
        ratio: median_of(&round_reports, |r| r.ratio),
        errors: round_reports.iter().map(|r| r.ours_errors).sum(),
        error_samples,
        relay_lag,
        rounds: round_reports,
    })
}

// ---------------------------------------------------------------------------------------------
// Ours: HTTP submits and the relay watcher.

/// The system under test: its HTTP API and what its relay delivers.
struct Ours {
    http: Http,
    deliveries: Arc<Mutex<Deliveries>>,
    /// Stop waiting for the relay after this long without progress.
    relay_patience: Duration,
    /// Every job accepted in a measured round (not the warm-up), for the overall lag.
    measured: Vec<Uuid>,
}

impl Ours {
    async fn start(args: &Args) -> Result<Self> {
        Ok(Self {
            http: Http::new(&args.command_url)?,
            deliveries: watch_relay(&args.nats_url).await?,
            relay_patience: Duration::from_secs(args.relay_patience_s),
            measured: Vec::new(),
        })
    }

    /// Submits the warm-up jobs and returns the `JobSubmitted` row one of them produced.
    async fn warm_up(&self, db: &Psql, count: u64) -> Result<EventTemplate> {
        let count = usize::try_from(count).context("warm-up count")?;
        let level = Level {
            concurrency: count.min(8),
            count,
        };
        let submitted = self.submit("warmup", level).await?;
        if let Some(sample) = submitted.error_samples.first() {
            bail!(
                "{} of {count} warm-up submits failed, e.g. {sample}",
                submitted.errors
            );
        }
        let missing = self.await_relay(&submitted.accepted).await;
        ensure!(
            missing == 0,
            "the relay delivered only {} of {count} warm-up events",
            count - missing
        );
        EventTemplate::load(db, submitted.accepted[0]).await
    }

    async fn submit(&self, phase: &str, level: Level) -> Result<Submitted> {
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let workers = (0..level.concurrency).map(|_| {
            let (http, next, phase) = (self.http.clone(), Arc::clone(&next), phase.to_owned());
            tokio::spawn(async move {
                let mut tally = Submitted::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= level.count {
                        break tally;
                    }
                    tally.record(http.submit(&format!("bench-{phase}-{i}")).await);
                }
            })
        });
        let tallies = futures::future::try_join_all(workers)
            .await
            .context("submit worker panicked")?;
        let mut submitted = tallies
            .into_iter()
            .fold(Submitted::default(), Submitted::merge);
        submitted.elapsed = started.elapsed();
        Ok(submitted)
    }

    /// Waits until the relay delivered every id or stops making progress; returns how many are missing.
    async fn await_relay(&self, ids: &[Uuid]) -> usize {
        let mut last = (usize::MAX, Instant::now());
        loop {
            let missing = lock(&self.deliveries).missing(ids);
            if missing == 0 {
                return 0;
            }
            if missing < last.0 {
                last = (missing, Instant::now());
            } else if last.1.elapsed() >= self.relay_patience {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn lag_of(&self, ids: &[Uuid]) -> LagStats {
        lock(&self.deliveries).lag_stats(ids)
    }

    fn lag_overall(&self) -> LagStats {
        self.lag_of(&self.measured)
    }

    fn counts(&self) -> RelayCounts {
        lock(&self.deliveries).counts
    }
}

/// A cheap-to-clone handle on `POST /jobs`.
#[derive(Clone)]
struct Http {
    client: reqwest::Client,
    jobs_url: String,
}

#[derive(Deserialize)]
struct Created {
    id: Uuid,
}

impl Http {
    fn new(base_url: &str) -> Result<Self> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(128)
            .timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            client,
            jobs_url: format!("{}/jobs", base_url.trim_end_matches('/')),
        })
    }

    /// One submit; `Ok` carries the job id and the request's latency.
    async fn submit(&self, name: &str) -> Result<(Uuid, Duration)> {
        let started = Instant::now();
        let response = self
            .client
            .post(&self.jobs_url)
            .json(&job_spec(name))
            .send()
            .await?;
        let status = response.status();
        let body = response.bytes().await?;
        let latency = started.elapsed();
        if !status.is_success() {
            bail!(
                "{status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            );
        }
        let created: Created = serde_json::from_slice(&body).context("reading the 2xx body")?;
        Ok((created.id, latency))
    }
}

/// What one phase of submits produced.
#[derive(Debug, Default)]
struct Submitted {
    accepted: Vec<Uuid>,
    latencies_ms: Vec<f64>,
    errors: usize,
    error_samples: Vec<String>,
    elapsed: Duration,
}

impl Submitted {
    fn record(&mut self, outcome: Result<(Uuid, Duration)>) {
        match outcome {
            Ok((id, latency)) => {
                self.accepted.push(id);
                self.latencies_ms.push(ms(latency));
            }
            Err(error) => {
                self.errors += 1;
                if self.error_samples.len() < ERROR_SAMPLES {
                    self.error_samples.push(format!("{error:#}"));
                }
            }
        }
    }

    fn merge(mut self, other: Self) -> Self {
        self.accepted.extend(other.accepted);
        self.latencies_ms.extend(other.latencies_ms);
        self.errors += other.errors;
        self.error_samples.extend(other.error_samples);
        self.error_samples.truncate(ERROR_SAMPLES);
        self
    }

    fn cmds_per_s(&self) -> f64 {
        self.accepted.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// The job every submit sends: small but shaped like a real one.
fn job_spec(name: &str) -> Value {
    json!({
        "name": name,
        "account": "bench",
        "submitted_by": "bench",
        "priority": 50,
        "gpus": 1,
        "gpu_memory_mb": 1000,
        "command": ["python", "-m", "train", "--epochs", "1"],
        "env": {"OVERFLY_BENCH": "1"},
        "params": {},
        "labels": {"suite": "bench-append"},
        "max_retries": 0,
        "timeout_s": 60,
    })
}

/// The fields of the relay's envelope the lag needs.
#[derive(Deserialize)]
struct Envelope {
    aggregate_id: Uuid,
    event_type: String,
    recorded_at: DateTime<Utc>,
}

/// What the relay delivered so far, filled by the subscriber task.
#[derive(Debug, Default)]
struct Deliveries {
    /// Arrival time minus `recorded_at` of each job's `JobSubmitted`, first delivery only.
    lag_ms: HashMap<Uuid, f64>,
    counts: RelayCounts,
}

/// Job events seen that are not a first `JobSubmitted`, warm-up included.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
struct RelayCounts {
    /// `JobSubmitted` delivered more than once (the relay publishes at least once).
    duplicates: u64,
    /// Other job events (the scheduler's, say): not timed.
    other_events: u64,
    /// Messages whose body was not an envelope.
    unreadable: u64,
}

impl Deliveries {
    fn record(&mut self, body: &[u8], received: DateTime<Utc>) {
        let Ok(envelope) = serde_json::from_slice::<Envelope>(body) else {
            self.counts.unreadable += 1;
            return;
        };
        if envelope.event_type != SUBMITTED_EVENT {
            self.counts.other_events += 1;
            return;
        }
        let lag_ms = (received - envelope.recorded_at).as_seconds_f64() * 1e3;
        if self.lag_ms.insert(envelope.aggregate_id, lag_ms).is_some() {
            self.counts.duplicates += 1;
        }
    }

    fn missing(&self, ids: &[Uuid]) -> usize {
        ids.iter()
            .filter(|id| !self.lag_ms.contains_key(id))
            .count()
    }

    fn lag_stats(&self, ids: &[Uuid]) -> LagStats {
        let mut lags: Vec<f64> = ids
            .iter()
            .filter_map(|id| self.lag_ms.get(id).copied())
            .collect();
        lags.sort_by(f64::total_cmp);
        LagStats {
            delivered: lags.len(),
            missing: ids.len() - lags.len(),
            p50_ms: percentile(&lags, 50.0),
            p99_ms: percentile(&lags, 99.0),
            max_ms: lags.last().copied(),
        }
    }
}

/// Subscribes (core NATS, no consumer) to every job event and times each `JobSubmitted` on arrival.
async fn watch_relay(nats_url: &str) -> Result<Arc<Mutex<Deliveries>>> {
    let client = async_nats::connect(nats_url)
        .await
        .with_context(|| format!("connecting to NATS at {nats_url}"))?;
    let mut subscriber = client
        .subscribe(JOB_EVENTS_SUBJECT)
        .await
        .context("subscribing to job events")?;
    client.flush().await.context("flushing the subscription")?;
    let deliveries = Arc::new(Mutex::new(Deliveries::default()));
    let sink = Arc::clone(&deliveries);
    tokio::spawn(async move {
        let _connection = client;
        while let Some(message) = subscriber.next().await {
            let received = Utc::now();
            lock(&sink).record(&message.payload, received);
        }
    });
    Ok(deliveries)
}

fn lock(deliveries: &Mutex<Deliveries>) -> std::sync::MutexGuard<'_, Deliveries> {
    deliveries.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// The ceiling: pgbench inserting the same row into bench_events.

/// The event row pgbench inserts, as the service wrote it (or a synthetic stand-in).
#[derive(Debug, Deserialize)]
struct EventTemplate {
    aggregate_type: String,
    event_type: String,
    event_version: String,
    payload: Value,
    metadata: Value,
    /// Where it came from, for the report.
    #[serde(skip)]
    source: &'static str,
}

impl EventTemplate {
    /// The first event of `job`, read back from `events`.
    async fn load(db: &Psql, job: Uuid) -> Result<Self> {
        let sql = format!(
            "SELECT json_build_object('aggregate_type', aggregate_type, 'event_type', event_type, \
             'event_version', event_version, 'payload', payload, 'metadata', metadata) \
             FROM events WHERE aggregate_id = '{job}' ORDER BY sequence LIMIT 1"
        );
        let row = db.query(&sql).await?;
        ensure!(
            !row.is_empty(),
            "no event for warm-up job {job} in the events table"
        );
        let mut template: Self =
            serde_json::from_str(&row).context("reading the warm-up event row")?;
        template.source = "the warm-up's first event, read back from events";
        Ok(template)
    }

    /// A stand-in shaped like the service's `JobSubmitted` v1 row, for `--ceiling-only`.
    fn synthetic() -> Self {
        let payload = json!({ SUBMITTED_EVENT: {
            "at": Utc::now(),
            "job_id": Uuid::new_v4(),
            "spec": job_spec("bench-ceiling-0"),
        }});
        Self {
            aggregate_type: "job".into(),
            event_type: SUBMITTED_EVENT.into(),
            event_version: "1".into(),
            payload,
            metadata: json!({
                "actor": "bench",
                "command": "SubmitJob",
                "command_id": Uuid::new_v4(),
                "correlation_id": Uuid::new_v4(),
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            }),
            source: "synthetic (--ceiling-only)",
        }
    }

    /// pgbench `-D` definitions; prepared mode sends them as parameters, so no quoting.
    fn pgbench_vars(&self) -> [String; 5] {
        [
            format!("aggregate_type={}", self.aggregate_type),
            format!("event_type={}", self.event_type),
            format!("event_version={}", self.event_version),
            format!("payload={}", self.payload),
            format!("metadata={}", self.metadata),
        ]
    }

    fn describe(&self) -> EventDescription {
        EventDescription {
            event_type: self.event_type.clone(),
            event_version: self.event_version.clone(),
            payload_bytes: self.payload.to_string().len(),
            metadata_bytes: self.metadata.to_string().len(),
            source: self.source.to_owned(),
        }
    }
}

/// One autocommit insert per transaction, fresh aggregate each time: the cheapest way to append
/// that event row, i.e. the ceiling.
const PGBENCH_SCRIPT: &str = "INSERT INTO bench_events \
(aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
VALUES (:aggregate_type, gen_random_uuid()::text, 1, :event_type, :event_version, :payload::jsonb, :metadata::jsonb);\n";

struct Ceiling {
    pgbench: PathBuf,
    db: Psql,
    template: EventTemplate,
}

impl Ceiling {
    async fn run(&self, level: Level) -> Result<PgbenchRun> {
        self.db
            .exec("TRUNCATE bench_events RESTART IDENTITY")
            .await?;
        self.db.checkpoint().await;
        let per_client = level.count.div_ceil(level.concurrency);
        let mut child = Command::new(&self.pgbench)
            .args(["-n", "-M", "prepared", "-f", "-"])
            .args(["-c", &level.concurrency.to_string()])
            .args(["-j", &level.concurrency.min(2).to_string()])
            .args(["-t", &per_client.to_string()])
            .args(
                self.template
                    .pgbench_vars()
                    .iter()
                    .flat_map(|var| ["-D", var]),
            )
            .arg(&self.db.url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.pgbench.display()))?;
        let mut stdin = child.stdin.take().context("pgbench stdin")?;
        stdin.write_all(PGBENCH_SCRIPT.as_bytes()).await?;
        drop(stdin);
        let output = child.wait_with_output().await?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "pgbench failed ({}): {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
        parse_pgbench(&stdout)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct PgbenchRun {
    tps: f64,
    latency_avg_ms: f64,
}

/// Reads `tps = X (without initial connection time)` and `latency average = Y ms`.
fn parse_pgbench(stdout: &str) -> Result<PgbenchRun> {
    let value_after = |prefix: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse::<f64>().ok())
            .with_context(|| format!("no `{prefix}` in pgbench output:\n{stdout}"))
    };
    ensure!(
        stdout.contains("(without initial connection time)"),
        "pgbench printed no tps without connection time:\n{stdout}"
    );
    Ok(PgbenchRun {
        tps: value_after("tps = ")?,
        latency_avg_ms: value_after("latency average = ")?,
    })
}

/// psql against one database, for the little SQL the benchmark needs.
struct Psql {
    exe: PathBuf,
    url: String,
}

impl Psql {
    /// Runs `sql`; returns its unaligned, tuples-only output.
    async fn query(&self, sql: &str) -> Result<String> {
        let output = Command::new(&self.exe)
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url,
                "-c",
                sql,
            ])
            .output()
            .await
            .with_context(|| format!("starting {}", self.exe.display()))?;
        ensure!(
            output.status.success(),
            "psql failed ({}) on `{sql}`: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8(output.stdout)
            .context("psql output")?
            .trim()
            .to_owned())
    }

    async fn exec(&self, sql: &str) -> Result<()> {
        self.query(sql).await.map(drop)
    }

    /// Flushes dirty pages so neither side pays for the other's writes; best effort (needs superuser).
    async fn checkpoint(&self) {
        if let Err(error) = self.exec("CHECKPOINT").await {
            eprintln!("warning: {error:#}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics.

/// Nearest-rank percentile of an ascending slice; `None` when empty.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Median (mean of the middle two for an even count); `None` when empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[mid]),
        _ => Some((values[mid - 1] + values[mid]) / 2.0),
    }
}

fn median_of(rounds: &[RoundReport], field: impl Fn(&RoundReport) -> Option<f64>) -> Option<f64> {
    median(rounds.iter().filter_map(field).collect())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// The report.

#[derive(Debug, Serialize)]
struct Report {
    date: DateTime<Utc>,
    machine: Machine,
    /// `None` with `--ceiling-only`.
    command_url: Option<String>,
    rounds: u32,
    warmup: u64,
    event: EventDescription,
    levels: Vec<LevelReport>,
    /// Over every job submitted in a measured round (the warm-up excluded).
    relay_lag: Option<LagStats>,
    relay_counts: Option<RelayCounts>,
    goals: Goals,
}

impl Report {
    /// What makes the run exit non-zero: failed submits and events the relay never delivered.
    fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for level in &self.levels {
            if level.errors > 0 {
                failures.push(format!(
                    "{} failed submits at c={}",
                    level.errors, level.concurrency
                ));
            }
            if let Some(missing) = level
                .relay_lag
                .as_ref()
                .map(|lag| lag.missing)
                .filter(|&n| n > 0)
            {
                failures.push(format!(
                    "{missing} events not delivered at c={}",
                    level.concurrency
                ));
            }
        }
        failures
    }

    fn goals_met(&self) -> Option<bool> {
        let ratios_met = self
            .levels
            .iter()
            .map(|l| l.ratio.map(|r| r >= GOAL_RATIO))
            .collect::<Option<Vec<_>>>()?;
        let lag_met = self.relay_lag.as_ref()?.p99_ms? < GOAL_LAG_P99_MS;
        Some(lag_met && ratios_met.into_iter().all(|met| met))
    }
}

#[derive(Debug, Serialize)]
struct Machine {
    nproc: usize,
    cpu_model: String,
}

impl Machine {
    fn detect() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let nproc = std::thread::available_parallelism().map_or(0, usize::from);
        Self { nproc, cpu_model }
    }
}

#[derive(Debug, Serialize)]
struct EventDescription {
    event_type: String,
    event_version: String,
    payload_bytes: usize,
    metadata_bytes: usize,
    source: String,
}

#[derive(Debug, Serialize)]
struct Goals {
    ratio_min: f64,
    relay_lag_p99_max_ms: f64,
}

#[derive(Debug, Serialize)]
struct LevelReport {
    concurrency: usize,
    count: usize,
    /// Median over rounds.
    cmds_per_s: Option<f64>,
    /// Over every request of every round.
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    /// Median over rounds.
    pgbench_tps: Option<f64>,
    /// Median of the rounds' ratios (not the ratio of medians).
    ratio: Option<f64>,
    errors: usize,
    error_samples: Vec<String>,
    relay_lag: Option<LagStats>,
    rounds: Vec<RoundReport>,
}

#[derive(Debug, Serialize)]
struct RoundReport {
    round: u32,
    ours_cmds_per_s: Option<f64>,
    ours_accepted: usize,
    ours_errors: usize,
    ours_elapsed_s: Option<f64>,
    pgbench_tps: f64,
    pgbench_latency_avg_ms: f64,
    ratio: Option<f64>,
}

impl RoundReport {
    fn new(round: u32, ours: Option<&Submitted>, pgbench: &PgbenchRun) -> Self {
        let ours_cmds_per_s = ours.map(Submitted::cmds_per_s);
        Self {
            round,
            ours_cmds_per_s,
            ours_accepted: ours.map_or(0, |s| s.accepted.len()),
            ours_errors: ours.map_or(0, |s| s.errors),
            ours_elapsed_s: ours.map(|s| s.elapsed.as_secs_f64()),
            pgbench_tps: pgbench.tps,
            pgbench_latency_avg_ms: pgbench.latency_avg_ms,
            ratio: ours_cmds_per_s.map(|cmds| cmds / pgbench.tps),
        }
    }

    fn summary(&self) -> String {
        let pgbench = format!("pgbench {:.0} tps", self.pgbench_tps);
        match (self.ours_cmds_per_s, self.ratio) {
            (Some(cmds), Some(ratio)) => format!(
                "ours {cmds:.0} cmds/s ({} errors), {pgbench}, ratio {ratio:.2}",
                self.ours_errors
            ),
            _ => pgbench,
        }
    }
}

/// Relay lag of a set of accepted jobs' `JobSubmitted`.
#[derive(Debug, Serialize)]
struct LagStats {
    delivered: usize,
    /// Accepted but never delivered.
    missing: usize,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
}

fn fmt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

fn print_report(report: &Report) {
    let m = &report.machine;
    println!(
        "\nOverfly append benchmark — {}",
        report.date.format("%Y-%m-%d %H:%M:%S UTC")
    );
    println!("machine: {}, nproc {}", m.cpu_model, m.nproc);
    println!(
        "rounds per level: {} (ours then pgbench, alternating); warm-up: {} submits",
        report.rounds, report.warmup
    );
    let e = &report.event;
    println!(
        "ceiling row: {} v{}, payload {} B, metadata {} B — {}",
        e.event_type, e.event_version, e.payload_bytes, e.metadata_bytes, e.source
    );
    println!(
        "\n{:>5} {:>6} {:>9} {:>8} {:>8} {:>9} {:>6}  {:<17} {:>6} {:>21}",
        "conc",
        "count",
        "cmds/s",
        "p50 ms",
        "p99 ms",
        "pg tps",
        "ratio",
        "round ratios",
        "errors",
        "lag p50/p99/max ms"
    );
    for level in &report.levels {
        print_level(level);
    }
    println!(
        "\ncmds/s, pgbench tps and ratio are medians over rounds; latency percentiles pool all rounds."
    );
    if let (Some(lag), Some(counts)) = (&report.relay_lag, &report.relay_counts) {
        println!(
            "relay lag, all levels: p50 {} ms, p99 {} ms, max {} ms over {} events, {} missing",
            fmt(lag.p50_ms, 1),
            fmt(lag.p99_ms, 1),
            fmt(lag.max_ms, 1),
            lag.delivered,
            lag.missing,
        );
        println!(
            "also seen: {} duplicate JobSubmitted, {} other job events, {} unreadable messages",
            counts.duplicates, counts.other_events, counts.unreadable
        );
        println!(
            "  (lag = arrival at a core NATS subscriber − the row's recorded_at, which is taken \
             before the transaction commits: an upper bound of commit → JetStream publish-ack)"
        );
    }
    let verdict = match report.goals_met() {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    };
    println!(
        "goals: ratio ≥ {} at every level, relay lag p99 < {} ms — {verdict}",
        report.goals.ratio_min, report.goals.relay_lag_p99_max_ms
    );
}

fn print_level(level: &LevelReport) {
    let ratios: Vec<String> = level.rounds.iter().map(|r| fmt(r.ratio, 2)).collect();
    let lag = level.relay_lag.as_ref().map_or_else(
        || "-".into(),
        |lag| {
            format!(
                "{}/{}/{}",
                fmt(lag.p50_ms, 1),
                fmt(lag.p99_ms, 1),
                fmt(lag.max_ms, 1)
            )
        },
    );
    println!(
        "{:>5} {:>6} {:>9} {:>8} {:>8} {:>9} {:>6}  {:<17} {:>6} {:>21}",
        level.concurrency,
        level.count,
        fmt(level.cmds_per_s, 0),
        fmt(level.latency_p50_ms, 2),
        fmt(level.latency_p99_ms, 2),
        fmt(level.pgbench_tps, 0),
        fmt(level.ratio, 2),
        ratios.join(" "),
        level.errors,
        lag
    );
    for sample in &level.error_samples {
        println!("      error: {sample}");
    }
    if let Some(missing) = level
        .relay_lag
        .as_ref()
        .map(|lag| lag.missing)
        .filter(|&n| n > 0)
    {
        println!("      {missing} accepted jobs' events never arrived");
    }
}

fn write_json(path: &Path, report: &Report) -> Result<()> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
        assert_eq!(percentile(&values, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn median_handles_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn parses_pgbench_15_output() {
        let stdout = "transaction type: -\nscaling factor: 1\nquery mode: prepared\n\
            number of clients: 16\nnumber of threads: 2\nnumber of failed transactions: 0 (0.000%)\n\
            latency average = 2.345 ms\ninitial connection time = 12.5 ms\n\
            tps = 6823.123456 (without initial connection time)\n";
        let run = parse_pgbench(stdout).unwrap();
        assert_eq!(
            run,
            PgbenchRun {
                tps: 6823.123456,
                latency_avg_ms: 2.345
            }
        );
        assert!(parse_pgbench("latency average = 1 ms\n").is_err());
    }

    #[test]
    fn deliveries_time_submitted_events_and_count_the_rest() {
        let mut deliveries = Deliveries::default();
        let id = Uuid::new_v4();
        let recorded_at: DateTime<Utc> = "2026-11-01T12:00:00.000Z".parse().unwrap();
        let envelope = |event_type: &str| {
            json!({"aggregate_id": id, "event_type": event_type, "recorded_at": recorded_at, "sequence": 1})
                .to_string()
        };
        let received = recorded_at + chrono::Duration::milliseconds(12);
        deliveries.record(envelope(SUBMITTED_EVENT).as_bytes(), received);
        deliveries.record(envelope(SUBMITTED_EVENT).as_bytes(), received);
        deliveries.record(envelope("RunAssigned").as_bytes(), received);
        deliveries.record(b"not json", received);

        let stats = deliveries.lag_stats(&[id, Uuid::new_v4()]);
        assert_eq!((stats.delivered, stats.missing), (1, 1));
        assert_eq!(stats.p99_ms, Some(12.0));
        let counts = RelayCounts {
            duplicates: 1,
            other_events: 1,
            unreadable: 1,
        };
        assert_eq!(deliveries.counts, counts);
    }
}
