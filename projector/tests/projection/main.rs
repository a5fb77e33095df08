//! The jobs projection against the real command service, relay, Postgres and nats-server.

mod audit;
mod audit_all;
mod executors;
mod export;
mod helpers;
mod usage;

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use helpers::{STREAM, differences, drain, spawn_app};
use overfly_projector::runner::{self, RunnerConfig};
use overfly_projector::{Outcome, ProjectionError, rebuild_into};
use serde_json::{Value, json};

/// An `events` row: aggregate id, sequence, position, type, version, payload, recorded at.
type StoredEvent = (
    String,
    i64,
    i64,
    String,
    String,
    Value,
    chrono::DateTime<chrono::Utc>,
);

/// Submit, change priority, assign, start, progress, fail retryably (→ retry scheduled),
/// assign again, start, succeed; and a second job cancelled while running.
#[tokio::test]
async fn a_scripted_lifecycle_gives_exact_rows() {
    let app = spawn_app().await;
    let mut projection = app.projection().await;
    let executor = json!({"executor_id": "gpu-host-1"});

    let job = app.submit(&helpers::job_body(1)).await;
    app.post(
        &format!("/jobs/{job}/priority"),
        &json!({"priority": 80, "by": "ana", "reason": "deadline"}),
    )
    .await;
    let run1 = app.assign(&job, "gpu-host-1", &["GPU-a", "GPU-b"]).await;
    app.report(&job, &run1, "started", executor.clone()).await;
    app.report(
        &job,
        &run1,
        "progress",
        json!({"executor_id": "gpu-host-1", "report_seq": 1, "progress": 0.5,
               "metrics": {"loss": 0.25}}),
    )
    .await;
    app.report(
        &job,
        &run1,
        "failed",
        json!({"executor_id": "gpu-host-1", "exit_code": 1, "reason": "CUDA OOM",
               "retryable": true}),
    )
    .await;

    // The second job, cancelled while its run is running.
    let other = app.submit(&helpers::job_body(2)).await;
    let other_run = app
        .assign(&other, "gpu-host-2", &["GPU-x", "GPU-y", "GPU-z"])
        .await;
    let executor2 = json!({"executor_id": "gpu-host-2"});
    app.report(&other, &other_run, "started", executor2).await;
    app.post(
        &format!("/jobs/{other}/cancel"),
        &json!({"by": "ana", "reason": "wrong input"}),
    )
    .await;

    app.wait_relayed().await;
    drain(&mut projection).await.unwrap();

    // Between attempts: queued again, in backoff.
    let row = app.job_row(&job).await;
    assert_eq!(row["state"], "queued");
    assert_eq!(row["attempts"], 1);
    assert_eq!(row["current_run_id"], run1.as_str());
    assert_eq!(
        row["eligible_at"],
        app.field(&job, "RetryScheduled", 0, "eligible_at").await
    );
    assert_eq!(row["updated_at"], app.at(&job, "RetryScheduled", 0).await);
    assert_eq!(row["finished_at"], Value::Null);

    // The default backoff after a first attempt is 10 s.
    let eligible: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(row["eligible_at"].clone()).unwrap();
    let wait = (eligible - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    let run2 = app.assign(&job, "gpu-host-3", &["GPU-c", "GPU-d"]).await;
    let executor3 = json!({"executor_id": "gpu-host-3"});
    app.report(&job, &run2, "started", executor3.clone()).await;
    app.report(&job, &run2, "succeeded", executor3).await;
    app.wait_relayed().await;
    drain(&mut projection).await.unwrap();

    let (version, position): (i64, i64) = sqlx::query_as(
        "SELECT max(sequence), max(global_position) FROM events WHERE aggregate_id = $1",
    )
    .bind(&job)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let mut spec = helpers::job_body(1);
    spec["priority"] = json!(80);
    let expected = json!({
        "job_id": job,
        "name": "tiles-eu-west-1",
        "account": "vision-team",
        "submitted_by": "ana",
        "priority": 80,
        "gpus": 2,
        "gpu_memory_mb": 40000,
        "state": "succeeded",
        "spec": spec,
        "labels": {"benchmark": "tiles-v1"},
        "max_retries": 2,
        "attempts": 2,
        "current_run_id": run2,
        "eligible_at": null,
        "failure_reason": null,
        "submitted_at": app.at(&job, "JobSubmitted", 0).await,
        "assigned_at": app.at(&job, "RunAssigned", 1).await,
        "started_at": app.at(&job, "RunStarted", 1).await,
        "finished_at": app.at(&job, "JobSucceeded", 0).await,
        "cancelled_at": null,
        "updated_at": app.at(&job, "JobSucceeded", 0).await,
        "version": version,
        "position": position,
    });
    assert_eq!(app.job_row(&job).await, expected);

    let decision = json!({"score": 0.0, "priority": 0, "fair_share_factor": 0.0,
        "age_factor": 0.0, "overtook": [], "placement": ""});
    let expected_run1 = json!({
        "run_id": run1,
        "job_id": job,
        "attempt": 1,
        "executor_id": "gpu-host-1",
        "gpu_uuids": ["GPU-a", "GPU-b"],
        "state": "failed",
        "decision": decision,
        "assigned_at": app.at(&job, "RunAssigned", 0).await,
        "started_at": app.at(&job, "RunStarted", 0).await,
        "ended_at": app.at(&job, "RunFailed", 0).await,
        "exit_code": 1,
        "signal": null,
        "failure_reason": "CUDA OOM",
        "retryable": true,
        "last_progress": 0.5,
        "last_metrics": {"loss": 0.25},
        "progress_at": app.at(&job, "RunProgressed", 0).await,
    });
    assert_eq!(app.run_row(&run1).await, expected_run1);
    let expected_run2 = json!({
        "run_id": run2,
        "job_id": job,
        "attempt": 2,
        "executor_id": "gpu-host-3",
        "gpu_uuids": ["GPU-c", "GPU-d"],
        "state": "succeeded",
        "decision": decision,
        "assigned_at": app.at(&job, "RunAssigned", 1).await,
        "started_at": app.at(&job, "RunStarted", 1).await,
        "ended_at": app.at(&job, "RunSucceeded", 0).await,
        "exit_code": null,
        "signal": null,
        "failure_reason": null,
        "retryable": null,
        "last_progress": null,
        "last_metrics": null,
        "progress_at": null,
    });
    assert_eq!(app.run_row(&run2).await, expected_run2);

    let row = app.job_row(&other).await;
    let cancelled_at = app.at(&other, "JobCancelled", 0).await;
    assert_eq!(row["state"], "cancelled");
    assert_eq!(row["attempts"], 1);
    assert_eq!(row["current_run_id"], other_run.as_str());
    assert_eq!(row["cancelled_at"], cancelled_at);
    assert_eq!(row["finished_at"], cancelled_at);
    assert_eq!(row["started_at"], app.at(&other, "RunStarted", 0).await);
    assert_eq!(row["version"], 4);
    // The run goes on until its executor reports its end.
    let run = app.run_row(&other_run).await;
    assert_eq!(run["state"], "running");
    assert_eq!(run["ended_at"], Value::Null);

    let checkpoint = app.checkpoint("public").await;
    assert_eq!(checkpoint["events_applied"], app.event_count().await);
    assert_eq!(checkpoint["stream_sequence"], app.event_count().await);
    assert_eq!(checkpoint["last_error"], Value::Null);
    let last_position: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(checkpoint["position"], last_position);
}

/// A batch failing after some events rolls back whole; after a restart the live tables equal a
/// fresh rebuild from the event store, row for row.
#[tokio::test]
async fn a_crash_mid_batch_then_restart_equals_a_rebuild() {
    let app = spawn_app().await;
    for n in 0..8 {
        app.short_life(n, 1 + n % 4).await;
    }
    app.wait_relayed().await;
    let total = app.event_count().await;

    let config = RunnerConfig {
        batch_size: 5,
        ..RunnerConfig::default()
    };
    let mut projection = app.projection_with(config.clone()).await;
    assert_eq!(projection.step().await.unwrap(), Outcome::Processed(5));
    projection.fail_after = Some(3);
    let error = projection.step().await.unwrap_err();
    assert!(matches!(error, ProjectionError::Injected(3)), "{error}");
    // Only the first batch is in: the second rolled back with its checkpoint.
    let checkpoint = app.checkpoint("public").await;
    assert_eq!(checkpoint["events_applied"], 5);
    assert_eq!(checkpoint["stream_sequence"], 5);
    let version_sum: Option<i64> = sqlx::query_scalar("SELECT sum(version)::bigint FROM read_jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(version_sum, Some(5));
    drop(projection);

    // More events arrive while the projector is down.
    for n in 8..12 {
        app.short_life(n, 4).await;
    }
    app.wait_relayed().await;
    let total_after = app.event_count().await;
    assert!(total_after > total);

    let mut restarted = app.projection_with(config).await;
    drain(&mut restarted).await.unwrap();

    let rebuilt = rebuild_into(&app.pool, "rebuild_check").await.unwrap();
    assert_eq!(i64::try_from(rebuilt).unwrap(), total_after);
    for table in ["read_jobs", "read_runs"] {
        let diff = differences(&app.pool, "public", "rebuild_check", table).await;
        assert!(diff.is_empty(), "{table} differs from a rebuild: {diff:#?}");
        assert_eq!(
            app.rows("public", table).await.len(),
            app.rows("rebuild_check", table).await.len()
        );
    }
    let live = app.checkpoint("public").await;
    let rebuild = app.checkpoint("rebuild_check").await;
    assert_eq!(live["events_applied"], total_after);
    assert_eq!(live["events_applied"], rebuild["events_applied"]);
    assert_eq!(live["tx_id"], rebuild["tx_id"]);
    assert_eq!(live["position"], rebuild["position"]);
    assert_eq!(rebuild["stream_sequence"], 0);
}

/// Messages delivered again (the consumer re-created from the stream's start) and events
/// applied twice change nothing.
#[tokio::test]
async fn redelivered_messages_change_nothing() {
    let app = spawn_app().await;
    for n in 0..6 {
        app.short_life(n, 4).await;
    }
    app.wait_relayed().await;
    let mut projection = app.projection().await;
    let total = drain(&mut projection).await.unwrap();
    assert_eq!(i64::try_from(total).unwrap(), app.event_count().await);
    let jobs = app.rows("public", "read_jobs").await;
    let runs = app.rows("public", "read_runs").await;
    let checkpoint = app.checkpoint("public").await;

    // Redeliver everything: a fresh consumer of the same name from sequence 1.
    let js = jetstream::new(async_nats::connect(app.nats.url()).await.unwrap());
    let stream = js.get_stream(STREAM).await.unwrap();
    stream.delete_consumer(runner::CONSUMER).await.unwrap();
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(runner::CONSUMER.to_string()),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            filter_subject: runner::FILTER.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(drain(&mut projection).await.unwrap(), total);
    assert_eq!(app.rows("public", "read_jobs").await, jobs);
    assert_eq!(app.rows("public", "read_runs").await, runs);
    assert_eq!(app.checkpoint("public").await, checkpoint);

    // Apply every event once more, straight from the store: the version guard skips them all.
    let envelopes: Vec<StoredEvent> = sqlx::query_as(
        "SELECT aggregate_id, sequence, global_position, event_type, event_version, payload,
                    recorded_at
               FROM events ORDER BY global_position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut tx = app.pool.begin().await.unwrap();
    for (aggregate_id, sequence, position, event_type, event_version, payload, recorded_at) in
        envelopes
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
        let applied = runner::apply_envelope(&mut tx, &envelope).await.unwrap();
        assert_eq!(applied, overfly_projector::jobs::Applied::AlreadyApplied);
    }
    tx.commit().await.unwrap();
    assert_eq!(app.rows("public", "read_jobs").await, jobs);
    assert_eq!(app.rows("public", "read_runs").await, runs);
}

/// An event type the projector does not know stops the projection with the reason in its
/// checkpoint row; it is never skipped.
#[tokio::test]
async fn an_unknown_event_type_stops_the_projection() {
    let app = spawn_app().await;
    let job = app.submit(&helpers::job_body(1)).await;
    app.wait_relayed().await;

    // A newer producer wrote an event this projector does not know; the relay publishes it.
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
    let later = app.short_life(2, 1).await;
    app.wait_relayed().await;

    // All three arrive in one batch: what came before the unknown event is kept.
    let mut projection = app.projection().await;
    for _ in 0..2 {
        let error = projection.step().await.unwrap_err();
        assert!(error.is_poison(), "{error}");
        assert!(
            matches!(error, ProjectionError::UnknownEventType { .. }),
            "{error}"
        );
        let checkpoint = app.checkpoint("public").await;
        let last_error = checkpoint["last_error"].as_str().unwrap();
        assert!(
            last_error.contains("unknown event type JobTeleported (version 1)"),
            "{last_error}"
        );
        assert_eq!(checkpoint["events_applied"], 1);
        assert_eq!(checkpoint["stream_sequence"], 1);
    }
    // Nothing after it was applied either: the projection stopped.
    assert_eq!(app.job_row(&job).await["version"], 1);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM read_jobs WHERE job_id = $1::uuid")
        .bind(&later)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, 0);
}

/// One runner at a time: a second one stands by while the first holds the lock, and takes over
/// where the first stopped once it is gone.
#[tokio::test]
async fn a_second_runner_stands_by_then_takes_over() {
    let app = spawn_app().await;
    app.short_life(0, 4).await;
    app.wait_relayed().await;
    let mut first = app.projection().await;
    let mut second = app.projection().await;
    let before = usize::try_from(app.event_count().await).unwrap();
    assert_eq!(drain(&mut first).await.unwrap(), before);
    app.short_life(1, 2).await;
    app.wait_relayed().await;
    assert_eq!(second.step().await.unwrap(), Outcome::Idle);
    drop(first);
    // The lock goes with the first runner's connection; the second resumes after its batch.
    let mut taken_over = 0;
    for _ in 0..100 {
        taken_over += drain(&mut second).await.unwrap();
        if taken_over > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(taken_over, 2);
    assert_eq!(
        app.checkpoint("public").await["events_applied"],
        app.event_count().await
    );
}

/// `run` keeps the rows up to date as commands come in (the loop the binary runs).
#[tokio::test]
async fn run_follows_the_stream() {
    let app = spawn_app().await;
    let projection = app.projection().await;
    let runner = tokio::spawn(projection.run());
    let job = app.short_life(0, 3).await;
    let mut state = Value::Null;
    for _ in 0..200 {
        let row: Option<Value> =
            sqlx::query_scalar("SELECT to_jsonb(j) FROM read_jobs j WHERE job_id = $1::uuid")
                .bind(&job)
                .fetch_optional(&app.pool)
                .await
                .unwrap();
        state = row.map_or(Value::Null, |row| row["state"].clone());
        if state == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    runner.abort();
    assert_eq!(state, "running");
}
