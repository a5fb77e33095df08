//! `GET /executors`, `GET /executors/{id}` and `GET /gpus` answer what the read models say.

use serde_json::{Value, json};

use crate::helpers::{Stack, job_body, spawn_stack};

async fn register(stack: &Stack, executor: &str) -> i64 {
    let gpu = |index: u32| {
        json!({"uuid": format!("{executor}-gpu{index}"), "index": index,
               "name": "NVIDIA A100-SXM4-40GB", "memory_mb": 40960, "compute_capability": "8.0"})
    };
    let (status, answer) = stack
        .command(
            "/executors",
            &json!({"executor_id": executor, "hostname": format!("{executor}.example"),
                    "lease_s": 30, "gpus": [gpu(0), gpu(1)]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    answer["position"].as_i64().unwrap()
}

async fn command(stack: &Stack, path: &str, body: Value) -> i64 {
    let (status, answer) = stack.command(path, &body).await;
    assert!((200..300).contains(&status), "{path}: {status} {answer}");
    answer["position"].as_i64().unwrap()
}

/// The rows as JSON, in the API's order.
async fn rows(stack: &Stack, sql: &str) -> Vec<Value> {
    sqlx::query_scalar(sql)
        .fetch_all(&stack.pool)
        .await
        .unwrap()
}

fn uuids(gpus: &Value) -> Vec<&str> {
    gpus.as_array()
        .unwrap()
        .iter()
        .map(|gpu| gpu["gpu_uuid"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn executors_and_gpus_are_listed_filtered_and_looked_up() {
    let stack = spawn_stack().await;
    register(&stack, "host-a").await;
    register(&stack, "host-b").await;
    command(&stack, "/executors/host-a/heartbeat", json!({})).await;
    command(
        &stack,
        "/executors/host-b/drain",
        json!({"by": "ops", "reason": "kernel update"}),
    )
    .await;
    let (job, _) = stack.submit(&job_body(1)).await;
    let run = uuid::Uuid::new_v4().to_string();
    let position = command(
        &stack,
        &format!("/jobs/{job}/runs"),
        json!({"run_id": run, "executor_id": "host-a", "gpu_uuids": ["host-a-gpu1"]}),
    )
    .await;
    stack.wait_for_executors(position).await;

    // Every executor, and by state; the fields are the row's.
    let (status, _, all) = stack.query("/executors").await;
    assert_eq!(status, 200, "{all}");
    let expected = rows(
        &stack,
        "SELECT to_jsonb(e) FROM read_executors e ORDER BY executor_id",
    )
    .await;
    assert_eq!(all.as_array().unwrap().len(), 2);
    for (answer, row) in all.as_array().unwrap().iter().zip(&expected) {
        for key in [
            "executor_id",
            "hostname",
            "state",
            "session",
            "lease_s",
            "version",
        ] {
            assert_eq!(answer[key], row[key], "{key}");
        }
    }
    assert_eq!(all[0]["state"], "active");
    assert_eq!(all[1]["state"], "draining");
    let (_, _, active) = stack.query("/executors?state=active").await;
    assert_eq!(active.as_array().unwrap().len(), 1);
    assert_eq!(active[0]["executor_id"], "host-a");
    let (_, _, lost) = stack.query("/executors?state=lost").await;
    assert_eq!(lost, json!([]));

    // One executor with its GPUs, the held one naming its run and job.
    let (status, _, host_a) = stack.query("/executors/host-a").await;
    assert_eq!(status, 200, "{host_a}");
    assert_eq!(host_a["executor_id"], "host-a");
    assert_eq!(host_a["state"], "active");
    assert!(host_a["lease_expires_at"].is_string(), "{host_a}");
    assert_eq!(uuids(&host_a["gpus"]), ["host-a-gpu0", "host-a-gpu1"]);
    assert_eq!(host_a["gpus"][0]["held_by_run"], Value::Null);
    assert_eq!(host_a["gpus"][1]["held_by_run"], run.as_str());
    assert_eq!(host_a["gpus"][1]["held_by_job"], job.as_str());
    assert_eq!(host_a["gpus"][1]["name"], "NVIDIA A100-SXM4-40GB");
    assert_eq!(host_a["gpus"][1]["memory_mb"], 40960);

    // GPUs: all, of one executor, free or held.
    let (status, _, gpus) = stack.query("/gpus").await;
    assert_eq!(status, 200, "{gpus}");
    assert_eq!(
        uuids(&gpus),
        ["host-a-gpu0", "host-a-gpu1", "host-b-gpu0", "host-b-gpu1"]
    );
    let (_, _, gpus) = stack.query("/gpus?executor_id=host-b").await;
    assert_eq!(uuids(&gpus), ["host-b-gpu0", "host-b-gpu1"]);
    let (_, _, gpus) = stack.query("/gpus?free=false").await;
    assert_eq!(uuids(&gpus), ["host-a-gpu1"]);
    let (_, _, gpus) = stack.query("/gpus?free=true&executor_id=host-a").await;
    assert_eq!(uuids(&gpus), ["host-a-gpu0"]);

    // The run ends: its GPU is free again.
    let executor = json!({"executor_id": "host-a"});
    command(
        &stack,
        &format!("/jobs/{job}/runs/{run}/started"),
        executor.clone(),
    )
    .await;
    let position = command(
        &stack,
        &format!("/jobs/{job}/runs/{run}/succeeded"),
        executor,
    )
    .await;
    stack.wait_for_executors(position).await;
    let (_, _, gpus) = stack.query("/gpus?free=false").await;
    assert_eq!(gpus, json!([]));
}

#[tokio::test]
async fn bad_filters_are_400_naming_the_parameter_and_unknown_ids_404() {
    let stack = spawn_stack().await;
    let (status, headers, problem) = stack.query("/executors?state=sleeping").await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(problem["field"], "state");
    let (status, _, problem) = stack.query("/gpus?free=maybe").await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["field"], "free");
    let (status, _, problem) = stack.query("/executors/nobody").await;
    assert_eq!(status, 404, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("nobody"),
        "{problem}"
    );
}
