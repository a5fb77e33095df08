//! Harness: a fresh Postgres database, a real nats-server, the real command service (in this
//! process, bound to port 0) and the real `overfly-executor` binary as a child process, whose
//! workloads are real `overfly-tiles` processes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use clap::Parser;
use futures::StreamExt;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use overfly_command_service::app::Application;
use overfly_command_service::config::Cli;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

pub use overfly_testkit::{TestDb, TestNats};

pub const TILES: &str = env!("CARGO_BIN_EXE_overfly-tiles");
const EXECUTOR: &str = env!("CARGO_BIN_EXE_overfly-executor");
/// Bound of every wait for something the system must do on its own.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct Harness {
    pub url: String,
    pub http: reqwest::Client,
    pub pool: PgPool,
    pub nats: TestNats,
    pub dir: PathBuf,
    _db: TestDb,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // A failed test may leave workloads (some hang for ever) behind its killed executors.
        for executor in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            for run in std::fs::read_dir(executor.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Some(record) = overfly_executor::run::read_record(&run.path())
                    && let overfly_executor::run::RecordState::Running { pid } = record.state
                    && overfly_executor::run::is_our_process(pid, record.run_id)
                {
                    overfly_executor::run::kill_group(pid, Signal::SIGKILL);
                }
            }
        }
    }
}

/// Runs are assigned by the tests (`POST /jobs/{id}/runs`), as the scheduler would.
pub async fn start() -> Harness {
    start_with(false).await
}

/// With `scheduler`, the command service's own scheduler assigns the runs.
pub async fn start_with(scheduler: bool) -> Harness {
    let db = TestDb::create().await;
    let nats = TestNats::start().await;
    let cli = Cli::parse_from([
        "overfly-command",
        "--database-url",
        &db.url,
        "--nats-url",
        &nats.url(),
        "--addr",
        "127.0.0.1:0",
        "--scheduler-enabled",
        &scheduler.to_string(),
        "--retry-base-s",
        "1",
    ]);
    let app = Application::build(&cli.config).await.expect("app builds");
    let addr = app.local_addr();
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    let pool = PgPool::connect(&db.url).await.unwrap();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("executor-tests")
        .join(Uuid::new_v4().simple().to_string());
    std::fs::create_dir_all(&dir).unwrap();
    Harness {
        url: format!("http://{addr}"),
        http: reqwest::Client::new(),
        pool,
        nats,
        dir,
        _db: db,
        stop: Some(stop),
    }
}

/// The `overfly-executor` binary, killed (SIGKILL) when dropped unless it exited.
pub struct ExecutorProcess {
    pub id: String,
    pub child: Child,
    pub log: PathBuf,
}

impl ExecutorProcess {
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// SIGKILL: a crash.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (bounded) for the process to exit and returns its status.
    pub async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "executor {} did not exit within {within:?}; log: {}",
                self.id,
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ExecutorProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Harness {
    /// The test database's URL.
    pub fn db_url(&self) -> String {
        self._db.url.clone()
    }

    pub fn work_dir(&self, executor_id: &str) -> PathBuf {
        self.dir.join(executor_id)
    }

    /// Starts the executor binary with simulated GPUs and waits until it registered
    /// (`sessions` = how many `ExecutorRegistered` events it must have, counting this one).
    pub async fn executor(
        &self,
        id: &str,
        gpus: &str,
        extra: &[&str],
        sessions: usize,
    ) -> ExecutorProcess {
        let log = self.dir.join(format!("{id}-{sessions}.log"));
        let child = Command::new(EXECUTOR)
            .args(["--executor-id", id, "--gpus", gpus, "--work-dir"])
            .arg(self.work_dir(id))
            .args(if extra.contains(&"--lease-s") {
                &[][..]
            } else {
                &["--lease-s", "30"][..]
            })
            .args(["--kill-grace-s", "2", "--telemetry-interval-ms", "200"])
            .args(extra)
            .env("OVERFLY_COMMAND_URL", &self.url)
            .env("NATS_URL", self.nats.url())
            .env("RUST_LOG", "info,overfly_executor=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let process = ExecutorProcess {
            id: id.to_string(),
            child,
            log,
        };
        self.wait_until(&format!("executor {id} registered"), async || {
            let registered: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM events WHERE aggregate_type = 'executor'
                    AND aggregate_id = $1 AND event_type = 'ExecutorActivated'",
            )
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .unwrap();
            registered as usize >= sessions
        })
        .await;
        process
    }

