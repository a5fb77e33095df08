//! The executors & GPUs projection against the real command service, relay, Postgres and
//! nats-server: executor and job events interleaved in commit order.

use async_nats::jetstream::{self, consumer};
use overfly_projector::ProjectionError;
use overfly_projector::runner;
use serde_json::{Value, json};

use crate::helpers::{self, STREAM, TestApp, drain, spawn_app};

/// Registers `executor` with two H100s, `<executor>-gpu0` and `<executor>-gpu1`.
async fn register(app: &TestApp, executor: &str) {
    app.post(
        "/executors",
        &json!({
            "executor_id": executor, "hostname": format!("{executor}.example"), "lease_s": 30,
            "gpus": [
                {"uuid": format!("{executor}-gpu0"), "index": 0, "name": "NVIDIA H100 80GB HBM3",
                 "memory_mb": 81559, "compute_capability": "9.0"},
                {"uuid": format!("{executor}-gpu1"), "index": 1, "name": "NVIDIA H100 80GB HBM3",
                 "memory_mb": 81559, "compute_capability": "9.0"}
            ]
        }),
    )
    .await;
}

/// The `ExecutorHeartbeat`'s `lease_expires_at` of `executor`, in `to_jsonb` form.
async fn lease(app: &TestApp, executor: &str) -> Value {
    app.field(executor, "ExecutorHeartbeat", 0, "lease_expires_at")
        .await
}

fn gpu(executor: &str, index: u32, held: Option<(&str, &str, &Value)>, updated: &Value) -> Value {
    let (run, job, since) = match held {
        Some((run, job, since)) => (json!(run), json!(job), since.clone()),
        None => (Value::Null, Value::Null, Value::Null),
    };
    json!({
        "gpu_uuid": format!("{executor}-gpu{index}"),
        "executor_id": executor,
        "index": index,
        "name": "NVIDIA H100 80GB HBM3",
        "memory_mb": 81559,
        "compute_capability": "9.0",
        "held_by_run": run,
        "held_by_job": job,
        "held_since": since,
        "updated_at": updated,
    })
}

/// Two executors with two GPUs each, heartbeats, a run on one GPU (held, then released when it
/// succeeds), one executor drained: the rows exactly; then everything redelivered changes
/// nothing.
#[tokio::test]
async fn executors_and_gpu_holding_give_exact_rows_and_survive_redelivery() {
    let app = spawn_app().await;
    let mut projection = app.executors_projection().await;
    register(&app, "host-a").await;
    register(&app, "host-b").await;
    app.post("/executors/host-a/heartbeat", &json!({})).await;
    app.post("/executors/host-b/heartbeat", &json!({})).await;
    // One GPU.
    let job = app.submit(&helpers::job_body(0)).await;
    let run = app.assign(&job, "host-a", &["host-a-gpu1"]).await;
    let executor = json!({"executor_id": "host-a"});
    app.report(&job, &run, "started", executor.clone()).await;
    app.wait_relayed().await;
    drain(&mut projection).await.unwrap();

    // Held by the run since it was assigned; the others free.
    let assigned = app.at(&job, "RunAssigned", 0).await;
    let registered_a = app.at("host-a", "ExecutorRegistered", 0).await;
    let registered_b = app.at("host-b", "ExecutorRegistered", 0).await;
    let held = app.rows("public", "read_gpus").await;
    assert_eq!(
        held,
        vec![
            gpu("host-a", 0, None, &registered_a),
            gpu("host-a", 1, Some((&run, &job, &assigned)), &assigned),
            gpu("host-b", 0, None, &registered_b),
            gpu("host-b", 1, None, &registered_b),
        ]
    );

    app.report(&job, &run, "succeeded", executor).await;
    app.post(
        "/executors/host-b/drain",
        &json!({"by": "ops", "reason": "kernel update"}),
    )
    .await;
    app.wait_relayed().await;
    drain(&mut projection).await.unwrap();

    let succeeded = app.at(&job, "RunSucceeded", 0).await;
    let gpus = app.rows("public", "read_gpus").await;
    assert_eq!(
        gpus,
        vec![
            gpu("host-a", 0, None, &registered_a),
            gpu("host-a", 1, None, &succeeded),
            gpu("host-b", 0, None, &registered_b),
            gpu("host-b", 1, None, &registered_b),
        ]
    );
    let executors = app.rows("public", "read_executors").await;
    let position = |executor: &'static str| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT max(global_position) FROM events WHERE aggregate_id = $1",
            )
            .bind(executor)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let heartbeat_a = app.at("host-a", "ExecutorHeartbeat", 0).await;
    let heartbeat_b = app.at("host-b", "ExecutorHeartbeat", 0).await;
    assert_eq!(
        executors,
        vec![
            json!({
                "executor_id": "host-a", "hostname": "host-a.example", "state": "active",
                "session": 1, "lease_s": 30,
                "last_heartbeat_at": heartbeat_a, "lease_expires_at": lease(&app, "host-a").await,
                "registered_at": registered_a, "updated_at": heartbeat_a,
                "version": 3, "position": position("host-a").await,
            }),
            json!({
                "executor_id": "host-b", "hostname": "host-b.example", "state": "draining",
                "session": 1, "lease_s": 30,
                "last_heartbeat_at": heartbeat_b, "lease_expires_at": lease(&app, "host-b").await,
                "registered_at": registered_b,
                "updated_at": app.at("host-b", "ExecutorDraining", 0).await,
                "version": 4, "position": position("host-b").await,
            }),
        ]
    );
    let checkpoint: Value = sqlx::query_scalar(
        "SELECT to_jsonb(c) - 'updated_at' FROM projection_checkpoints c
          WHERE projection = 'executors'",
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
        .delete_consumer(runner::EXECUTORS_CONSUMER)
        .await
        .unwrap();
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(runner::EXECUTORS_CONSUMER.to_string()),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            filter_subject: runner::EXECUTORS_FILTER.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    let total = drain(&mut projection).await.unwrap();
    assert_eq!(i64::try_from(total).unwrap(), app.event_count().await);
    assert_eq!(app.rows("public", "read_executors").await, executors);
    assert_eq!(app.rows("public", "read_gpus").await, gpus);

    // The jobs projection, with its own consumer and checkpoint, is untouched by all this.
    assert_eq!(app.checkpoint("public").await, Value::Null);
}

