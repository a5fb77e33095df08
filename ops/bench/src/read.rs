//! `bench-read`: the read side at scale, each figure beside its physical ceiling in the same run.
//!
//! 1. **Seed** ≥ 1 million real domain events (`JobEvent` / `ExecutorEvent` values serialized by
//!    the domain crate, with the command-service's metadata shape) straight into `events` with
//!    `COPY`, in big transactions: jobs through full lifecycles, some failing and retrying, some
//!    stopped while running, some cancelled or still queued, and executors with GPUs.
//! 2. **Publish** them to JetStream as the relay does (same stream, subjects, envelopes, headers,
//!    commit order) and store the relay's position after them; `--real-relay` uses
//!    `overfly-command relay` itself, which at this backlog is far too slow (see the README).
//! 3. **(a) Catch-up** from an empty read model, events applied per second from
//!    `projection_checkpoints`: first the jobs projection's runner alone (in this process, the
//!    code `run` runs), then `overfly-projector run` (jobs, executors and usage together). Ceiling,
//!    before and after both: a plain JetStream pull of the same (job) messages written to Postgres
//!    with one `COPY` as they arrive.
//! 4. **(b) Rebuild**: `overfly-projector rebuild` (jobs) vs. `COPY (SELECT … FROM events ORDER BY
//!    tx_id, global_position) TO STDOUT` of the same rows, copy / rebuild / copy.
//! 5. **(c) Queries**: `overfly-query` under wrk at 64 connections: `GET /jobs?state=running&limit=50`
//!    and `GET /jobs/{id}` of random seeded jobs, alternating.
//! 6. **(d) Command → visible**: `POST /jobs` on `overfly-command serve`, then `GET /jobs/{id}` on
//!    the query service every millisecond until it answers 200.
//!
//! A benchmark, not a test: goals are reported, never asserted. It exits non-zero only when a phase
//! could not run. Run it through `ops/bench/read`, which prepares a scratch database and a private
//! nats-server; it must never point at a database or a stream that matters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, TimeZone, Utc};
use clap::Parser;
use futures::StreamExt;
use overfly_domain::executor::ExecutorEvent;
use overfly_domain::job::JobEvent;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::postgres::{PgPool, PgPoolCopyExt, PgPoolOptions};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// Goals from issue #3.
const GOAL_EVENTS_PER_S: f64 = 50_000.0;
const GOAL_QUERY_P99_MS: f64 = 10.0;
const GOAL_QUERY_RPS: f64 = 10_000.0;
const GOAL_VISIBLE_P99_MS: f64 = 100.0;
/// The jobs projection's JetStream filter (what the catch-up ceiling pulls).
const JOB_SUBJECTS: &str = "overfly.events.job.>";

#[derive(Debug, Parser)]
#[command(
    name = "bench-read",
    about = "Projector catch-up, rebuild, query throughput and command→visible latency vs. ceilings"
)]
struct Args {
    /// The scratch database (its events are seeded here; read models are built here).
    #[arg(
        long,
        env = "OVERFLY_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/overfly_bench_read"
    )]
    database_url: String,
    /// A private NATS server (JetStream) for the bench's stream.
    #[arg(
        long,
        env = "OVERFLY_BENCH_NATS_URL",
        default_value = "nats://127.0.0.1:14223"
    )]
    nats_url: String,
    /// The JetStream stream the relay publishes to and the projector reads.
    #[arg(long, default_value = "OVERFLY_EVENTS")]
    stream: String,
    /// Where overfly-command, overfly-projector and overfly-query (release) are.
    #[arg(long, env = "OVERFLY_BENCH_BIN_DIR", default_value = "target/release")]
    bin_dir: PathBuf,
    /// Logs of the services it starts go here.
    #[arg(long, env = "OVERFLY_BENCH_LOG_DIR", default_value = ".overfly")]
    log_dir: PathBuf,
    /// Jobs seeded (about 6.8 events each).
    #[arg(long, default_value_t = 150_000)]
    jobs: usize,
    /// Executors seeded (8 GPUs each).
    #[arg(long, default_value_t = 50)]
    executors: usize,
    /// Events per seeding transaction (one COPY each).
    #[arg(long, default_value_t = 200_000)]
    events_per_tx: usize,
    /// Give up on a catch-up after this many seconds (an error).
    #[arg(long, default_value_t = 420)]
    phase_timeout_s: u64,
    /// Stop the rebuild after this many seconds and report its rate so far (from its progress log).
    #[arg(long, default_value_t = 150)]
    rebuild_timeout_s: u64,
    /// Publish with the real relay (`overfly-command relay`) instead of the bench's own publisher
    /// of the same messages. Its batch query sorts the whole backlog per batch (see
    /// ops/bench/README.md), so at a million events this takes far longer than the bench.
    #[arg(long)]
    real_relay: bool,
    /// wrk: seconds per measured run (each preceded by a 3 s warm-up).
    #[arg(long, default_value_t = 10)]
    wrk_seconds: u64,
    /// wrk: measured runs per endpoint, alternating the two endpoints.
    #[arg(long, default_value_t = 2)]
    wrk_rounds: usize,
    /// wrk: connections.
    #[arg(long, default_value_t = 64)]
    wrk_connections: usize,
    /// wrk: threads.
    #[arg(long, default_value_t = 2)]
    wrk_threads: usize,
    /// Commands whose visibility is timed.
    #[arg(long, default_value_t = 500)]
    visible_commands: usize,
    /// Where the query service listens.
    #[arg(long, default_value = "127.0.0.1:18181")]
    query_addr: String,
    /// Where the command service listens.
    #[arg(long, default_value = "127.0.0.1:18180")]
    command_addr: String,
    /// Where the figures are written as JSON.
    #[arg(
        long,
        env = "OVERFLY_BENCH_OUTPUT",
        default_value = "ops/bench/results/read-latest.json"
    )]
    output: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// Report.

#[derive(Debug, Serialize)]
struct Report {
    date: DateTime<Utc>,
    machine: Machine,
    seed: SeedReport,
    relay: RelayReport,
    catch_up: CatchUpReport,
    rebuild: RebuildReport,
    queries: QueryReport,
    visible: VisibleReport,
    goals: Goals,
}

#[derive(Debug, Serialize)]
struct Machine {
    nproc: usize,
    cpu_model: String,
}

#[derive(Debug, Serialize)]
struct Goals {
    catch_up_events_per_s: f64,
    rebuild_events_per_s: f64,
    query_p99_ms_max: f64,
    query_rps_min: f64,
    visible_p99_ms_max: f64,
}

#[derive(Debug, Serialize)]
struct SeedReport {
    jobs: usize,
    executors: usize,
    events: u64,
    job_events: u64,
    transactions: usize,
    by_type: BTreeMap<String, u64>,
    jobs_by_final_state: BTreeMap<String, u64>,
    seconds: f64,
    copy_events_per_s: f64,
    events_table_mb: f64,
}

#[derive(Debug, Serialize)]
struct RelayReport {
    /// `overfly-command relay`, or the bench's own publisher of the relay's messages.
    publisher: String,
    messages: u64,
    seconds: f64,
    events_per_s: f64,
}

