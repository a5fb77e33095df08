//! `GET /jobs/{id}/explain`: why a job is pending, now and at any past instant, from the
//! events (the queue and fleet rebuilt, the scheduler's policy run in explain mode).

use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};

use crate::helpers::{Stack, spawn_stack};

async fn command(stack: &Stack, path: &str, body: Value) -> i64 {
    let (status, answer) = stack.command(path, &body).await;
    assert!((200..300).contains(&status), "{path}: {status} {answer}");
    answer["position"].as_i64().unwrap()
}

fn job(name: &str, priority: u8, memory_mb: u64) -> Value {
    json!({"name": name, "account": "geo-team", "submitted_by": "ana", "priority": priority,
           "gpus": 1, "gpu_memory_mb": memory_mb, "command": ["true"], "max_retries": 2,
           "timeout_s": 600})
}

async fn explain(stack: &Stack, job: &str, at: Option<chrono::DateTime<Utc>>) -> Value {
    let query = at.map_or(String::new(), |at| {
        format!(
            "?at={}",
            at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .replace('+', "%2B")
        )
    });
    let (status, _, body) = stack.query(&format!("/jobs/{job}/explain{query}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_says_why_a_job_waits_now_and_at_any_past_instant() {
    let stack = spawn_stack().await;
    let before_everything = Utc::now();
    // One executor with one 40 GB GPU.
    command(
        &stack,
        "/executors",
        json!({"executor_id": "h", "hostname": "h.example", "lease_s": 600,
               "gpus": [{"uuid": "h-gpu0", "index": 0, "name": "NVIDIA A100-SXM4-40GB",
                         "memory_mb": 40960, "compute_capability": "8.0"}]}),
    )
    .await;
    command(&stack, "/executors/h/heartbeat", json!({})).await;
    let (huge, _) = stack.submit(&job("huge", 90, 80_000)).await;
    let (mid, _) = stack.submit(&job("mid", 50, 0)).await;
    let (low, _) = stack.submit(&job("low", 10, 0)).await;

    // The 80 GB job heads the queue but fits nowhere; the next one fits now; the last waits.
    let why = explain(&stack, &huge, None).await;
    assert_eq!(why["state"], "queued");
    assert_eq!(why["position"], 1);
    assert_eq!(why["queue_length"], 3);
    assert_eq!(
        why["waiting_for"][0]["kind"], "no_executor_can_fit",
        "{why}"
    );
    assert_eq!(why["factors"]["priority"], 90);
    let why = explain(&stack, &mid, None).await;
    assert_eq!(why["position"], 2);
    assert_eq!(why["ahead"], json!([huge]));
    assert_eq!(why["would_assign"]["executor_id"], "h", "{why}");
    assert_eq!(why["would_assign"]["overtakes"], json!([huge]));
    assert_eq!(why["waiting_for"], json!([]));
    let why = explain(&stack, &low, None).await;
    assert_eq!(why["position"], 3);
    assert_eq!(why["ahead_count"], 2);
    assert_eq!(why["waiting_for"][0]["kind"], "gpus_busy", "{why}");
    assert_eq!(why["waiting_for"][0]["executors"], json!(["h"]));
    assert!(
        why["summary"].as_str().unwrap().contains("position 3 of 3"),
        "{why}"
    );

    let before_assignment = Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let run = uuid::Uuid::new_v4().to_string();
    command(
        &stack,
        &format!("/jobs/{mid}/runs"),
        json!({"run_id": run, "executor_id": "h", "gpu_uuids": ["h-gpu0"]}),
    )
    .await;

    // Now: the assigned job is not waiting; the last one moved up and still waits for h.
    let why = explain(&stack, &mid, None).await;
    assert_eq!(why["state"], "assigned");
    assert_eq!(why["position"], Value::Null);
    let why = explain(&stack, &low, None).await;
    assert_eq!(why["position"], 2);
    assert_eq!(why["waiting_for"][0]["kind"], "gpus_busy");

    // In the past: before the assignment, the middle job was about to be placed.
    let then = explain(&stack, &mid, Some(before_assignment)).await;
    assert_eq!(then["state"], "queued");
    assert_eq!(
        then["would_assign"]["gpu_uuids"],
        json!(["h-gpu0"]),
        "{then}"
    );

    // A retryable failure puts it back in the queue, in backoff (1 s in these tests).
    command(
        &stack,
        &format!("/jobs/{mid}/runs/{run}/failed"),
        json!({"executor_id": "h", "exit_code": null, "signal": 9, "reason": "OOM killed",
               "retryable": true}),
    )
    .await;
    let why = explain(&stack, &mid, None).await;
    assert_eq!(why["state"], "queued");
    assert_eq!(why["waiting_for"][0]["kind"], "backoff", "{why}");
    assert!(why["waiting_for"][0]["until"].is_string());

    // Before it was submitted, and an unknown job: 404.
    let at = before_everything
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        .replace('+', "%2B");
    let (status, headers, problem) = stack.query(&format!("/jobs/{mid}/explain?at={at}")).await;
    assert_eq!(status, 404, "{problem}");
    assert_eq!(headers["content-type"], "application/problem+json");
    let (status, _, _) = stack
        .query(&format!("/jobs/{}/explain", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(status, 404);
    let (status, _, problem) = stack.query("/jobs/not-a-uuid/explain").await;
    assert_eq!(status, 400);
    assert_eq!(problem["field"], "job_id");
}
