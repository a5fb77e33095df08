//! Audit history: every event of an aggregate in order, with who, when, why and the trace.

use serde_json::json;

use crate::helpers::{job_body, spawn_stack};

#[tokio::test]
async fn a_jobs_history_is_every_event_in_order_with_its_context() {
    let stack = spawn_stack().await;
    let response = stack
        .http
        .post(format!("http://{}/jobs", stack.command))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("X-Correlation-Id", "audit-1")
        .json(&job_body(1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let id = response.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = stack
        .command(
            &format!("/jobs/{id}/cancel"),
            &json!({"by": "lead", "reason": "budget"}),
        )
        .await;
    assert_eq!(status, 200);

    let (status, _, history) = stack.query(&format!("/jobs/{id}/history")).await;
    assert_eq!(status, 200, "{history}");
    let events = history.as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["sequence"], 1);
    assert_eq!(events[0]["event_type"], "JobSubmitted");
    assert_eq!(events[0]["event_version"], "1");
    assert_eq!(events[0]["actor"], "kim");
    assert_eq!(events[0]["command"], "SubmitJob");
    assert_eq!(events[0]["correlation_id"], "audit-1");
    assert_eq!(events[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(events[0]["payload"]["JobSubmitted"]["spec"].is_object());
    assert_eq!(events[1]["sequence"], 2);
    assert_eq!(events[1]["event_type"], "JobCancelled");
    assert_eq!(events[1]["actor"], "lead");
    assert_eq!(events[1]["payload"]["JobCancelled"]["reason"], "budget");
    assert!(events[0]["position"].as_i64() < events[1]["position"].as_i64());
}

#[tokio::test]
async fn an_executors_history_shows_its_lifecycle() {
    let stack = spawn_stack().await;
    let gpu = json!({"uuid": "GPU-a", "index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559, "compute_capability": "9.0"});
    let (status, _) = stack
        .command(
            "/executors",
            &json!({"executor_id": "gpu-host-7", "hostname": "h7", "gpus": [gpu], "lease_s": 30}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = stack
        .command("/executors/gpu-host-7/heartbeat", &json!({}))
        .await;
    assert_eq!(status, 200);
    let (status, _, history) = stack.query("/executors/gpu-host-7/history").await;
    assert_eq!(status, 200);
    let types: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "ExecutorRegistered",
            "ExecutorActivated",
            "ExecutorHeartbeat"
        ]
    );
    assert_eq!(history[0]["actor"], "executor:gpu-host-7");
}
