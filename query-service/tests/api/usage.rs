//! `GET /usage/accounts/{account}` and `GET /usage/leaderboard` answer what the usage read
//! model (`read_usage_runs`) says, computed exactly from the runs' start and end.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::helpers::{Stack, job_body, spawn_stack};

async fn command(stack: &Stack, path: &str, body: Value) -> i64 {
    let (status, answer) = stack.command(path, &body).await;
    assert!((200..300).contains(&status), "{path}: {status} {answer}");
    answer["position"].as_i64().unwrap()
}

/// Registers `executor` with four A100s and makes it active.
async fn register(stack: &Stack, executor: &str) -> i64 {
    let gpu = |index: u32| {
        json!({"uuid": format!("{executor}-gpu{index}"), "index": index,
               "name": "NVIDIA A100-SXM4-40GB", "memory_mb": 40960, "compute_capability": "8.0"})
    };
    command(
        stack,
        "/executors",
        json!({"executor_id": executor, "hostname": format!("{executor}.example"),
               "lease_s": 30, "gpus": [gpu(0), gpu(1), gpu(2), gpu(3)]}),
    )
    .await;
    command(
        stack,
        &format!("/executors/{executor}/heartbeat"),
        json!({}),
    )
    .await
}

/// Submits job `n` asking for `gpus` GPUs and assigns it a run on `executor`'s `gpu_uuids`.
async fn submit_and_assign(stack: &Stack, n: usize, executor: &str, gpu_uuids: &[&str]) -> Job {
    let mut body = job_body(n);
    body["gpus"] = json!(gpu_uuids.len());
    let (id, _) = stack.submit(&body).await;
    let run = uuid::Uuid::new_v4().to_string();
    command(
        stack,
        &format!("/jobs/{id}/runs"),
        json!({"run_id": run, "executor_id": executor, "gpu_uuids": gpu_uuids}),
    )
    .await;
    Job {
        id,
        run,
        account: body["account"].as_str().unwrap().to_string(),
        user: body["submitted_by"].as_str().unwrap().to_string(),
    }
}

struct Job {
    id: String,
    run: String,
    account: String,
    user: String,
}

async fn report(stack: &Stack, job: &Job, what: &str, executor: &str) -> i64 {
    command(
        stack,
        &format!("/jobs/{}/runs/{}/{what}", job.id, job.run),
        json!({"executor_id": executor}),
    )
    .await
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    job_id: uuid::Uuid,
    account: String,
    submitted_by: String,
    executor_id: String,
    gpu_count: i32,
    gpu_uuids: Vec<String>,
    gpu_model: Option<String>,
    started_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
}

async fn row(stack: &Stack, run: &str) -> Row {
    sqlx::query_as(
        "SELECT job_id, account, submitted_by, executor_id, gpu_count, gpu_uuids, gpu_model,
                started_at, ended_at
           FROM read_usage_runs WHERE run_id = $1::uuid",
    )
    .bind(run)
    .fetch_one(&stack.pool)
    .await
    .unwrap()
}

/// GPU-seconds of a finished run, exactly as the rows say (microsecond timestamps).
fn gpu_seconds(row: &Row) -> f64 {
    let micros = (row.ended_at.unwrap() - row.started_at.unwrap())
        .num_microseconds()
        .unwrap();
    (i64::from(row.gpu_count) * micros) as f64 / 1e6
}