/// An executor event type the projector does not know stops the executors projection with the
/// reason in its checkpoint row; it is never skipped, and what followed is not applied.
#[tokio::test]
async fn an_unknown_executor_event_type_stops_the_projection() {
    let app = spawn_app().await;
    register(&app, "host-a").await;
    app.wait_relayed().await;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         VALUES ('executor', 'host-a', 2, 'ExecutorTeleported', '1',
                 '{\"ExecutorTeleported\": {\"to\": \"mars\"}}', '{}')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    app.wait_relayed().await;
    register(&app, "host-b").await;
    app.wait_relayed().await;

    let mut projection = app.executors_projection().await;
    for _ in 0..2 {
        let error = projection.step().await.unwrap_err();
        assert!(
            matches!(error, ProjectionError::UnknownEventType { .. }),
            "{error}"
        );
        let last_error: String = sqlx::query_scalar(
            "SELECT last_error FROM projection_checkpoints WHERE projection = 'executors'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert!(
            last_error.contains("unknown event type ExecutorTeleported (version 1)"),
            "{last_error}"
        );
    }
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT executor_id FROM read_executors ORDER BY executor_id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(ids, vec!["host-a".to_string()]);
}

/// A restarted executor re-registers with another inventory: the GPUs it lost go, the new one
/// comes, the one it kept keeps its holder until the run fails; deregistering leaves it gone.
#[tokio::test]
async fn re_registration_replaces_the_inventory_and_keeps_holders() {
    let app = spawn_app().await;
    register(&app, "host-a").await;
    let job = app.submit(&helpers::job_body(0)).await;
    let run = app.assign(&job, "host-a", &["host-a-gpu1"]).await;
    app.post(
        "/executors",
        &json!({
            "executor_id": "host-a", "hostname": "host-a.example", "lease_s": 60,
            "gpus": [
                {"uuid": "host-a-gpu1", "index": 1, "name": "NVIDIA H100 80GB HBM3",
                 "memory_mb": 81559, "compute_capability": "9.0"},
                {"uuid": "host-a-gpu2", "index": 2, "name": "NVIDIA H100 80GB HBM3",
                 "memory_mb": 81559, "compute_capability": "9.0"}
            ]
        }),
    )
    .await;
    app.wait_relayed().await;
    let mut projection = app.executors_projection().await;
    drain(&mut projection).await.unwrap();

    let assigned = app.at(&job, "RunAssigned", 0).await;
    let reregistered = app.at("host-a", "ExecutorRegistered", 1).await;
    assert_eq!(
        app.rows("public", "read_gpus").await,
        vec![
            gpu("host-a", 1, Some((&run, &job, &assigned)), &reregistered),
            gpu("host-a", 2, None, &reregistered),
        ]
    );
    let row = &app.rows("public", "read_executors").await[0];
    assert_eq!(row["session"], 2);
    assert_eq!(row["lease_s"], 60);
    assert_eq!(row["state"], "registered");
    assert_eq!(row["registered_at"], reregistered);

    app.report(
        &job,
        &run,
        "failed",
        json!({"executor_id": "host-a", "exit_code": 137, "reason": "killed by restart",
               "retryable": false}),
    )
    .await;
    app.post(
        "/executors/host-a/deregister",
        &json!({"reason": "decommissioned"}),
    )
    .await;
    app.wait_relayed().await;
    drain(&mut projection).await.unwrap();
    let failed = app.at(&job, "RunFailed", 0).await;
    assert_eq!(
        app.rows("public", "read_gpus").await,
        vec![
            gpu("host-a", 1, None, &failed),
            gpu("host-a", 2, None, &reregistered),
        ]
    );
    let row = &app.rows("public", "read_executors").await[0];
    assert_eq!(row["state"], "gone");
    assert_eq!(row["version"], 3);
}
