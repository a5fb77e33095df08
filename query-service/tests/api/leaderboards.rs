//! Leaderboards: accounts by jobs succeeded, success rate, efficiency (utilisation reported
//! with each run's end) and idle GPU-hours (`GET /usage/leaderboard?by=`), and runs by a
//! metric they reported (`GET /leaderboards/{metric}`), all through the real command API,
//! relay, NATS and projections.

use serde_json::{Value, json};

use crate::helpers::{Stack, job_body, spawn_stack};

async fn command(stack: &Stack, path: &str, body: Value) -> i64 {
    let (status, answer) = stack.command(path, &body).await;
    assert!((200..300).contains(&status), "{path}: {status} {answer}");
    answer["position"].as_i64().unwrap()
}

const EXECUTOR: &str = "host-a";

async fn register(stack: &Stack) {
    let gpus: Vec<Value> = (0..8)
        .map(|index| {
            json!({"uuid": format!("{EXECUTOR}-gpu{index}"), "index": index,
                   "name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559,
                   "compute_capability": "9.0"})
        })
        .collect();
    command(
        stack,
        "/executors",
        json!({"executor_id": EXECUTOR, "hostname": "host-a.example", "lease_s": 30,
               "gpus": gpus}),
    )
    .await;
    command(
        stack,
        &format!("/executors/{EXECUTOR}/heartbeat"),
        json!({}),
    )
    .await;
}

/// A job of `account` (the rest from `job_body(n)`), assigned GPU `n` and started.
struct Run {
    job: String,
    run: String,
}

async fn start(stack: &Stack, n: usize, account: &str) -> Run {
    let mut body = job_body(n);
    body["account"] = json!(account);
    body["max_retries"] = json!(0);
    let (job, _) = stack.submit(&body).await;
    let run = uuid::Uuid::new_v4().to_string();
    command(
        stack,
        &format!("/jobs/{job}/runs"),
        json!({"run_id": run, "executor_id": EXECUTOR,
               "gpu_uuids": [format!("{EXECUTOR}-gpu{n}")]}),
    )
    .await;
    let run = Run { job, run };
    report(stack, &run, "started", json!({})).await;
    run
}

async fn report(stack: &Stack, run: &Run, what: &str, mut body: Value) -> i64 {
    body["executor_id"] = json!(EXECUTOR);
    command(
        stack,
        &format!("/jobs/{}/runs/{}/{what}", run.job, run.run),
        body,
    )
    .await
}

fn utilisation(sampled: f64, busy: f64) -> Value {
    json!({"utilisation": {"gpu_seconds_sampled": sampled, "gpu_seconds_busy": busy,
                           "peak_memory_mb": 30_000}})
}

