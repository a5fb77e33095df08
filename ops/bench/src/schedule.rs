//! `bench-schedule`: jobs through the whole system — submit, the scheduler's assignment, a real
//! `overfly-executor` running the real process (`true`) on a simulated GPU, its reports —
//! against the ceiling of the write path for the same events in the same run.
//!
//! Set-up (all release binaries, all child processes): two scratch databases, a private
//! nats-server, two `overfly-command serve` (one with the scheduler and 4 executors of 16
//! simulated GPUs each: "ours"; one without scheduler or executors: "ceiling", where this
//! program issues the same commands itself — submit, assign, started, succeeded — at the same
//! concurrency, i.e. the event-store and API cost of a job with no orchestration). Rounds of
//! ours and of the ceiling alternate (the machine is noisy; only neighbouring rounds compare).
//!
//! Reported, from the events' `recorded_at`: jobs/s from first submit to last success; queued →
//! assigned p50/p99, separately for a trickle phase (GPUs free) and under load; GPU idle
//! fraction while work was queued; executor overhead per run (assigned → started, started →
//! succeeded for a process that exits at once). A benchmark, not a test: it reports the goals,
//! it does not assert them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::{DateTime, Utc};
use clap::Parser;
use overfly_bench::{Processes, free_port, percentile, wait_port, wait_ready, with_database};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::process::Command;
use uuid::Uuid;

const GOAL_JOBS_PER_S: f64 = 500.0;
const GOAL_ASSIGN_P99_MS: f64 = 50.0;
const GOAL_IDLE_FRACTION: f64 = 0.05;

#[derive(Debug, Parser)]
#[command(
    name = "bench-schedule",
    about = "Jobs end to end through scheduler and executors vs. the bare write path"
)]
struct Args {
    /// Server to use; its database name is replaced by the scratch databases'.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/overfly"
    )]
    database_url: String,
    /// Jobs in all of ours' rounds together (split evenly).
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// Alternating rounds of ours and of the ceiling.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Executors, and simulated GPUs per executor.
    #[arg(long, default_value_t = 4)]
    executors: usize,
    #[arg(long, default_value_t = 16)]
    gpus_per_executor: usize,
    /// Concurrent submitters (ours) and concurrent job pipelines (ceiling).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Trickle phase: this many jobs, one every `trickle_ms`, while GPUs are free.
    #[arg(long, default_value_t = 200)]
    trickle_jobs: usize,
    #[arg(long, default_value_t = 20)]
    trickle_ms: u64,
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    #[arg(long, default_value = "ops/bench/results/schedule-latest.json")]
    output: PathBuf,
    /// Scratch directory (NATS store, executors' work dirs, logs).
    #[arg(long, default_value = ".overfly/bench-schedule")]
    state: PathBuf,
}

struct Service {
    url: String,
    db_url: String,
}

