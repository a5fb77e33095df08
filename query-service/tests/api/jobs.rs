//! `GET /jobs`, `GET /jobs/{id}`: read-your-writes, stable pagination, point-in-time state,
//! filters and their errors.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{job_body, spawn_stack, spawn_stack_with};

/// Test 6 of issue 3: a command, then a query with its position, always sees the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_query_with_the_commands_position_always_sees_the_write() {
    let stack = spawn_stack().await;
    for n in 0..15 {
        let (id, position) = stack.submit(&job_body(n)).await;
        let (status, _, job) = stack
            .query(&format!("/jobs/{id}?min_position={position}"))
            .await;
        assert_eq!(status, 200, "{job}");
        assert_eq!(job["state"], "queued");
        assert_eq!(job["position"], position);

        let (status, cancelled) = stack
            .command(
                &format!("/jobs/{id}/cancel"),
                &json!({"by": "ana", "reason": "ryw"}),
            )
            .await;
        assert_eq!(status, 200);
        let position = cancelled["position"].as_i64().unwrap();
        let (status, _, job) = stack
            .query(&format!("/jobs/{id}?min_position={position}"))
            .await;
        assert_eq!(status, 200);
        assert_eq!(job["state"], "cancelled", "iteration {n}");
        let (status, _, page) = stack
            .query(&format!(
                "/jobs?state=cancelled&min_position={position}&with_total=true"
            ))
            .await;
        assert_eq!(status, 200);
        assert_eq!(page["total"], n as i64 + 1);
    }
}

#[tokio::test]
async fn a_position_the_projection_has_not_reached_is_a_503_with_retry_after() {
    let stack = spawn_stack_with(100).await;
    let (status, headers, problem) = stack.query("/jobs?min_position=999999").await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(problem["detail"].as_str().unwrap().contains("999999"));
}