    /// The GPUs an executor registered with (its last registration).
    pub async fn gpus_of(&self, executor_id: &str) -> Vec<Value> {
        let payload: Value = sqlx::query_scalar(
            "SELECT payload FROM events WHERE aggregate_type = 'executor' AND aggregate_id = $1
                AND event_type = 'ExecutorRegistered' ORDER BY sequence DESC LIMIT 1",
        )
        .bind(executor_id)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        payload["ExecutorRegistered"]["gpus"]
            .as_array()
            .unwrap()
            .clone()
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn submit(
        &self,
        command: &[String],
        gpus: u8,
        timeout_s: u64,
        max_retries: u32,
    ) -> Uuid {
        let response = self
            .post(
                "/jobs",
                &json!({
                    "name": "tiles-eu-west", "account": "geo-team", "submitted_by": "ana",
                    "priority": 50, "gpus": gpus, "gpu_memory_mb": 0,
                    "command": command, "env": {"TILE_BATCH": "64"},
                    "params": {"region": "eu-west"}, "labels": {"benchmark": "tiles-v1"},
                    "max_retries": max_retries, "timeout_s": timeout_s,
                }),
            )
            .await;
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Assigns the job's next run to these GPUs of the executor (what the scheduler does);
    /// if a scheduler got there first, its assignment is the one returned.
    pub async fn assign(
        &self,
        job_id: Uuid,
        executor_id: &str,
        gpu_uuids: &[String],
    ) -> (Uuid, Vec<String>) {
        let run_id = Uuid::new_v4();
        let response = self
            .post(
                &format!("/jobs/{job_id}/runs"),
                &json!({"run_id": run_id, "executor_id": executor_id, "gpu_uuids": gpu_uuids}),
            )
            .await;
        if response.status() == 200 {
            return (run_id, gpu_uuids.to_vec());
        }
        let assigned = self.events(job_id).await;
        let (_, payload) = assigned
            .iter()
            .rev()
            .find(|(t, _)| t == "RunAssigned")
            .unwrap_or_else(|| panic!("assign refused: {}", response.status()));
        let run = &payload["RunAssigned"];
        (
            run["run_id"].as_str().unwrap().parse().unwrap(),
            serde_json::from_value(run["gpu_uuids"].clone()).unwrap(),
        )
    }

    /// `(event_type, payload)` of every event of a job, in order.
    pub async fn events(&self, job_id: Uuid) -> Vec<(String, Value)> {
        sqlx::query_as(
            "SELECT event_type, payload FROM events WHERE aggregate_type = 'job'
                AND aggregate_id = $1 ORDER BY sequence",
        )
        .bind(job_id.to_string())
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    pub async fn executor_events(&self, executor_id: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT event_type FROM events WHERE aggregate_type = 'executor'
                AND aggregate_id = $1 ORDER BY sequence",
        )
        .bind(executor_id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Waits (bounded by [`WAIT`]) until the job has an event of this type; returns all events.
    pub async fn wait_for_event(&self, job_id: Uuid, event_type: &str) -> Vec<(String, Value)> {
        let mut events = Vec::new();
        self.wait_until(&format!("{event_type} of job {job_id}"), async || {
            events = self.events(job_id).await;
            events.iter().any(|(t, _)| t == event_type)
        })
        .await;
        events
    }

    pub async fn wait_until(&self, what: &str, mut condition: impl AsyncFnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !condition().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; executor logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The executor's record of a run (`<work-dir>/<run_id>/run.json`).
    pub fn run_record(&self, executor_id: &str, run_id: Uuid) -> Option<Value> {
        let path = self
            .work_dir(executor_id)
            .join(run_id.to_string())
            .join("run.json");
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Waits until the executor recorded the run's process, and returns its pid.
    pub async fn wait_for_pid(&self, executor_id: &str, run_id: Uuid) -> i32 {
        let mut pid = 0;
        self.wait_until(&format!("the process of run {run_id}"), async || {
            if let Some(record) = self.run_record(executor_id, run_id)
                && let Some(p) = record["pid"].as_i64()
            {
                pid = p as i32;
                return true;
            }
            false
        })
        .await;
        pid
    }

    /// Waits until the executor has finished with the run (reported what it had to).
    pub async fn wait_for_done(&self, executor_id: &str, run_id: Uuid) {
        self.wait_until(&format!("run {run_id} done"), async || {
            self.run_record(executor_id, run_id)
                .is_some_and(|r| r["state"] == "done")
        })
        .await;
    }

    /// Every log line of a run in the `OVERFLY_LOGS` stream, as `(stream, line)`.
    pub async fn log_lines(&self, job_id: Uuid, run_id: Uuid) -> Vec<(String, String)> {
        let client = async_nats::connect(self.nats.url()).await.unwrap();
        let js = jetstream::new(client);
        let Ok(stream) = js.get_stream("OVERFLY_LOGS").await else {
            return Vec::new();
        };
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: format!("overfly.logs.{job_id}.{run_id}"),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap();
        let pending = consumer.clone().info().await.unwrap().num_pending as usize;
        let mut lines = Vec::new();
        if pending == 0 {
            return lines;
        }
        let mut messages = consumer
            .fetch()
            .max_messages(pending)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .unwrap();
        while let Some(Ok(message)) = messages.next().await {
            let batch: Value = serde_json::from_slice(&message.payload).unwrap();
            for line in batch["lines"].as_array().unwrap() {
                lines.push((
                    line["stream"].as_str().unwrap().to_string(),
                    line["line"].as_str().unwrap().to_string(),
                ));
            }
        }
        lines
    }

    /// Waits until a run's logs contain a line with `needle`; returns all lines.
    pub async fn wait_for_log(
        &self,
        job_id: Uuid,
        run_id: Uuid,
        needle: &str,
    ) -> Vec<(String, String)> {
        let mut lines = Vec::new();
        self.wait_until(&format!("log line {needle:?}"), async || {
            lines = self.log_lines(job_id, run_id).await;
            lines.iter().any(|(_, l)| l.contains(needle))
        })
        .await;
        lines
    }
}

/// Whether any live process of this process group is left. A zombie does not count: an
/// orphan killed after its executor crashed is reaped by init, whenever init gets to it.
pub fn group_alive(pgid: i32) -> bool {
    if killpg(Pid::from_raw(pgid), None).is_err() {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // `pid (comm) state ppid pgrp …`; comm may contain spaces, so split after ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z"
    })
}

pub fn tiles(args: &[&str]) -> Vec<String> {
    std::iter::once(TILES)
        .chain(args.iter().copied())
        .map(str::to_string)
        .collect()
}

pub fn uuids(gpus: &[Value], indexes: &[usize]) -> Vec<String> {
    indexes
        .iter()
        .map(|&i| gpus[i]["uuid"].as_str().unwrap().to_string())
        .collect()
}

pub fn count(events: &[(String, Value)], event_type: &str) -> usize {
    events.iter().filter(|(t, _)| t == event_type).count()
}

pub fn payload<'a>(events: &'a [(String, Value)], event_type: &str) -> &'a Value {
    &events
        .iter()
        .find(|(t, _)| t == event_type)
        .unwrap_or_else(|| panic!("no {event_type} in {events:?}"))
        .1[event_type]
}
