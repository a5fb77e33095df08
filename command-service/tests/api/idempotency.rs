//! Test 4: `Idempotency-Key` on `POST /jobs`.

use serde_json::Value;

use crate::helpers::{job_body, spawn_app};

async fn submit_with_key(
    app: &crate::helpers::TestApp,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    app.http
        .post(app.url("/jobs"))
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn submitted_events(app: &crate::helpers::TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'JobSubmitted'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_retried_submit_returns_the_first_response_and_creates_no_second_job() {
    let app = spawn_app().await;
    let first = submit_with_key(&app, "tiles-2026-11-24", &job_body(1)).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    // Same body, keys in another order and other whitespace: still the same request.
    let mut reordered = serde_json::Map::new();
    for (key, value) in job_body(1).as_object().unwrap().iter().rev() {
        reordered.insert(key.clone(), value.clone());
    }
    let replay = submit_with_key(&app, "tiles-2026-11-24", &Value::Object(reordered)).await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay, first);
    assert_eq!(submitted_events(&app).await, 1);
}

#[tokio::test]
async fn reusing_a_key_with_another_body_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    assert_eq!(
        submit_with_key(&app, "k-1", &job_body(1)).await.status(),
        201
    );
    let before = app.event_count().await;
    let conflict = submit_with_key(&app, "k-1", &job_body(2)).await;
    assert_eq!(conflict.status(), 422);
    assert_eq!(
        conflict.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = conflict.json().await.unwrap();
    assert_eq!(problem["field"], "Idempotency-Key");
    assert_eq!(app.event_count().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_with_one_key_create_one_job() {
    let app = std::sync::Arc::new(spawn_app().await);
    let mut handles = Vec::new();
    for _ in 0..12 {
        let app = app.clone();
        handles.push(tokio::spawn(async move {
            let response = submit_with_key(&app, "burst", &job_body(7)).await;
            assert_eq!(response.status(), 201);
            response.json::<Value>().await.unwrap()
        }));
    }
    let mut bodies = Vec::new();
    for handle in handles {
        bodies.push(handle.await.unwrap());
    }
    assert!(bodies.iter().all(|b| b == &bodies[0]), "{bodies:?}");
    assert_eq!(submitted_events(&app).await, 1);
}

#[tokio::test]
async fn a_malformed_key_is_refused() {
    let app = spawn_app().await;
    let response = submit_with_key(&app, &"k".repeat(300), &job_body(1)).await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["field"], "Idempotency-Key");
    assert_eq!(app.event_count().await, 0);
}

/// A submit with a freshly generated id skips loading the (empty) aggregate. Should that id
/// exist after all, the primary key refuses the append and the command is re-run with a real
/// load: the existing job is untouched.
#[tokio::test]
async fn a_fresh_id_that_exists_after_all_is_loaded_and_refused() {
    use overfly_command_service::bus::{CommandBus, CommandContext, CommandError};
    use overfly_domain::job::{JobCommand, JobError, JobServices, JobSpec};

    let app = spawn_app().await;
    let id: uuid::Uuid = app.submit(&job_body(1)).await.parse().unwrap();
    let bus = CommandBus::new(app.pool.clone(), JobServices::default(), Default::default());
    let mut spec: JobSpec = serde_json::from_value(job_body(2)).unwrap();
    spec.name = "impostor".into();
    let ctx = CommandContext {
        actor: "test".into(),
        correlation_id: "c".into(),
        causation_id: None,
        traceparent: None,
    };
    let command = JobCommand::SubmitJob {
        job_id: id,
        spec,
        at: chrono::Utc::now(),
    };
    let error = bus.new_job(id, command, &ctx).await.unwrap_err();
    assert!(
        matches!(error, CommandError::Domain(JobError::AlreadySubmitted)),
        "{error:?}"
    );
    let names: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT payload->'JobSubmitted'->'spec'->'name' FROM events WHERE aggregate_id = $1",
    )
    .bind(id.to_string())
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(names, vec![serde_json::json!("tiles-eu-west-1")]);
}
