//! Test 5: concurrent commands on one aggregate. Optimistic concurrency with bounded internal
//! retries: every command gets exactly one definite outcome, and no update is lost.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::helpers::{job_body, spawn_app};

async fn events_of(app: &crate::helpers::TestApp, id: &str) -> Vec<(String, Value)> {
    sqlx::query_as(
        "SELECT event_type, payload FROM events WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_priority_changes_are_all_recorded_as_a_chain() {
    let app = Arc::new(spawn_app().await);
    let body = json!({
        "name": "llm-eval", "account": "nlp-team", "submitted_by": "kim", "priority": 0,
        "gpus": 1, "command": ["true"], "timeout_s": 60
    });
    let id = app.submit(&body).await;
    let mut handles = Vec::new();
    for priority in 1..=16 {
        let app = app.clone();
        let id = id.clone();
        handles.push(tokio::spawn(async move {
            let response = app
                .post(
                    &format!("/jobs/{id}/priority"),
                    &json!({"priority": priority, "by": "lead", "reason": "race"}),
                )
                .await;
            response.status().as_u16()
        }));
    }
    let mut accepted = 0;
    for handle in handles {
        match handle.await.unwrap() {
            200 => accepted += 1,
            409 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    let changes: Vec<Value> = events_of(&app, &id)
        .await
        .into_iter()
        .filter(|(kind, _)| kind == "JobPriorityChanged")
        .map(|(_, payload)| payload["JobPriorityChanged"].clone())
        .collect();
    assert_eq!(changes.len(), accepted, "one event per accepted command");
    assert!(accepted >= 1);
    let mut current = 0;
    for change in &changes {
        assert_eq!(change["from"], current, "a lost update breaks the chain");
        current = change["to"].as_i64().unwrap();
    }
}

/// Cancel and assign race on the same job, many times: either the assignment came first and
/// the cancellation names the run it stops, or the cancellation came first and the
/// assignment was refused. Never an assigned run that the cancellation did not see.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_and_assign_racing_leave_a_consistent_history() {
    let app = Arc::new(spawn_app().await);
    for n in 0..20 {
        let mut body = job_body(n);
        body["gpus"] = json!(1);
        let id = app.submit(&body).await;
        let run_id = uuid::Uuid::new_v4();
        let (cancel_path, assign_path) = (format!("/jobs/{id}/cancel"), format!("/jobs/{id}/runs"));
        let cancel_body = json!({"by": "ana", "reason": "race"});
        let assign_body =
            json!({"run_id": run_id, "executor_id": "gpu-host-1", "gpu_uuids": ["GPU-1"]});
        let (cancel, assign) = tokio::join!(
            app.post(&cancel_path, &cancel_body),
            app.post(&assign_path, &assign_body),
        );
        assert_eq!(
            cancel.status(),
            200,
            "cancel of a non-terminal job always succeeds"
        );
        let events = events_of(&app, &id).await;
        let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
        let cancelled =
            &events.iter().find(|(k, _)| k == "JobCancelled").unwrap().1["JobCancelled"];
        match assign.status().as_u16() {
            200 => {
                assert_eq!(kinds, ["JobSubmitted", "RunAssigned", "JobCancelled"]);
                assert_eq!(cancelled["active_run"], json!(run_id));
                assert_eq!(cancelled["previous_state"], "assigned");
            }
            409 => {
                assert_eq!(kinds, ["JobSubmitted", "JobCancelled"]);
                assert_eq!(cancelled["active_run"], Value::Null);
            }
            other => panic!("unexpected assign status {other}"),
        }
    }
}

/// The retry backoff is configuration (`--retry-base-s`), recorded in the event it decides.
#[tokio::test]
async fn the_configured_retry_backoff_is_what_the_event_records() {
    use crate::helpers::{Options, spawn_app_with};
    let app = spawn_app_with(Options {
        retry_base_s: 2,
        ..Options::default()
    })
    .await;
    let mut body = job_body(1);
    body["gpus"] = json!(1);
    let id = app.submit(&body).await;
    let run = uuid::Uuid::new_v4();
    let steps = [
        (
            format!("/jobs/{id}/runs"),
            json!({"run_id": run, "executor_id": "h1", "gpu_uuids": ["GPU-1"]}),
        ),
        (
            format!("/jobs/{id}/runs/{run}/started"),
            json!({"executor_id": "h1"}),
        ),
        (
            format!("/jobs/{id}/runs/{run}/failed"),
            json!({"executor_id": "h1", "exit_code": 1, "reason": "boom", "retryable": true}),
        ),
    ];
    for (path, body) in &steps {
        assert_eq!(app.post(path, body).await.status(), 200, "{path}");
    }
    let events = events_of(&app, &id).await;
    let (kind, payload) = events.last().unwrap();
    assert_eq!(kind, "RetryScheduled");
    assert_eq!(payload["RetryScheduled"]["backoff_s"], 2);
}
