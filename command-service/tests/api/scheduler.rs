//! The scheduler, end to end over the real event store: queued jobs are assigned to free GPUs
//! of active executors by the policy, with the decision recorded; a GPU is never held by two
//! runs; a lost executor's runs fail as retryable and run elsewhere after their backoff.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Options, TestApp, spawn_app_with};

async fn ok(app: &TestApp, path: &str, body: Value) -> Value {
    let response = app.post(path, &body).await;
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{path}: {status} {answer}");
    answer
}

async fn register(app: &TestApp, executor: &str, gpus: u32, memory_mb: u64, lease_s: u32) {
    let gpus: Vec<Value> = (0..gpus)
        .map(|i| {
            json!({"uuid": format!("{executor}-gpu{i}"), "index": i,
                   "name": "NVIDIA H100 80GB HBM3", "memory_mb": memory_mb,
                   "compute_capability": "9.0"})
        })
        .collect();
    ok(
        app,
        "/executors",
        json!({"executor_id": executor, "hostname": format!("{executor}.example"),
               "lease_s": lease_s, "gpus": gpus}),
    )
    .await;
    ok(app, &format!("/executors/{executor}/heartbeat"), json!({})).await;
}

fn job(name: &str, account: &str, priority: u8, gpus: u8, memory_mb: u64) -> Value {
    json!({"name": name, "account": account, "submitted_by": "ana", "priority": priority,
           "gpus": gpus, "gpu_memory_mb": memory_mb, "command": ["true"],
           "max_retries": 2, "timeout_s": 600})
}

/// Every job event in commit order: (job id, event type, payload body).
async fn job_events(app: &TestApp) -> Vec<(String, String, Value)> {
    let rows: Vec<(String, String, Value)> = sqlx::query_as(
        "SELECT aggregate_id, event_type, payload FROM events
          WHERE aggregate_type = 'job' ORDER BY events.tx_id, events.global_position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, kind, payload)| {
            let body = payload[&kind].clone();
            (id, kind, body)
        })
        .collect()
}

/// Replays the history: no GPU is ever held by two runs at once.
fn assert_no_gpu_double_held(events: &[(String, String, Value)]) {
    let mut held: HashMap<String, String> = HashMap::new();
    let mut runs: HashMap<String, Vec<String>> = HashMap::new();
    for (_, kind, body) in events {
        let release = |run: &str, held: &mut HashMap<String, String>, runs: &HashMap<_, _>| {
            for gpu in runs.get(run).map(Vec::as_slice).unwrap_or_default() {
                if held.get(gpu).map(String::as_str) == Some(run) {
                    held.remove(gpu);
                }
            }
        };
        match kind.as_str() {
            "RunAssigned" => {
                let run = body["run_id"].as_str().unwrap().to_string();
                let gpus: Vec<String> = serde_json::from_value(body["gpu_uuids"].clone()).unwrap();
                for gpu in &gpus {
                    if let Some(other) = held.insert(gpu.clone(), run.clone()) {
                        panic!("{gpu} given to {run} while {other} held it");
                    }
                }
                runs.insert(run, gpus);
            }
            "RunSucceeded" | "RunFailed" | "RunTimedOut" => {
                release(body["run_id"].as_str().unwrap(), &mut held, &runs);
            }
            "JobCancelled" => {
                if let Some(run) = body["active_run"].as_str() {
                    release(run, &mut held, &runs);
                }
            }
            _ => {}
        }
    }
}

