//! `export` against the real command service, relay, Postgres and nats-server: the files are
//! read back (Parquet's own reader, the csv crate) and compared with the event store and the
//! usage read model, row for row.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use chrono::{DateTime, NaiveDate, SecondsFormat, TimeDelta, Utc};
use overfly_projector::export::{ExportError, ExportOptions, Format, export};
use parquet::basic::LogicalType;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::{Value, json};

use crate::helpers::{self, TestApp, drain, spawn_app};

/// A file read back: column names, and rows as JSON (JSON columns parsed, timestamps as RFC
/// 3339 with microseconds and `Z`, days as `YYYY-MM-DD`), plus each row as the strings a CSV
/// export writes.
struct Table {
    names: Vec<String>,
    rows: Vec<BTreeMap<String, Value>>,
    strings: Vec<Vec<String>>,
}

fn micros(at: i64) -> String {
    DateTime::from_timestamp_micros(at)
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn read_parquet(path: &Path) -> Table {
    let reader = SerializedFileReader::new(File::open(path).unwrap()).unwrap();
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let names: Vec<String> = schema
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let json: Vec<bool> = schema
        .columns()
        .iter()
        .map(|c| c.logical_type_ref() == Some(&LogicalType::Json))
        .collect();
    let mut rows = Vec::new();
    let mut strings = Vec::new();
    for row in reader.get_row_iter(None).unwrap() {
        let mut object = BTreeMap::new();
        let mut texts = Vec::new();
        for (i, (name, field)) in row.unwrap().into_columns().into_iter().enumerate() {
            let (value, text) = match field {
                Field::Null => (Value::Null, String::new()),
                Field::Long(v) => (json!(v), v.to_string()),
                Field::Double(v) => (json!(v), v.to_string()),
                Field::Bool(v) => (json!(v), v.to_string()),
                Field::Str(v) if json[i] => (serde_json::from_str(&v).unwrap(), v),
                Field::Str(v) => (json!(v), v),
                Field::TimestampMicros(v) => (json!(micros(v)), micros(v)),
                Field::Date(days) => {
                    let day = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()
                        + TimeDelta::days(i64::from(days));
                    let text = day.format("%Y-%m-%d").to_string();
                    (json!(text), text)
                }
                other => panic!("{name}: unexpected {other:?}"),
            };
            object.insert(name, value);
            texts.push(text);
        }
        rows.push(object);
        strings.push(texts);
    }
    Table {
        names,
        rows,
        strings,
    }
}

/// A CSV file: header and rows.
fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut reader = csv::Reader::from_path(path).unwrap();
    let header = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_string)
        .collect();
    let rows = reader
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect();
    (header, rows)
}

const EVENT_COLUMNS: [&str; 16] = [
    "position",
    "tx_id",
    "aggregate_type",
    "aggregate_id",
    "sequence",
    "event_type",
    "event_version",
    "recorded_at",
    "actor",
    "command",
    "command_id",
    "correlation_id",
    "causation_id",
    "trace_id",
    "payload",
    "metadata",
];

type StoreRow = (
    i64,
    i64,
    String,
    String,
    i64,
    String,
    String,
    DateTime<Utc>,
    Value,
    Value,
);

