//! The GPU usage projection against the real command service, relay, Postgres and nats-server:
//! one row per run with its job's account and user, its GPUs and their model, its start and end.

use async_nats::jetstream::{self, consumer};
use overfly_projector::ProjectionError;
use overfly_projector::runner;
use serde_json::{Value, json};

use crate::helpers::{self, STREAM, TestApp, drain, spawn_app};

async fn usage_row(app: &TestApp, run: &str) -> Value {
    sqlx::query_scalar("SELECT to_jsonb(r) FROM read_usage_runs r WHERE run_id = $1::uuid")
        .bind(run)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn runs_give_exact_usage_rows_and_survive_redelivery() {
    let app = spawn_app().await;
    let mut projection = app.usage_projection().await;
    let gpu = |index: u32| {
        json!({"uuid": format!("host-a-gpu{index}"), "index": index, "name": "NVIDIA H100 80GB HBM3",
               "memory_mb": 81559, "compute_capability": "9.0"})
    };
    app.post(
        "/executors",
        &json!({"executor_id": "host-a", "hostname": "host-a.example", "lease_s": 30,
                "gpus": [gpu(0), gpu(1), gpu(2)]}),
    )
    .await;
    app.post("/executors/host-a/heartbeat", &json!({})).await;
    let executor = json!({"executor_id": "host-a"});

    // Succeeded on two registered GPUs.
    let mut body = helpers::job_body(0);
    body["gpus"] = json!(2);
    let done = app.submit(&body).await;
    let done_run = app
        .assign(&done, "host-a", &["host-a-gpu0", "host-a-gpu1"])
        .await;
    app.report(&done, &done_run, "started", executor.clone())
        .await;
    let mut end = executor.clone();
    end["utilisation"] =
        json!({"gpu_seconds_sampled": 12.5, "gpu_seconds_busy": 10.25, "peak_memory_mb": 70000});
    app.report(&done, &done_run, "succeeded", end).await;
    // Cancelled while running on an executor never registered (model unknown).
    let mut body = helpers::job_body(1);
    body["gpus"] = json!(1);
    let cancelled = app.submit(&body).await;
    let cancelled_run = app.assign(&cancelled, "gpu-host-9", &["GPU-z"]).await;
    app.report(
        &cancelled,
        &cancelled_run,
        "started",
        json!({"executor_id": "gpu-host-9"}),
    )
    .await;
    app.post(
        &format!("/jobs/{cancelled}/cancel"),
        &json!({"by": "ana", "reason": "wrong input"}),
    )
    .await;
    // Still running; and assigned but never started.
    let running = app.submit(&body).await;
    let running_run = app.assign(&running, "host-a", &["host-a-gpu2"]).await;
    app.report(&running, &running_run, "started", executor.clone())
        .await;
    let waiting = app.submit(&body).await;
    let waiting_run = app.assign(&waiting, "gpu-host-9", &["GPU-y"]).await;
    app.wait_relayed().await;
    drain(&mut projection).await.unwrap();

    let account = |n: usize| helpers::job_body(n)["account"].clone();
    let user = |n: usize| helpers::job_body(n)["submitted_by"].clone();
    assert_eq!(
        usage_row(&app, &done_run).await,
        json!({
            "run_id": done_run, "job_id": done, "account": account(0), "submitted_by": user(0),
            "executor_id": "host-a", "gpu_count": 2, "gpu_uuids": ["host-a-gpu0", "host-a-gpu1"],
            "gpu_model": "NVIDIA H100 80GB HBM3",
            "started_at": app.at(&done, "RunStarted", 0).await,
            "ended_at": app.at(&done, "RunSucceeded", 0).await,
            "gpu_seconds_sampled": 12.5, "gpu_seconds_busy": 10.25, "peak_memory_mb": 70000,
        })
    );
    assert_eq!(
        usage_row(&app, &cancelled_run).await,
        json!({
            "run_id": cancelled_run, "job_id": cancelled, "account": account(1),
            "submitted_by": user(1), "executor_id": "gpu-host-9", "gpu_count": 1,
            "gpu_uuids": ["GPU-z"], "gpu_model": null,
            "started_at": app.at(&cancelled, "RunStarted", 0).await,
            "ended_at": app.at(&cancelled, "JobCancelled", 0).await,
            "gpu_seconds_sampled": null, "gpu_seconds_busy": null, "peak_memory_mb": null,
        })
    );
    let row = usage_row(&app, &running_run).await;
    assert_eq!(row["started_at"], app.at(&running, "RunStarted", 0).await);
    assert_eq!(row["ended_at"], Value::Null);
    assert_eq!(row["gpu_model"], "NVIDIA H100 80GB HBM3");
    let row = usage_row(&app, &waiting_run).await;
    assert_eq!(row["started_at"], Value::Null);
    assert_eq!(row["ended_at"], Value::Null);

    let runs = app.rows("public", "read_usage_runs").await;
    assert_eq!(runs.len(), 4);
    let checkpoint: Value = sqlx::query_scalar(
        "SELECT to_jsonb(c) - 'updated_at' FROM projection_checkpoints c
          WHERE projection = 'usage'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(checkpoint["last_error"], Value::Null);
    assert_eq!(checkpoint["stream_sequence"], app.event_count().await);

    // Redeliver everything: a fresh consumer of the same name from sequence 1.
    let js = jetstream::new(async_nats::connect(app.nats.url()).await.unwrap());
    let stream = js.get_stream(STREAM).await.unwrap();
    stream
        .delete_consumer(runner::USAGE_CONSUMER)
        .await
        .unwrap();
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(runner::USAGE_CONSUMER.to_string()),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            filter_subject: runner::EXECUTORS_FILTER.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    let total = drain(&mut projection).await.unwrap();
    assert_eq!(i64::try_from(total).unwrap(), app.event_count().await);
    assert_eq!(app.rows("public", "read_usage_runs").await, runs);

    // Every job event applied once more straight (past the checkpoint): the version guard
    // keeps them all out.
    let events: Vec<crate::StoredEvent> = sqlx::query_as(
        "SELECT aggregate_id, sequence, global_position, event_type, event_version, payload,
                    recorded_at
               FROM events WHERE aggregate_type = 'job' ORDER BY global_position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut tx = app.pool.begin().await.unwrap();
    for (aggregate_id, sequence, position, event_type, event_version, payload, recorded_at) in
        events
    {
        let envelope = overfly_schemas::EventEnvelope {
            aggregate_type: "job".into(),
            aggregate_id,
            sequence,
            position,
            event_type,
            event_version,
            recorded_at,
            metadata: serde_json::Map::new(),
            payload,
        };
        let applied = overfly_projector::usage::apply_envelope(&mut tx, &envelope)
            .await
            .unwrap();
        assert_eq!(applied, overfly_projector::jobs::Applied::AlreadyApplied);
    }
    tx.commit().await.unwrap();
    assert_eq!(app.rows("public", "read_usage_runs").await, runs);

    // The other projections' checkpoints are untouched by all this.
    assert_eq!(app.checkpoint("public").await, Value::Null);
}

/// A job event type the projector does not know stops the usage projection with the reason in
/// its checkpoint row; it is never skipped.
#[tokio::test]
async fn an_unknown_event_type_stops_the_usage_projection() {
    let app = spawn_app().await;
    let job = app.submit(&helpers::job_body(1)).await;
    app.wait_relayed().await;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         VALUES ('job', $1, 2, 'JobTeleported', '1', '{\"JobTeleported\": {\"to\": \"mars\"}}',
                 '{}')",
    )
    .bind(&job)
    .execute(&app.pool)
    .await
    .unwrap();
    app.wait_relayed().await;
    app.short_life(2, 3).await;
    app.wait_relayed().await;

    let mut projection = app.usage_projection().await;
    for _ in 0..2 {
        let error = projection.step().await.unwrap_err();
        assert!(
            matches!(error, ProjectionError::UnknownEventType { .. }),
            "{error}"
        );
        let last_error: String = sqlx::query_scalar(
            "SELECT last_error FROM projection_checkpoints WHERE projection = 'usage'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert!(
            last_error.contains("unknown event type JobTeleported (version 1)"),
            "{last_error}"
        );
    }
    // What came before it is kept; nothing after it was applied.
    let jobs: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT job_id FROM read_usage_jobs")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(jobs, vec![job.parse::<uuid::Uuid>().unwrap()]);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM read_usage_runs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(runs, 0);
}