/// Plays the executors: starts and succeeds every assigned run until `jobs` jobs succeeded.
async fn run_everything(app: &TestApp, jobs: usize) -> Vec<(String, String, Value)> {
    let mut reported = HashSet::new();
    for _ in 0..1500 {
        let events = job_events(app).await;
        let succeeded = events.iter().filter(|e| e.1 == "JobSucceeded").count();
        if succeeded == jobs {
            return events;
        }
        for (job, kind, body) in &events {
            if kind != "RunAssigned" {
                continue;
            }
            let run = body["run_id"].as_str().unwrap().to_string();
            if !reported.insert(run.clone()) {
                continue;
            }
            let executor = body["executor_id"].as_str().unwrap();
            let path = |what: &str| format!("/jobs/{job}/runs/{run}/{what}");
            ok(app, &path("started"), json!({"executor_id": executor})).await;
            ok(app, &path("succeeded"), json!({"executor_id": executor})).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not every job succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_scheduler_assigns_queued_jobs_to_free_gpus_by_priority() {
    let app = spawn_app_with(Options {
        scheduler: true,
        ..Options::default()
    })
    .await;
    // Queue first: nothing can run while no executor is active.
    let low = app.submit(&job("low", "geo-team", 10, 1, 0)).await;
    let high = app.submit(&job("high", "vision-team", 90, 1, 0)).await;
    let big = app.submit(&job("big", "geo-team", 50, 2, 80_000)).await;
    let mut others = Vec::new();
    for n in 0..5 {
        let account = ["nlp-team", "geo-team"][n % 2];
        others.push(
            app.submit(&job(&format!("other-{n}"), account, 30, 1, 0))
                .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !job_events(&app).await.iter().any(|e| e.1 == "RunAssigned"),
        "assigned with no executor"
    );

    // One executor with a single 40 GB GPU: the highest priority job that fits goes first.
    register(&app, "small", 1, 40_000, 30).await;
    let mut first = None;
    for _ in 0..250 {
        if let Some(e) = job_events(&app)
            .await
            .into_iter()
            .find(|e| e.1 == "RunAssigned")
        {
            first = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (job_id, _, decision) = first.expect("nothing was assigned");
    assert_eq!(job_id, high);
    assert_eq!(decision["executor_id"], "small");
    assert_eq!(decision["gpu_uuids"], json!(["small-gpu0"]));
    let why = &decision["decision"];
    assert_eq!(why["priority"], 90);
    assert!(why["score"].as_f64().unwrap() >= 90.0, "{why}");
    assert!(why["fair_share_factor"].as_f64().unwrap() > 0.0, "{why}");
    assert!(
        why["placement"].as_str().unwrap().starts_with("small:"),
        "{why}"
    );

    // A big executor arrives; the 2 × 80 GB job can only go there. Everything runs to the end.
    register(&app, "big-host", 4, 81_559, 30).await;
    let events = run_everything(&app, 2 + 1 + others.len()).await;
    assert_no_gpu_double_held(&events);
    let assigned: Vec<&(String, String, Value)> =
        events.iter().filter(|e| e.1 == "RunAssigned").collect();
    let big_run = assigned.iter().find(|e| e.0 == big).unwrap();
    assert_eq!(big_run.2["executor_id"], "big-host");
    assert_eq!(big_run.2["gpu_uuids"].as_array().unwrap().len(), 2);
    // Every job ran exactly once, and the low-priority job went after the others that
    // were queued with it whenever GPUs were scarce: here, it is never first.
    assert_eq!(assigned.len(), 8);
    assert_ne!(assigned[0].0, low);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_executors_runs_are_retried_on_another_executor() {
    let app = spawn_app_with(Options {
        scheduler: true,
        retry_base_s: 1,
        ..Options::default()
    })
    .await;
    // A one-second lease, never renewed.
    register(&app, "flaky", 1, 81_559, 1).await;
    let job_id = app.submit(&job("tiles", "geo-team", 50, 1, 0)).await;
    let mut events = Vec::new();
    for _ in 0..250 {
        events = job_events(&app).await;
        if events.iter().any(|e| e.1 == "RunAssigned") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = events
        .iter()
        .find(|e| e.1 == "RunAssigned")
        .unwrap()
        .clone();
    assert_eq!(first.2["executor_id"], "flaky");
    let run = first.2["run_id"].as_str().unwrap().to_string();
    ok(
        &app,
        &format!("/jobs/{job_id}/runs/{run}/started"),
        json!({"executor_id": "flaky"}),
    )
    .await;
    register(&app, "steady", 1, 81_559, 60).await;

    // The lease runs out: the executor is lost, its run fails as retryable, and after the
    // one-second backoff the job is assigned to the other executor.
    let mut second = None;
    for _ in 0..500 {
        events = job_events(&app).await;
        if let Some(e) = events
            .iter()
            .filter(|e| e.1 == "RunAssigned")
            .nth(1)
            .cloned()
        {
            second = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = second.expect("the job was never re-assigned");
    assert_eq!(second.2["executor_id"], "steady");
    let failed = events.iter().find(|e| e.1 == "RunFailed").unwrap();
    assert_eq!(failed.2["run_id"], run.as_str());
    assert_eq!(failed.2["retryable"], true);
    assert!(
        failed.2["reason"].as_str().unwrap().contains("flaky lost"),
        "{failed:?}"
    );
    assert!(events.iter().any(|e| e.1 == "RetryScheduled"));
    let lost: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = 'flaky' AND event_type = 'ExecutorLost'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(lost, 1);
    assert_no_gpu_double_held(&events);
}
