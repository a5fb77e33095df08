//! `verify` and `rebuild` of the executors and usage projections (the same generic code as the
//! jobs one), against the real command service, relay, Postgres and nats-server.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use overfly_projector::rebuild::RebuildError;
use overfly_projector::verify::ColumnDifference;
use overfly_projector::{
    AnyProjection, Difference, DifferenceKind, Executors, Jobs, Projection, RebuildOptions, Usage,
    rebuild, rebuild_projection_into, verify,
};
use serde_json::{Value, json};

use crate::helpers::{self, TestApp, differences, drain, spawn_app};

/// Registers `executor` with two H100s, `<executor>-gpu0` and `<executor>-gpu1`.
async fn register(app: &TestApp, executor: &str) {
    let gpu = |index: u32| {
        json!({"uuid": format!("{executor}-gpu{index}"), "index": index,
               "name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559, "compute_capability": "9.0"})
    };
    app.post(
        "/executors",
        &json!({"executor_id": executor, "hostname": format!("{executor}.example"),
                "lease_s": 30, "gpus": [gpu(0), gpu(1)]}),
    )
    .await;
}

/// Job `n`: one GPU of `host-<n % 3>` (host-2 never registers: its GPUs have no model and no
/// row), through one of five ends: assigned only, running, succeeded, failed, cancelled while
/// running. Returns (job, run).
async fn life(app: &TestApp, n: usize) -> (String, String) {
    let host = format!("host-{}", n % 3);
    let mut body = helpers::job_body(n);
    body["gpus"] = json!(1);
    body["max_retries"] = json!(0);
    let job = app.submit(&body).await;
    let gpu = format!("{host}-gpu{}", (n / 3) % 2);
    let run = app.assign(&job, &host, &[&gpu]).await;
    let executor = json!({"executor_id": host});
    if n % 5 >= 1 {
        app.report(&job, &run, "started", executor.clone()).await;
    }
    match n % 5 {
        2 => app.report(&job, &run, "succeeded", executor).await,
        3 => {
            app.report(
                &job,
                &run,
                "failed",
                json!({"executor_id": host, "exit_code": 1, "reason": "CUDA OOM",
                       "retryable": false}),
            )
            .await;
        }
        4 => {
            app.post(
                &format!("/jobs/{job}/cancel"),
                &json!({"by": "ana", "reason": "wrong input"}),
            )
            .await;
        }
        _ => {}
    }
    (job, run)
}

/// Two executors registered (heartbeats, one drained at the end) and jobs `jobs` through
/// their lives, executor and job events interleaved; the (job, run) of each.
async fn history(app: &TestApp, jobs: Range<usize>) -> Vec<(String, String)> {
    register(app, "host-0").await;
    register(app, "host-1").await;
    app.post("/executors/host-0/heartbeat", &json!({})).await;
    let mut lives = Vec::new();
    for n in jobs {
        lives.push(life(app, n).await);
        if n % 4 == 0 {
            app.post("/executors/host-1/heartbeat", &json!({})).await;
        }
    }
    app.post(
        "/executors/host-1/drain",
        &json!({"by": "ops", "reason": "kernel update"}),
    )
    .await;
    lives
}

/// The checkpoint row of `projection` in `schema`, without its wall-clock `updated_at`.
async fn checkpoint(app: &TestApp, schema: &str, projection: &str) -> Value {
    sqlx::query_scalar(&format!(
        "SELECT to_jsonb(c) - 'updated_at' FROM {schema}.projection_checkpoints c
          WHERE projection = $1"
    ))
    .bind(projection)
    .fetch_optional(&app.pool)
    .await
    .unwrap()
    .unwrap_or(Value::Null)
}

/// Waits until the live checkpoints of `projections` have taken in every message.
async fn wait_caught_up(app: &TestApp, projections: &[&str]) {
    app.wait_relayed().await;
    let expected = app.event_count().await;
    for _ in 0..800 {
        let mut behind = false;
        for projection in projections {
            behind |= checkpoint(app, "public", projection).await["stream_sequence"] != expected;
        }
        if !behind {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the runners of {projections:?} did not catch up to {expected}");
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

/// Runs the binary with `args` against the test's database: (success, stdout, stderr).
async fn binary(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_overfly-projector"))
        .args(args)
        .args(["--database-url", &app.database_url()])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn difference(
    table: &'static str,
    key_column: &'static str,
    key: &str,
    kind: DifferenceKind,
) -> Difference {
    Difference {
        table,
        key_column,
        key: key.to_string(),
        kind,
    }
}

fn column(name: &str, live: Value, rebuilt: Value) -> ColumnDifference {
    ColumnDifference {
        column: name.into(),
        live,
        rebuilt,
    }
}

/// The declared key of every table is its primary key, in the migrated schema.
#[tokio::test]
async fn every_projection_table_is_keyed_by_its_primary_key() {
    let db = helpers::TestDb::create().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    overfly_infra::db::migrate(&pool).await.unwrap();
    for projection in AnyProjection::all() {
        for table in projection.tables() {
            let keys: Vec<String> = sqlx::query_scalar(
                "SELECT a.attname::text FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                  WHERE i.indrelid = ('public.' || $1)::regclass AND i.indisprimary",
            )
            .bind(table.name)
            .fetch_all(&pool)
            .await
            .unwrap();
            assert_eq!(keys, vec![table.key.to_string()], "{}", table.name);
        }
    }
}

/// Healthy executors and usage read models have no drift (also while they lag the store);
/// then a corrupted column, a deleted row and an invented row in each are reported exactly,
/// naming table, key and column, as is a column added to a table after the code was written;
/// the binary says so and exits non-zero; `rebuild` repairs it.
#[tokio::test]
async fn verify_finds_no_drift_in_executors_and_usage_then_exactly_the_corrupted_rows() {
    let app = spawn_app().await;
    let lives = history(&app, 0..10).await;
    app.wait_relayed().await;
    let mut jobs = app.projection().await;
    let mut executors = app.executors_projection().await;
    let mut usage = app.usage_projection().await;
    drain(&mut jobs).await.unwrap();
    drain(&mut executors).await.unwrap();
    drain(&mut usage).await.unwrap();

    let report = verify(&app.pool, &Executors).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.projection, "executors");
    assert_eq!(report.tables, vec![("read_executors", 2), ("read_gpus", 4)]);
    let report = verify(&app.pool, &Usage).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(
        report.tables,
        vec![
            ("read_usage_jobs", 10),
            ("read_usage_gpus", 4),
            ("read_usage_runs", 10)
        ]
    );
    let usage_cursor = report.cursor;
    // `verify` alone: every projection.
    let (success, stdout, stderr) = binary(&app, &["verify"]).await;
    assert!(success, "{stdout}{stderr}");
    for line in [
        "read_jobs 10 rows, read_runs 10 rows compared, 0 differences",
        "read_executors 2 rows, read_gpus 4 rows compared, 0 differences",
        "read_usage_jobs 10 rows, read_usage_gpus 4 rows, read_usage_runs 10 rows compared, 0 \
         differences",
    ] {
        assert!(stdout.contains(line), "{line:?} not in {stdout}");
    }

    // Events the live projections have not applied yet are not drift: like for like.
    life(&app, 10).await;
    register(&app, "host-2").await;
    app.wait_relayed().await;
    let behind = verify(&app.pool, &Usage).await.unwrap();
    assert!(behind.is_clean(), "{behind}");
    assert_eq!(behind.cursor, usage_cursor);
    assert_eq!(behind.compared("read_usage_runs"), 10);
    let behind = verify(&app.pool, &Executors).await.unwrap();
    assert!(behind.is_clean(), "{behind}");
    assert_eq!(behind.compared("read_gpus"), 4);
    drain(&mut executors).await.unwrap();
    drain(&mut usage).await.unwrap();
    drain(&mut jobs).await.unwrap();

    // Corrupt the executors: a state, a deleted GPU, an invented GPU, a number.
    let drained = app.rows("public", "read_executors").await[1].clone();
    assert_eq!(drained["state"], "draining");
    for sql in [
        "UPDATE read_executors SET state = 'lost' WHERE executor_id = 'host-1'",
        "DELETE FROM read_gpus WHERE gpu_uuid = 'host-0-gpu1'",
        "INSERT INTO read_gpus SELECT 'host-9-gpu0', 'host-9', index, name, memory_mb,
                compute_capability, held_by_run, held_by_job, held_since, updated_at
           FROM read_gpus WHERE gpu_uuid = 'host-0-gpu0'",
        "UPDATE read_gpus SET memory_mb = 1 WHERE gpu_uuid = 'host-2-gpu1'",
    ] {
        sqlx::query(sql).execute(&app.pool).await.unwrap();
    }
    let report = verify(&app.pool, &Executors).await.unwrap();
    assert_eq!(
        report.differences,
        vec![
            difference(
                "read_executors",
                "executor_id",
                "host-1",
                DifferenceKind::Differs(vec![column("state", json!("lost"), json!("draining"))]),
            ),
            difference(
                "read_gpus",
                "gpu_uuid",
                "host-0-gpu1",
                DifferenceKind::MissingInLive
            ),
            difference(
                "read_gpus",
                "gpu_uuid",
                "host-2-gpu1",
                DifferenceKind::Differs(vec![column("memory_mb", json!(1), json!(81559))]),
            ),
            difference(
                "read_gpus",
                "gpu_uuid",
                "host-9-gpu0",
                DifferenceKind::ExtraInLive
            ),
        ],
        "{report}"
    );
    assert_eq!(report.tables, vec![("read_executors", 3), ("read_gpus", 7)]);
    let printed = report.to_string();
    for line in [
        "executors projection verified at",
        "4 differences",
        "read_executors executor_id=host-1: state live=\"lost\" rebuilt=\"draining\"",
        "read_gpus gpu_uuid=host-0-gpu1: missing in live (the events produce it)",
        "read_gpus gpu_uuid=host-2-gpu1: memory_mb live=1 rebuilt=81559",
        "read_gpus gpu_uuid=host-9-gpu0: extra in live (the events do not produce it)",
    ] {
        assert!(printed.contains(line), "{line:?} not in {printed}");
    }

    // Corrupt the usage: two columns of a finished run, a deleted job, an invented GPU model;
    // and a column added after this code was written, wrong in one row.
    let (succeeded_job, succeeded_run) = &lives[2];
    let (deleted_job, _) = &lives[4];
    let (_, probed_run) = &lives[1];
    let ended = app.at(succeeded_job, "RunSucceeded", 0).await;
    for sql in [
        format!(
            "UPDATE read_usage_runs SET gpu_count = 7, ended_at = NULL WHERE run_id = '{succeeded_run}'"
        ),
        format!("DELETE FROM read_usage_jobs WHERE job_id = '{deleted_job}'"),
        "INSERT INTO read_usage_gpus VALUES ('GPU-invented', 'NVIDIA A100')".into(),
        "ALTER TABLE read_usage_runs ADD COLUMN audit_probe_note text".into(),
        format!("UPDATE read_usage_runs SET audit_probe_note = 'x' WHERE run_id = '{probed_run}'"),
    ] {
        sqlx::query(&sql).execute(&app.pool).await.unwrap();
    }
    let report = verify(&app.pool, &Usage).await.unwrap();
    let mut runs = vec![
        difference(
            "read_usage_runs",
            "run_id",
            succeeded_run,
            DifferenceKind::Differs(vec![
                column("gpu_count", json!(7), json!(1)),
                column("ended_at", Value::Null, ended.clone()),
            ]),
        ),
        difference(
            "read_usage_runs",
            "run_id",
            probed_run,
            DifferenceKind::Differs(vec![column("audit_probe_note", json!("x"), Value::Null)]),
        ),
    ];
    runs.sort_by_key(|d| d.uuid());
    let mut expected = vec![
        difference(
            "read_usage_jobs",
            "job_id",
            deleted_job,
            DifferenceKind::MissingInLive,
        ),
        difference(
            "read_usage_gpus",
            "gpu_uuid",
            "GPU-invented",
            DifferenceKind::ExtraInLive,
        ),
    ];
    expected.extend(runs);
    assert_eq!(report.differences, expected, "{report}");
    let printed = report.to_string();
    for line in [
        format!("read_usage_jobs job_id={deleted_job}: missing in live"),
        "read_usage_gpus gpu_uuid=GPU-invented: extra in live".to_string(),
        format!(
            "read_usage_runs run_id={succeeded_run}: gpu_count live=7 rebuilt=1, ended_at \
             live=null rebuilt={ended}"
        ),
        format!("read_usage_runs run_id={probed_run}: audit_probe_note live=\"x\" rebuilt=null"),
    ] {
        assert!(printed.contains(&line), "{line:?} not in {printed}");
    }

    // The binary: each projection on its own, and all of them.
    let (success, stdout, stderr) = binary(&app, &["verify", "executors"]).await;
    assert!(!success, "verify must fail on drift: {stdout}");
    assert!(stdout.contains("4 differences"), "{stdout}");
    assert!(
        stdout.contains("read_gpus gpu_uuid=host-9-gpu0: extra in live"),
        "{stdout}"
    );
    assert!(!stdout.contains("usage projection"), "{stdout}");
    assert!(stderr.contains("executors: 4 differences"), "{stderr}");
    let (success, stdout, _) = binary(&app, &["verify", "jobs"]).await;
    assert!(success, "{stdout}");
    let (success, stdout, stderr) = binary(&app, &["verify", "all"]).await;
    assert!(!success, "{stdout}");
    assert!(
        stdout.contains("audit_probe_note live=\"x\" rebuilt=null"),
        "{stdout}"
    );
    assert!(
        stderr.contains("executors: 4 differences; usage: 4 differences"),
        "{stderr}"
    );
    let (success, _, stderr) = binary(&app, &["verify", "leaderboard"]).await;
    assert!(!success);
    assert!(
        stderr.contains(
            "unknown projection \"leaderboard\"; the projections are: jobs, executors, usage"
        ),
        "{stderr}"
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'verify_%'"
        )
        .await,
        0
    );

    // `rebuild` puts the events' rows back (the added column comes along, empty).
    let (success, stdout, stderr) = binary(&app, &["rebuild", "usage"]).await;
    assert!(success, "{stdout}{stderr}");
    assert!(
        stdout.contains("rebuilt and swapped in the usage projection"),
        "{stdout}"
    );
    let summary = rebuild(&app.pool, &Executors, &RebuildOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (
            summary.rows_of("read_executors"),
            summary.rows_of("read_gpus")
        ),
        (3, 6)
    );
    let report = verify(&app.pool, &Executors).await.unwrap();
    assert!(report.is_clean(), "{report}");
    let report = verify(&app.pool, &Usage).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.compared("read_usage_jobs"), 11);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM read_usage_runs WHERE audit_probe_note IS NOT NULL"
        )
        .await,
        0
    );
    // The runners go on from the swapped-in checkpoints without applying anything twice.
    life(&app, 11).await;
    app.wait_relayed().await;
    drain(&mut executors).await.unwrap();
    drain(&mut usage).await.unwrap();
    for projection in ["executors", "usage"] {
        let live = checkpoint(&app, "public", projection).await;
        assert_eq!(live["stream_sequence"], app.event_count().await, "{live}");
        assert_eq!(live["last_error"], Value::Null);
    }
    assert!(verify(&app.pool, &Executors).await.unwrap().is_clean());
    assert!(verify(&app.pool, &Usage).await.unwrap().is_clean());
}

/// The indexes of `tables` in `public`: `table.index`, sorted.
async fn index_names(app: &TestApp, tables: &[&str]) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT tablename || '.' || indexname FROM pg_indexes
          WHERE schemaname = 'public' AND tablename = ANY($1)
          ORDER BY 1",
    )
    .bind(tables)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// `rebuild` of the executors and of the usage projection at once, while their live runners