async fn recreate(admin: &str, db: &str) -> Result<()> {
    let mut conn = PgConnection::connect(admin).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut conn)
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.rounds >= 1 && args.jobs >= args.rounds,
        "need at least one job per round"
    );
    let bin = |name: &str| args.bin_dir.join(name);
    for name in ["overfly-command", "overfly-executor"] {
        ensure!(
            bin(name).exists(),
            "{} missing: cargo build --release",
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

    let admin = with_database(&args.database_url, "postgres");
    let mut services = Vec::new();
    let mut nats_urls = Vec::new();
    for (name, scheduler) in [("ours", true), ("ceiling", false)] {
        // Each its own nats-server: the two relays publish the same subjects.
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
                .arg(args.state.join(format!("nats-{name}")))
                .stdout(log(&format!("nats-{name}"))?)
                .stderr(Stdio::from(log(&format!("nats-{name}-err"))?))
                .spawn()
                .context("nats-server")?,
        );
        wait_port(nats_port).await?;
        nats_urls.push(nats_url.clone());
        let db = format!("overfly_bench_schedule_{name}");
        recreate(&admin, &db).await?;
        let db_url = with_database(&args.database_url, &db);
        let port = free_port()?;
        let mut child = Command::new(bin("overfly-command"))
            .arg("serve")
            .env("DATABASE_URL", &db_url)
            .env("NATS_URL", &nats_url)
            .env("OVERFLY_COMMAND_ADDR", format!("127.0.0.1:{port}"))
            .env("OVERFLY_SCHEDULER_ENABLED", scheduler.to_string())
            .env("NO_COLOR", "1")
            .stdout(log(&format!("command-{name}"))?)
            .stderr(Stdio::from(log(&format!("command-{name}-err"))?))
            .spawn()
            .context("overfly-command")?;
        let url = format!("http://127.0.0.1:{port}");
        wait_ready(&format!("{url}/readyz"), &mut child, "overfly-command").await?;
        processes.0.push(child);
        services.push(Service { url, db_url });
    }
    let (ours, ceiling) = (&services[0], &services[1]);

    for n in 0..args.executors {
        let id = format!("bench-{n}");
        processes.0.push(
            Command::new(bin("overfly-executor"))
                .args(["--executor-id", &id])
                .arg("--gpus")
                .arg(format!("sim:{}xH100-80GB", args.gpus_per_executor))
                .arg("--work-dir")
                .arg(args.state.join(&id))
                .env("OVERFLY_COMMAND_URL", &ours.url)
                .env("NATS_URL", &nats_urls[0])
                .env("NO_COLOR", "1")
                .env("RUST_LOG", "warn")
                .stdout(log(&id)?)
                .stderr(Stdio::from(log(&format!("{id}-err"))?))
                .spawn()
                .context("overfly-executor")?,
        );
    }
    let gpus = args.executors * args.gpus_per_executor;
    wait_for_active(&ours.db_url, args.executors).await?;
    eprintln!(
        "bench-schedule: {} executors × {} simulated GPUs active",
        args.executors, args.gpus_per_executor
    );

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;

    // Trickle: GPUs free, one job at a time.
    let trickle_from = Utc::now();
    let mut ids = Vec::new();
    for _ in 0..args.trickle_jobs {
        ids.push(submit(&http, &ours.url).await?);
        tokio::time::sleep(Duration::from_millis(args.trickle_ms)).await;
    }
    wait_succeeded(&ours.db_url, &ids, Duration::from_secs(120)).await?;
    let trickle = measure(&ours.db_url, trickle_from, gpus).await?;
    eprintln!(
        "bench-schedule: trickle: assign p50 {:.1} ms p99 {:.1} ms",
        trickle.assign_p50_ms, trickle.assign_p99_ms
    );

    // Ceiling set-up: one registered executor holding every GPU, for the bench to assign to.
    register_ceiling_executor(&http, &ceiling.url, gpus).await?;

    let per_round = args.jobs / args.rounds;
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let from = Utc::now();
        let started = Instant::now();
        let ids = submit_many(&http, &ours.url, per_round, args.concurrency).await?;
        wait_succeeded(&ours.db_url, &ids, Duration::from_secs(600)).await?;
        let wall = started.elapsed();
        let load = measure(&ours.db_url, from, gpus).await?;

        let started = Instant::now();
        ceiling_jobs(&http, &ceiling.url, per_round, args.concurrency, gpus).await?;
        let ceiling_wall = started.elapsed();
        let ceiling_jobs_per_s = per_round as f64 / ceiling_wall.as_secs_f64();
        let ratio = load.jobs_per_s / ceiling_jobs_per_s;
        eprintln!(
            "bench-schedule: round {round}: ours {:.0} jobs/s (wall {:.1} s), ceiling {:.0} jobs/s, ratio {:.2}; assign p99 {:.0} ms, idle {:.1}%",
            load.jobs_per_s,
            wall.as_secs_f64(),
            ceiling_jobs_per_s,
            ratio,
            load.assign_p99_ms,
            load.idle_fraction * 100.0
        );
        rounds.push(Round {
            jobs: per_round,
            ours: load,
            ceiling_jobs_per_s,
            ratio,
        });
    }

    let median = |f: &dyn Fn(&Round) -> f64| {
        let mut values: Vec<f64> = rounds.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let report = Report {
        machine: "2 cores (the development machine), release build, loopback",
        executors: args.executors,
        gpus,
        jobs: per_round * args.rounds,
        concurrency: args.concurrency,
        trickle,
        jobs_per_s_median: median(&|r| r.ours.jobs_per_s),
        ceiling_jobs_per_s_median: median(&|r| r.ceiling_jobs_per_s),
        ratio_median: median(&|r| r.ratio),
        load_assign_p99_ms_median: median(&|r| r.ours.assign_p99_ms),
        idle_fraction_median: median(&|r| r.ours.idle_fraction),
        executor_assigned_to_started_p50_ms: median(&|r| r.ours.assigned_to_started_p50_ms),
        executor_started_to_succeeded_p50_ms: median(&|r| r.ours.started_to_succeeded_p50_ms),
        goals: json!({
            "jobs_per_s": {"goal": GOAL_JOBS_PER_S, "met": median(&|r| r.ours.jobs_per_s) >= GOAL_JOBS_PER_S},
            "assign_p99_ms_while_gpus_free": {"goal": GOAL_ASSIGN_P99_MS, "met": trickle.assign_p99_ms < GOAL_ASSIGN_P99_MS},
            "idle_fraction": {"goal": GOAL_IDLE_FRACTION, "met": median(&|r| r.ours.idle_fraction) < GOAL_IDLE_FRACTION},
        }),
        rounds,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(parent) = args.output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.output, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("bench-schedule: written {}", args.output.display());
    drop(processes);
    let mut conn = PgConnection::connect(&admin).await?;
    for name in ["ours", "ceiling"] {
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS overfly_bench_schedule_{name} WITH (FORCE)"
        ))
        .execute(&mut conn)
        .await?;
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct Report {
    machine: &'static str,
    executors: usize,
    gpus: usize,
    jobs: usize,
    concurrency: usize,
    trickle: Measured,
    jobs_per_s_median: f64,
    ceiling_jobs_per_s_median: f64,
    ratio_median: f64,
    load_assign_p99_ms_median: f64,
    idle_fraction_median: f64,
    executor_assigned_to_started_p50_ms: f64,
    executor_started_to_succeeded_p50_ms: f64,
    goals: Value,
    rounds: Vec<Round>,
}

#[derive(Debug, Serialize)]
struct Round {
    jobs: usize,
    ours: Measured,
    ceiling_jobs_per_s: f64,
    ratio: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Measured {
    jobs: usize,
    /// First submit to last success, from the events.
    jobs_per_s: f64,
    assign_p50_ms: f64,
    assign_p99_ms: f64,
    /// Of the GPU time while at least one job was queued (and eligible), the part no run held.
    idle_fraction: f64,
    assigned_to_started_p50_ms: f64,
    assigned_to_started_p99_ms: f64,
    started_to_succeeded_p50_ms: f64,
    started_to_succeeded_p99_ms: f64,
}

fn job_body(n: usize) -> Value {
    let account = ["geo", "vision", "nlp", "ops"][n % 4];
    json!({"name": format!("bench-{n}"), "account": account,
           "submitted_by": "bench", "priority": (n * 7) % 101, "gpus": 1,
           "command": ["true"], "max_retries": 0, "timeout_s": 600})
}

async fn submit(http: &reqwest::Client, url: &str) -> Result<String> {
    let answer: Value = http
        .post(format!("{url}/jobs"))
        .json(&job_body(0))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(answer["id"].as_str().context("id")?.to_string())
}

async fn submit_many(
    http: &reqwest::Client,
    url: &str,
    count: usize,
    concurrency: usize,
) -> Result<Vec<String>> {
    let tasks: Vec<_> = (0..concurrency)
        .map(|worker| {
            let http = http.clone();
            let url = url.to_string();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in (worker..count).step_by(concurrency) {
                    let answer: Value = http
                        .post(format!("{url}/jobs"))
                        .json(&job_body(n))
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    ids.push(answer["id"].as_str().context("id")?.to_string());
                }
                anyhow::Ok(ids)
            })
        })
        .collect();
    let mut ids = Vec::with_capacity(count);
    for task in tasks {
        ids.extend(task.await??);
    }
    Ok(ids)
}