#[derive(Debug, Serialize)]
struct CatchUpReport {
    /// Job events: what the jobs projection applies and the ceiling pulls and copies.
    job_events: u64,
    /// The jobs projection's runner alone (in this process, the same code `run` runs), from an
    /// empty read model: the figure compared with the ceiling.
    jobs_alone: JobsAlone,
    /// Jobs projection: job events applied per second, from start to caught up, while the
    /// executors and usage projections run in the same process (as `run` does).
    jobs_events_per_s: f64,
    jobs_seconds: f64,
    /// Whether it was cut off by `--phase-timeout-s` (then the rate is of what it did so far).
    jobs_capped: bool,
    /// All three projections: stream messages handled (each reads its own filter) per second
    /// until the last one caught up.
    all_messages: u64,
    all_messages_per_s: f64,
    all_seconds: f64,
    per_projection: Vec<ProjectionCatchUp>,
    ceiling: Vec<CeilingRound>,
    ceiling_events_per_s_mean: f64,
    /// `run`'s jobs projection rate ÷ mean of the ceiling rounds around it.
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct JobsAlone {
    batch_size: usize,
    events_applied: i64,
    seconds: f64,
    events_per_s: f64,
    /// Its rate ÷ the mean of the ceiling rounds around the catch-up runs.
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct ProjectionCatchUp {
    projection: String,
    events_applied: i64,
    stream_sequence: i64,
    seconds: Option<f64>,
    last_error: Option<String>,
}

#[derive(Debug, Serialize, Clone)]
struct CeilingRound {
    round: usize,
    what: String,
    rows: u64,
    bytes: u64,
    seconds: f64,
    events_per_s: f64,
}

#[derive(Debug, Serialize)]
struct RebuildReport {
    command: String,
    job_events: u64,
    /// Stopped by `--rebuild-timeout-s`: the rate is of what it did until then.
    cut_off: bool,
    events_read: Option<u64>,
    seconds: f64,
    /// Events read ÷ wall time of the process (includes start-up, the swap and the drop).
    events_per_s: f64,
    /// The rate the rebuild itself printed, when it printed one.
    reported_events_per_s: Option<f64>,
    summary: String,
    ceiling: Vec<CeilingRound>,
    ceiling_events_per_s_mean: f64,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct QueryReport {
    running_jobs: u64,
    connections: usize,
    threads: usize,
    seconds_per_run: u64,
    list_running: Vec<WrkRun>,
    get_job: Vec<WrkRun>,
    list_running_median_rps: f64,
    list_running_max_p99_ms: f64,
    get_job_median_rps: f64,
    get_job_max_p99_ms: f64,
}

#[derive(Debug, Serialize, Clone)]
struct WrkRun {
    round: usize,
    requests: u64,
    requests_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    socket_errors: String,
}

#[derive(Debug, Serialize)]
struct VisibleReport {
    commands: usize,
    submit_p50_ms: f64,
    submit_p99_ms: f64,
    visible_p50_ms: f64,
    visible_p99_ms: f64,
    visible_max_ms: f64,
    polls_per_command_mean: f64,
    not_visible: usize,
}

// ---------------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut services = Services::new(&args.log_dir)?;
    let result = run(&args, &mut services).await;
    services.stop_all().await;
    let report = result?;
    print_report(&report);
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.output, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!("\nwritten: {}", args.output.display());
    Ok(())
}

async fn run(args: &Args, services: &mut Services) -> Result<Report> {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&args.database_url)
        .await
        .with_context(|| format!("connecting to {}", args.database_url))?;
    let nats = async_nats::connect(&args.nats_url)
        .await
        .with_context(|| format!("connecting to {}", args.nats_url))?;
    let js = jetstream::new(nats);
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .context("the scratch database must be migrated (ops/bench/read does it)")?;
    ensure!(
        existing == 0,
        "{} already holds {existing} events: bench-read wants an empty scratch database",
        args.database_url
    );

    eprintln!(
        "bench/read: seeding {} jobs, {} executors",
        args.jobs, args.executors
    );
    let (seed, sample) = seed(&pool, args).await?;
    eprintln!(
        "bench/read: seeded {} events ({} job events) in {:.1} s",
        seed.events, seed.job_events, seed.seconds
    );

    let relay = if args.real_relay {
        relay(args, services, &js, seed.events).await?
    } else {
        publish(args, &pool, &js).await?
    };
    eprintln!(
        "bench/read: relayed {} messages in {:.1} s",
        relay.messages, relay.seconds
    );

    let catch_up = catch_up(args, services, &pool, &js, &seed).await?;
    let rebuild = rebuild(args, services, &pool, seed.job_events).await?;
    let queries = queries(args, services, &pool, &sample).await?;
    let visible = visible(args, services).await?;

    Ok(Report {
        date: Utc::now(),
        machine: machine(),
        seed,
        relay,
        catch_up,
        rebuild,
        queries,
        visible,
        goals: Goals {
            catch_up_events_per_s: GOAL_EVENTS_PER_S,
            rebuild_events_per_s: GOAL_EVENTS_PER_S,
            query_p99_ms_max: GOAL_QUERY_P99_MS,
            query_rps_min: GOAL_QUERY_RPS,
            visible_p99_ms_max: GOAL_VISIBLE_P99_MS,
        },
    })
}

fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
    }
}

// ---------------------------------------------------------------------------------------------
// Services the bench starts (stopped at the end, whatever happened).

struct Services {
    log_dir: PathBuf,
    running: Vec<(String, Child)>,
}

impl Services {
    fn new(log_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        Ok(Self {
            log_dir: log_dir.to_path_buf(),
            running: Vec::new(),
        })
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("bench-read-{name}.log"))
    }

    fn command(
        &self,
        name: &str,
        exe: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Command> {
        let log = std::fs::File::create(self.log_path(name))?;
        let mut command = Command::new(exe);
        command
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        Ok(command)
    }

    fn start(&mut self, name: &str, exe: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
        let child = self
            .command(name, exe, args, env)?
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        self.running.push((name.to_string(), child));
        Ok(())
    }

    /// Fails when the service `name` has exited.
    fn check(&mut self, name: &str) -> Result<()> {
        if let Some((_, child)) = self.running.iter_mut().find(|(n, _)| n == name)
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "{name} exited ({status}); see {}",
                self.log_path(name).display()
            );
        }
        Ok(())
    }

    async fn stop(&mut self, name: &str) {
        if let Some(index) = self.running.iter().position(|(n, _)| n == name) {
            let (_, child) = self.running.remove(index);
            terminate(child).await;
        }
    }

    async fn stop_all(&mut self) {
        while let Some((_, child)) = self.running.pop() {
            terminate(child).await;
        }
    }
}

/// SIGTERM, then SIGKILL after 5 s.
async fn terminate(mut child: Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

fn bin(args: &Args, name: &str) -> Result<PathBuf> {
    let path = args.bin_dir.join(name);
    ensure!(
        path.is_file(),
        "{} missing: run `make bench-read` (cargo build --release)",
        path.display()
    );
    Ok(path)
}

async fn wait_ready(services: &mut Services, name: &str, url: &str) -> Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = client.get(url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        services.check(name)?;
        ensure!(Instant::now() < deadline, "{name} not ready after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Seeding.

/// One event row for `COPY events`.
struct Row {
    aggregate_type: &'static str,
    aggregate_id: String,
    sequence: i64,
    event_type: &'static str,
    payload: String,
    metadata: String,
}

/// What a seeded job ends as.
#[derive(Clone, Copy, Debug)]
enum Fate {
    Succeeded,
    RetriedThenSucceeded,
    Failed,
    Running,
    Cancelled,
    Queued,
}

impl Fate {
    /// 80 % succeed (8 % of all after a failed attempt), 4 % fail, 4 % are left running, 2 % are
    /// cancelled while queued and 2 % are still queued.
    fn of(job: usize) -> Self {
        match job % 50 {
            0 | 1 => Self::Running,
            2 | 3 => Self::Failed,
            4..=7 => Self::RetriedThenSucceeded,
            8 => Self::Cancelled,
            9 => Self::Queued,
            _ => Self::Succeeded,
        }
    }

    fn state(self) -> &'static str {
        match self {
            Self::Succeeded | Self::RetriedThenSucceeded => "succeeded",
            Self::Failed => "failed",
            Self::Running => "running",
            Self::Cancelled => "cancelled",
            Self::Queued => "queued",
        }
    }
}

fn base_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
        .single()
        .expect("a valid instant")
}

fn metadata(actor: &str, command: &str, correlation: Uuid) -> String {
    json!({
        "actor": actor,
        "command": command,
        "command_id": Uuid::new_v4(),
        "correlation_id": correlation,
    })
    .to_string()
}

/// Serializes `{type: fields}` through the domain's own `JobEvent` (so the payload is exactly
/// what the command-service would store, and a field the domain does not know fails here).
fn job_payload(event_type: &str, fields: Value) -> Result<String> {
    let event: JobEvent = serde_json::from_value(json!({ event_type: fields }))
        .with_context(|| format!("building a {event_type}"))?;
    Ok(serde_json::to_string(&event)?)
}

fn executor_payload(event_type: &str, fields: Value) -> Result<String> {
    let event: ExecutorEvent = serde_json::from_value(json!({ event_type: fields }))
        .with_context(|| format!("building a {event_type}"))?;
    Ok(serde_json::to_string(&event)?)
}

fn executor_id(n: usize) -> String {
    format!("bench-exec-{n:03}")
}

fn gpu_uuid(executor: usize, index: usize) -> String {
    format!("GPU-bench-{executor:03}-{index}")
}

fn executor_rows(executors: usize) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let at = base_time();
    for n in 0..executors {
        let id = executor_id(n);
        let correlation = Uuid::new_v4();
        let gpus: Vec<Value> = (0..8)
            .map(|i| {
                json!({
                    "uuid": gpu_uuid(n, i), "index": i, "name": "NVIDIA H100 80GB HBM3",
                    "memory_mb": 81559, "compute_capability": "9.0",
                })
            })
            .collect();
        let registered = executor_payload(
            "ExecutorRegistered",
            json!({"executor_id": id, "hostname": format!("gpu-host-{n}"), "gpus": gpus,
                   "lease_s": 30, "session": 1, "at": at}),
        )?;
        let activated = executor_payload("ExecutorActivated", json!({ "at": at }))?;
        for (sequence, event_type, payload, command) in [
            (1, "ExecutorRegistered", registered, "RegisterExecutor"),
            (2, "ExecutorActivated", activated, "Heartbeat"),
        ] {
            rows.push(Row {
                aggregate_type: "executor",
                aggregate_id: id.clone(),
                sequence,
                event_type,
                payload,
                metadata: metadata(&id, command, correlation),
            });
        }
    }
    Ok(rows)
}

