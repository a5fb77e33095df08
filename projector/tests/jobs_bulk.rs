//! The jobs projection's batch path (`jobs::apply_batch`: rows read at once, events applied in
//! memory, rows written back with one upsert per table) against its per-event path
//! (`jobs::apply`): the same events give the same rows, column for column, whatever the batch
//! boundaries, redeliveries included; and a batch with a gap or a missing run fails at the same
//! event with the same error.

use chrono::{DateTime, Duration, TimeZone, Utc};
use overfly_domain::job::JobEvent;
use overfly_projector::jobs::{self, Applied, EventMeta};
use overfly_testkit::TestDb;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

fn at(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap() + Duration::minutes(minutes)
}

fn event(event_type: &str, fields: Value) -> JobEvent {
    serde_json::from_value(json!({ event_type: fields })).unwrap()
}

fn spec(n: usize) -> Value {
    json!({
        "name": format!("job-{n}"), "account": "acct", "submitted_by": "ana", "priority": 10,
        "gpus": 2, "gpu_memory_mb": 1000, "command": ["run"], "env": {},
        "params": {"lr": 0.1, "depth": n, "tags": ["a", "b"]},
        "labels": {"suite": "bulk"}, "max_retries": 3, "timeout_s": 60,
    })
}

/// The life of job `n`: every event type, several runs, merging metrics, a priority change.
fn life(n: usize) -> Vec<JobEvent> {
    let job_id = Uuid::new_v4();
    let runs: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let gpus = json!(["GPU-0", format!("GPU-\"{n}\"")]);
    let assigned = |run: Uuid, attempt: u32, t: i64| {
        event(
            "RunAssigned",
            json!({"run_id": run, "attempt": attempt, "executor_id": "host-1", "gpu_uuids": gpus,
                   "decision": {"score": 1.5, "priority": 10, "fair_share_factor": 0.5,
                                "age_factor": 0.25, "overtook": [], "placement": "host-1"},
                   "at": at(t)}),
        )
    };
    let started = |run: Uuid, attempt: u32, t: i64| {
        event(
            "RunStarted",
            json!({"run_id": run, "attempt": attempt, "executor_id": "host-1", "at": at(t)}),
        )
    };
    let progressed = |run: Uuid, seq: u64, progress: Value, metrics: Value, t: i64| {
        event(
            "RunProgressed",
            json!({"run_id": run, "report_seq": seq, "progress": progress, "metrics": metrics,
                   "at": at(t)}),
        )
    };
    let retry = |attempt: u32, after: Uuid, t: i64| {
        event(
            "RetryScheduled",
            json!({"next_attempt": attempt, "after_run": after, "eligible_at": at(t + 1),
                   "backoff_s": 60, "trigger": {"kind": "automatic"}, "at": at(t)}),
        )
    };
    let mut events = vec![
        event(
            "JobSubmitted",
            json!({"job_id": job_id, "spec": spec(n), "at": at(0)}),
        ),
        event(
            "JobPriorityChanged",
            json!({"from": 10, "to": 90, "by": "ana", "reason": "urgent", "at": at(1)}),
        ),
        assigned(runs[0], 1, 2),
        started(runs[0], 1, 3),
        progressed(runs[0], 1, json!(0.25), json!({"loss": 1.0, "acc": 0.5}), 4),
        progressed(runs[0], 2, Value::Null, json!({"loss": 0.75}), 5),
        event(
            "RunFailed",
            json!({"run_id": runs[0], "attempt": 1, "executor_id": "host-1",
                   "gpu_uuids": gpus, "started_at": at(3), "exit_code": 137, "signal": 9,
                   "reason": "killed", "retryable": true, "at": at(6)}),
        ),
        retry(2, runs[0], 7),
        assigned(runs[1], 2, 8),
        event(
            "RunTimedOut",
            json!({"run_id": runs[1], "attempt": 2, "executor_id": "host-1",
                   "gpu_uuids": gpus, "started_at": null, "timeout_s": 60, "at": at(9)}),
        ),
        retry(3, runs[1], 10),
        assigned(runs[2], 3, 11),
        started(runs[2], 3, 12),
    ];
    match n % 4 {
        0 => {
            events.push(progressed(runs[2], 1, json!(1.0), json!({"acc": 0.9}), 13));
            events.push(event(
                "RunSucceeded",
                json!({"run_id": runs[2], "attempt": 3, "executor_id": "host-1",
                       "gpu_uuids": gpus, "started_at": at(12), "at": at(14)}),
            ));
            events.push(event(
                "JobSucceeded",
                json!({"run_id": runs[2], "attempts": 3, "at": at(15)}),
            ));
        }
        1 => {
            events.push(event(
                "RunFailed",
                json!({"run_id": runs[2], "attempt": 3, "executor_id": "host-1",
                       "gpu_uuids": gpus, "started_at": at(12), "exit_code": 1,
                       "signal": null, "reason": "exit 1", "retryable": false, "at": at(13)}),
            ));
            events.push(event(
                "JobFailed",
                json!({"reason": "exit 1", "attempts": 3, "last_run": runs[2], "at": at(14)}),
            ));
            // A manual retry of the failed job reopens it.
            events.push(event(
                "RetryScheduled",
                json!({"next_attempt": 4, "after_run": runs[2], "eligible_at": at(16),
                       "backoff_s": 0, "trigger": {"kind": "manual", "by": "ana", "reason": "again"},
                       "at": at(15)}),
            ));
        }
        2 => events.push(event(
            "JobCancelled",
            json!({"by": "ana", "reason": "stop", "previous_state": "running",
                   "active_run": runs[2], "active_executor": "host-1", "at": at(13)}),
        )),
        _ => {}
    }
    events
}

