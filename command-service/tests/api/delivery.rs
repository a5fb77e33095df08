//! Every acknowledged event reaches JetStream exactly once, in per-aggregate order, through
//! concurrency, NATS outages and relay crashes.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::helpers::{
    Options, assert_exactly_once_in_order, job_body, spawn_app, spawn_app_with, stream_events,
};

/// Test 1: N jobs from many tasks, each then re-prioritised and cancelled: all 3·N events are
/// in Postgres and in JetStream exactly once, each job's events in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submissions_reach_jetstream_exactly_once_in_order() {
    let app = Arc::new(spawn_app().await);
    let tasks = 24;
    let per_task = 10;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let app = app.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..per_task {
                let body = job_body(t * per_task + i);
                let id = app.submit(&body).await;
                let raised = (body["priority"].as_i64().unwrap() + 1) % 101;
                let priority = app
                    .post(
                        &format!("/jobs/{id}/priority"),
                        &json!({"priority": raised, "by": "lead", "reason": "deadline"}),
                    )
                    .await;
                assert_eq!(priority.status(), 200);
                let cancel = app
                    .post(
                        &format!("/jobs/{id}/cancel"),
                        &json!({"by": "ana", "reason": "wrong region"}),
                    )
                    .await;
                assert_eq!(cancel.status(), 200);
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let expected = tasks * per_task * 3;
    assert_eq!(app.event_count().await, expected as i64);
    let stream = stream_events(&app.nats.url(), expected, Duration::from_secs(30)).await;
    assert_eq!(stream.len(), expected);
    assert_exactly_once_in_order(&stream, &app.event_ids().await);
    // The envelope carries who and why.
    let first = &stream[0].envelope;
    assert_eq!(first["event_type"], "JobSubmitted");
    assert_eq!(first["metadata"]["actor"], "ana");
    assert_eq!(first["metadata"]["command"], "SubmitJob");
    assert!(first["metadata"]["correlation_id"].is_string());
    assert!(
        first["metadata"]["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("00-"))
    );
}

/// Test 2: NATS dies (SIGKILL) while jobs are being submitted. Commands keep succeeding;
/// after NATS is back every event arrives, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_outage_delays_events_but_loses_none() {
    let mut app = spawn_app().await;
    let total = 240;
    let submitted = Arc::new(AtomicUsize::new(0));
    let http = app.http.clone();
    let url = app.url("/jobs");
    let submitter = {
        let submitted = submitted.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut batch = Vec::new();
            for n in 0..total {
                let http = http.clone();
                let url = url.clone();
                let submitted = submitted.clone();
                batch.push(tokio::spawn(async move {
                    let status = http
                        .post(url)
                        .json(&job_body(n))
                        .send()
                        .await
                        .unwrap()
                        .status();
                    submitted.fetch_add(1, Ordering::SeqCst);
                    status
                }));
                if batch.len() == 8 {
                    for handle in batch.drain(..) {
                        statuses.push(handle.await.unwrap());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            for handle in batch {
                statuses.push(handle.await.unwrap());
            }
            statuses
        })
    };
    while submitted.load(Ordering::SeqCst) < total / 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    app.nats.kill();
    // While NATS is down the service is not ready, but commands still succeed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(
        ready.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    while submitted.load(Ordering::SeqCst) < total * 3 / 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    app.nats.restart().await;
    let statuses = submitter.await.unwrap();
    assert!(statuses.iter().all(|s| s.as_u16() == 201), "{statuses:?}");
    assert_eq!(app.event_count().await, total as i64);
    let stream = stream_events(&app.nats.url(), total, Duration::from_secs(60)).await;
    assert_eq!(stream.len(), total);
    assert_exactly_once_in_order(&stream, &app.event_ids().await);
}

fn relay_process(
    app: &crate::helpers::TestApp,
    batch_size: usize,
    abort_after: Option<usize>,
) -> std::process::Child {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_overfly-command"));
    command
        .arg("relay")
        .env("DATABASE_URL", &app.db.url)
        .env("NATS_URL", app.nats.url())
        .env("OVERFLY_RELAY_BATCH_SIZE", batch_size.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(n) = abort_after {
        command.env("OVERFLY_RELAY_ABORT_AFTER", n.to_string());
    }
    command.spawn().expect("relay binary starts")
}

async fn submit_many(app: &crate::helpers::TestApp, count: usize) {
    let mut handles = Vec::new();
    for chunk in (0..count).collect::<Vec<_>>().chunks(count.div_ceil(8)) {
        let chunk = chunk.to_vec();
        let http = app.http.clone();
        let url = app.url("/jobs");
        handles.push(tokio::spawn(async move {
            for n in chunk {
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
    for handle in handles {
        handle.await.unwrap();
    }
}

async fn relay_position(app: &crate::helpers::TestApp) -> Option<i64> {
    sqlx::query_scalar("SELECT global_position FROM relay_positions")
        .fetch_optional(&app.pool)
        .await
        .unwrap()
}

/// Test 3a: the relay process dies after JetStream acked a batch but before it stored its
/// position (fault injected at exactly that point). The restarted relay skips what the stream
/// already has and publishes the rest: nothing lost, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_crash_between_ack_and_position_loses_and_duplicates_nothing() {
    let app = spawn_app_with(Options {
        relay: false,
        ..Options::default()
    })
    .await;
    let total = 1200;
    submit_many(&app, total).await;

    let mut crashing = relay_process(&app, 500, Some(700));
    let status = tokio::task::spawn_blocking(move || crashing.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success(), "the relay must have aborted");
    let stream = stream_events(&app.nats.url(), 1000, Duration::from_secs(20)).await;
    assert_eq!(stream.len(), 1000, "two batches of 500 were acked");
    // The position may not have been stored at all (it is written at most every 100 ms):
    // either way the stream is ahead of it.
    let stored = relay_position(&app).await.unwrap_or(0);
    assert!(
        stored < stream.last().unwrap().position,
        "the crash happened before the second batch's position was stored"
    );

    let mut relay = relay_process(&app, 500, None);
    let stream = stream_events(&app.nats.url(), total, Duration::from_secs(30)).await;
    let _ = relay.kill();
    let _ = relay.wait();
    assert_eq!(stream.len(), total);
    assert_exactly_once_in_order(&stream, &app.event_ids().await);
}

/// Test 3b: the relay is killed with SIGKILL at an arbitrary point while publishing a backlog
/// in small batches, then restarted: every event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_mid_batch_and_restarted_loses_and_duplicates_nothing() {
    let app = spawn_app_with(Options {
        relay: false,
        ..Options::default()
    })
    .await;
    let total = 1500;
    submit_many(&app, total).await;

    let mut relay = relay_process(&app, 50, None);
    // Kill it as soon as 300 are in (polling the stream's count, which is cheap).
    let js = async_nats::jetstream::new(async_nats::connect(app.nats.url()).await.unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let count = match js.get_stream(crate::helpers::STREAM).await {
            Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        };
        if count >= 300 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    relay.kill().unwrap();
    relay.wait().unwrap();
    let partial = stream_events(&app.nats.url(), 300, Duration::from_secs(20)).await;
    assert!(
        partial.len() >= 300 && partial.len() < total,
        "killed mid-way: {}",
        partial.len()
    );

    let mut relay = relay_process(&app, 50, None);
    let stream = stream_events(&app.nats.url(), total, Duration::from_secs(30)).await;
    let _ = relay.kill();
    let _ = relay.wait();
    assert_eq!(stream.len(), total);
    assert_exactly_once_in_order(&stream, &app.event_ids().await);
}

/// Only one relay publishes: a second instance stands by while the first holds the lock, and
/// takes over when it dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_relay_takes_over_when_the_leader_dies() {
    let app = spawn_app_with(Options {
        relay: false,
        ..Options::default()
    })
    .await;
    submit_many(&app, 100).await;
    let mut leader = relay_process(&app, 500, None);
    let first = stream_events(&app.nats.url(), 100, Duration::from_secs(20)).await;
    assert_eq!(first.len(), 100);
    let mut standby = relay_process(&app, 500, None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    leader.kill().unwrap();
    leader.wait().unwrap();
    submit_many(&app, 100).await;
    let stream = stream_events(&app.nats.url(), 200, Duration::from_secs(30)).await;
    let _ = standby.kill();
    let _ = standby.wait();
    assert_eq!(stream.len(), 200);
    assert_exactly_once_in_order(&stream, &app.event_ids().await);
}

/// Commit order is the numeric order of transaction ids: a job's event written by transaction
/// 100 comes after one written by transaction 99, though "100" < "99" as text (the relay once
/// sorted by the text it selected).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transaction_ids_order_numerically_not_as_text() {
    let app = spawn_app_with(Options {
        relay: true,
        ..Options::default()
    })
    .await;
    let job = uuid::Uuid::new_v4().to_string();
    // Old transactions (below every running one; initdb alone uses hundreds of ids), as a
    // cluster's ids cross a digit.
    // One statement, so the relay reads them in one batch.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, tx_id)
         SELECT 'job', $1, s, 'JobPriorityChanged', '1', '{}', '{}', t::text::xid8
           FROM unnest(ARRAY[1, 2, 3], ARRAY[99, 100, 101]) AS u(s, t)",
    )
    .bind(&job)
    .execute(&app.pool)
    .await
    .unwrap();
    let stream = stream_events(&app.nats.url(), 3, Duration::from_secs(20)).await;
    let sequences: Vec<i64> = stream
        .iter()
        .filter(|e| e.aggregate_id == job)
        .map(|e| e.sequence)
        .collect();
    assert_eq!(sequences, [1, 2, 3]);
}