fn accounts(board: &Value) -> Vec<String> {
    board["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["account"].as_str().unwrap().to_string())
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accounts_rank_by_outcomes_efficiency_and_idle_gpu_time() {
    let stack = spawn_stack().await;
    register(&stack).await;
    // geo-team: one success at 90% busy, one failure (no retries left) at 50% busy.
    let geo_ok = start(&stack, 0, "geo-team").await;
    let geo_bad = start(&stack, 1, "geo-team").await;
    // vision-team: two successes, one at 20% busy, one without telemetry.
    let vision_a = start(&stack, 2, "vision-team").await;
    let vision_b = start(&stack, 3, "vision-team").await;
    report(&stack, &geo_ok, "succeeded", utilisation(10.0, 9.0)).await;
    let mut failure = utilisation(10.0, 5.0);
    failure["exit_code"] = json!(1);
    failure["reason"] = json!("exit status 1");
    failure["retryable"] = json!(false);
    report(&stack, &geo_bad, "failed", failure).await;
    report(&stack, &vision_a, "succeeded", utilisation(20.0, 4.0)).await;
    report(&stack, &vision_b, "succeeded", json!({})).await;
    // nlp-team: a job cancelled while queued (neither success nor failure).
    let (nlp, _) = stack.submit(&job_body(4)).await;
    let position = command(
        &stack,
        &format!("/jobs/{nlp}/cancel"),
        json!({"by": "ana", "reason": "wrong bucket"}),
    )
    .await;
    stack.wait_for_usage(position).await;

    // The run rows carry what the end reported.
    let (sampled, busy, peak): (Option<f64>, Option<f64>, Option<i64>) = sqlx::query_as(
        "SELECT gpu_seconds_sampled, gpu_seconds_busy, peak_memory_mb
           FROM read_usage_runs WHERE run_id = $1::uuid",
    )
    .bind(&geo_ok.run)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!((sampled, busy, peak), (Some(10.0), Some(9.0), Some(30_000)));

    let board = |query: &'static str| {
        let stack = &stack;
        async move {
            let (status, _, board) = stack.query(&format!("/usage/leaderboard?{query}")).await;
            assert_eq!(status, 200, "{query}: {board}");
            board
        }
    };

    let by_succeeded = board("by=jobs_succeeded").await;
    assert_eq!(by_succeeded["by"], "jobs_succeeded");
    assert_eq!(accounts(&by_succeeded), ["vision-team", "geo-team"]);
    assert_eq!(by_succeeded["items"][0]["value"], 2.0);
    assert_eq!(by_succeeded["items"][1]["jobs_failed"], 1);

    let by_rate = board("by=success_rate").await;
    assert_eq!(accounts(&by_rate), ["vision-team", "geo-team"]);
    assert_eq!(by_rate["items"][0]["success_rate"], 1.0);
    assert_eq!(by_rate["items"][1]["success_rate"], 0.5);
    // nlp-team's only job was cancelled: it has no success rate, only a cancellation.
    assert!(!accounts(&by_rate).contains(&"nlp-team".to_string()));
    assert_eq!(
        accounts(&board("by=success_rate&min_jobs=3").await).len(),
        0
    );
    assert_eq!(
        accounts(&board("by=success_rate&order=asc").await),
        ["geo-team", "vision-team"]
    );

    // Efficiency: busy / sampled over the runs that reported telemetry.
    let by_efficiency = board("by=efficiency").await;
    assert_eq!(accounts(&by_efficiency), ["geo-team", "vision-team"]);
    let geo = &by_efficiency["items"][0];
    assert!(
        close(geo["efficiency"].as_f64().unwrap(), 14.0 / 20.0),
        "{geo}"
    );
    assert!(close(geo["value"].as_f64().unwrap(), 14.0 / 20.0), "{geo}");
    assert!(
        close(geo["sampled_gpu_hours"].as_f64().unwrap(), 20.0 / 3600.0),
        "{geo}"
    );
    assert!(
        close(geo["busy_gpu_hours"].as_f64().unwrap(), 14.0 / 3600.0),
        "{geo}"
    );
    let vision = &by_efficiency["items"][1];
    assert!(
        close(vision["efficiency"].as_f64().unwrap(), 0.2),
        "{vision}"
    );
    // The "idle GPU" ranking, least efficient first.
    let idle_first = board("by=efficiency&order=asc").await;
    assert_eq!(idle_first["order"], "asc");
    assert_eq!(accounts(&idle_first), ["vision-team", "geo-team"]);
    let idle = board("by=idle_gpu_hours").await;
    assert_eq!(accounts(&idle), ["vision-team", "geo-team"]);
    assert!(
        close(idle["items"][0]["value"].as_f64().unwrap(), 16.0 / 3600.0),
        "{idle}"
    );

    // The account's usage carries its utilisation too.
    let (status, _, usage) = stack.query("/usage/accounts/vision-team").await;
    assert_eq!(status, 200, "{usage}");
    assert!(
        close(usage["sampled_gpu_seconds"].as_f64().unwrap(), 20.0),
        "{usage}"
    );
    assert!(
        close(usage["busy_gpu_seconds"].as_f64().unwrap(), 4.0),
        "{usage}"
    );
    assert!(close(usage["efficiency"].as_f64().unwrap(), 0.2), "{usage}");
    let (_, _, usage) = stack.query("/usage/accounts/nlp-team").await;
    assert_eq!(usage["efficiency"], Value::Null, "{usage}");

    // Bad utilisation is refused, naming the field, and the run stays open.
    let open = start(&stack, 5, "geo-team").await;
    let (status, problem) = stack
        .command(
            &format!("/jobs/{}/runs/{}/succeeded", open.job, open.run),
            &json!({"executor_id": EXECUTOR,
                    "utilisation": {"gpu_seconds_sampled": 1.0, "gpu_seconds_busy": 2.0}}),
        )
        .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(
        problem["field"], "utilisation.gpu_seconds_busy",
        "{problem}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_rank_by_a_metric_they_reported() {
    let stack = spawn_stack().await;
    register(&stack).await;
    // job_body: even n → label benchmark=tiles-v1, odd n → tiles-v2.
    let accuracies = [0.91, 0.99, 0.95, 0.42, 0.88];
    let mut runs = Vec::new();
    for (n, accuracy) in accuracies.into_iter().enumerate() {
        let account = if n == 4 { "vision-team" } else { "geo-team" };
        let run = start(&stack, n, account).await;
        report(
            &stack,
            &run,
            "progress",
            json!({"report_seq": 1, "progress": 0.5,
                   "metrics": {"accuracy": accuracy, "loss": 1.0 - accuracy}}),
        )
        .await;
        runs.push(run);
    }
    // A later report without accuracy keeps the accuracy reported before.
    report(
        &stack,
        &runs[2],
        "progress",
        json!({"report_seq": 2, "progress": 1.0, "metrics": {"tiles_per_s": 40.0}}),
    )
    .await;
    let position = report(&stack, &runs[0], "succeeded", json!({})).await;
    let (status, _, _) = stack
        .query(&format!("/jobs/{}?min_position={position}", runs[0].job))
        .await;
    assert_eq!(status, 200);

    let ranked = |query: String| {
        let stack = &stack;
        async move {
            let (status, _, board) = stack.query(&query).await;
            assert_eq!(status, 200, "{query}: {board}");
            let runs: Vec<(String, f64)> = board["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|item| {
                    (
                        item["run_id"].as_str().unwrap().to_string(),
                        item["value"].as_f64().unwrap(),
                    )
                })
                .collect();
            (board, runs)
        }
    };
    let id = |n: usize| runs[n].run.clone();

    let (board, best) = ranked("/leaderboards/accuracy?label=benchmark=tiles-v1".into()).await;
    assert_eq!(board["metric"], "accuracy");
    assert_eq!(board["order"], "desc");
    assert_eq!(best, [(id(2), 0.95), (id(0), 0.91), (id(4), 0.88)]);
    let first = &board["items"][0];
    assert_eq!(first["rank"], 1);
    assert_eq!(first["job_id"], runs[2].job.as_str());
    assert_eq!(first["account"], "geo-team");
    assert_eq!(first["labels"]["benchmark"], "tiles-v1");
    assert_eq!(first["progress"], 1.0);

    let (_, all) = ranked("/leaderboards/accuracy".into()).await;
    assert_eq!(all.len(), 5);
    assert_eq!(all[0], (id(1), 0.99));
    let (_, lowest_loss) = ranked("/leaderboards/loss?order=asc&limit=2".into()).await;
    assert_eq!(
        lowest_loss.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        [id(1), id(2)]
    );
    let (_, vision) = ranked("/leaderboards/accuracy?account=vision-team".into()).await;
    assert_eq!(vision, [(id(4), 0.88)]);
    let (_, done) = ranked("/leaderboards/accuracy?state=succeeded".into()).await;
    assert_eq!(done, [(id(0), 0.91)]);
    let (_, both) =
        ranked("/leaderboards/accuracy?label=benchmark=tiles-v1&label=other=x".into()).await;
    assert!(both.is_empty());
    let (_, none) = ranked("/leaderboards/f1".into()).await;
    assert!(none.is_empty());
}

#[tokio::test]
async fn bad_leaderboard_parameters_are_400_naming_them() {
    let stack = spawn_stack().await;
    let cases = [
        ("/usage/leaderboard?by=fame", "by"),
        ("/usage/leaderboard?order=up", "order"),
        ("/usage/leaderboard?by=success_rate&min_jobs=0", "min_jobs"),
        ("/leaderboards/acc%20uracy", "metric"),
        ("/leaderboards/accuracy?label=benchmark", "label"),
        ("/leaderboards/accuracy?order=best", "order"),
        ("/leaderboards/accuracy?state=done", "state"),
        ("/leaderboards/accuracy?limit=501", "limit"),
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
}
