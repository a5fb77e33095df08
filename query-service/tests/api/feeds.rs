//! Live SSE feeds over real HTTP: a job's lifecycle in order, resuming with `Last-Event-ID`
//! without gap or duplicate, a client that reads nothing is reset, and many clients on one
//! filter each get every event from one shared subscription.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use overfly_testkit::sse::Sse;

use crate::helpers::{Stack, job_body, spawn_stack, spawn_stack_full};

/// A feed of the stack's query service.
async fn connect(stack: &Stack, path: &str, last_event_id: Option<&str>) -> Sse {
    Sse::connect(
        &stack.http,
        &format!("http://{}{path}", stack.query),
        last_event_id,
    )
    .await
}

async fn command(stack: &Stack, path: &str, body: Value) -> i64 {
    let (status, answer) = stack.command(path, &body).await;
    assert!((200..300).contains(&status), "{path}: {status} {answer}");
    answer["position"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_sees_a_jobs_whole_lifecycle_in_order_live() {
    let stack = spawn_stack().await;
    command(
        &stack,
        "/executors",
        json!({"executor_id": "h", "hostname": "h.example", "lease_s": 600,
               "gpus": [{"uuid": "h-gpu0", "index": 0, "name": "NVIDIA H100 80GB HBM3",
                         "memory_mb": 81559, "compute_capability": "9.0"}]}),
    )
    .await;
    let (job, _) = stack.submit(&job_body(0)).await;
    // Connected after the submit: the history comes first, then live.
    let mut feed = connect(&stack, &format!("/jobs/{job}/events"), None).await;
    let first = feed.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(first.event.as_deref(), Some("JobSubmitted"));
    let run = uuid::Uuid::new_v4().to_string();
    command(
        &stack,
        &format!("/jobs/{job}/runs"),
        json!({"run_id": run, "executor_id": "h", "gpu_uuids": ["h-gpu0"]}),
    )
    .await;
    let report = |what: &'static str, body: Value| {
        let stack = &stack;
        let path = format!("/jobs/{job}/runs/{run}/{what}");
        async move { command(stack, &path, body).await }
    };
    report("started", json!({"executor_id": "h"})).await;
    report(
        "progress",
        json!({"executor_id": "h", "report_seq": 1, "progress": 0.5, "metrics": {"loss": 0.3}}),
    )
    .await;
    report("succeeded", json!({"executor_id": "h"})).await;

    let mut messages = vec![first];
    while messages.last().unwrap().event.as_deref() != Some("JobSucceeded") {
        messages.push(
            feed.next(Duration::from_secs(10))
                .await
                .expect("the feed stalled"),
        );
    }
    let types: Vec<&str> = messages
        .iter()
        .map(|m| m.event.as_deref().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "JobSubmitted",
            "RunAssigned",
            "RunStarted",
            "RunProgressed",
            "RunSucceeded",
            "JobSucceeded"
        ]
    );
    for (n, message) in messages.iter().enumerate() {
        let data: Value = serde_json::from_str(&message.data).unwrap();
        assert_eq!(data["aggregate_id"], job.as_str());
        assert_eq!(data["sequence"], n as i64 + 1);
        assert_eq!(data["stream_sequence"].as_u64(), Some(message.sequence()));
    }
    assert!(
        messages
            .windows(2)
            .all(|w| w[0].sequence() < w[1].sequence())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnecting_with_last_event_id_gets_exactly_what_was_missed() {
    let stack = spawn_stack().await;
    let mut feed = connect(&stack, "/stream?aggregate_type=job", None).await;
    for n in 0..10 {
        stack.submit(&job_body(n)).await;
    }
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(feed.next(Duration::from_secs(10)).await.unwrap());
    }
    drop(feed);
    for n in 10..20 {
        stack.submit(&job_body(n)).await;
    }
    let last = seen.last().unwrap().id.clone().unwrap();
    let mut feed = connect(&stack, "/stream?aggregate_type=job", Some(&last)).await;
    while seen.len() < 20 {
        seen.push(
            feed.next(Duration::from_secs(10))
                .await
                .expect("missing events"),
        );
    }
    // Nothing more than the 20 submits.
    assert!(feed.next(Duration::from_millis(500)).await.is_none());
    let ids: Vec<u64> = seen
        .iter()
        .map(overfly_testkit::sse::Message::sequence)
        .collect();
    let distinct: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), 20, "duplicates: {ids:?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "out of order: {ids:?}");
    let jobs: BTreeSet<String> = seen
        .iter()
        .map(|m| serde_json::from_str::<Value>(&m.data).unwrap()["aggregate_id"].to_string())
        .collect();
    assert_eq!(jobs.len(), 20);

    // The resume's catch-up consumer is gone once the feed caught up: deleted by the service,
    // not left for the server's 30 s inactivity threshold. Left: the shared subscription and
    // the three projections' durable consumers.
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats_url()).await.unwrap());
    let mut stream = js.get_stream("OVERFLY_EVENTS").await.unwrap();
    let mut consumers = 0;
    for _ in 0..100 {
        consumers = stream.info().await.unwrap().state.consumer_count;
        if consumers <= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(consumers, 4, "the catch-up consumer was not deleted");
    // A bad Last-Event-ID is a 400 naming it.
    let response = stack
        .http
        .get(format!("http://{}/stream", stack.query))
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["field"], "Last-Event-ID");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_reads_nothing_is_reset_and_told_where_to_resume() {
    // A 64-event buffer: the client falls behind quickly.
    let stack = spawn_stack_full(10_000, 64).await;
    let mut feed = connect(&stack, "/stream", None).await;
    // Read nothing while 3,000 events pass.
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let http = stack.http.clone();
        let url = format!("http://{}/jobs", stack.command);
        tasks.push(tokio::spawn(async move {
            for n in (worker..3000).step_by(8) {
                let status = http
                    .post(&url)
                    .json(&job_body(n))
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert_eq!(status, 201);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut last_event = None;
    let reset = loop {
        let message = feed
            .next(Duration::from_secs(10))
            .await
            .expect("the feed ended without a reset");
        if message.event.as_deref() == Some("reset") {
            break message;
        }
        last_event = message.id.clone();
    };
    let body: Value = serde_json::from_str(&reset.data).unwrap();
    let resume_after = body["resume_after"].as_u64().unwrap();
    assert_eq!(
        Some(resume_after.to_string()),
        last_event.or(Some("0".into()))
    );
    assert_eq!(reset.id, Some(resume_after.to_string()));
    assert!(resume_after < 3000, "it fell behind: {resume_after}");
    // Then the server closes the connection.
    assert!(feed.next(Duration::from_secs(5)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_clients_on_one_filter_each_get_every_event() {
    let stack = spawn_stack().await;
    let mut clients = Vec::new();
    for _ in 0..200 {
        clients.push(connect(&stack, "/stream?event_type=JobSubmitted", None).await);
    }
    let mut jobs = BTreeSet::new();
    for n in 0..20 {
        jobs.insert(stack.submit(&job_body(n)).await.0);
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut got = BTreeSet::new();
                while got.len() < 20 {
                    let message = client.next(Duration::from_secs(20)).await.expect("stalled");
                    let data: Value = serde_json::from_str(&message.data).unwrap();
                    got.insert(data["aggregate_id"].as_str().unwrap().to_string());
                }
                got
            })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.unwrap(), jobs);
    }
    // One shared subscription, not one consumer per client.
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats_url()).await.unwrap());
    let mut stream = js.get_stream("OVERFLY_EVENTS").await.unwrap();
    let consumers = stream.info().await.unwrap().state.consumer_count;
    assert!(consumers <= 4, "{consumers} consumers for 200 clients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_account_filter_keeps_that_accounts_job_events_only() {
    let stack = spawn_stack().await;
    // job_body: n % 3 picks the account (geo-team, vision-team, nlp-team).
    let (geo_before, _) = stack.submit(&job_body(0)).await;
    stack.submit(&job_body(1)).await;
    // Known to the read model before the client connects: found there, not in the feed.
    stack.wait_for_jobs(2).await;
    let mut feed = connect(&stack, "/stream?account=geo-team", None).await;
    let (geo, _) = stack.submit(&job_body(3)).await;
    stack.submit(&job_body(4)).await;
    command(
        &stack,
        &format!("/jobs/{geo_before}/priority"),
        json!({"priority": 90, "by": "lead", "reason": "deadline"}),
    )
    .await;
    command(
        &stack,
        "/executors",
        json!({"executor_id": "h", "hostname": "h.example", "lease_s": 600,
               "gpus": [{"uuid": "h-gpu0", "index": 0, "name": "NVIDIA H100 80GB HBM3",
                         "memory_mb": 81559, "compute_capability": "9.0"}]}),
    )
    .await;
    let mut got = Vec::new();
    while let Some(message) = feed.next(Duration::from_secs(3)).await {
        let data: Value = serde_json::from_str(&message.data).unwrap();
        got.push((
            data["aggregate_id"].as_str().unwrap().to_string(),
            message.event.unwrap(),
        ));
    }
    assert_eq!(
        got,
        [
            (geo, "JobSubmitted".to_string()),
            (geo_before, "JobPriorityChanged".to_string())
        ]
    );
    let (status, _, problem) = stack.query("/stream?account=a.b").await;
    assert_eq!(status, 400);
    assert_eq!(problem["field"], "account");
}

/// Test 3 at full size, memory measured: the query service runs as its own process (so its
/// memory is its own) while a client that reads nothing sits on `/stream` and 100,000 events
/// pass through the event store, the relay and JetStream. Its peak RSS stays within a bound
/// far below what buffering them for that client would take, and the client, once it reads,
/// gets what was queued for it, a `reset` naming where to resume, and the end of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_reads_nothing_while_100k_events_pass_leaves_memory_bounded() {
    const EVENTS: i64 = 100_000;
    let db = overfly_testkit::TestDb::create().await;
    let nats = overfly_testkit::TestNats::start().await;
    let command_app = crate::helpers::command_app(&db, &nats).await;
    let command = command_app.local_addr();
    let command_task = tokio::spawn(command_app.run_until(std::future::pending()));
    let port = overfly_testkit::free_port();
    let query = std::process::Command::new(env!("CARGO_BIN_EXE_overfly-query"))
        .args(["--database-url", &db.url, "--nats-url", &nats.url()])
        .args([
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--feed-buffer",
            "1024",
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let query = KillOnDrop(query);
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..300 {
        if let Ok(response) = http.get(format!("{base}/readyz")).send().await {
            ready = response.status() == 200;
            if ready {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "the query service came up");
    let memory = |field: &str| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", query.0.id())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("{field} in /proc/pid/status"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };

    // One real JobSubmitted through the API, as the template of 100,000 more written straight
    // into the event store (one statement; each a new job), which the relay then publishes.
    let submitted = http
        .post(format!("http://{command}/jobs"))
        .json(&crate::helpers::job_body(0))
        .send()
        .await
        .unwrap();
    assert_eq!(submitted.status(), 201);
    let mut slow = Sse::connect(&http, &format!("{base}/stream"), None).await;
    let mut fast = Sse::connect(&http, &format!("{base}/stream"), None).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline_kib = memory("VmRSS:");
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT 'job', gen_random_uuid()::text, 1, e.event_type, e.event_version, e.payload, e.metadata
           FROM events e, generate_series(1, $1)
          WHERE e.aggregate_type = 'job' AND e.event_type = 'JobSubmitted'",
    )
    .bind(EVENTS)
    .execute(&pool)
    .await
    .unwrap();

    // The fast client gets every one of them, once, in order: they all went through the feed.
    let mut received = 0i64;
    let mut last = 0;
    while received < EVENTS {
        let message = fast
            .next(Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("the fast client stalled after {received} events"));
        assert_eq!(message.event.as_deref(), Some("JobSubmitted"));
        assert!(message.sequence() > last);
        last = message.sequence();
        received += 1;
    }
    drop(fast);
    let peak_kib = memory("VmHWM:");
    let growth_mib = peak_kib.saturating_sub(baseline_kib) as f64 / 1024.0;
    eprintln!(
        "query service: RSS {baseline_kib} KiB before, peak {peak_kib} KiB while {EVENTS} events passed (+{growth_mib:.1} MiB)"
    );
    // Holding the events for the slow client would take over 100 MiB (each is ~1 KiB as
    // JSON, twice: decoded and rendered); the ring holds 1,024 and the connection 64.
    assert!(
        growth_mib < 48.0,
        "peak RSS grew by {growth_mib:.1} MiB while a client read nothing"
    );

    // The slow client: what was queued for it, then `reset` with where to resume, then the end.
    let mut before_reset = Vec::new();
    let reset = loop {
        let message = slow
            .next(Duration::from_secs(30))
            .await
            .expect("the slow client gets a reset");
        if message.event.as_deref() == Some("reset") {
            break message;
        }
        before_reset.push(message.sequence());
    };
    let resume_after = reset.json()["resume_after"].as_u64().unwrap();
    if let Some(&got) = before_reset.last() {
        assert_eq!(got, resume_after, "it resumes right after what it got");
    }
    assert!(
        (before_reset.len() as i64) < EVENTS / 10,
        "it was cut off: {} events queued for it",
        before_reset.len()
    );
    assert!(slow.next(Duration::from_secs(10)).await.is_none());
    command_task.abort();
}

/// A child process killed when the test ends, pass or fail.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A quiet feed gets keep-alive comments; server shutdown ends every live feed cleanly (the
/// response ends; nothing hangs) and the server stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quiet_feeds_get_keep_alives_and_shutdown_ends_every_feed() {
    let db = overfly_testkit::TestDb::create().await;
    let nats = overfly_testkit::TestNats::start().await;
    let app = crate::helpers::query_app(&db, &nats, &[]).await;
    let base = format!("http://{}", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    // A quiet feed sends a keep-alive comment every 15 s.
    let mut quiet = http.get(format!("{base}/stream")).send().await.unwrap();
    let started = std::time::Instant::now();
    let comment = tokio::time::timeout(Duration::from_secs(20), quiet.chunk())
        .await
        .expect("a keep-alive within 20 s")
        .unwrap()
        .unwrap();
    assert_eq!(&comment[..], b":\n\n");
    assert!(
        started.elapsed() >= Duration::from_secs(14),
        "not before its period"
    );
    drop(quiet);
    let mut feeds = Vec::new();
    for path in ["/stream", "/gpus/stream", "/stream?aggregate_type=job"] {
        feeds.push(Sse::connect(&http, &format!("{base}{path}"), None).await);
    }
    stop.send(()).unwrap();
    for mut feed in feeds {
        // `to_end` panics if the stream stays open; nothing was published, so nothing comes.
        assert!(feed.to_end(Duration::from_secs(10)).await.is_empty());
    }
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stopped")
        .unwrap()
        .unwrap();
}