/// The events of job number `n`, in order.
fn job_rows(n: usize, executors: usize) -> Result<(Uuid, Fate, Vec<Row>)> {
    let job_id = Uuid::new_v4();
    let fate = Fate::of(n);
    let user = format!("user-{:02}", n % 40);
    let correlation = Uuid::new_v4();
    let t0 = base_time() + chrono::Duration::seconds(i64::try_from(n).unwrap_or(0));
    let at = |minutes: i64| t0 + chrono::Duration::minutes(minutes);
    let executor = n % executors.max(1);
    let gpus = 1 + n % 2;
    let gpu_uuids: Vec<String> = (0..gpus)
        .map(|g| gpu_uuid(executor, (n / executors.max(1) * 2 + g) % 8))
        .collect();
    let exec_id = executor_id(executor);
    let max_retries = match fate {
        Fate::Failed => 0,
        _ => 2,
    };
    let spec = json!({
        "name": format!("bench-read-{n}"),
        "account": format!("acct-{:02}", n % 12),
        "submitted_by": user,
        "priority": n % 101,
        "gpus": gpus,
        "gpu_memory_mb": 40000,
        "command": ["python", "-m", "train", "--epochs", "3"],
        "env": {"OVERFLY_BENCH": "read"},
        "params": {"lr": 0.0003, "seed": n},
        "labels": {"suite": "bench-read", "benchmark": format!("tiles-v{}", n % 3)},
        "max_retries": max_retries,
        "timeout_s": 3600,
    });
    let mut events: Vec<(&'static str, &'static str, String)> = Vec::new();
    let mut push = |event_type: &'static str, command: &'static str, fields: Value| -> Result<()> {
        events.push((event_type, command, job_payload(event_type, fields)?));
        Ok(())
    };
    push(
        "JobSubmitted",
        "SubmitJob",
        json!({"job_id": job_id, "spec": spec, "at": at(0)}),
    )?;
    let decision = |attempt: u32| {
        json!({"score": 0.5 + f64::from(attempt) / 10.0, "priority": n % 101,
               "fair_share_factor": 0.8, "age_factor": 0.1, "overtook": [],
               "placement": format!("{exec_id}: {gpus} free GPUs with ≥ 40000 MiB")})
    };
    let minute = std::cell::Cell::new(1i64);
    let attempt_run = |attempt: u32,
                       outcome: &str,
                       push: &mut dyn FnMut(&'static str, &'static str, Value) -> Result<()>|
     -> Result<Uuid> {
        let run_id = Uuid::new_v4();
        let m = minute.get();
        minute.set(m + 30);
        push(
            "RunAssigned",
            "AssignRun",
            json!({"run_id": run_id, "attempt": attempt, "executor_id": exec_id,
                   "gpu_uuids": gpu_uuids, "decision": decision(attempt), "at": at(m)}),
        )?;
        push(
            "RunStarted",
            "ReportRunStarted",
            json!({"run_id": run_id, "attempt": attempt, "executor_id": exec_id, "at": at(m + 1)}),
        )?;
        let reports = if outcome == "failed" { 0 } else { 2 };
        for report in 1..=reports {
            push(
                "RunProgressed",
                "ReportRunProgress",
                json!({"run_id": run_id, "report_seq": report, "progress": f64::from(report) / 3.0,
                       "metrics": {"loss": 1.0 / f64::from(report + 1), "tokens_per_s": 1200.0},
                       "at": at(m + 1 + i64::from(report) * 5)}),
            )?;
        }
        match outcome {
            "succeeded" => push(
                "RunSucceeded",
                "ReportRunSucceeded",
                json!({"run_id": run_id, "attempt": attempt, "executor_id": exec_id,
                       "gpu_uuids": gpu_uuids, "started_at": at(m + 1), "at": at(m + 20)}),
            )?,
            "failed" => push(
                "RunFailed",
                "ReportRunFailed",
                json!({"run_id": run_id, "attempt": attempt, "executor_id": exec_id,
                       "gpu_uuids": gpu_uuids, "started_at": at(m + 1), "exit_code": 1,
                       "signal": null, "reason": "process exited with status 1",
                       "retryable": true, "at": at(m + 3)}),
            )?,
            _ => {}
        }
        Ok(run_id)
    };
    match fate {
        Fate::Succeeded => {
            let run = attempt_run(1, "succeeded", &mut push)?;
            push(
                "JobSucceeded",
                "ReportRunSucceeded",
                json!({"run_id": run, "attempts": 1, "at": at(minute.get())}),
            )?;
        }
        Fate::RetriedThenSucceeded => {
            let failed = attempt_run(1, "failed", &mut push)?;
            push(
                "RetryScheduled",
                "ReportRunFailed",
                json!({"next_attempt": 2, "after_run": failed, "eligible_at": at(minute.get()),
                       "backoff_s": 10, "trigger": {"kind": "automatic"}, "at": at(minute.get())}),
            )?;
            let run = attempt_run(2, "succeeded", &mut push)?;
            push(
                "JobSucceeded",
                "ReportRunSucceeded",
                json!({"run_id": run, "attempts": 2, "at": at(minute.get())}),
            )?;
        }
        Fate::Failed => {
            let run = attempt_run(1, "failed", &mut push)?;
            push(
                "JobFailed",
                "ReportRunFailed",
                json!({"reason": "process exited with status 1", "attempts": 1,
                       "last_run": run, "at": at(minute.get())}),
            )?;
        }
        Fate::Running => {
            attempt_run(1, "running", &mut push)?;
        }
        Fate::Cancelled => push(
            "JobCancelled",
            "CancelJob",
            json!({"by": user, "reason": "no longer needed", "previous_state": "queued",
                   "active_run": null, "active_executor": null, "at": at(1)}),
        )?,
        Fate::Queued => {}
    }
    let id = job_id.to_string();
    let rows = events
        .into_iter()
        .enumerate()
        .map(|(i, (event_type, command, payload))| Row {
            aggregate_type: "job",
            aggregate_id: id.clone(),
            sequence: i64::try_from(i).unwrap_or(0) + 1,
            event_type,
            payload,
            metadata: metadata(
                if command == "SubmitJob" {
                    &user
                } else {
                    &exec_id
                },
                command,
                correlation,
            ),
        })
        .collect();
    Ok((job_id, fate, rows))
}

