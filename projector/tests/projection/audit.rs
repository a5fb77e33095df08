//! `verify` and `rebuild` (with the swap) against the real command service, relay, Postgres
//! and nats-server, with the live runner running.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use overfly_projector::rebuild::RebuildError;
use overfly_projector::runner::RunnerConfig;
use overfly_projector::verify::ColumnDifference;
use overfly_projector::{
    Difference, DifferenceKind, Jobs, Outcome, RebuildOptions, rebuild, verify,
};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{TestApp, drain, spawn_app};

async fn schemas_like(app: &TestApp, pattern: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE $1")
        .bind(pattern)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn uuid_of(app: &TestApp, sql: &str, bind: &str) -> Uuid {
    sqlx::query_scalar(sql)
        .bind(bind)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Waits until the live checkpoint has taken in every message of the stream.
async fn wait_caught_up(app: &TestApp) {
    app.wait_relayed().await;
    let expected = app.event_count().await;
    for _ in 0..400 {
        if app.checkpoint("public").await["stream_sequence"] == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "the runner did not catch up to {expected}: {}",
        app.checkpoint("public").await
    );
}

/// Runs the binary's `verify` against the test's database: (success, stdout).
async fn verify_binary(app: &TestApp) -> (bool, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_overfly-projector"))
        .args(["verify", "jobs", "--database-url", &app.database_url()])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// A healthy projection has no drift (also while it lags the store: compared at its own
/// checkpoint); a corrupted column (text and array), a deleted run and an invented run are each reported,
/// exactly, and the shadow schema is gone afterwards.
#[tokio::test]
async fn verify_reports_no_drift_then_exactly_the_corrupted_rows() {
    let app = spawn_app().await;
    let mut jobs = Vec::new();
    for n in 0..6 {
        // Lives of 1..=4 steps: runs for n = 1, 2, 3, 5.
        jobs.push(app.short_life(n, 1 + n % 4).await);
    }
    app.wait_relayed().await;
    let mut projection = app.projection().await;
    drain(&mut projection).await.unwrap();

    let report = verify(&app.pool, &Jobs).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(
        (report.compared("read_jobs"), report.compared("read_runs")),
        (6, 4)
    );
    let (success, stdout) = verify_binary(&app).await;
    assert!(success, "{stdout}");
    assert!(
        stdout.contains("read_jobs 6 rows, read_runs 4 rows compared, 0 differences"),
        "{stdout}"
    );

    // Events the live projection has not applied yet are not drift: like for like.
    app.short_life(6, 4).await;
    app.wait_relayed().await;
    let behind = verify(&app.pool, &Jobs).await.unwrap();
    assert!(behind.is_clean(), "{behind}");
    assert_eq!(behind.cursor, report.cursor);
    assert_eq!(
        (behind.compared("read_jobs"), behind.compared("read_runs")),
        (6, 4)
    );
    drain(&mut projection).await.unwrap();

    // Corrupt: a state, a deleted run, an invented run.
    let running = jobs[2].as_str();
    assert_eq!(app.job_row(running).await["state"], "running");
    sqlx::query("UPDATE read_jobs SET state = 'failed' WHERE job_id = $1::uuid")
        .bind(running)
        .execute(&app.pool)
        .await
        .unwrap();
    let reassigned = uuid_of(
        &app,
        "UPDATE read_runs SET gpu_uuids = '{GPU-x}' WHERE job_id = $1::uuid RETURNING run_id",
        &jobs[1],
    )
    .await;
    let deleted = uuid_of(
        &app,
        "DELETE FROM read_runs WHERE job_id = $1::uuid RETURNING run_id",
        &jobs[3],
    )
    .await;
    let invented = uuid_of(
        &app,
        "INSERT INTO read_runs
             SELECT gen_random_uuid(), job_id, attempt + 1, executor_id, gpu_uuids, state,
                    decision, assigned_at, started_at, ended_at, exit_code, signal,
                    failure_reason, retryable, last_progress, last_metrics, progress_at
               FROM read_runs WHERE job_id = $1::uuid
         RETURNING run_id",
        &jobs[5],
    )
    .await;

    let report = verify(&app.pool, &Jobs).await.unwrap();
    let running_id = Uuid::parse_str(running).unwrap();
    let run = |key: Uuid, kind| Difference {
        table: "read_runs",
        key_column: "run_id",
        key: key.to_string(),
        kind,
    };
    let mut expected = vec![
        Difference {
            table: "read_jobs",
            key_column: "job_id",
            key: running_id.to_string(),
            kind: DifferenceKind::Differs(vec![ColumnDifference {
                column: "state".into(),
                live: json!("failed"),
                rebuilt: json!("running"),
            }]),
        },
        run(
            reassigned,
            DifferenceKind::Differs(vec![ColumnDifference {
                column: "gpu_uuids".into(),
                live: json!(["GPU-x"]),
                rebuilt: json!(["GPU-0", "GPU-1"]),
            }]),
        ),
        run(deleted, DifferenceKind::MissingInLive),
        run(invented, DifferenceKind::ExtraInLive),
    ];
    // Each table's differences come in key order.
    expected[1..].sort_by_key(|d| d.uuid());
    assert_eq!(report.differences, expected, "{report}");
    assert_eq!(
        (report.compared("read_jobs"), report.compared("read_runs")),
        (7, 6)
    );
    let printed = report.to_string();
    assert!(
        printed.contains(&format!(
            "read_jobs job_id={running_id}: state live=\"failed\" rebuilt=\"running\""
        )),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("read_runs run_id={deleted}: missing in live")),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("read_runs run_id={invented}: extra in live")),
        "{printed}"
    );
    let (success, stdout) = verify_binary(&app).await;
    assert!(!success, "verify must fail on drift: {stdout}");
    assert!(stdout.contains("4 differences"), "{stdout}");
    assert!(stdout.contains("state live=\"failed\""), "{stdout}");

    assert_eq!(schemas_like(&app, "verify_jobs_%").await, 0);
}

/// A checkpoint swapped in ahead of the stream (stream sequence 0: no runner ever ran): the
/// runner reads the stream from the start, acks what the checkpoint covers without applying
/// it, applies what comes after, and its stream sequence becomes meaningful again.
#[tokio::test]
async fn the_runner_skips_what_a_swapped_in_checkpoint_covers() {
    let app = spawn_app().await;
    for n in 0..5 {
        app.short_life(n, 4).await;
    }
    app.wait_relayed().await;
    let options = RebuildOptions {
        schema: Some("rebuild_first".into()),
        ..RebuildOptions::default()
    };
    // One rebuild at a time.
    let mut other = app.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(overfly_projector::swap::REBUILD_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    let busy = rebuild(&app.pool, &Jobs, &options).await.unwrap_err();
    assert!(matches!(busy, RebuildError::Busy("jobs")), "{busy}");
    other.close().await.unwrap();

    let summary = rebuild(&app.pool, &Jobs, &options).await.unwrap();
    // Five events each: submitted, assigned, started, run succeeded, job succeeded.
    assert_eq!(summary.events_applied, 25);
    assert_eq!(summary.stream_sequence, 0);
    assert_eq!(
        (summary.rows_of("read_jobs"), summary.rows_of("read_runs")),
        (5, 5)
    );
    let rebuilt = app.rows("public", "read_jobs").await;
    let checkpoint = app.checkpoint("public").await;
    assert_eq!(checkpoint["stream_sequence"], 0);
    assert_eq!(checkpoint["events_applied"], 25);

    let late = app.short_life(5, 4).await;
    app.wait_relayed().await;
    let mut projection = app.projection().await;
    assert_eq!(drain(&mut projection).await.unwrap(), 30);
    let checkpoint = app.checkpoint("public").await;
    assert_eq!(checkpoint["stream_sequence"], 30);
    assert_eq!(checkpoint["events_applied"], 30);
    let last_position: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(checkpoint["position"], last_position);
    let rows = app.rows("public", "read_jobs").await;
    assert_eq!(rows.len(), 6);
    for row in &rebuilt {
        assert!(rows.contains(row), "changed by the runner: {row}");
    }
    assert_eq!(app.job_row(&late).await["version"], 5);
    let report = verify(&app.pool, &Jobs).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

/// A swap ahead of a runner part-way through the stream keeps the runner's stream sequence;
/// the runner then acks the messages the new cursor covers without applying them, applies
/// what comes after, and the projection equals the events.
#[tokio::test]
async fn a_swap_ahead_of_the_runner_keeps_its_stream_sequence() {
    let app = spawn_app().await;
    for n in 0..5 {
        app.short_life(n, 4).await;
    }
    app.wait_relayed().await;
    let config = RunnerConfig {
        batch_size: 10,
        ..RunnerConfig::default()
    };
    let mut projection = app.projection_with(config).await;
    assert_eq!(projection.step().await.unwrap(), Outcome::Processed(10));

    let options = RebuildOptions {
        schema: Some("rebuild_ahead".into()),
        ..RebuildOptions::default()
    };
    let summary = rebuild(&app.pool, &Jobs, &options).await.unwrap();
    assert_eq!(summary.events_applied, 25);
    assert_eq!(summary.stream_sequence, 10);
    let checkpoint = app.checkpoint("public").await;
    assert_eq!(checkpoint["stream_sequence"], 10);
    assert_eq!(checkpoint["events_applied"], 25);

    let late = app.short_life(5, 4).await;
    app.wait_relayed().await;
    // 15 covered by the swapped-in rows, 5 new.
    assert_eq!(drain(&mut projection).await.unwrap(), 20);
    let checkpoint = app.checkpoint("public").await;
    assert_eq!(checkpoint["stream_sequence"], 30);
    assert_eq!(checkpoint["events_applied"], 30);
    assert_eq!(app.job_row(&late).await["version"], 5);
    let report = verify(&app.pool, &Jobs).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.compared("read_jobs"), 6);
}

/// `rebuild` while the live runner keeps running and commands keep arriving: the query tables
/// are there for every read, the swap lands, the runner goes on after it, and `verify` then
/// finds no drift. The schema afterwards is the migrations' (index names included).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_swaps_in_while_the_runner_and_commands_keep_going() {
    let app = spawn_app().await;
    for n in 0..40 {
        app.short_life(n, 1 + n % 4).await;
    }
    app.wait_relayed().await;
    let runner = tokio::spawn(app.projection().await.run());
    let indexes_before = index_names(&app).await;
    // A read-only role (as a query service may use): its grant survives the swap.
    let role = format!(
        "overfly_reader_{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    sqlx::query(&format!("CREATE ROLE {role}"))
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query(&format!("GRANT SELECT ON read_jobs, read_runs TO {role}"))
        .execute(&app.pool)
        .await
        .unwrap();

    let done = AtomicBool::new(false);
    let options = RebuildOptions {
        schema: Some("rebuild_live".into()),
        // Small batches and a strict "close": many transactions, several catch-up rounds.
        batch_size: 7,
        close_enough: 2,
        max_rounds: 30,
        progress_every: Duration::from_millis(50),
        ..RebuildOptions::default()
    };
    let rebuilding = async {
        let summary = rebuild(&app.pool, &Jobs, &options).await;
        done.store(true, Ordering::SeqCst);
        summary
    };
    let commanding = async {
        let mut n = 100;
        while !done.load(Ordering::SeqCst) {
            app.short_life(n, 1 + n % 4).await;
            n += 1;
        }
        n - 100
    };
    let reading = async {
        let mut reads = 0_u64;
        while !done.load(Ordering::SeqCst) {
            for table in ["read_jobs", "read_runs"] {
                let result: Result<i64, sqlx::Error> =
                    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
                        .fetch_one(&app.pool)
                        .await;
                if let Err(error) = result {
                    panic!("{table} unreadable during the rebuild: {error}");
                }
                reads += 1;
            }
        }
        reads
    };
    let (summary, commands, reads) = tokio::join!(rebuilding, commanding, reading);
    let summary = summary.unwrap();
    println!("{summary}; {commands} commands and {reads} reads meanwhile");
    assert!(
        commands > 0 && reads > 0,
        "{commands} commands, {reads} reads"
    );
    assert!(summary.catch_up_rounds >= 1, "{summary}");
    assert!(summary.events_applied >= 100, "{summary}");

    // New events land after the swap.
    let late = app.short_life(999, 4).await;
    wait_caught_up(&app).await;
    assert_eq!(app.job_row(&late).await["state"], "succeeded");
    let checkpoint = app.checkpoint("public").await;
    assert_eq!(checkpoint["events_applied"], app.event_count().await);
    assert_eq!(checkpoint["last_error"], serde_json::Value::Null);
    let report = verify(&app.pool, &Jobs).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(
        i64::try_from(report.compared("read_jobs")).unwrap(),
        sqlx::query_scalar::<_, i64>("SELECT count(DISTINCT aggregate_id) FROM events")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    );
    runner.abort();

    assert_eq!(index_names(&app).await, indexes_before);
    let granted: (bool, bool, bool) = sqlx::query_as(
        "SELECT has_table_privilege($1, 'public.read_jobs', 'SELECT'),
                has_table_privilege($1, 'public.read_runs', 'SELECT'),
                has_table_privilege($1, 'public.read_jobs', 'UPDATE')",
    )
    .bind(&role)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    sqlx::query(&format!("DROP OWNED BY {role}"))
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(granted, (true, true, false));
    assert_eq!(schemas_like(&app, "rebuild_live").await, 0);
    let old: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE tablename IN ('read_jobs_old', 'read_runs_old')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(old, 0);
}

/// A query holding the live tables past the swap's `lock_timeout` makes the swap roll back
/// and try again (readers queue behind a waiting swap for at most that long), and the
/// rebuild still lands once the reader is done.
#[tokio::test]
async fn a_long_reader_makes_the_swap_try_again_rather_than_block_readers() {
    let app = spawn_app().await;
    for n in 0..3 {
        app.short_life(n, 4).await;
    }
    app.wait_relayed().await;
    let mut projection = app.projection().await;
    drain(&mut projection).await.unwrap();

    let mut reader = app.pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM read_jobs")
        .execute(&mut *reader)
        .await
        .unwrap();
    let options = RebuildOptions {
        schema: Some("rebuild_wait".into()),
        lock_timeout: Duration::from_millis(100),
        swap_attempts: 100,
        ..RebuildOptions::default()
    };
    let releasing = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        // Other readers get through meanwhile (after at most one lock_timeout each).
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM read_jobs")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        reader.commit().await.unwrap();
        count
    };
    let (summary, count) = tokio::join!(rebuild(&app.pool, &Jobs, &options), releasing);
    let summary = summary.unwrap();
    assert_eq!(count, 3);
    assert!(summary.swap_attempts > 1, "{summary}");
    assert_eq!(summary.events_applied, 15);
    let report = verify(&app.pool, &Jobs).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

/// The indexes of the live read-model tables: `table.index`, sorted.
async fn index_names(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT tablename || '.' || indexname FROM pg_indexes
          WHERE schemaname = 'public' AND tablename IN ('read_jobs', 'read_runs')
          ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}