async fn register_ceiling_executor(http: &reqwest::Client, url: &str, gpus: usize) -> Result<()> {
    let inventory: Vec<Value> = (0..gpus)
        .map(|i| {
            json!({"uuid": format!("ceiling-gpu{i}"), "index": i, "name": "NVIDIA H100 80GB HBM3",
                        "memory_mb": 81_559, "compute_capability": "9.0"})
        })
        .collect();
    http.post(format!("{url}/executors"))
        .json(&json!({"executor_id": "ceiling", "hostname": "ceiling", "lease_s": 3600, "gpus": inventory}))
        .send()
        .await?
        .error_for_status()?;
    http.post(format!("{url}/executors/ceiling/heartbeat"))
        .json(&json!({}))
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

/// The same events per job as ours, issued directly: submit, assign, started, succeeded.
async fn ceiling_jobs(
    http: &reqwest::Client,
    url: &str,
    count: usize,
    concurrency: usize,
    gpus: usize,
) -> Result<()> {
    let tasks: Vec<_> = (0..concurrency)
        .map(|worker| {
            let http = http.clone();
            let url = url.to_string();
            tokio::spawn(async move {
                for n in (worker..count).step_by(concurrency) {
                    let post = |path: String, body: Value| {
                        let http = http.clone();
                        async move { http.post(path).json(&body).send().await?.error_for_status() }
                    };
                    let answer: Value = post(format!("{url}/jobs"), job_body(n))
                        .await?
                        .json()
                        .await?;
                    let job = answer["id"].as_str().context("id")?.to_string();
                    let run = Uuid::new_v4();
                    let gpu = format!("ceiling-gpu{}", worker % gpus);
                    post(
                        format!("{url}/jobs/{job}/runs"),
                        json!({"run_id": run, "executor_id": "ceiling", "gpu_uuids": [gpu]}),
                    )
                    .await?;
                    for what in ["started", "succeeded"] {
                        post(
                            format!("{url}/jobs/{job}/runs/{run}/{what}"),
                            json!({"executor_id": "ceiling"}),
                        )
                        .await?;
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

async fn wait_for_active(db_url: &str, executors: usize) -> Result<()> {
    let mut conn = PgConnection::connect(db_url).await?;
    for _ in 0..600 {
        let active: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT aggregate_id) FROM events WHERE event_type = 'ExecutorActivated'",
        )
        .fetch_one(&mut conn)
        .await?;
        if active as usize >= executors {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the executors never became active (see .overfly/bench-schedule/*.log)")
}

async fn wait_succeeded(db_url: &str, ids: &[String], patience: Duration) -> Result<()> {
    let mut conn = PgConnection::connect(db_url).await?;
    let deadline = Instant::now() + patience;
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE event_type IN ('JobSucceeded', 'JobFailed', 'JobCancelled')
               AND aggregate_id = ANY($1)",
        )
        .bind(ids)
        .fetch_one(&mut conn)
        .await?;
        if done as usize >= ids.len() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {done} of {} jobs ended in time",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The figures of the jobs submitted since `from`, from their events.
async fn measure(db_url: &str, from: DateTime<Utc>, gpus: usize) -> Result<Measured> {
    let mut conn = PgConnection::connect(db_url).await?;
    let rows: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT e.aggregate_id, e.event_type, e.recorded_at FROM events e
          WHERE e.aggregate_type = 'job'
            AND e.aggregate_id IN (SELECT aggregate_id FROM events
                                    WHERE event_type = 'JobSubmitted' AND recorded_at >= $1)
          ORDER BY e.recorded_at",
    )
    .bind(from)
    .fetch_all(&mut conn)
    .await?;
    let mut per_job: BTreeMap<String, BTreeMap<String, DateTime<Utc>>> = BTreeMap::new();
    for (job, kind, at) in &rows {
        per_job
            .entry(job.clone())
            .or_default()
            .entry(kind.clone())
            .or_insert(*at);
    }
    let ms =
        |a: DateTime<Utc>, b: DateTime<Utc>| (b - a).num_microseconds().unwrap_or(0) as f64 / 1e3;
    let between = |from_kind: &str, to_kind: &str| -> Vec<f64> {
        per_job
            .values()
            .filter_map(|e| Some(ms(*e.get(from_kind)?, *e.get(to_kind)?)))
            .collect()
    };
    let mut assign = between("JobSubmitted", "RunAssigned");
    let mut to_start = between("RunAssigned", "RunStarted");
    let mut to_end = between("RunStarted", "RunSucceeded");
    let first = rows.first().map(|r| r.2).context("no events")?;
    let last = rows
        .iter()
        .filter(|r| r.1 == "JobSucceeded")
        .map(|r| r.2)
        .max()
        .context("no success")?;
    let jobs = per_job.len();

    // Idle GPU time while work was queued: replay queued count and held GPUs over time.
    let mut timeline: Vec<(DateTime<Utc>, i64, i64)> = Vec::new(); // (at, Δqueued, Δheld)
    for (_, kind, at) in &rows {
        match kind.as_str() {
            "JobSubmitted" | "RetryScheduled" => timeline.push((*at, 1, 0)),
            "RunAssigned" => timeline.push((*at, -1, 1)),
            "RunSucceeded" | "RunFailed" | "RunTimedOut" => timeline.push((*at, 0, -1)),
            _ => {}
        }
    }
    timeline.sort_by_key(|t| t.0);
    let (mut queued, mut held) = (0i64, 0i64);
    let (mut busy, mut total) = (0.0f64, 0.0f64);
    for pair in timeline.windows(2) {
        queued += pair[0].1;
        held += pair[0].2;
        let span = (pair[1].0 - pair[0].0).num_microseconds().unwrap_or(0) as f64 / 1e6;
        if queued > 0 {
            total += span * gpus as f64;
            busy += span * held.min(gpus as i64) as f64;
        }
    }
    Ok(Measured {
        jobs,
        jobs_per_s: jobs as f64 / ((last - first).num_microseconds().unwrap_or(1) as f64 / 1e6),
        assign_p50_ms: percentile(&mut assign, 50.0),
        assign_p99_ms: percentile(&mut assign, 99.0),
        idle_fraction: if total > 0.0 { 1.0 - busy / total } else { 0.0 },
        assigned_to_started_p50_ms: percentile(&mut to_start, 50.0),
        assigned_to_started_p99_ms: percentile(&mut to_start, 99.0),
        started_to_succeeded_p50_ms: percentile(&mut to_end, 50.0),
        started_to_succeeded_p99_ms: percentile(&mut to_end, 99.0),
    })
}