/// A CSV field, always quoted.
fn csv_field(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for byte in text.bytes() {
        if byte == b'"' {
            out.push(b'"');
        }
        out.push(byte);
    }
    out.push(b'"');
}

fn csv_row(out: &mut Vec<u8>, row: &Row) {
    out.extend_from_slice(row.aggregate_type.as_bytes());
    out.push(b',');
    out.extend_from_slice(row.aggregate_id.as_bytes());
    out.push(b',');
    out.extend_from_slice(row.sequence.to_string().as_bytes());
    out.push(b',');
    out.extend_from_slice(row.event_type.as_bytes());
    out.extend_from_slice(b",1,");
    csv_field(out, &row.payload);
    out.push(b',');
    csv_field(out, &row.metadata);
    out.push(b'\n');
}

const COPY_EVENTS: &str = "COPY events (aggregate_type, aggregate_id, sequence, event_type, \
                           event_version, payload, metadata) FROM STDIN (FORMAT csv)";

/// Seeds the store; also returns a sample of job ids (for `GET /jobs/{id}`).
async fn seed(pool: &PgPool, args: &Args) -> Result<(SeedReport, Vec<Uuid>)> {
    let started = Instant::now();
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    let mut final_states: BTreeMap<String, u64> = BTreeMap::new();
    let mut sample = Vec::new();
    let mut events = 0u64;
    let mut job_events = 0u64;
    let mut transactions = 0;

    // Executors first, in a transaction of their own.
    let mut buf = Vec::new();
    for row in executor_rows(args.executors)? {
        *by_type.entry(row.event_type.to_string()).or_default() += 1;
        csv_row(&mut buf, &row);
        events += 1;
    }
    let mut copy = pool.copy_in_raw(COPY_EVENTS).await?;
    copy.send(buf).await?;
    copy.finish().await?;
    transactions += 1;

    // Jobs, 1000 at a time interleaved step by step (as concurrent jobs' events interleave in a
    // real store), one COPY (transaction) per `events_per_tx` events.
    const CHUNK: usize = 1000;
    let sample_every = (args.jobs / 20_000).max(1);
    let mut next = 0;
    while next < args.jobs {
        let mut copy = pool.copy_in_raw(COPY_EVENTS).await?;
        let mut in_tx = 0usize;
        let mut buf = Vec::with_capacity(8 << 20);
        while next < args.jobs && in_tx < args.events_per_tx {
            let end = (next + CHUNK).min(args.jobs);
            let mut chunk = Vec::with_capacity(end - next);
            for n in next..end {
                let (job_id, fate, rows) = job_rows(n, args.executors)?;
                if n.is_multiple_of(sample_every) {
                    sample.push(job_id);
                }
                *final_states.entry(fate.state().to_string()).or_default() += 1;
                chunk.push(rows.into_iter());
            }
            next = end;
            loop {
                let mut any = false;
                for rows in &mut chunk {
                    if let Some(row) = rows.next() {
                        any = true;
                        *by_type.entry(row.event_type.to_string()).or_default() += 1;
                        csv_row(&mut buf, &row);
                        events += 1;
                        job_events += 1;
                        in_tx += 1;
                    }
                }
                if !any {
                    break;
                }
            }
            if buf.len() >= 4 << 20 {
                copy.send(std::mem::take(&mut buf)).await?;
            }
        }
        if !buf.is_empty() {
            copy.send(buf).await?;
        }
        copy.finish().await?;
        transactions += 1;
        eprintln!("bench/read: seeded {events} events");
    }
    let seconds = started.elapsed().as_secs_f64();
    sqlx::query("ANALYZE events").execute(pool).await?;
    let bytes: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('events')")
        .fetch_one(pool)
        .await?;
    Ok((
        SeedReport {
            jobs: args.jobs,
            executors: args.executors,
            events,
            job_events,
            transactions,
            by_type,
            jobs_by_final_state: final_states,
            seconds,
            copy_events_per_s: events as f64 / seconds,
            events_table_mb: bytes as f64 / 1_048_576.0,
        },
        sample,
    ))
}

// ---------------------------------------------------------------------------------------------
// Relay.

async fn stream_state(js: &jetstream::Context, stream: &str) -> Option<(u64, u64)> {
    let mut stream = js.get_stream(stream).await.ok()?;
    let info = stream.info().await.ok()?;
    Some((info.state.messages, info.state.last_sequence))
}

