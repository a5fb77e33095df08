//! `GET /projections`: each projection's progress, and a projection stopped by an event it
//! does not know shows as stopped, naming the event.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{job_body, spawn_stack};

fn by_name<'a>(statuses: &'a Value, name: &str) -> &'a Value {
    statuses
        .as_array()
        .unwrap()
        .iter()
        .find(|status| status["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {statuses}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projections_report_progress_and_why_they_stopped() {
    let stack = spawn_stack().await;
    let (job, position) = stack.submit(&job_body(0)).await;
    stack.wait_for_usage(position).await;
    stack.wait_for_executors(position).await;
    let (status, _, _) = stack
        .query(&format!("/jobs/{job}?min_position={position}"))
        .await;
    assert_eq!(status, 200);

    let (status, _, statuses) = stack.query("/projections").await;
    assert_eq!(status, 200, "{statuses}");
    for name in ["jobs", "executors", "usage"] {
        let projection = by_name(&statuses, name);
        assert_eq!(projection["status"], "ok", "{projection}");
        assert_eq!(projection["position"], position, "{projection}");
        assert_eq!(projection["positions_behind"], 0, "{projection}");
        // The executors projection reads job events too but has nothing to do for a submit.
        let applied = if name == "executors" { 0 } else { 1 };
        assert_eq!(projection["events_applied"], applied, "{projection}");
        assert_eq!(projection["last_error"], Value::Null, "{projection}");
    }

    // A newer producer wrote an event this projector does not know: every projection that
    // reads job events stops on it instead of skipping it, and says so.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         VALUES ('job', $1, 2, 'JobTeleported', '1', '{\"JobTeleported\": {\"to\": \"mars\"}}',
                 '{}')",
    )
    .bind(&job)
    .execute(&stack.pool)
    .await
    .unwrap();
    let mut stopped = Value::Null;
    for _ in 0..500 {
        let (_, _, statuses) = stack.query("/projections").await;
        if ["jobs", "executors", "usage"]
            .iter()
            .all(|name| by_name(&statuses, name)["status"] == "stopped")
        {
            stopped = statuses;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(
        stopped,
        Value::Null,
        "the projections never reported the stop"
    );
    for name in ["jobs", "executors", "usage"] {
        let projection = by_name(&stopped, name);
        let error = projection["last_error"].as_str().unwrap();
        assert!(error.contains("JobTeleported"), "{projection}");
        assert_eq!(projection["position"], position, "{projection}");
        assert_eq!(projection["positions_behind"], 1, "{projection}");
    }
}
