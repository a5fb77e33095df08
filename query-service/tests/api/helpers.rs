//! A whole Overfly in one test process: command service (with its relay), the jobs, executors
//! and usage projections and the query service, over a fresh database and a real nats-server.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use overfly_projector::{
    ExecutorsProjection, JobsProjection, UsageProjection, runner::RunnerConfig,
};
use overfly_testkit::{TestDb, TestNats};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::task::JoinHandle;

pub struct Stack {
    pub command: SocketAddr,
    pub query: SocketAddr,
    pub http: reqwest::Client,
    pub pool: PgPool,
    tasks: Vec<JoinHandle<()>>,
    _nats: TestNats,
    _db: TestDb,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub async fn spawn_stack() -> Stack {
    // Generous: on a loaded CI machine the projection may lag; the bound itself is tested
    // separately with a short wait.
    spawn_stack_with(10_000).await
}

/// `wait_ms`: how long read-your-writes waits before a 503.
pub async fn spawn_stack_with(wait_ms: u64) -> Stack {
    spawn_stack_full(wait_ms, 4096).await
}

/// `feed_buffer`: events the live feeds' shared buffer holds.
pub async fn spawn_stack_full(wait_ms: u64, feed_buffer: usize) -> Stack {
    // Spans carry trace ids (so events get a traceparent) only with the subscriber installed.
    static TELEMETRY: std::sync::OnceLock<overfly_infra::telemetry::TelemetryGuard> =
        std::sync::OnceLock::new();
    TELEMETRY.get_or_init(|| overfly_infra::telemetry::init("overfly-query-test").unwrap());
    let db = TestDb::create().await;
    let nats = TestNats::start().await;
    let command_app = command_app(&db, &nats).await;
    let command = command_app.local_addr();
    let query_app = query_app(
        &db,
        &nats,
        &[
            "--read-your-writes-wait-ms",
            &wait_ms.to_string(),
            "--feed-buffer",
            &feed_buffer.to_string(),
        ],
    )
    .await;
    let query = query_app.local_addr();
    let pool = PgPool::connect(&db.url).await.unwrap();
    let projection = JobsProjection::new(
        pool.clone(),
        async_nats::connect(nats.url()).await.unwrap(),
        RunnerConfig::default(),
    );
    let executors = ExecutorsProjection::new(
        pool.clone(),
        async_nats::connect(nats.url()).await.unwrap(),
        RunnerConfig::default(),
    );
    let usage = UsageProjection::new(
        pool.clone(),
        async_nats::connect(nats.url()).await.unwrap(),
        RunnerConfig::default(),
    );
    let tasks = vec![
        tokio::spawn(async move {
            let _ = command_app.run_until(std::future::pending()).await;
        }),
        tokio::spawn(async move {
            let _ = query_app.run_until(std::future::pending()).await;
        }),
        tokio::spawn(projection.run()),
        tokio::spawn(executors.run()),
        tokio::spawn(usage.run()),
    ];
    Stack {
        command,
        query,
        http: reqwest::Client::new(),
        pool,
        tasks,
        _nats: nats,
        _db: db,
    }
}

/// The command service (with its relay; runs are assigned by hand, as the scheduler would;
/// automatic retries after 1 s, not 10, so a test can wait out a backoff), on port 0.
pub async fn command_app(
    db: &TestDb,
    nats: &TestNats,
) -> overfly_command_service::app::Application {
    let cli = overfly_command_service::config::Cli::parse_from([
        "overfly-command",
        "--database-url",
        &db.url,
        "--nats-url",
        &nats.url(),
        "--addr",
        "127.0.0.1:0",
        "--retry-base-s",
        "1",
        "--scheduler-enabled",
        "false",
    ]);
    overfly_command_service::app::Application::build(&cli.config)
        .await
        .unwrap()
}

/// The query service on port 0, with `extra` flags.
pub async fn query_app(
    db: &TestDb,
    nats: &TestNats,
    extra: &[&str],
) -> overfly_query_service::app::Application {
    let mut args = vec![
        "overfly-query".to_string(),
        "--database-url".into(),
        db.url.clone(),
        "--nats-url".into(),
        nats.url(),
        "--addr".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let cli = overfly_query_service::config::Cli::parse_from(args);
    overfly_query_service::app::Application::build(&cli.config)
        .await
        .unwrap()
}

pub fn job_body(n: usize) -> Value {
    let account = ["geo-team", "vision-team", "nlp-team"][n % 3];
    let (user, benchmark) = if n.is_multiple_of(2) {
        ("ana", "tiles-v1")
    } else {
        ("kim", "tiles-v2")
    };
    json!({
        "name": format!("tiles-{n}"),
        "account": account,
        "submitted_by": user,
        "priority": 50,
        "gpus": 1,
        "command": ["python", "infer.py"],
        "labels": {"benchmark": benchmark},
        "max_retries": 2,
        "timeout_s": 3600
    })
}

impl Stack {
    /// The test's nats-server.
    pub fn nats_url(&self) -> String {
        self._nats.url()
    }

    /// POST to the command service; returns (status, body).
    pub async fn command(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("http://{}{path}", self.command))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Submits a job; returns (id, position).
    pub async fn submit(&self, body: &Value) -> (String, i64) {
        let (status, answer) = self.command("/jobs", body).await;
        assert_eq!(status, 201, "{answer}");
        (
            answer["id"].as_str().unwrap().to_string(),
            answer["position"].as_i64().unwrap(),
        )
    }

    /// GET from the query service; returns (status, headers, body).
    pub async fn query(&self, path_and_query: &str) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = self
            .http
            .get(format!("http://{}{path_and_query}", self.query))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (
            status,
            headers,
            response.json().await.unwrap_or(Value::Null),
        )
    }

    /// Waits until the executors projection has applied the event at `position` (commands
    /// issued one after another commit in position order).
    pub async fn wait_for_executors(&self, position: i64) {
        self.wait_for_projection("executors", position).await;
    }

    /// Waits until the usage projection has applied the event at `position`.
    pub async fn wait_for_usage(&self, position: i64) {
        self.wait_for_projection("usage", position).await;
    }

    async fn wait_for_projection(&self, projection: &str, position: i64) {
        for _ in 0..600 {
            let applied: Option<i64> = sqlx::query_scalar(
                "SELECT position FROM projection_checkpoints WHERE projection = $1",
            )
            .bind(projection)
            .fetch_optional(&self.pool)
            .await
            .unwrap();
            if applied.is_some_and(|applied| applied >= position) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the {projection} projection never reached position {position}");
    }

    /// Waits until the read model holds `count` jobs.
    pub async fn wait_for_jobs(&self, count: i64) {
        for _ in 0..600 {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM read_jobs")
                .fetch_one(&self.pool)
                .await
                .unwrap();
            if n >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the read model never reached {count} jobs");
    }
}
