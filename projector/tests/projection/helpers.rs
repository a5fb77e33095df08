//! Test harness (after command-service's): a fresh Postgres database per test, a real
//! nats-server per test (own random port, own store dir, killed on drop), the real command
//! service (HTTP API + relay) producing the events, and the jobs projection stepped by hand.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use clap::Parser;
use overfly_command_service::app::Application;
use overfly_command_service::config::Cli;
use overfly_projector::runner::{
    ExecutorsProjection, JobsProjection, Runner, RunnerConfig, UsageProjection,
};
use overfly_projector::{Outcome, Projection, ProjectionError};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use overfly_testkit::{TestDb, TestNats};

pub const STREAM: &str = "OVERFLY_EVENTS";

/// The command service (API + relay) on its own database and nats-server.
pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub pool: PgPool,
    /// Dropped (with its database) when the test ends.
    _db: TestDb,
    pub nats: TestNats,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app() -> TestApp {
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
        // Automatic retries after 1 s (not 10), so a test can wait out a backoff.
        "--retry-base-s",
        "1",
        // Runs are assigned by hand, as the scheduler would.
        "--scheduler-enabled",
        "false",
    ]);
    let app = Application::build(&cli.config).await.expect("app builds");
    let addr = app.local_addr();
    let (stop, stopped) = oneshot::channel();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    let pool = PgPool::connect(&db.url).await.unwrap();
    TestApp {
        addr,
        http: reqwest::Client::new(),
        pool,
        _db: db,
        nats,
        stop: Some(stop),
        server: Some(server),
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// A realistic job submission; `n` makes names distinct.
pub fn job_body(n: usize) -> Value {
    let account = ["geo-team", "vision-team", "nlp-team"][n % 3];
    json!({
        "name": format!("tiles-eu-west-{n}"),
        "account": account,
        "submitted_by": "ana",
        "priority": (n * 7) % 101,
        "gpus": 1 + n % 4,
        "gpu_memory_mb": 40000,
        "command": ["python", "infer.py", "--tiles", "1200"],
        "env": {"BATCH": "64"},
        "params": {"region": "eu-west", "n": n},
        "labels": {"benchmark": "tiles-v1"},
        "max_retries": 2,
        "timeout_s": 3600
    })
}

impl TestApp {
    /// The test database's URL (for the binary under test).
    pub fn database_url(&self) -> String {
        self._db.url.clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// POSTs a command; panics unless 2xx.
    pub async fn post(&self, path: &str, body: &Value) -> Value {
        let response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request sent");
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "POST {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    pub async fn submit(&self, body: &Value) -> String {
        self.post("/jobs", body).await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Assigns a new run to `executor` and returns its id.
    pub async fn assign(&self, job: &str, executor: &str, gpus: &[&str]) -> String {
        let run_id = uuid::Uuid::new_v4().to_string();
        self.post(
            &format!("/jobs/{job}/runs"),
            &json!({"run_id": run_id, "executor_id": executor, "gpu_uuids": gpus}),
        )
        .await;
        run_id
    }

    pub async fn report(&self, job: &str, run: &str, what: &str, body: Value) {
        self.post(&format!("/jobs/{job}/runs/{run}/{what}"), &body)
            .await;
    }

    /// A job taken through a short life of `steps` (1..=4) commands: submit, assign, start,
    /// succeed.
    pub async fn short_life(&self, n: usize, steps: usize) -> String {
        let job = self.submit(&job_body(n)).await;
        if steps >= 2 {
            let gpus: Vec<String> = (0..1 + n % 4).map(|i| format!("GPU-{i}")).collect();
            let gpus: Vec<&str> = gpus.iter().map(String::as_str).collect();
            let run = self.assign(&job, "gpu-host-1", &gpus).await;
            let executor = json!({"executor_id": "gpu-host-1"});
            if steps >= 3 {
                self.report(&job, &run, "started", executor.clone()).await;
            }
            if steps >= 4 {
                self.report(&job, &run, "succeeded", executor).await;
            }
        }
        job
    }

    pub async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Waits until the relay has published every event of the store to the stream.
    pub async fn wait_relayed(&self) {
        let expected = u64::try_from(self.event_count().await).unwrap();
        let client = async_nats::connect(self.nats.url()).await.unwrap();
        let js = jetstream::new(client);
        for _ in 0..200 {
            if let Ok(mut stream) = js.get_stream(STREAM).await
                && let Ok(info) = stream.info().await
                && info.state.messages >= expected
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the relay did not publish {expected} events in time");
    }

    pub async fn projection(&self) -> JobsProjection {
        self.projection_with(RunnerConfig::default()).await
    }

    pub async fn projection_with(&self, config: RunnerConfig) -> JobsProjection {
        let client = async_nats::connect(self.nats.url()).await.unwrap();
        JobsProjection::new(self.pool.clone(), client, config)
    }

    pub async fn executors_projection(&self) -> ExecutorsProjection {
        let client = async_nats::connect(self.nats.url()).await.unwrap();
        ExecutorsProjection::new(self.pool.clone(), client, RunnerConfig::default())
    }

    pub async fn usage_projection(&self) -> UsageProjection {
        let client = async_nats::connect(self.nats.url()).await.unwrap();
        UsageProjection::new(self.pool.clone(), client, RunnerConfig::default())
    }

    /// Every row of `table` (in `schema`) as JSON, in key order.
    pub async fn rows(&self, schema: &str, table: &str) -> Vec<Value> {
        let key = match table {
            "read_runs" => "run_id",
            "read_executors" => "executor_id",
            "read_gpus" | "read_usage_gpus" => "gpu_uuid",
            "read_usage_runs" => "run_id",
            _ => "job_id",
        };
        sqlx::query_scalar(&format!(
            "SELECT to_jsonb(t) FROM {schema}.{table} t ORDER BY {key}"
        ))
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    pub async fn job_row(&self, job: &str) -> Value {
        sqlx::query_scalar("SELECT to_jsonb(j) FROM read_jobs j WHERE job_id = $1::uuid")
            .bind(job)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn run_row(&self, run: &str) -> Value {
        sqlx::query_scalar("SELECT to_jsonb(r) FROM read_runs r WHERE run_id = $1::uuid")
            .bind(run)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// The checkpoint row without its wall-clock `updated_at`.
    pub async fn checkpoint(&self, schema: &str) -> Value {
        sqlx::query_scalar(&format!(
            "SELECT to_jsonb(c) - 'updated_at' FROM {schema}.projection_checkpoints c
              WHERE projection = 'jobs'"
        ))
        .fetch_optional(&self.pool)
        .await
        .unwrap()
        .unwrap_or(Value::Null)
    }

    /// The `at` of the `nth` (0-based) event of `event_type` of `job`, as the projection
    /// stores it (microseconds), in the JSON form `to_jsonb` prints.
    pub async fn at(&self, job: &str, event_type: &str, nth: usize) -> Value {
        self.field(job, event_type, nth, "at").await
    }

    /// A field of the `nth` (0-based) event of `event_type` of `job`, as a `timestamptz` in
    /// `to_jsonb` form.
    pub async fn field(&self, job: &str, event_type: &str, nth: usize, field: &str) -> Value {
        let payloads: Vec<Value> = sqlx::query_scalar(
            "SELECT payload FROM events WHERE aggregate_id = $1 AND event_type = $2
              ORDER BY sequence",
        )
        .bind(job)
        .bind(event_type)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let raw = payloads[nth][event_type][field]
            .as_str()
            .unwrap()
            .to_string();
        let at: chrono::DateTime<chrono::Utc> = raw.parse().unwrap();
        // Through Postgres, exactly as the projection's bind stores it.
        sqlx::query_scalar("SELECT to_jsonb($1::timestamptz)")
            .bind(at)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// Steps until idle; the number of messages processed.
pub async fn drain<P: Projection>(projection: &mut Runner<P>) -> Result<usize, ProjectionError> {
    let mut total = 0;
    loop {
        match projection.step().await? {
            Outcome::Processed(n) => total += n,
            Outcome::Idle => return Ok(total),
        }
    }
}

/// Rows in one schema's copy of `table` that the other lacks, both ways (all columns).
pub async fn differences(pool: &PgPool, a: &str, b: &str, table: &str) -> Vec<Value> {
    sqlx::query_scalar(&format!(
        "(SELECT jsonb_build_object('only_in', '{a}', 'row', to_jsonb(x)) FROM
            (SELECT * FROM {a}.{table} EXCEPT SELECT * FROM {b}.{table}) x)
         UNION ALL
         (SELECT jsonb_build_object('only_in', '{b}', 'row', to_jsonb(y)) FROM
            (SELECT * FROM {b}.{table} EXCEPT SELECT * FROM {a}.{table}) y)"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}
