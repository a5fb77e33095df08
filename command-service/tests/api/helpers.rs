//! Test harness: a fresh Postgres database per test, a real nats-server per test (own random
//! port, own store dir, killed on drop), and the command service bound to port 0.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use clap::Parser;
use overfly_command_service::app::Application;
use overfly_command_service::config::Cli;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use overfly_testkit::{TestDb, TestNats};

pub const STREAM: &str = "OVERFLY_EVENTS";

pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub pool: PgPool,
    pub db: TestDb,
    pub nats: TestNats,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

pub struct Options {
    pub relay: bool,
    pub retry_base_s: u64,
    /// Run the scheduler (tests that assign runs by hand leave it off).
    pub scheduler: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            relay: true,
            retry_base_s: 10,
            scheduler: false,
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    static TELEMETRY: std::sync::OnceLock<overfly_infra::telemetry::TelemetryGuard> =
        std::sync::OnceLock::new();
    TELEMETRY.get_or_init(|| overfly_infra::telemetry::init("overfly-command-test").unwrap());
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
        "--relay-enabled",
        &options.relay.to_string(),
        "--retry-base-s",
        &options.retry_base_s.to_string(),
        "--scheduler-enabled",
        &options.scheduler.to_string(),
        "--scheduler-poll-ms",
        "20",
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
        db,
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
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Submits a job and returns its id; panics unless 201.
    pub async fn submit(&self, body: &Value) -> String {
        let response = self.post("/jobs", body).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 201, "submit failed: {text}");
        let value: Value = serde_json::from_str(&text).unwrap();
        value["id"].as_str().unwrap().to_string()
    }

    pub async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// `aggregate_id:sequence` of every event in Postgres.
    pub async fn event_ids(&self) -> HashSet<String> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT aggregate_id, sequence FROM events")
            .fetch_all(&self.pool)
            .await
            .unwrap();
        rows.into_iter()
            .map(|(id, seq)| format!("{id}:{seq}"))
            .collect()
    }
}

/// One message of the event stream.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub msg_id: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub position: i64,
    pub envelope: Value,
}

/// Waits until the stream holds at least `expected` messages (or `timeout` passes), then
/// returns all of them in stream order.
pub async fn stream_events(nats_url: &str, expected: usize, timeout: Duration) -> Vec<StreamEvent> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(events) = read_stream(nats_url).await
            && (events.len() >= expected || tokio::time::Instant::now() > deadline)
        {
            return events;
        }
        if tokio::time::Instant::now() > deadline {
            return Vec::new();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn read_stream(nats_url: &str) -> anyhow::Result<Vec<StreamEvent>> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client);
    let mut stream = js.get_stream(STREAM).await?;
    let state = stream.info().await?.state.clone();
    let mut events = Vec::new();
    if state.messages == 0 {
        return Ok(events);
    }
    for seq in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(seq).await?;
        let header = |name: &str| message.headers.get(name).unwrap().as_str().to_string();
        let envelope: Value = serde_json::from_slice(&message.payload)?;
        events.push(StreamEvent {
            msg_id: header("Nats-Msg-Id"),
            aggregate_id: header("Overfly-Aggregate-Id"),
            sequence: header("Overfly-Sequence").parse()?,
            position: header("Overfly-Position").parse()?,
            envelope,
        });
    }
    Ok(events)
}

/// The stream holds every Postgres event exactly once, and each aggregate's events in order.
pub fn assert_exactly_once_in_order(stream: &[StreamEvent], in_postgres: &HashSet<String>) {
    let ids: Vec<&String> = stream.iter().map(|e| &e.msg_id).collect();
    let unique: HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
    assert_eq!(ids.len(), unique.len(), "duplicates in the stream");
    let missing: Vec<_> = in_postgres.difference(&unique).collect();
    let extra: Vec<_> = unique.difference(in_postgres).collect();
    assert!(
        missing.is_empty(),
        "{} events missing from the stream, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    assert!(
        extra.is_empty(),
        "events in the stream but not in Postgres: {extra:?}"
    );
    let mut last: HashMap<&str, i64> = HashMap::new();
    for event in stream {
        let previous = last
            .insert(&event.aggregate_id, event.sequence)
            .unwrap_or(0);
        assert_eq!(
            event.sequence,
            previous + 1,
            "aggregate {} out of order in the stream",
            event.aggregate_id
        );
        assert_eq!(event.envelope["sequence"], event.sequence);
        assert_eq!(event.envelope["position"], event.position);
    }
}