/// Every event of the store in commit order, as the events file should have it.
async fn store_events(app: &TestApp) -> Vec<(DateTime<Utc>, BTreeMap<String, Value>)> {
    let rows: Vec<StoreRow> = sqlx::query_as(
        "SELECT global_position, tx_id::text::bigint, aggregate_type, aggregate_id, sequence,
                event_type, event_version, recorded_at, payload, metadata
           FROM events ORDER BY events.tx_id, events.global_position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(
            |(position, tx, at_type, at_id, seq, ty, ver, at, payload, metadata)| {
                let meta = |key: &str| metadata.get(key).cloned().unwrap_or(Value::Null);
                let trace_id = metadata
                    .get("traceparent")
                    .and_then(Value::as_str)
                    .and_then(|t| t.split('-').nth(1))
                    .map_or(Value::Null, |t| json!(t));
                let row = BTreeMap::from([
                    ("position".to_string(), json!(position)),
                    ("tx_id".to_string(), json!(tx)),
                    ("aggregate_type".to_string(), json!(at_type)),
                    ("aggregate_id".to_string(), json!(at_id)),
                    ("sequence".to_string(), json!(seq)),
                    ("event_type".to_string(), json!(ty)),
                    ("event_version".to_string(), json!(ver)),
                    (
                        "recorded_at".to_string(),
                        json!(at.to_rfc3339_opts(SecondsFormat::Micros, true)),
                    ),
                    ("actor".to_string(), meta("actor")),
                    ("command".to_string(), meta("command")),
                    ("command_id".to_string(), meta("command_id")),
                    ("correlation_id".to_string(), meta("correlation_id")),
                    ("causation_id".to_string(), meta("causation_id")),
                    ("trace_id".to_string(), trace_id),
                    ("payload".to_string(), payload),
                    ("metadata".to_string(), metadata),
                ]);
                (at, row)
            },
        )
        .collect()
}

/// A usage run as the file should have it, but `gpu_seconds`: `to_jsonb` of the row with
/// timestamps in the file's form. Also its start and end.
type UsageRun = (
    BTreeMap<String, Value>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    i64,
);

async fn store_runs(app: &TestApp) -> Vec<UsageRun> {
    type Stored = (Value, Option<DateTime<Utc>>, Option<DateTime<Utc>>, i32);
    let rows: Vec<Stored> = sqlx::query_as(
        "SELECT to_jsonb(r), started_at, ended_at, gpu_count FROM read_usage_runs r
          ORDER BY run_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(row, started, ended, gpus)| {
            let Value::Object(row) = row else {
                panic!("{row}")
            };
            let row = row
                .into_iter()
                .map(|(key, value)| {
                    let value = match value.as_str().map(DateTime::parse_from_rfc3339) {
                        Some(Ok(at)) => json!(
                            at.with_timezone(&Utc)
                                .to_rfc3339_opts(SecondsFormat::Micros, true)
                        ),
                        _ => value,
                    };
                    (key, value)
                })
                .collect();
            (row, started, ended, i64::from(gpus))
        })
        .collect()
}

fn seconds(delta: TimeDelta) -> f64 {
    delta.num_microseconds().unwrap() as f64 / 1e6
}

/// GPU-seconds of a run inside `[from, to)`, running runs ending at `now`.
fn clipped(
    run: &UsageRun,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> f64 {
    let (_, Some(started), ended, gpus) = run else {
        return 0.0;
    };
    let lo = from.map_or(*started, |from| from.max(*started));
    let end = ended.unwrap_or(now);
    let hi = to.map_or(end, |to| to.min(end));
    (*gpus as f64) * seconds(hi - lo).max(0.0)
}

/// Account, user and GPU model of a run or day row.
fn group(row: &BTreeMap<String, Value>) -> String {
    format!(
        "{} {} {}",
        row["account"], row["submitted_by"], row["gpu_model"]
    )
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(1.0)
}

/// An executor with two H100s; a job that ran and succeeded on both, one still running, one
/// assigned but never started, one cancelled while queued; one command with correlation and
/// causation ids. The usage projection is caught up.
async fn history(app: &TestApp) -> (String, String) {
    let mut usage = app.usage_projection().await;
    let gpu = |index: u32| {
        json!({"uuid": format!("host-a-gpu{index}"), "index": index, "name": "NVIDIA H100 80GB HBM3",
               "memory_mb": 81559, "compute_capability": "9.0"})
    };
    app.post(
        "/executors",
        &json!({"executor_id": "host-a", "hostname": "host-a.example", "lease_s": 30,
                "gpus": [gpu(0), gpu(1)]}),
    )
    .await;
    let executor = json!({"executor_id": "host-a"});
    let mut body = helpers::job_body(0);
    body["gpus"] = json!(2);
    let response = app
        .http
        .post(app.url("/jobs"))
        .header("X-Correlation-Id", "export-correlation")
        .header("X-Causation-Id", "export-causation")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let done: Value = response.json().await.unwrap();
    let done = done["id"].as_str().unwrap().to_string();
    let run = app
        .assign(&done, "host-a", &["host-a-gpu0", "host-a-gpu1"])
        .await;
    app.report(&done, &run, "started", executor.clone()).await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    app.report(&done, &run, "succeeded", executor.clone()).await;
    let mut body = helpers::job_body(1);
    body["gpus"] = json!(1);
    let running = app.submit(&body).await;
    let run = app.assign(&running, "host-a", &["host-a-gpu0"]).await;
    app.report(&running, &run, "started", executor.clone())
        .await;
    let mut body = helpers::job_body(2);
    body["gpus"] = json!(1);
    let waiting = app.submit(&body).await;
    app.assign(&waiting, "gpu-host-9", &["GPU-y"]).await;
    let cancelled = app.submit(&helpers::job_body(3)).await;
    app.post(
        &format!("/jobs/{cancelled}/cancel"),
        &json!({"by": "bo", "reason": "not needed"}),
    )
    .await;
    app.wait_relayed().await;
    drain(&mut usage).await.unwrap();
    (done, running)
}

#[tokio::test]
async fn export_writes_the_store_and_the_usage_exactly() {
    let app = spawn_app().await;
    let (done, _running) = history(&app).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("all");
    let summary = export(&app.pool, &ExportOptions::new(&out)).await.unwrap();
    let now = summary.now;

    // Events: every one, in commit order, each column as stored.
    let store = store_events(&app).await;
    let events = read_parquet(&out.join("events.parquet"));
    assert_eq!(events.names, EVENT_COLUMNS);
    assert_eq!(events.rows.len(), store.len());
    assert_eq!(summary.events.rows, store.len() as u64);
    assert_eq!(summary.events.path, out.join("events.parquet"));
    assert_eq!(
        summary.events.bytes,
        std::fs::metadata(out.join("events.parquet")).unwrap().len()
    );
    for (i, (row, (_, expected))) in events.rows.iter().zip(&store).enumerate() {
        assert_eq!(row, expected, "event {i} in commit order");
    }
    // The who/why columns are really filled from the metadata.
    let submitted = events
        .rows
        .iter()
        .find(|r| r["aggregate_id"] == done.as_str() && r["event_type"] == "JobSubmitted")
        .unwrap();
    assert_eq!(submitted["correlation_id"], "export-correlation");
    assert_eq!(submitted["causation_id"], "export-causation");
    assert_eq!(submitted["command"], "SubmitJob");
    assert_eq!(submitted["payload"]["JobSubmitted"]["spec"]["gpus"], 2);
    assert!(events.rows.iter().all(|r| r["actor"].is_string()));

    // Usage runs: every column of read_usage_runs, then gpu_seconds up to the export's now.
    let runs = store_runs(&app).await;
    assert_eq!(runs.len(), 3);
    let usage = read_parquet(&out.join("usage_runs.parquet"));
    let mut columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns
          WHERE table_schema = 'public' AND table_name = 'read_usage_runs'
          ORDER BY ordinal_position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    columns.push("gpu_seconds".into());
    assert_eq!(usage.names, columns);
    assert_eq!(usage.rows.len(), runs.len());
    assert_eq!(summary.usage_runs.rows, runs.len() as u64);
    let mut total = 0.0;
    let mut by_group: BTreeMap<String, f64> = BTreeMap::new();
    for (row, run) in usage.rows.iter().zip(&runs) {
        let mut row = row.clone();
        let gpu_seconds = row.remove("gpu_seconds").unwrap().as_f64().unwrap();
        assert_eq!(row, run.0);
        let expected = clipped(run, None, None, now);
        assert!(close(gpu_seconds, expected), "{gpu_seconds} != {expected}");
        total += expected;
        *by_group.entry(group(&run.0)).or_default() += expected;
    }
    // The succeeded run (2 GPUs) and the running one count; the unstarted one is 0.
    let positive = usage
        .rows
        .iter()
        .filter(|r| r["gpu_seconds"].as_f64().unwrap() > 0.0)
        .count();
    assert_eq!(positive, 2);

    // Daily: the same GPU-seconds per account, user and model, on the days the runs ran.
    let daily = read_parquet(&out.join("usage_daily.parquet"));
    assert_eq!(
        daily.names,
        [
            "day",
            "account",
            "submitted_by",
            "gpu_model",
            "gpu_seconds",
            "runs"
        ]
    );
    assert!(!daily.rows.is_empty());
    assert_eq!(summary.usage_daily.rows, daily.rows.len() as u64);
    let mut daily_total = 0.0;
    let mut daily_by_group: BTreeMap<String, f64> = BTreeMap::new();
    let first_day = runs.iter().filter_map(|r| r.1).min().unwrap().date_naive();
    for row in &daily.rows {
        let day: NaiveDate = row["day"].as_str().unwrap().parse().unwrap();
        assert!(first_day <= day && day <= now.date_naive(), "{row:?}");
        let seconds = row["gpu_seconds"].as_f64().unwrap();
        daily_total += seconds;
        *daily_by_group.entry(group(row)).or_default() += seconds;
    }
    assert!(close(daily_total, total), "{daily_total} != {total}");
    by_group.retain(|_, s| *s > 0.0);
    assert_eq!(
        by_group.keys().collect::<Vec<_>>(),
        daily_by_group.keys().collect::<Vec<_>>()
    );
    for (key, seconds) in &by_group {
        assert!(close(daily_by_group[key], *seconds), "{key:?}");
    }

    // A window: events recorded in [from, to), runs that ran in it, days clipped to it.
    let from = store[store.len() / 3].0;
    let to = store[2 * store.len() / 3].0;
    let windowed = dir.path().join("window");
    let summary = export(
        &app.pool,
        &ExportOptions {
            from: Some(from),
            to: Some(to),
            rows_per_batch: 3,
            ..ExportOptions::new(&windowed)
        },
    )
    .await
    .unwrap();
    let expected: Vec<&BTreeMap<String, Value>> = store
        .iter()
        .filter(|(at, _)| from <= *at && *at < to)
        .map(|(_, row)| row)
        .collect();
    assert!(!expected.is_empty() && expected.len() < store.len());
    let events = read_parquet(&windowed.join("events.parquet"));
    assert_eq!(events.rows.iter().collect::<Vec<_>>(), expected);
    let usage = read_parquet(&windowed.join("usage_runs.parquet"));
    let expected: Vec<&UsageRun> = runs
        .iter()
        .filter(|run| {
            run.1
                .is_some_and(|s| s < to && run.2.unwrap_or(summary.now) > from)
        })
        .collect();
    let got: Vec<Value> = usage.rows.iter().map(|r| r["run_id"].clone()).collect();
    let want: Vec<Value> = expected.iter().map(|r| r.0["run_id"].clone()).collect();
    assert_eq!(got, want);
    let daily = read_parquet(&windowed.join("usage_daily.parquet"));
    let daily_total: f64 = daily
        .rows
        .iter()
        .map(|r| r["gpu_seconds"].as_f64().unwrap())
        .sum();
    let total: f64 = runs
        .iter()
        .map(|run| clipped(run, Some(from), Some(to), summary.now))
        .sum();
    assert!(close(daily_total, total), "{daily_total} != {total}");

    // CSV: the same rows as the Parquet files, as text.
    let csv_out = dir.path().join("csv");
    let summary = export(
        &app.pool,
        &ExportOptions {
            format: Format::Csv,
            ..ExportOptions::new(&csv_out)
        },
    )
    .await
    .unwrap();
    assert_eq!(summary.events.path, csv_out.join("events.csv"));
    let parquet = read_parquet(&out.join("events.parquet"));
    let (header, rows) = read_csv(&csv_out.join("events.csv"));
    assert_eq!(header, parquet.names);
    assert_eq!(rows, parquet.strings);
    // Usage: the same, but for the GPU-seconds of the running run (a later now).
    let parquet = read_parquet(&out.join("usage_runs.parquet"));
    let (header, rows) = read_csv(&csv_out.join("usage_runs.csv"));
    assert_eq!(header, parquet.names);
    let last = header.len() - 1;
    let strip = |rows: &[Vec<String>]| -> Vec<Vec<String>> {
        rows.iter().map(|r| r[..last].to_vec()).collect()
    };
    assert_eq!(strip(&rows), strip(&parquet.strings));
    let parquet = read_parquet(&out.join("usage_daily.parquet"));
    let (header, rows) = read_csv(&csv_out.join("usage_daily.csv"));
    assert_eq!(header, parquet.names);
    assert_eq!(rows.len(), parquet.strings.len());
    for (csv_row, parquet_row) in rows.iter().zip(&parquet.strings) {
        assert_eq!(csv_row[..4], parquet_row[..4]);
        assert_eq!(csv_row[5], parquet_row[5]);
    }
    // No partial files are left behind.
    for dir in [&out, &windowed, &csv_out] {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }
}

/// Runs spanning UTC midnights are split per day and clipped to the window; a running run
/// counts up to the export's now; a column a migration adds to `read_usage_runs` is exported.
#[tokio::test]
async fn daily_usage_is_split_at_utc_midnights_and_clipped_to_the_window() {
    let app = spawn_app().await;
    // Usage rows straight into the read model: the API's clock cannot make runs days long.
    sqlx::query(
        "INSERT INTO read_usage_runs (run_id, job_id, account, submitted_by, executor_id,
                                      gpu_count, gpu_uuids, gpu_model, started_at, ended_at)
         VALUES ('00000000-0000-0000-0000-00000000000a', gen_random_uuid(), 'acme', 'bo', 'h1',
                 2, '{g0,g1}', 'H100', '2026-01-01T12:00:00Z', '2026-01-03T06:00:00Z'),
                ('00000000-0000-0000-0000-00000000000b', gen_random_uuid(), 'acme', 'cy', 'h2',
                 1, '{g9}', NULL, '2026-01-02T23:00:00Z', '2026-01-03T01:00:00Z'),
                ('00000000-0000-0000-0000-00000000000c', gen_random_uuid(), 'acme', 'cy', 'h2',
                 1, '{g8}', NULL, NULL, NULL),
                ('00000000-0000-0000-0000-00000000000d', gen_random_uuid(), 'zeta', 'di', 'h3',
                 4, '{g1,g2,g3,g4}', 'A100', now() - interval '36 hours', NULL)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    // The column the telemetry work adds (if its migration has not already).
    sqlx::query(
        "ALTER TABLE read_usage_runs ADD COLUMN IF NOT EXISTS gpu_seconds_busy double precision",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE read_usage_runs SET gpu_seconds_busy = 1234.5
          WHERE run_id = '00000000-0000-0000-0000-00000000000a'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let running_since: DateTime<Utc> = sqlx::query_scalar(
        "SELECT started_at FROM read_usage_runs WHERE run_id = '00000000-0000-0000-0000-00000000000d'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let summary = export(&app.pool, &ExportOptions::new(dir.path()))
        .await
        .unwrap();
    let running = seconds(summary.now - running_since) * 4.0;
    let daily = read_parquet(&dir.path().join("usage_daily.parquet"));
    let fixed: Vec<Vec<String>> = daily
        .strings
        .iter()
        .filter(|r| r[1] == "acme")
        .cloned()
        .collect();
    let row = |cells: [&str; 6]| cells.map(str::to_string).to_vec();
    assert_eq!(
        fixed,
        [
            row(["2026-01-01", "acme", "bo", "H100", "86400", "1"]),
            row(["2026-01-02", "acme", "bo", "H100", "172800", "1"]),
            row(["2026-01-02", "acme", "cy", "", "3600", "1"]),
            row(["2026-01-03", "acme", "bo", "H100", "43200", "1"]),
            row(["2026-01-03", "acme", "cy", "", "3600", "1"]),
        ]
    );
    let zeta: Vec<&BTreeMap<String, Value>> = daily
        .rows
        .iter()
        .filter(|r| r["account"] == "zeta")
        .collect();
    // 36 hours span two or three UTC days.
    assert!((2..=3).contains(&zeta.len()), "{zeta:?}");
    let zeta_total: f64 = zeta
        .iter()
        .map(|r| r["gpu_seconds"].as_f64().unwrap())
        .sum();
    assert!(close(zeta_total, running), "{zeta_total} != {running}");
    assert!(close(running, 36.0 * 3600.0 * 4.0) || running > 36.0 * 3600.0 * 4.0);

    let usage = read_parquet(&dir.path().join("usage_runs.parquet"));
    assert_eq!(usage.rows.len(), 4);
    assert!(usage.names.contains(&"gpu_seconds_busy".to_string()));
    assert_eq!(usage.rows[0]["gpu_seconds_busy"], json!(1234.5));
    assert_eq!(usage.rows[1]["gpu_seconds_busy"], Value::Null);
    assert_eq!(usage.rows[0]["gpu_uuids"], json!(["g0", "g1"]));
    assert_eq!(usage.rows[0]["gpu_seconds"], json!(42.0 * 3600.0 * 2.0));
    assert_eq!(usage.rows[1]["gpu_seconds"], json!(7200.0));
    assert_eq!(usage.rows[2]["gpu_seconds"], json!(0.0));
    assert!(close(
        usage.rows[3]["gpu_seconds"].as_f64().unwrap(),
        running
    ));
    assert_eq!(usage.rows[3]["ended_at"], Value::Null);

    // A window, as CSV: days clipped to it; only the runs that ran in it, unclipped.
    let windowed = dir.path().join("window");
    export(
        &app.pool,
        &ExportOptions {
            format: Format::Csv,
            from: Some("2026-01-02T12:00:00Z".parse().unwrap()),
            to: Some("2026-01-03T00:30:00Z".parse().unwrap()),
            ..ExportOptions::new(&windowed)
        },
    )
    .await
    .unwrap();
    let (_, rows) = read_csv(&windowed.join("usage_daily.csv"));
    assert_eq!(
        rows,
        [
            row(["2026-01-02", "acme", "bo", "H100", "86400", "1"]),
            row(["2026-01-02", "acme", "cy", "", "3600", "1"]),
            row(["2026-01-03", "acme", "bo", "H100", "3600", "1"]),
            row(["2026-01-03", "acme", "cy", "", "1800", "1"]),
        ]
    );
    let (header, rows) = read_csv(&windowed.join("usage_runs.csv"));
    let at = |name: &str| header.iter().position(|h| h == name).unwrap();
    let runs: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r[at("run_id")].as_str(),
                r[at("started_at")].as_str(),
                r[at("gpu_seconds")].as_str(),
            )
        })
        .collect();
    assert_eq!(
        runs,
        [
            (
                "00000000-0000-0000-0000-00000000000a",
                "2026-01-01T12:00:00.000000Z",
                "302400"
            ),
            (
                "00000000-0000-0000-0000-00000000000b",
                "2026-01-02T23:00:00.000000Z",
                "7200"
            ),
        ]
    );
    assert_eq!(rows[0][at("gpu_uuids")], r#"["g0", "g1"]"#);
}

/// The binary: `export` writes the files and prints rows and bytes per file; bad arguments
/// and an unwritable directory are clear errors.
#[tokio::test]
async fn the_binary_exports_and_rejects_bad_arguments_clearly() {
    let app = spawn_app().await;
    app.short_life(0, 4).await;
    app.short_life(1, 3).await;
    app.wait_relayed().await;
    let mut usage = app.usage_projection().await;
    drain(&mut usage).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: Vec<String>| {
        let url = app.database_url();
        async move {
            let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_overfly-projector"))
                .arg("export")
                .args(&args)
                .args(["--database-url", &url])
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
    };
    let arg = |p: &Path| p.to_string_lossy().into_owned();

    let out = dir.path().join("csv");
    let (ok, stdout, stderr) = run(vec!["--out".into(), arg(&out), "--format=csv".into()]).await;
    assert!(ok, "{stdout}\n{stderr}");
    let events = app.event_count().await;
    let line = stdout
        .lines()
        .find(|l| l.contains("events.csv"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let bytes = std::fs::metadata(out.join("events.csv")).unwrap().len();
    assert!(line.contains(&format!(" {events} rows")), "{line}");
    assert!(line.contains(&format!(" {bytes} bytes")), "{line}");
    assert!(stdout.contains("usage_runs.csv") && stdout.contains("usage_daily.csv"));
    // The same events as the library's Parquet export.
    let parquet = dir.path().join("parquet");
    export(&app.pool, &ExportOptions::new(&parquet))
        .await
        .unwrap();
    let (_, rows) = read_csv(&out.join("events.csv"));
    assert_eq!(rows, read_parquet(&parquet.join("events.parquet")).strings);
    assert_eq!(rows.len() as i64, events);

    // An --out that cannot be a directory: a regular file is in the way.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let blocked = file.join("out");
    let (ok, _, stderr) = run(vec!["--out".into(), arg(&blocked)]).await;
    assert!(!ok);
    assert!(
        stderr.contains(&format!("cannot write to {}", blocked.display())),
        "{stderr}"
    );
    let error = export(&app.pool, &ExportOptions::new(&file))
        .await
        .unwrap_err();
    assert!(matches!(error, ExportError::Io { .. }), "{error}");
    assert!(
        error
            .to_string()
            .starts_with(&format!("cannot write to {}", file.display())),
        "{error}"
    );

    let (ok, _, stderr) = run(vec![
        "--out".into(),
        arg(&out),
        "--from".into(),
        "2026-11-25".into(),
        "--to".into(),
        "2026-11-24T12:00:00Z".into(),
    ])
    .await;
    assert!(!ok);
    assert!(
        stderr.contains("--from (") && stderr.contains("must be before --to"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(vec![
        "--out".into(),
        arg(&out),
        "--format".into(),
        "xml".into(),
    ])
    .await;
    assert!(!ok);
    assert!(stderr.contains("invalid value 'xml'"), "{stderr}");
    let (ok, _, stderr) = run(vec![
        "--out".into(),
        arg(&out),
        "--from".into(),
        "yesterday".into(),
    ])
    .await;
    assert!(!ok);
    assert!(stderr.contains("neither an RFC 3339 time"), "{stderr}");
    let (ok, _, stderr) = run(vec![]).await;
    assert!(!ok);
    assert!(stderr.contains("--out <DIR>"), "{stderr}");
}