fn bucket_sum(usage: &Value) -> f64 {
    usage["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|bucket| bucket["gpu_seconds"].as_f64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_per_account_and_leaderboard_follow_the_runs() {
    let stack = spawn_stack().await;
    register(&stack, "host-a").await;
    // geo-team (ana) on two GPUs, vision-team (kim) on one.
    let geo = submit_and_assign(&stack, 0, "host-a", &["host-a-gpu0", "host-a-gpu1"]).await;
    let vision = submit_and_assign(&stack, 1, "host-a", &["host-a-gpu2"]).await;
    assert_eq!(geo.account, "geo-team");
    assert_eq!(vision.account, "vision-team");
    report(&stack, &geo, "started", "host-a").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let position = report(&stack, &vision, "started", "host-a").await;
    stack.wait_for_usage(position).await;

    // A running run counts up to now: its usage grows between two calls.
    let path = format!("/usage/accounts/{}?granularity=hour", vision.account);
    let (status, _, first) = stack.query(&path).await;
    assert_eq!(status, 200, "{first}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, _, second) = stack.query(&path).await;
    let (first, second) = (
        first["total_gpu_seconds"].as_f64().unwrap(),
        second["total_gpu_seconds"].as_f64().unwrap(),
    );
    assert!(first > 0.0, "{first}");
    assert!(second >= first + 0.15, "{first} then {second}");
    let running = row(&stack, &vision.run).await;
    assert!(running.started_at.is_some() && running.ended_at.is_none());

    report(&stack, &vision, "succeeded", "host-a").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let position = report(&stack, &geo, "succeeded", "host-a").await;
    stack.wait_for_usage(position).await;

    // One row per run, with the job's account and user, its GPUs and their model.
    let geo_row = row(&stack, &geo.run).await;
    let vision_row = row(&stack, &vision.run).await;
    assert_eq!(geo_row.job_id.to_string(), geo.id);
    assert_eq!(geo_row.account, "geo-team");
    assert_eq!(geo_row.submitted_by, geo.user);
    assert_eq!(geo_row.executor_id, "host-a");
    assert_eq!(geo_row.gpu_count, 2);
    assert_eq!(geo_row.gpu_uuids, ["host-a-gpu0", "host-a-gpu1"]);
    assert_eq!(geo_row.gpu_model.as_deref(), Some("NVIDIA A100-SXM4-40GB"));
    assert_eq!(vision_row.account, "vision-team");
    assert_eq!(vision_row.submitted_by, vision.user);
    assert_eq!(vision_row.gpu_count, 1);
    for row in [&geo_row, &vision_row] {
        assert!(row.ended_at.unwrap() > row.started_at.unwrap(), "{row:?}");
    }

    // The buckets add up to gpu_count × (ended_at − started_at), for hours and days.
    for account_row in [&geo_row, &vision_row] {
        let expected = gpu_seconds(account_row);
        for granularity in ["hour", "day"] {
            let (status, _, usage) = stack
                .query(&format!(
                    "/usage/accounts/{}?granularity={granularity}",
                    account_row.account
                ))
                .await;
            assert_eq!(status, 200, "{usage}");
            assert_eq!(usage["granularity"], granularity);
            assert_eq!(usage["total_gpu_seconds"].as_f64().unwrap(), expected);
            assert!((bucket_sum(&usage) - expected).abs() < 1e-6, "{usage}");
            let buckets = usage["buckets"].as_array().unwrap();
            let expected_buckets = if granularity == "hour" { 168 } else { 7 };
            assert!(
                (expected_buckets..=expected_buckets + 1).contains(&buckets.len()),
                "{}",
                buckets.len()
            );
            assert_eq!(
                usage["by_user"][0]["key"],
                account_row.submitted_by.as_str()
            );
            assert_eq!(
                usage["by_user"][0]["gpu_seconds"].as_f64().unwrap(),
                expected
            );
            assert_eq!(usage["by_gpu_model"][0]["key"], "NVIDIA A100-SXM4-40GB");
        }
    }

    // A window that clips the run counts only the part inside it.
    let started = geo_row.started_at.unwrap();
    let ended = geo_row.ended_at.unwrap();
    // Whole microseconds, as the query string carries them.
    let half = (ended - started).num_microseconds().unwrap() / 2;
    let middle = started + chrono::TimeDelta::microseconds(half);
    let at = |instant: DateTime<Utc>| {
        instant
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            .replace('+', "%2B")
    };
    let (status, _, usage) = stack
        .query(&format!(
            "/usage/accounts/geo-team?granularity=hour&from={}&to={}",
            at(middle),
            at(ended + chrono::TimeDelta::hours(1))
        ))
        .await;
    assert_eq!(status, 200, "{usage}");
    let expected = 2.0 * (ended - middle).num_microseconds().unwrap() as f64 / 1e6;
    assert_eq!(usage["total_gpu_seconds"].as_f64().unwrap(), expected);
    assert!((bucket_sum(&usage) - expected).abs() < 1e-6, "{usage}");

    // An account without runs has empty buckets.
    let (status, _, usage) = stack.query("/usage/accounts/nobody?granularity=day").await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["total_gpu_seconds"].as_f64().unwrap(), 0.0);
    assert_eq!(bucket_sum(&usage), 0.0);

    // The leaderboard: geo-team (two GPUs, longer) first.
    let (status, _, board) = stack.query("/usage/leaderboard").await;
    assert_eq!(status, 200, "{board}");
    assert_eq!(board["by"], "gpu_hours");
    assert_eq!(board["window_hours"], 168);
    let items = board["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{board}");
    assert!(gpu_seconds(&geo_row) > gpu_seconds(&vision_row));
    assert_eq!(items[0]["account"], "geo-team");
    assert_eq!(items[0]["rank"], 1);
    assert_eq!(items[1]["account"], "vision-team");
    assert_eq!(items[1]["rank"], 2);
    let hours = items[0]["gpu_hours"].as_f64().unwrap();
    assert!(
        (hours - gpu_seconds(&geo_row) / 3600.0).abs() < 1e-9,
        "{hours}"
    );
    let (_, _, board) = stack
        .query("/usage/leaderboard?window=1&by=gpu_hours&limit=1")
        .await;
    assert_eq!(board["items"].as_array().unwrap().len(), 1, "{board}");
    assert_eq!(board["items"][0]["account"], "geo-team");
}

#[tokio::test]
async fn bad_usage_parameters_are_400_naming_them() {
    let stack = spawn_stack().await;
    let cases = [
        ("/usage/accounts/geo-team?granularity=week", "granularity"),
        (
            "/usage/accounts/geo-team?from=2026-11-24T10:00:00Z&to=2026-11-24T10:00:00Z",
            "from",
        ),
        (
            "/usage/accounts/geo-team?from=2026-11-24T10:00:00Z&to=2026-11-20T10:00:00Z",
            "from",
        ),
        // 2001 hourly buckets.
        (
            "/usage/accounts/geo-team?granularity=hour&from=2026-01-01T00:00:00Z&to=2026-03-25T09:00:00Z",
            "from",
        ),
        ("/usage/leaderboard?by=jobs", "by"),
        ("/usage/leaderboard?window=0", "window"),
        ("/usage/leaderboard?window=100000", "window"),
        ("/usage/leaderboard?limit=0", "limit"),
    ];
    for (path, field) in cases {
        let (status, headers, problem) = stack.query(path).await;
        assert_eq!(status, 400, "{path}: {problem}");
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "{path}"
        );
        assert_eq!(problem["field"], field, "{path}: {problem}");
    }
    // 2000 hourly buckets are fine.
    let (status, _, usage) = stack
        .query(
            "/usage/accounts/geo-team?granularity=hour&from=2026-01-01T00:00:00Z&to=2026-03-25T08:00:00Z",
        )
        .await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["buckets"].as_array().unwrap().len(), 2000);
}