/// keep running and commands keep arriving: every read of their tables succeeds, both swaps
/// land, the runners go on after them, and the swapped-in tables (and checkpoints) equal a
/// fresh rebuild made afterwards: nothing applied twice, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilds_of_executors_and_usage_swap_in_while_runners_and_commands_keep_going() {
    let app = spawn_app().await;
    history(&app, 0..40).await;
    app.wait_relayed().await;
    let before = u64::try_from(app.event_count().await).unwrap();
    let projections = [
        AnyProjection::Executors(Executors),
        AnyProjection::Usage(Usage),
    ];
    let tables: Vec<&str> = projections
        .iter()
        .flat_map(|p| p.tables().iter().map(|t| t.name))
        .collect();
    assert_eq!(tables.len(), 5);
    let indexes_before = index_names(&app, &tables).await;

    // One rebuild of a projection at a time; another projection's is not held up.
    let mut other = app.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(Executors.rebuild_lock())
        .execute(&mut *other)
        .await
        .unwrap();
    let busy = rebuild(&app.pool, &Executors, &RebuildOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(busy, RebuildError::Busy("executors")), "{busy}");
    assert_eq!(
        busy.to_string(),
        "another rebuild of the executors projection is running"
    );
    other.close().await.unwrap();

    let executors_runner = tokio::spawn(app.executors_projection().await.run());
    let usage_runner = tokio::spawn(app.usage_projection().await.run());
    let jobs_runner = tokio::spawn(app.projection().await.run());

    let done = AtomicBool::new(false);
    // Set once the first command of the stream below committed (its events are new).
    let flowing = AtomicBool::new(false);
    let options = RebuildOptions {
        // Small batches and a strict "close": many transactions, several catch-up rounds.
        batch_size: 5,
        close_enough: 2,
        max_rounds: 30,
        progress_every: Duration::from_millis(50),
        ..RebuildOptions::default()
    };
    let rebuilding = async {
        while !flowing.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let summaries = tokio::join!(
            rebuild(&app.pool, &Executors, &options),
            rebuild(&app.pool, &Usage, &options)
        );
        done.store(true, Ordering::SeqCst);
        summaries
    };
    let commanding = async {
        let mut n = 100;
        while !done.load(Ordering::SeqCst) {
            life(&app, n).await;
            flowing.store(true, Ordering::SeqCst);
            if n % 3 == 0 {
                app.post("/executors/host-0/heartbeat", &json!({})).await;
            }
            n += 1;
        }
        n - 100
    };
    let reading = async {
        let mut reads = 0_u64;
        while !done.load(Ordering::SeqCst) {
            for table in &tables {
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
    let ((executors, usage), commands, reads) = tokio::join!(rebuilding, commanding, reading);
    // On failure, the event log in commit order says what the rebuild read.
    if executors.is_err() || usage.is_err() {
        let events: Vec<(String, i64, String, i64, String)> = sqlx::query_as(
            "SELECT tx_id::text, global_position, aggregate_id, sequence, event_type
               FROM events ORDER BY events.tx_id, events.global_position",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        panic!("executors: {executors:?}\nusage: {usage:?}\nevents: {events:#?}");
    }
    let executors = executors.unwrap();
    let usage = usage.unwrap();
    println!("{executors}\n{usage}\n{commands} commands and {reads} reads meanwhile");
    assert!(
        commands > 0 && reads > 0,
        "{commands} commands, {reads} reads"
    );
    for summary in [&executors, &usage] {
        assert!(summary.catch_up_rounds >= 1, "{summary}");
        // Events that arrived after the test's history (and while it built) are in it too.
        assert!(
            summary.events_read > before,
            "{before} events before: {summary}"
        );
    }
    assert_eq!(executors.projection, "executors");
    assert_eq!(usage.projection, "usage");
    assert_eq!(executors.rows_of("read_executors"), 2);
    assert!(usage.rows_of("read_usage_runs") > 40, "{usage}");

    // New events land after the swaps.
    let (late_job, late_run) = life(&app, 1002).await;
    wait_caught_up(&app, &["executors", "usage"]).await;
    let held: Value =
        sqlx::query_scalar("SELECT to_jsonb(g) FROM read_gpus g WHERE gpu_uuid = 'host-0-gpu0'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    // 1002 % 5 == 2: succeeded, so the GPU it ran on was released at its end.
    assert_eq!(held["held_by_run"], Value::Null, "{held}");
    assert_eq!(
        held["updated_at"],
        app.at(&late_job, "RunSucceeded", 0).await
    );
    let late: Value =
        sqlx::query_scalar("SELECT to_jsonb(r) FROM read_usage_runs r WHERE run_id = $1::uuid")
            .bind(&late_run)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(late["ended_at"], app.at(&late_job, "RunSucceeded", 0).await);
    jobs_runner.abort();
    executors_runner.abort();
    usage_runner.abort();

    // Equal to a fresh rebuild, row for row, checkpoint for checkpoint.
    for projection in &projections {
        let fresh = format!("fresh_{}", projection.name());
        let fresh = fresh.as_str();
        let built = rebuild_projection_into(&app.pool, projection, fresh)
            .await
            .unwrap();
        for table in projection.tables().iter().map(|t| t.name) {
            let diff = differences(&app.pool, "public", fresh, table).await;
            assert!(diff.is_empty(), "{table} differs from a rebuild: {diff:#?}");
            let rows = app.rows("public", table).await.len();
            assert!(rows > 0, "{table} is empty");
            assert_eq!(rows, app.rows(fresh, table).await.len(), "{table}");
        }
        let live = checkpoint(&app, "public", projection.name()).await;
        let rebuilt = checkpoint(&app, fresh, projection.name()).await;
        assert_eq!(
            live["events_applied"], rebuilt["events_applied"],
            "{live} {rebuilt}"
        );
        assert_eq!(
            rebuilt["events_applied"],
            i64::try_from(built.applied).unwrap()
        );
        assert_eq!(
            (&live["tx_id"], &live["position"]),
            (&rebuilt["tx_id"], &rebuilt["position"])
        );
        assert_eq!(live["last_error"], Value::Null);
    }
    // One usage row per assigned run: none counted twice.
    assert_eq!(
        count(&app, "SELECT count(*) FROM read_usage_runs").await,
        count(
            &app,
            "SELECT count(*) FROM events WHERE event_type = 'RunAssigned'"
        )
        .await
    );
    assert!(verify(&app.pool, &Executors).await.unwrap().is_clean());
    assert!(verify(&app.pool, &Usage).await.unwrap().is_clean());
    assert!(verify(&app.pool, &Jobs).await.unwrap().is_clean());

    // The schema afterwards is the migrations' (index names included), nothing left over.
    assert_eq!(index_names(&app, &tables).await, indexes_before);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM pg_namespace WHERE nspname IN ('rebuild_executors', 'rebuild_usage')"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'read_%_old'"
        )
        .await,
        0
    );
}