async fn relay(
    args: &Args,
    services: &mut Services,
    js: &jetstream::Context,
    events: u64,
) -> Result<RelayReport> {
    let exe = bin(args, "overfly-command")?;
    let started = Instant::now();
    services.start(
        "relay",
        &exe,
        &["relay"],
        &[
            ("DATABASE_URL", &args.database_url),
            ("NATS_URL", &args.nats_url),
            ("OVERFLY_EVENTS_STREAM", &args.stream),
        ],
    )?;
    let mut last_print = Instant::now();
    loop {
        let messages = stream_state(js, &args.stream).await.map_or(0, |s| s.0);
        if messages >= events {
            break;
        }
        services.check("relay")?;
        ensure!(
            started.elapsed() < Duration::from_secs(args.phase_timeout_s * 2),
            "the relay published only {messages} of {events} events"
        );
        if last_print.elapsed() > Duration::from_secs(10) {
            eprintln!("bench/read: relay: {messages}/{events} messages");
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Let it store its position (at most every 100 ms, and when caught up) before stopping it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    services.stop("relay").await;
    Ok(RelayReport {
        publisher: "overfly-command relay".into(),
        messages: events,
        seconds,
        events_per_s: events as f64 / seconds,
    })
}

/// Publishes every event of the store to the stream as the relay does (same stream settings,
/// subject, envelope and headers, commit order, `Nats-Msg-Id`), 1000 publishes in flight, then
/// stores the relay's position so a relay started later resumes after them.
async fn publish(args: &Args, pool: &PgPool, js: &jetstream::Context) -> Result<RelayReport> {
    use async_nats::HeaderMap;
    use async_nats::jetstream::{message::PublishMessage, stream};
    use overfly_schemas::EventEnvelope;
    use overfly_schemas::subjects::{self, headers};

    js.get_or_create_stream(stream::Config {
        name: args.stream.clone(),
        subjects: vec![subjects::EVENTS_ALL.to_string()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating the stream: {e}"))?;
    type Stored = (
        String,
        i64,
        String,
        String,
        i64,
        String,
        String,
        Value,
        Value,
        DateTime<Utc>,
    );
    let started = Instant::now();
    let mut rows = sqlx::query_as::<_, Stored>(
        "SELECT tx_id::text AS tx, global_position, aggregate_type, aggregate_id, sequence,
                event_type, event_version, payload, metadata, recorded_at
           FROM events ORDER BY events.tx_id, events.global_position",
    )
    .fetch(pool);
    let mut acks = Vec::with_capacity(1000);
    let mut messages = 0u64;
    let mut last: Option<(String, i64)> = None;
    while let Some(row) = rows.next().await {
        let (
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
        ) = row?;
        let Value::Object(metadata) = metadata else {
            bail!("event {position} has non-object metadata");
        };
        let envelope = EventEnvelope {
            aggregate_type,
            aggregate_id,
            sequence,
            position,
            event_type,
            event_version,
            recorded_at,
            metadata,
            payload,
        };
        let mut map = HeaderMap::new();
        map.insert(headers::MSG_ID, envelope.msg_id().as_str());
        map.insert(headers::EVENT_TYPE, envelope.event_type.as_str());
        map.insert(headers::EVENT_VERSION, envelope.event_version.as_str());
        map.insert(headers::AGGREGATE_TYPE, envelope.aggregate_type.as_str());
        map.insert(headers::AGGREGATE_ID, envelope.aggregate_id.as_str());
        map.insert(headers::SEQUENCE, envelope.sequence.to_string().as_str());
        map.insert(headers::POSITION, position.to_string().as_str());
        map.insert(headers::TX, tx.as_str());
        let message = PublishMessage::build()
            .payload(serde_json::to_vec(&envelope)?.into())
            .headers(map);
        let ack = js
            .send_publish(envelope.subject(), message)
            .await
            .map_err(|e| anyhow::anyhow!("publishing: {e}"))?;
        acks.push(ack);
        messages += 1;
        last = Some((tx, position));
        if acks.len() >= 1000 {
            for ack in acks.drain(..) {
                ack.await.map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
            }
        }
        if messages.is_multiple_of(200_000) {
            eprintln!("bench/read: published {messages} messages");
        }
    }
    for ack in acks.drain(..) {
        ack.await.map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(rows);
    if let Some((tx, position)) = last {
        sqlx::query(
            "INSERT INTO relay_positions (stream, tx_id, global_position)
             VALUES ($1, $2::text::xid8, $3)
             ON CONFLICT (stream) DO UPDATE
                SET tx_id = EXCLUDED.tx_id, global_position = EXCLUDED.global_position",
        )
        .bind(&args.stream)
        .bind(tx)
        .bind(position)
        .execute(pool)
        .await?;
    }
    Ok(RelayReport {
        publisher: "bench-read's own publisher (the relay's messages, in commit order)".into(),
        messages,
        seconds,
        events_per_s: messages as f64 / seconds,
    })
}

// ---------------------------------------------------------------------------------------------
// (a) Catch-up.

/// The ceiling of a catch-up: pull the job messages from JetStream (batches of 500, as the
/// runner fetches) and write every one to Postgres with one COPY, as they arrive.
async fn catch_up_ceiling(
    pool: &PgPool,
    js: &jetstream::Context,
    stream: &str,
    expected: u64,
    round: usize,
) -> Result<CeilingRound> {
    sqlx::query("DROP TABLE IF EXISTS bench_sink")
        .execute(pool)
        .await?;
    sqlx::query(
        "CREATE TABLE bench_sink (stream_sequence bigint NOT NULL, envelope jsonb NOT NULL)",
    )
    .execute(pool)
    .await?;
    sqlx::query("CHECKPOINT").execute(pool).await?;
    let stream = js.get_stream(stream).await?;
    let name = format!("bench-read-ceiling-{round}");
    let _ = stream.delete_consumer(&name).await;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.clone()),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            filter_subject: JOB_SUBJECTS.to_string(),
            ..Default::default()
        })
        .await?;
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw("COPY bench_sink (stream_sequence, envelope) FROM STDIN (FORMAT csv)")
        .await?;
    let mut buf = Vec::with_capacity(2 << 20);
    let (mut rows, mut bytes) = (0u64, 0u64);
    let mut idle = 0;
    while rows < expected {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("pulling: {e}"))?;
            let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
            buf.extend_from_slice(info.stream_sequence.to_string().as_bytes());
            buf.push(b',');
            csv_field(&mut buf, std::str::from_utf8(&message.payload)?);
            buf.push(b'\n');
            bytes += message.payload.len() as u64;
            got += 1;
        }
        rows += got;
        if buf.len() >= 1 << 20 {
            copy.send(std::mem::take(&mut buf)).await?;
        }
        idle = if got == 0 { idle + 1 } else { 0 };
        ensure!(
            idle < 20,
            "the ceiling's pull stalled at {rows} of {expected} messages"
        );
    }
    copy.send(buf).await?;
    copy.finish().await?;
    let seconds = started.elapsed().as_secs_f64();
    drop(conn);
    let _ = stream.delete_consumer(&name).await;
    sqlx::query("DROP TABLE bench_sink").execute(pool).await?;
    Ok(CeilingRound {
        round,
        what: "JetStream pull (batches of 500) + one COPY into a jsonb table".into(),
        rows,
        bytes,
        seconds,
        events_per_s: rows as f64 / seconds,
    })
}

#[derive(sqlx::FromRow)]
struct CheckpointRow {
    projection: String,
    events_applied: i64,
    stream_sequence: i64,
    last_error: Option<String>,
}

async fn checkpoints(pool: &PgPool) -> Result<Vec<CheckpointRow>> {
    Ok(sqlx::query_as(
        "SELECT projection, events_applied, stream_sequence, last_error
           FROM projection_checkpoints ORDER BY projection",
    )
    .fetch_all(pool)
    .await?)
}

async fn catch_up(
    args: &Args,
    services: &mut Services,
    pool: &PgPool,
    js: &jetstream::Context,
    seed: &SeedReport,
) -> Result<CatchUpReport> {
    let exe = bin(args, "overfly-projector")?;
    let (messages, last_sequence) = stream_state(js, &args.stream)
        .await
        .context("the stream is missing")?;
    let last_sequence = i64::try_from(last_sequence)?;
    let mut ceiling = Vec::new();
    eprintln!("bench/read: catch-up ceiling, round 1");
    ceiling.push(catch_up_ceiling(pool, js, &args.stream, seed.job_events, 1).await?);
    eprintln!("bench/read: {:.0} events/s", ceiling[0].events_per_s);

    let alone = jobs_alone(args, pool, last_sequence).await?;
    eprintln!(
        "bench/read: jobs runner alone: {:.0} events/s ({} in {:.1} s)",
        alone.events_per_s, alone.events_applied, alone.seconds
    );

    eprintln!("bench/read: overfly-projector run (catch-up from empty read models)");
    sqlx::query("CHECKPOINT").execute(pool).await?;
    let started = Instant::now();
    services.start(
        "projector",
        &exe,
        &["run"],
        &[
            ("DATABASE_URL", &args.database_url),
            ("NATS_URL", &args.nats_url),
            ("OVERFLY_EVENTS_STREAM", &args.stream),
        ],
    )?;
    let names = ["jobs", "executors", "usage"];
    let mut done_at: BTreeMap<String, f64> = BTreeMap::new();
    let mut last_print = Instant::now();
    let mut rows;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        services.check("projector")?;
        rows = checkpoints(pool).await.unwrap_or_default();
        let elapsed = started.elapsed().as_secs_f64();
        for row in &rows {
            if row.stream_sequence >= last_sequence && !done_at.contains_key(&row.projection) {
                done_at.insert(row.projection.clone(), elapsed);
                eprintln!(
                    "bench/read: {} caught up after {elapsed:.1} s",
                    row.projection
                );
            }
            if let Some(error) = &row.last_error {
                bail!("projection {} stopped: {error}", row.projection);
            }
        }
        if names.iter().all(|n| done_at.contains_key(*n))
            || started.elapsed() > Duration::from_secs(args.phase_timeout_s)
        {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            let progress: Vec<String> = rows
                .iter()
                .map(|r| format!("{} {}/{last_sequence}", r.projection, r.stream_sequence))
                .collect();
            eprintln!(
                "bench/read: catch-up {elapsed:.0} s: {}",
                progress.join(", ")
            );
            last_print = Instant::now();
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let jobs_row = rows.iter().find(|r| r.projection == "jobs");
    let jobs_applied = jobs_row.map_or(0, |r| r.events_applied);
    let jobs_seconds = done_at.get("jobs").copied().unwrap_or(elapsed);
    let jobs_capped = !done_at.contains_key("jobs");
    let jobs_events_per_s = jobs_applied as f64 / jobs_seconds;
    // Messages handled: the jobs consumer sees the job messages, the other two every message.
    let all_messages: u64 = rows
        .iter()
        .map(|r| {
            let seen = u64::try_from(r.stream_sequence).unwrap_or(0);
            if r.projection == "jobs" {
                seen.saturating_sub(seed.events - seed.job_events)
            } else {
                seen
            }
        })
        .sum();
    let all_seconds =
        done_at
            .values()
            .copied()
            .fold(0.0, f64::max)
            .max(if done_at.len() == names.len() {
                0.0
            } else {
                elapsed
            });
    let per_projection = rows
        .iter()
        .map(|r| ProjectionCatchUp {
            projection: r.projection.clone(),
            events_applied: r.events_applied,
            stream_sequence: r.stream_sequence,
            seconds: done_at.get(&r.projection).copied(),
            last_error: r.last_error.clone(),
        })
        .collect();
    eprintln!(
        "bench/read: jobs projection {jobs_events_per_s:.0} events/s ({jobs_applied} in {jobs_seconds:.1} s{})",
        if jobs_capped { ", cut off" } else { "" }
    );
    if !jobs_capped && done_at.len() < names.len() {
        eprintln!("bench/read: (the other projections are still catching up; they keep running)");
    }
    let _ = messages;

    eprintln!("bench/read: catch-up ceiling, round 2");
    ceiling.push(catch_up_ceiling(pool, js, &args.stream, seed.job_events, 2).await?);
    eprintln!("bench/read: {:.0} events/s", ceiling[1].events_per_s);
    let ceiling_mean = ceiling.iter().map(|c| c.events_per_s).sum::<f64>() / ceiling.len() as f64;
    let alone = JobsAlone {
        ratio: alone.events_per_s / ceiling_mean,
        ..alone
    };
    Ok(CatchUpReport {
        job_events: seed.job_events,
        jobs_alone: alone,
        jobs_events_per_s,
        jobs_seconds,
        jobs_capped,
        all_messages,
        all_messages_per_s: all_messages as f64 / all_seconds.max(1e-9),
        all_seconds,
        per_projection,
        ceiling,
        ceiling_events_per_s_mean: ceiling_mean,
        ratio: jobs_events_per_s / ceiling_mean,
    })
}

/// The jobs projection's runner alone, in this process, from an empty read model to the end of
/// the stream; then its tables and checkpoint are emptied again for `overfly-projector run`.
async fn jobs_alone(args: &Args, pool: &PgPool, last_sequence: i64) -> Result<JobsAlone> {
    use overfly_projector::runner::{JobsProjection, Outcome, RunnerConfig};
    let nats = async_nats::connect(&args.nats_url).await?;
    let config = RunnerConfig {
        stream: args.stream.clone(),
        ..RunnerConfig::default()
    };
    let batch_size = config.batch_size;
    eprintln!("bench/read: jobs projection runner alone (in-process, batches of {batch_size})");
    sqlx::query("CHECKPOINT").execute(pool).await?;
    let mut runner = JobsProjection::new(pool.clone(), nats, config);
    let started = Instant::now();
    let mut idle = 0;
    loop {
        match runner.step().await? {
            Outcome::Processed(_) => idle = 0,
            Outcome::Idle => idle += 1,
        }
        let done: Option<i64> = sqlx::query_scalar(
            "SELECT stream_sequence FROM projection_checkpoints WHERE projection = 'jobs'",
        )
        .fetch_optional(pool)
        .await?;
        if done.unwrap_or(0) >= last_sequence {
            break;
        }
        ensure!(
            idle < 50,
            "the jobs runner stopped at stream sequence {done:?}"
        );
        ensure!(
            started.elapsed() < Duration::from_secs(args.phase_timeout_s),
            "the jobs runner did not catch up in {} s",
            args.phase_timeout_s
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(runner); // its connection, and with it the projection's leader lock
    let events_applied: i64 = sqlx::query_scalar(
        "SELECT events_applied FROM projection_checkpoints WHERE projection = 'jobs'",
    )
    .fetch_one(pool)
    .await?;
    sqlx::query("TRUNCATE read_jobs, read_runs")
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection = 'jobs'")
        .execute(pool)
        .await?;
    Ok(JobsAlone {
        batch_size,
        events_applied,
        seconds,
        events_per_s: events_applied as f64 / seconds,
        ratio: 0.0,
    })
}

// ---------------------------------------------------------------------------------------------
// (b) Rebuild.

/// The ceiling of a rebuild: the same rows read in the same order, straight out with COPY.
async fn rebuild_ceiling(pool: &PgPool, round: usize) -> Result<CeilingRound> {
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    let mut out = conn
        .copy_out_raw(
            "COPY (SELECT tx_id, global_position, aggregate_type, aggregate_id, sequence,
                          event_type, event_version, payload, metadata, recorded_at
                     FROM events WHERE aggregate_type = 'job'
                    ORDER BY tx_id, global_position) TO STDOUT",
        )
        .await?;
    let (mut rows, mut bytes) = (0u64, 0u64);
    while let Some(chunk) = out.next().await {
        let chunk = chunk?;
        rows += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        bytes += chunk.len() as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(CeilingRound {
        round,
        what: "COPY (SELECT … FROM events WHERE job ORDER BY tx_id, global_position) TO STDOUT"
            .into(),
        rows,
        bytes,
        seconds,
        events_per_s: rows as f64 / seconds,
    })
}

async fn rebuild(
    args: &Args,
    services: &mut Services,
    pool: &PgPool,
    job_events: u64,
) -> Result<RebuildReport> {
    let exe = bin(args, "overfly-projector")?;
    // The CLI is being generalized to every projection: `rebuild jobs` where it takes one.
    let help = Command::new(&exe)
        .args(["rebuild", "--help"])
        .output()
        .await?;
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let mut cli: Vec<&str> = vec!["rebuild"];
    if help.contains("<PROJECTION>") || help.contains("[PROJECTION]") {
        cli.push("jobs");
    }
    let mut ceiling = Vec::new();
    eprintln!("bench/read: rebuild ceiling, round 1");
    ceiling.push(rebuild_ceiling(pool, 1).await?);
    eprintln!("bench/read: {:.0} events/s", ceiling[0].events_per_s);

    eprintln!("bench/read: overfly-projector {}", cli.join(" "));
    sqlx::query("CHECKPOINT").execute(pool).await?;
    let mut command = services.command(
        "rebuild",
        &exe,
        &cli,
        &[
            ("DATABASE_URL", &args.database_url),
            ("NATS_URL", &args.nats_url),
        ],
    )?;
    command.stdout(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn()?;
    let mut stdout = child.stdout.take().context("the rebuild's stdout")?;
    let reading = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut text).await;
        text
    });
    let finished =
        tokio::time::timeout(Duration::from_secs(args.rebuild_timeout_s), child.wait()).await;
    let seconds = started.elapsed().as_secs_f64();
    let (events_read, reported, summary, cut_off) = match finished {
        Ok(status) => {
            let status = status?;
            let summary = reading.await?.trim().to_string();
            ensure!(
                status.success(),
                "the rebuild failed ({status}); see {}",
                services.log_path("rebuild").display()
            );
            let read = number_before(&summary, " events read");
            let reported = number_before(&summary, " events/s").map(|n| n as f64);
            (read, reported, summary, false)
        }
        Err(_) => {
            terminate(child).await;
            let log = std::fs::read_to_string(services.log_path("rebuild")).unwrap_or_default();
            let done = log
                .lines()
                .rev()
                .find_map(|line| {
                    let rest = &line[line.find("progress: ")? + "progress: ".len()..];
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse::<u64>().ok()
                })
                .unwrap_or(0);
            let summary = format!(
                "cut off after {seconds:.0} s (--rebuild-timeout-s) at {done} of {job_events} \
                 events (its last progress line)"
            );
            (Some(done), None, summary, true)
        }
    };
    let events_per_s = events_read.unwrap_or(job_events) as f64 / seconds;
    eprintln!("bench/read: rebuild {events_per_s:.0} events/s ({summary})");

    eprintln!("bench/read: rebuild ceiling, round 2");
    ceiling.push(rebuild_ceiling(pool, 2).await?);
    eprintln!("bench/read: {:.0} events/s", ceiling[1].events_per_s);
    let ceiling_mean = ceiling.iter().map(|c| c.events_per_s).sum::<f64>() / ceiling.len() as f64;
    Ok(RebuildReport {
        command: format!("overfly-projector {}", cli.join(" ")),
        job_events,
        cut_off,
        events_read,
        seconds,
        events_per_s,
        reported_events_per_s: reported,
        summary,
        ceiling,
        ceiling_events_per_s_mean: ceiling_mean,
        ratio: events_per_s / ceiling_mean,
    })
}

/// The integer right before `marker` in `text` (e.g. "1234 events read").
fn number_before(text: &str, marker: &str) -> Option<u64> {
    let end = text.find(marker)?;
    let digits: String = text[..end]
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.chars().rev().collect::<String>().parse().ok()
}

// ---------------------------------------------------------------------------------------------
// (c) Queries under wrk.

async fn queries(
    args: &Args,
    services: &mut Services,
    pool: &PgPool,
    sample: &[Uuid],
) -> Result<QueryReport> {
    let exe = bin(args, "overfly-query")?;
    services.start(
        "query",
        &exe,
        &["serve"],
        &[
            ("DATABASE_URL", &args.database_url),
            ("OVERFLY_QUERY_ADDR", &args.query_addr),
        ],
    )?;
    let base = format!("http://{}", args.query_addr);
    wait_ready(services, "query", &format!("{base}/readyz")).await?;
    let running_jobs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM read_jobs WHERE state = 'running'")
            .fetch_one(pool)
            .await?;
    // Sanity: both endpoints answer with data.
    let client = reqwest::Client::new();
    let page: Value = client
        .get(format!("{base}/jobs?state=running&limit=50"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let items = page["items"].as_array().map_or(0, Vec::len);
    ensure!(
        items == 50,
        "GET /jobs?state=running&limit=50 returned {items} items"
    );
    client
        .get(format!("{base}/jobs/{}", sample[0]))
        .send()
        .await?
        .error_for_status()
        .context("GET /jobs/{id} of a seeded job")?;

    let ids = args.log_dir.join("bench-read-ids.txt");
    let text: String = sample.iter().map(|id| format!("{id}\n")).collect();
    std::fs::write(&ids, text)?;
    let script = args.log_dir.join("bench-read-get-job.lua");
    std::fs::write(
        &script,
        format!(
            "local ids = {{}}\n\
             for line in io.lines(\"{}\") do ids[#ids + 1] = line end\n\
             math.randomseed(os.time() + math.floor(os.clock() * 1000000))\n\
             request = function()\n  \
               return wrk.format(\"GET\", \"/jobs/\" .. ids[math.random(#ids)])\n\
             end\n",
            std::fs::canonicalize(&ids)?.display()
        ),
    )?;
    let list_url = format!("{base}/jobs?state=running&limit=50");
    let get_url = format!("{base}/");
    let script_arg = script.display().to_string();
    let mut list_running = Vec::new();
    let mut get_job = Vec::new();
    for round in 1..=args.wrk_rounds {
        for (which, url, script) in [
            ("list", &list_url, None),
            ("get", &get_url, Some(script_arg.as_str())),
        ] {
            if round == 1 {
                wrk(args, url, script, 3).await?; // warm-up, not counted
            }
            let mut run = wrk(args, url, script, args.wrk_seconds).await?;
            run.round = round;
            eprintln!(
                "bench/read: wrk {which} round {round}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, non-2xx {}",
                run.requests_per_s, run.p50_ms, run.p99_ms, run.non_2xx
            );
            if which == "list" {
                list_running.push(run);
            } else {
                get_job.push(run);
            }
        }
    }
    let median_rps = |runs: &[WrkRun]| median(runs.iter().map(|r| r.requests_per_s).collect());
    let max_p99 = |runs: &[WrkRun]| runs.iter().map(|r| r.p99_ms).fold(0.0, f64::max);
    Ok(QueryReport {
        running_jobs: u64::try_from(running_jobs).unwrap_or(0),
        connections: args.wrk_connections,
        threads: args.wrk_threads,
        seconds_per_run: args.wrk_seconds,
        list_running_median_rps: median_rps(&list_running),
        list_running_max_p99_ms: max_p99(&list_running),
        get_job_median_rps: median_rps(&get_job),
        get_job_max_p99_ms: max_p99(&get_job),
        list_running,
        get_job,
    })
}

async fn wrk(args: &Args, url: &str, script: Option<&str>, seconds: u64) -> Result<WrkRun> {
    let mut command = Command::new("wrk");
    command.args([
        "-t",
        &args.wrk_threads.to_string(),
        "-c",
        &args.wrk_connections.to_string(),
        "-d",
        &format!("{seconds}s"),
        "--latency",
    ]);
    if let Some(script) = script {
        command.args(["-s", script]);
    }
    let output = command
        .arg(url)
        .output()
        .await
        .context("running wrk (Debian: apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    ensure!(
        output.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse_wrk(&text).with_context(|| format!("reading wrk's output:\n{text}"))
}

fn parse_wrk(text: &str) -> Result<WrkRun> {
    let mut run = WrkRun {
        round: 0,
        requests: 0,
        requests_per_s: 0.0,
        p50_ms: f64::NAN,
        p90_ms: f64::NAN,
        p99_ms: f64::NAN,
        non_2xx: 0,
        socket_errors: String::new(),
    };
    let mut in_distribution = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            if let Some((p, value)) = line.split_once('%') {
                let ms = duration_ms(value.trim());
                match p.trim() {
                    "50" => run.p50_ms = ms.unwrap_or(f64::NAN),
                    "90" => run.p90_ms = ms.unwrap_or(f64::NAN),
                    "99" => run.p99_ms = ms.unwrap_or(f64::NAN),
                    _ => {}
                }
                continue;
            }
            in_distribution = false;
        }
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            run.requests_per_s = rest.trim().parse()?;
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.non_2xx = rest.trim().parse()?;
        } else if line.starts_with("Socket errors:") {
            run.socket_errors = line.to_string();
        } else if line.contains("requests in") {
            run.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    ensure!(run.requests_per_s > 0.0, "no Requests/sec line");
    Ok(run)
}

/// wrk's "1.23ms" / "850.00us" / "1.02s" in milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        return None;
    };
    number.trim().parse::<f64>().ok().map(|v| v * factor)
}

// ---------------------------------------------------------------------------------------------
// (d) Command → visible.

async fn visible(args: &Args, services: &mut Services) -> Result<VisibleReport> {
    let exe = bin(args, "overfly-command")?;
    services.start(
        "command",
        &exe,
        &["serve"],
        &[
            ("DATABASE_URL", &args.database_url),
            ("NATS_URL", &args.nats_url),
            ("OVERFLY_EVENTS_STREAM", &args.stream),
            ("OVERFLY_COMMAND_ADDR", &args.command_addr),
        ],
    )?;
    let command_url = format!("http://{}", args.command_addr);
    let query_url = format!("http://{}", args.query_addr);
    wait_ready(services, "command", &format!("{command_url}/readyz")).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()?;
    let (mut submit, mut seen) = (Vec::new(), Vec::new());
    let mut polls = 0u64;
    let mut not_visible = 0;
    // 20 untimed warm-up commands, then the measured ones.
    for n in 0..args.visible_commands + 20 {
        let body = json!({
            "name": format!("bench-read-visible-{n}"), "account": "bench", "submitted_by": "bench",
            "priority": 50, "gpus": 1, "gpu_memory_mb": 1000,
            "command": ["python", "-m", "train"], "env": {}, "params": {},
            "labels": {"suite": "bench-read"}, "max_retries": 0, "timeout_s": 60,
        });
        let started = Instant::now();
        let response = client
            .post(format!("{command_url}/jobs"))
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let accepted: Value = response.json().await?;
        ensure!(
            status.is_success(),
            "POST /jobs answered {status}: {accepted}"
        );
        let submitted = started.elapsed();
        let id = accepted["id"]
            .as_str()
            .context("no id in the answer")?
            .to_string();
        let deadline = started + Duration::from_secs(10);
        let visible_after = loop {
            polls += 1;
            let response = client.get(format!("{query_url}/jobs/{id}")).send().await?;
            if response.status().is_success() {
                break Some(started.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        if n < 20 {
            continue;
        }
        submit.push(submitted.as_secs_f64() * 1000.0);
        match visible_after {
            Some(after) => seen.push(after.as_secs_f64() * 1000.0),
            None => not_visible += 1,
        }
    }
    submit.sort_by(f64::total_cmp);
    seen.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| percentile(v, p).unwrap_or(f64::NAN);
    Ok(VisibleReport {
        commands: args.visible_commands,
        submit_p50_ms: pct(&submit, 50.0),
        submit_p99_ms: pct(&submit, 99.0),
        visible_p50_ms: pct(&seen, 50.0),
        visible_p99_ms: pct(&seen, 99.0),
        visible_max_ms: seen.last().copied().unwrap_or(f64::NAN),
        polls_per_command_mean: polls as f64 / (args.visible_commands + 20) as f64,
        not_visible,
    })
}

// ---------------------------------------------------------------------------------------------
// Statistics and output.

/// Nearest-rank percentile of an ascending slice; `None` when empty.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[mid],
        _ => (values[mid - 1] + values[mid]) / 2.0,
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn print_report(r: &Report) {
    println!(
        "\nbench-read — {} ({} cores, {})",
        r.date.format("%Y-%m-%d %H:%M UTC"),
        r.machine.nproc,
        r.machine.cpu_model
    );
    println!(
        "seed: {} events ({} job events, {} jobs, {} executors) in {} COPY transactions, {:.1} s ({:.0} events/s), events table {:.0} MiB",
        r.seed.events,
        r.seed.job_events,
        r.seed.jobs,
        r.seed.executors,
        r.seed.transactions,
        r.seed.seconds,
        r.seed.copy_events_per_s,
        r.seed.events_table_mb
    );
    println!(
        "publish: {} messages in {:.1} s ({:.0} events/s) by {}",
        r.relay.messages, r.relay.seconds, r.relay.events_per_s, r.relay.publisher
    );
    let c = &r.catch_up;
    println!(
        "(a) catch-up, jobs projection in `run`: {:.0} events/s ({} events in {:.1} s{}); ceiling {:.0} events/s (rounds {}); ratio {:.2} — goal ≥ {:.0}: {}",
        c.jobs_events_per_s,
        c.job_events,
        c.jobs_seconds,
        if c.jobs_capped { ", cut off" } else { "" },
        c.ceiling_events_per_s_mean,
        c.ceiling
            .iter()
            .map(|x| format!("{:.0}", x.events_per_s))
            .collect::<Vec<_>>()
            .join(", "),
        c.ratio,
        r.goals.catch_up_events_per_s,
        verdict(c.jobs_events_per_s >= r.goals.catch_up_events_per_s)
    );
    println!(
        "    jobs runner alone (batches of {}): {:.0} events/s ({} in {:.1} s); ratio {:.2}",
        c.jobs_alone.batch_size,
        c.jobs_alone.events_per_s,
        c.jobs_alone.events_applied,
        c.jobs_alone.seconds,
        c.jobs_alone.ratio
    );
    println!(
        "    all three projections: {} messages in {:.1} s ({:.0} messages/s)",
        c.all_messages, c.all_seconds, c.all_messages_per_s
    );
    for p in &c.per_projection {
        println!(
            "    {}: applied {}, stream sequence {}, caught up after {}",
            p.projection,
            p.events_applied,
            p.stream_sequence,
            p.seconds
                .map_or("(not yet)".into(), |s| format!("{s:.1} s"))
        );
    }
    let b = &r.rebuild;
    println!(
        "(b) rebuild: {:.0} events/s wall ({:.1} s{}; its own figure {}); ceiling {:.0} events/s (rounds {}); ratio {:.2} — goal ≥ {:.0}: {}",
        b.events_per_s,
        b.seconds,
        if b.cut_off { ", cut off" } else { "" },
        b.reported_events_per_s
            .map_or("n/a".into(), |v| format!("{v:.0} events/s")),
        b.ceiling_events_per_s_mean,
        b.ceiling
            .iter()
            .map(|x| format!("{:.0}", x.events_per_s))
            .collect::<Vec<_>>()
            .join(", "),
        b.ratio,
        r.goals.rebuild_events_per_s,
        verdict(b.events_per_s >= r.goals.rebuild_events_per_s)
    );
    let q = &r.queries;
    for (name, runs, rps, p99) in [
        (
            "GET /jobs?state=running&limit=50",
            &q.list_running,
            q.list_running_median_rps,
            q.list_running_max_p99_ms,
        ),
        (
            "GET /jobs/{id}",
            &q.get_job,
            q.get_job_median_rps,
            q.get_job_max_p99_ms,
        ),
    ] {
        println!(
            "(c) {name}: {rps:.0} req/s (median), p99 {p99:.2} ms (worst run); runs: {} — goal p99 < {} ms at ≥ {:.0} req/s: {}",
            runs.iter()
                .map(|x| format!(
                    "{:.0} req/s p50 {:.2} p99 {:.2} ms",
                    x.requests_per_s, x.p50_ms, x.p99_ms
                ))
                .collect::<Vec<_>>()
                .join("; "),
            r.goals.query_p99_ms_max,
            r.goals.query_rps_min,
            verdict(p99 < r.goals.query_p99_ms_max && rps >= r.goals.query_rps_min)
        );
    }
    let v = &r.visible;
    println!(
        "(d) command → visible over {} commands: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (submit p50 {:.1} / p99 {:.1} ms; not visible {}) — goal p99 < {} ms: {}",
        v.commands,
        v.visible_p50_ms,
        v.visible_p99_ms,
        v.visible_max_ms,
        v.submit_p50_ms,
        v.submit_p99_ms,
        v.not_visible,
        r.goals.visible_p99_ms_max,
        verdict(v.visible_p99_ms < r.goals.visible_p99_ms_max && v.not_visible == 0)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seeded_lifecycle_is_made_of_domain_events() {
        for n in 0..50 {
            let (_, fate, rows) = job_rows(n, 4).unwrap();
            assert_eq!(rows[0].event_type, "JobSubmitted");
            let sequences: Vec<i64> = rows.iter().map(|r| r.sequence).collect();
            assert_eq!(sequences, (1..=rows.len() as i64).collect::<Vec<_>>());
            let last = rows.last().unwrap().event_type;
            match fate {
                Fate::Succeeded | Fate::RetriedThenSucceeded => assert_eq!(last, "JobSucceeded"),
                Fate::Failed => assert_eq!(last, "JobFailed"),
                Fate::Running => assert_eq!(last, "RunProgressed"),
                Fate::Cancelled => assert_eq!(last, "JobCancelled"),
                Fate::Queued => assert_eq!(rows.len(), 1),
            }
        }
        assert_eq!(executor_rows(2).unwrap().len(), 4);
    }

    #[test]
    fn csv_fields_double_their_quotes() {
        let mut out = Vec::new();
        csv_field(&mut out, r#"{"a":"b,c"}"#);
        assert_eq!(out, br#""{""a"":""b,c""}""#);
    }

    #[test]
    fn wrk_output_is_read() {
        let text = "Running 10s test @ http://127.0.0.1:18181/\n  2 threads and 64 connections\n  \
            Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     5.01ms    2.00ms  40.00ms   80.00%\n  \
            Latency Distribution\n     50%    4.50ms\n     75%    6.00ms\n     90%    8.00ms\n     99%  850.00us\n  \
            120000 requests in 10.00s, 50.00MB read\n  Non-2xx or 3xx responses: 3\nRequests/sec:  12000.50\n\
            Transfer/sec:      5.00MB\n";
        let run = parse_wrk(text).unwrap();
        assert_eq!(run.requests, 120_000);
        assert!((run.requests_per_s - 12000.5).abs() < 1e-9);
        assert!((run.p50_ms - 4.5).abs() < 1e-9);
        assert!((run.p99_ms - 0.85).abs() < 1e-9);
        assert_eq!(run.non_2xx, 3);
        assert_eq!(duration_ms("1.02s"), Some(1020.0));
    }

    #[test]
    fn numbers_are_read_from_the_rebuild_summary() {
        let text = "rebuilt and swapped in the jobs projection: 1234 events read, 1200 applied, \
                    in 2.00 s (617 events/s)";
        assert_eq!(number_before(text, " events read"), Some(1234));
        assert_eq!(number_before(text, " events/s"), Some(617));
    }
}