/// Every job's events, interleaved step by step (as concurrent jobs' events are).
fn stream(jobs: usize) -> Vec<(EventMeta, JobEvent)> {
    let lives: Vec<(String, Vec<JobEvent>)> = (0..jobs)
        .map(|n| {
            let events = life(n);
            let JobEvent::JobSubmitted { job_id, .. } = &events[0] else {
                unreachable!()
            };
            (job_id.to_string(), events)
        })
        .collect();
    let mut out = Vec::new();
    let longest = lives.iter().map(|(_, e)| e.len()).max().unwrap_or(0);
    for step in 0..longest {
        for (id, events) in &lives {
            if let Some(event) = events.get(step) {
                let position = i64::try_from(out.len()).unwrap() + 1;
                out.push((
                    EventMeta {
                        aggregate_id: id.clone(),
                        sequence: i64::try_from(step).unwrap() + 1,
                        position,
                        recorded_at: at(position),
                    },
                    event.clone(),
                ));
            }
        }
    }
    out
}

async fn setup() -> (TestDb, PgPool) {
    let db = TestDb::create().await;
    let pool = PgPool::connect(&db.url).await.unwrap();
    overfly_infra::db::migrate(&pool).await.unwrap();
    (db, pool)
}

/// A connection writing to fresh copies of the jobs tables in `schema`.
async fn shadow(pool: &PgPool, schema: &str) -> PgConnection {
    for sql in [
        format!("CREATE SCHEMA {schema}"),
        format!("CREATE TABLE {schema}.read_jobs (LIKE public.read_jobs INCLUDING ALL)"),
        format!("CREATE TABLE {schema}.read_runs (LIKE public.read_runs INCLUDING ALL)"),
    ] {
        sqlx::query(&sql).execute(pool).await.unwrap();
    }
    let mut conn = pool.acquire().await.unwrap().detach();
    sqlx::query(&format!("SET search_path TO {schema}"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// Every row of both tables, every column, in key order.
async fn rows(pool: &PgPool, schema: &str) -> (Vec<Value>, Vec<Value>) {
    let read = |table: &str, key: &str| {
        format!("SELECT to_jsonb(t) FROM {schema}.{table} t ORDER BY {key}")
    };
    let jobs: Vec<Value> = sqlx::query_scalar(&read("read_jobs", "job_id"))
        .fetch_all(pool)
        .await
        .unwrap();
    let runs: Vec<Value> = sqlx::query_scalar(&read("read_runs", "run_id"))
        .fetch_all(pool)
        .await
        .unwrap();
    (jobs, runs)
}

async fn one_by_one(conn: &mut PgConnection, events: &[(EventMeta, JobEvent)]) -> Vec<Applied> {
    let mut tx = conn.begin().await.unwrap();
    let mut applied = Vec::new();
    for (meta, event) in events {
        applied.push(jobs::apply(&mut tx, meta, event).await.unwrap());
    }
    tx.commit().await.unwrap();
    applied
}

async fn in_batches(
    conn: &mut PgConnection,
    events: &[(EventMeta, JobEvent)],
    size: usize,
) -> Vec<Applied> {
    let mut applied = Vec::new();
    for batch in events.chunks(size) {
        let mut tx = conn.begin().await.unwrap();
        applied.extend(jobs::apply_batch(&mut tx, batch).await.unwrap());
        tx.commit().await.unwrap();
    }
    applied
}

#[tokio::test]
async fn batches_give_the_rows_events_one_by_one_give() {
    let (_db, pool) = setup().await;
    let events = stream(12);
    let mut single = shadow(&pool, "single").await;
    let expected = one_by_one(&mut single, &events).await;
    let want = rows(&pool, "single").await;
    assert_eq!(want.0.len(), 12);
    assert_eq!(want.1.len(), 36);

    for size in [2, 7, 50, events.len()] {
        let schema = format!("batch_{size}");
        let mut conn = shadow(&pool, &schema).await;
        let applied = in_batches(&mut conn, &events, size).await;
        assert_eq!(applied, expected, "batches of {size}");
        assert_eq!(rows(&pool, &schema).await, want, "batches of {size}");

        // Redelivery of everything, in other batch boundaries: nothing applied, nothing changes.
        let again = in_batches(&mut conn, &events, size + 3).await;
        assert!(again.iter().all(|a| *a == Applied::AlreadyApplied));
        assert_eq!(
            rows(&pool, &schema).await,
            want,
            "redelivered, batches of {size}"
        );
    }

    // Half applied one by one, then everything in one batch (the first half redelivered).
    let mut conn = shadow(&pool, "mixed").await;
    one_by_one(&mut conn, &events[..events.len() / 2]).await;
    let applied = in_batches(&mut conn, &events, events.len()).await;
    let fresh = applied.iter().filter(|a| **a == Applied::Applied).count();
    assert_eq!(fresh, events.len() - events.len() / 2);
    assert_eq!(rows(&pool, "mixed").await, want);
}

/// What `apply_batch` says about `events`, from a fresh schema holding `before` (rolled back).
async fn batch_error(
    pool: &PgPool,
    schema: &str,
    before: &[(EventMeta, JobEvent)],
    events: &[(EventMeta, JobEvent)],
) -> (usize, String) {
    let mut conn = shadow(pool, schema).await;
    one_by_one(&mut conn, before).await;
    let mut tx = conn.begin().await.unwrap();
    let (index, error) = jobs::apply_batch(&mut tx, events).await.unwrap_err();
    tx.rollback().await.unwrap();
    (index, error.to_string())
}

async fn single_error(
    pool: &PgPool,
    schema: &str,
    before: &[(EventMeta, JobEvent)],
    events: &[(EventMeta, JobEvent)],
) -> (usize, String) {
    let mut conn = shadow(pool, schema).await;
    one_by_one(&mut conn, before).await;
    let mut tx = conn.begin().await.unwrap();
    for (index, (meta, event)) in events.iter().enumerate() {
        if let Err(error) = jobs::apply(&mut tx, meta, event).await {
            return (index, error.to_string());
        }
    }
    panic!("no error one by one");
}

#[tokio::test]
async fn a_gap_or_a_missing_run_fails_the_batch_where_one_by_one_fails() {
    let (_db, pool) = setup().await;
    let events = stream(3);
    let (before, rest) = events.split_at(6);

    // A gap: the next event of a job skipped.
    let mut gap: Vec<_> = rest.to_vec();
    gap.remove(1);
    let want = single_error(&pool, "gap_single", before, &gap).await;
    let got = batch_error(&pool, "gap_batch", before, &gap).await;
    assert_eq!(got, want);

    // A run event for a run that was never assigned.
    let mut orphan: Vec<_> = rest.to_vec();
    let index = orphan
        .iter()
        .position(|(_, e)| matches!(e, JobEvent::RunStarted { .. }))
        .unwrap();
    if let JobEvent::RunStarted { run_id, .. } = &mut orphan[index].1 {
        *run_id = Uuid::new_v4();
    }
    let want = single_error(&pool, "orphan_single", before, &orphan).await;
    let got = batch_error(&pool, "orphan_batch", before, &orphan).await;
    assert_eq!(got, want);
    assert_eq!(got.0, index);

    // Nothing of a failed batch is left once its transaction rolls back.
    assert_eq!(
        rows(&pool, "orphan_batch").await,
        rows(&pool, "orphan_single").await
    );
}