/// Test 5 of issue 3: paging newest-first while jobs keep arriving returns each job once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pagination_under_concurrent_inserts_returns_each_job_once() {
    let stack = Arc::new(spawn_stack().await);
    let mut before = HashSet::new();
    for n in 0..40 {
        before.insert(stack.submit(&job_body(n)).await.0);
    }
    stack.wait_for_jobs(40).await;
    let writer = {
        let stack = stack.clone();
        tokio::spawn(async move {
            for n in 40..70 {
                stack.submit(&job_body(n)).await;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/jobs?limit=7&cursor={c}"),
            None => "/jobs?limit=7".to_string(),
        };
        let (status, _, page) = stack.query(&path).await;
        assert_eq!(status, 200, "{page}");
        for item in page["items"].as_array().unwrap() {
            seen.push(item["job_id"].as_str().unwrap().to_string());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    writer.await.unwrap();
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a job was returned twice");
    assert!(
        before.is_subset(&unique),
        "a job that existed before paging was skipped"
    );
}

/// Test 3 of issue 3: `as_of` answers match the state at each step of a scripted lifecycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn as_of_answers_match_the_live_state_at_every_step() {
    let stack = spawn_stack().await;
    let (id, position) = stack.submit(&job_body(1)).await;
    let run_1 = uuid::Uuid::new_v4();
    let run_2 = uuid::Uuid::new_v4();
    let executor = json!({"executor_id": "gpu-host-1"});
    let steps: Vec<(String, Value)> = vec![
        (
            format!("/jobs/{id}/priority"),
            json!({"priority": 80, "by": "lead", "reason": "deadline"}),
        ),
        (
            format!("/jobs/{id}/runs"),
            json!({"run_id": run_1, "executor_id": "gpu-host-1", "gpu_uuids": ["GPU-a"],
            "decision": {"score": 0.8, "priority": 80, "fair_share_factor": 0.5, "age_factor": 0.1, "overtook": [], "placement": "gpu-host-1: 1 free GPU"}}),
        ),
        (format!("/jobs/{id}/runs/{run_1}/started"), executor.clone()),
        (
            format!("/jobs/{id}/runs/{run_1}/progress"),
            json!({"executor_id": "gpu-host-1", "report_seq": 1, "progress": 0.4, "metrics": {"loss": 0.31}}),
        ),
        (
            format!("/jobs/{id}/runs/{run_1}/failed"),
            json!({"executor_id": "gpu-host-1", "exit_code": 1, "reason": "CUDA error", "retryable": true}),
        ),
    ];
    let mut snapshots = Vec::new();
    let snapshot = |position: i64| {
        let stack = &stack;
        let id = id.clone();
        async move {
            let (status, _, live) = stack
                .query(&format!("/jobs/{id}?min_position={position}"))
                .await;
            assert_eq!(status, 200, "{live}");
            tokio::time::sleep(Duration::from_millis(5)).await;
            (chrono::Utc::now(), live)
        }
    };
    snapshots.push(snapshot(position).await);
    for (path, body) in &steps {
        let (status, answer) = stack.command(path, body).await;
        assert_eq!(status, 200, "{path}: {answer}");
        snapshots.push(snapshot(answer["position"].as_i64().unwrap()).await);
    }
    // The retry becomes eligible after the backoff (10 s by default): the second attempt is
    // checked through the state before it, which is what matters for as_of.
    let (status, _, live) = stack.query(&format!("/jobs/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(live["state"], "queued");
    assert_eq!(live["attempts"], 1);
    let _ = run_2;

    for (instant, live) in &snapshots {
        let at = instant.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let (status, _, then) = stack
            .query(&format!("/jobs/{id}?as_of={}", urlencode(&at)))
            .await;
        assert_eq!(status, 200, "{then}");
        assert_eq!(&then, live, "as_of {at}");
    }
    // Before the job existed it is unknown.
    let (status, _, _) = stack
        .query(&format!(
            "/jobs/{id}?as_of={}",
            urlencode("2000-01-01T00:00:00Z")
        ))
        .await;
    assert_eq!(status, 404);
}

fn urlencode(text: &str) -> String {
    text.replace(':', "%3A").replace('+', "%2B")
}

#[tokio::test]
async fn filters_select_what_they_say() {
    let stack = spawn_stack().await;
    for n in 0..9 {
        stack.submit(&job_body(n)).await;
    }
    stack.wait_for_jobs(9).await;
    let count = |path: String| {
        let stack = &stack;
        async move {
            let (status, _, page) = stack.query(&path).await;
            assert_eq!(status, 200, "{page}");
            (page["items"].as_array().unwrap().len(), page)
        }
    };
    assert_eq!(count("/jobs?account=geo-team".into()).await.0, 3);
    assert_eq!(count("/jobs?submitted_by=ana".into()).await.0, 5);
    assert_eq!(count("/jobs?label=benchmark%3Dtiles-v2".into()).await.0, 4);
    assert_eq!(count("/jobs?state=queued".into()).await.0, 9);
    assert_eq!(count("/jobs?state=running".into()).await.0, 0);
    let (_, oldest) = count("/jobs?sort=oldest&limit=1".into()).await;
    assert_eq!(oldest["items"][0]["name"], "tiles-0");
    let (_, newest) = count("/jobs?limit=1".into()).await;
    assert_eq!(newest["items"][0]["name"], "tiles-8");
    let (n, _) = count("/jobs?created_after=2999-01-01T00%3A00%3A00Z".into()).await;
    assert_eq!(n, 0);
    let (_, total) = count("/jobs?account=nlp-team&with_total=true&limit=1".into()).await;
    assert_eq!(total["total"], 3);
}

#[tokio::test]
async fn bad_filters_are_400_problems_naming_the_parameter() {
    let stack = spawn_stack().await;
    let cases = [
        ("/jobs?state=bogus", 400, Some("state")),
        ("/jobs?limit=0", 400, Some("limit")),
        ("/jobs?limit=501", 400, Some("limit")),
        ("/jobs?cursor=garbage", 400, Some("cursor")),
        ("/jobs?label=novalue", 400, Some("label")),
        ("/jobs?sort=sideways", 400, Some("sort")),
        ("/jobs?created_after=yesterday", 400, Some("created_after")),
        ("/jobs?min_position=0", 400, Some("min_position")),
        ("/jobs/not-a-uuid", 400, Some("job_id")),
        ("/jobs/5f0c6a38-0000-4000-8000-000000000000", 404, None),
        (
            "/jobs/5f0c6a38-0000-4000-8000-000000000000/history",
            404,
            None,
        ),
        ("/executors/nobody/history", 404, None),
    ];
    for (path, status, field) in cases {
        let (got, headers, problem) = stack.query(path).await;
        assert_eq!(got, status, "{path}: {problem}");
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "{path}"
        );
        if let Some(field) = field {
            assert_eq!(problem["field"], field, "{path}: {problem}");
        }
    }
}

/// A position returned by a command on another aggregate (an executor) is reached as soon
/// as every job event before it is applied, though the jobs projection never applies it.
#[tokio::test]
async fn a_position_of_another_aggregate_is_reached_when_the_jobs_before_it_are() {
    let stack = spawn_stack().await;
    let (id, _) = stack.submit(&job_body(1)).await;
    let gpu = json!({"uuid": "GPU-a", "index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559, "compute_capability": "9.0"});
    let (status, registered) = stack
        .command(
            "/executors",
            &json!({"executor_id": "h1", "hostname": "h1", "gpus": [gpu], "lease_s": 30}),
        )
        .await;
    assert_eq!(status, 200);
    let position = registered["position"].as_i64().unwrap();
    let (status, _, job) = stack
        .query(&format!("/jobs/{id}?min_position={position}"))
        .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["state"], "queued");
}
