//! Exports for analytics (`overfly-projector export`): the event store and the GPU usage
//! projection as Parquet (or CSV) files that DuckDB, pandas or Spark read as they are.
//!
//! Three files, written into one directory:
//! - `events.parquet`: every event of the Postgres event store in commit order (`tx_id`,
//!   `global_position`: the order the relay publishes in), read in keyset-paginated batches so
//!   memory stays bounded whatever the store's size. Who/why columns come out of the metadata
//!   the command service writes (`actor`, `command`, `command_id`, `correlation_id`,
//!   `causation_id`, and the trace id of `traceparent`); payload and metadata are JSON text.
//! - `usage_runs.parquet`: every column of `read_usage_runs` (read from `information_schema`,
//!   so a column a migration adds is exported too; arrays become JSON text), plus
//!   `gpu_seconds`: GPU count × (end, or now for a running run, − start).
//! - `usage_daily.parquet`: GPU-seconds per UTC day, account, user and GPU model, with each run
//!   clipped to each day (and to the window), a running run counting up to now; computed in SQL.
//!
//! Everything is read in one read-only `REPEATABLE READ` transaction, so the three files show
//! the same instant (`now()` of that transaction is the "now" running runs count up to), and
//! only events of transactions older than every one still in flight are exported (as the relay
//! reads): the events file is always a prefix of the commit order.
//!
//! Timestamps are UTC microseconds (`TIMESTAMP(MICROS, UTC)` in Parquet, RFC 3339 with
//! microseconds and `Z` in CSV); days are `DATE`; an empty CSV field is NULL. Each file is
//! written beside its final name and renamed into place only once complete.

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveTime, SecondsFormat, Utc};
use futures::TryStreamExt;
use parquet::basic::{Compression, LogicalType, Repetition, TimeUnit, Type as PhysicalType};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use crate::rebuild::Cursor;

/// Rows read from Postgres per query (events and usage runs are keyset-paginated).
pub const BATCH: i64 = 5000;

/// At most this many rows per Parquet row group (buffered in memory until written) …
const ROW_GROUP_ROWS: usize = 100_000;
/// … and at most about this many bytes of values.
const ROW_GROUP_BYTES: usize = 64 << 20;

/// The file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Apache Parquet, Snappy-compressed, with logical types (string, JSON, timestamp, date).
    #[default]
    Parquet,
    /// CSV with a header row (RFC 4180 quoting); an empty field is NULL.
    Csv,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Self::Parquet => "parquet",
            Self::Csv => "csv",
        }
    }
}

/// What to export, where (the `export` subcommand's arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct ExportOptions {
    /// Directory to write the files into (created if missing; files in it are replaced).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// File format.
    #[arg(long, value_enum, default_value_t = Format::Parquet)]
    pub format: Format,
    /// Only events recorded at or after T, and usage of runs still running at T
    /// (RFC 3339, e.g. 2026-11-24T00:00:00Z, or a UTC day, 2026-11-24).
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub from: Option<DateTime<Utc>>,
    /// Only events recorded before T, and usage of runs started before T (same forms).
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub to: Option<DateTime<Utc>>,
    /// Rows read from Postgres per query.
    #[arg(long, default_value_t = BATCH)]
    pub rows_per_batch: i64,
}

impl ExportOptions {
    /// Everything, as Parquet, into `out`.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            format: Format::Parquet,
            from: None,
            to: None,
            rows_per_batch: BATCH,
        }
    }
}

/// Parses `--from` / `--to`: an RFC 3339 instant, or a day (`YYYY-MM-DD`, midnight UTC).
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_time(NaiveTime::MIN).and_utc());
    }
    Err(format!(
        "{text:?} is neither an RFC 3339 time (2026-11-24T13:00:00Z) nor a day (2026-11-24)"
    ))
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("bad arguments: {0}")]
    BadArguments(String),
    #[error("cannot write to {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {}: {source}", path.display())]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("writing {}: {source}", path.display())]
    Csv { path: PathBuf, source: csv::Error },
    #[error("reading from Postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{file}: column {column} is NULL in a row but is not nullable")]
    UnexpectedNull { file: String, column: String },
}

/// One file written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSummary {
    pub path: PathBuf,
    pub rows: u64,
    pub bytes: u64,
}

/// What an export wrote, and the instant it shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    pub format: Format,
    /// `now()` of the export's transaction: running runs count up to it.
    pub now: DateTime<Utc>,
    /// Events of transactions from this one on were still in flight (not exported).
    pub horizon: u64,
    pub events: FileSummary,
    pub usage_runs: FileSummary,
    pub usage_daily: FileSummary,
}

impl ExportSummary {
    pub fn files(&self) -> [&FileSummary; 3] {
        [&self.events, &self.usage_runs, &self.usage_daily]
    }
}

impl fmt::Display for ExportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "exported ({}) as of {} (events of transactions before {}):",
            self.format.extension(),
            self.now.to_rfc3339_opts(SecondsFormat::Micros, true),
            self.horizon,
        )?;
        for file in self.files() {
            writeln!(
                f,
                "  {:<40} {:>10} rows {:>14} bytes",
                file.path.display(),
                file.rows,
                file.bytes
            )?;
        }
        Ok(())
    }
}

/// What a column holds; the SQL expression selecting it must give the matching Postgres type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `bigint`.
    Int64,
    /// `double precision`.
    Float64,
    /// `boolean`.
    Bool,
    /// `text`.
    Text,
    /// `text` holding a JSON document.
    Json,
    /// `timestamptz`, written as UTC microseconds.
    Timestamp,
    /// `date`.
    Date,
}

/// A column of an exported file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub kind: Kind,
    pub nullable: bool,
    /// The SQL expression selecting it.
    sql: String,
}

impl Column {
    fn new(name: &str, kind: Kind, nullable: bool, sql: impl Into<String>) -> Self {
        Self {
            name: name.to_string(),
            kind,
            nullable,
            sql: sql.into(),
        }
    }
}

/// One value of a row.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    Timestamp(DateTime<Utc>),
    Date(NaiveDate),
}

fn cells(row: &PgRow, columns: &[Column]) -> Result<Vec<Cell>, sqlx::Error> {
    columns
        .iter()
        .enumerate()
        .map(|(i, column)| {
            Ok(match column.kind {
                Kind::Int64 => row.try_get::<Option<i64>, _>(i)?.map(Cell::Int),
                Kind::Float64 => row.try_get::<Option<f64>, _>(i)?.map(Cell::Float),
                Kind::Bool => row.try_get::<Option<bool>, _>(i)?.map(Cell::Bool),
                Kind::Text | Kind::Json => row.try_get::<Option<String>, _>(i)?.map(Cell::Text),
                Kind::Timestamp => row
                    .try_get::<Option<DateTime<Utc>>, _>(i)?
                    .map(Cell::Timestamp),
                Kind::Date => row.try_get::<Option<NaiveDate>, _>(i)?.map(Cell::Date),
            }
            .unwrap_or(Cell::Null))
        })
        .collect()
}

fn select_list(columns: &[Column]) -> String {
    columns
        .iter()
        .map(|c| format!("{} AS \"{}\"", c.sql, c.name.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The columns of `events.parquet`, in file order.
pub fn event_columns() -> Vec<Column> {
    let meta = |name: &str| Column::new(name, Kind::Text, true, format!("metadata->>'{name}'"));
    vec![
        Column::new("position", Kind::Int64, false, "global_position"),
        Column::new("tx_id", Kind::Int64, false, "tx_id::text::bigint"),
        Column::new("aggregate_type", Kind::Text, false, "aggregate_type"),
        Column::new("aggregate_id", Kind::Text, false, "aggregate_id"),
        Column::new("sequence", Kind::Int64, false, "sequence"),
        Column::new("event_type", Kind::Text, false, "event_type"),
        Column::new("event_version", Kind::Text, false, "event_version"),
        Column::new("recorded_at", Kind::Timestamp, false, "recorded_at"),
        meta("actor"),
        meta("command"),
        meta("command_id"),
        meta("correlation_id"),
        meta("causation_id"),
        // W3C traceparent: version-traceid-parentid-flags.
        Column::new(
            "trace_id",
            Kind::Text,
            true,
            "NULLIF(split_part(metadata->>'traceparent', '-', 2), '')",
        ),
        Column::new("payload", Kind::Json, false, "payload::text"),
        Column::new("metadata", Kind::Json, false, "metadata::text"),
    ]
}

/// The columns of `usage_runs.parquet`: every column `read_usage_runs` has now (in table
/// order), then `gpu_seconds`.
pub async fn usage_run_columns(conn: &mut PgConnection) -> Result<Vec<Column>, sqlx::Error> {
    let table: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, is_nullable = 'YES'
           FROM information_schema.columns
          WHERE table_schema = current_schema() AND table_name = 'read_usage_runs'
          ORDER BY ordinal_position",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut columns: Vec<Column> = table
        .iter()
        .map(|(name, data_type, nullable)| {
            let quoted = format!("r.\"{}\"", name.replace('"', "\"\""));
            let (kind, sql) = match data_type.as_str() {
                "smallint" | "integer" | "bigint" => (Kind::Int64, format!("{quoted}::bigint")),
                "real" | "double precision" | "numeric" => {
                    (Kind::Float64, format!("{quoted}::float8"))
                }
                "boolean" => (Kind::Bool, quoted),
                "timestamp with time zone" => (Kind::Timestamp, quoted),
                "timestamp without time zone" => {
                    (Kind::Timestamp, format!("{quoted} AT TIME ZONE 'UTC'"))
                }
                "date" => (Kind::Date, quoted),
                "json" | "jsonb" | "ARRAY" => (Kind::Json, format!("to_jsonb({quoted})::text")),
                _ => (Kind::Text, format!("{quoted}::text")),
            };
            Column::new(name, kind, *nullable, sql)
        })
        .collect();
    if !columns.iter().any(|c| c.name == "gpu_seconds") {
        columns.push(Column::new(
            "gpu_seconds",
            Kind::Float64,
            false,
            // $1 is the export's now; a run that never started allocated nothing.
            "COALESCE(r.gpu_count * GREATEST(0, EXTRACT(EPOCH FROM
                 COALESCE(r.ended_at, $1) - r.started_at)), 0)::float8",
        ));
    }
    Ok(columns)
}

/// The columns of `usage_daily.parquet`.
pub fn usage_daily_columns() -> Vec<Column> {
    vec![
        Column::new("day", Kind::Date, false, "day"),
        Column::new("account", Kind::Text, false, "account"),
        Column::new("submitted_by", Kind::Text, false, "submitted_by"),
        Column::new("gpu_model", Kind::Text, true, "gpu_model"),
        Column::new("gpu_seconds", Kind::Float64, false, "gpu_seconds"),
        Column::new("runs", Kind::Int64, false, "runs"),
    ]
}

/// Exports the event store and the usage projection into `options.out`; see the module docs.
pub async fn export(pool: &PgPool, options: &ExportOptions) -> Result<ExportSummary, ExportError> {
    if let (Some(from), Some(to)) = (options.from, options.to)
        && from >= to
    {
        return Err(ExportError::BadArguments(format!(
            "--from ({from}) must be before --to ({to})"
        )));
    }
    if options.rows_per_batch < 1 {
        return Err(ExportError::BadArguments(format!(
            "--rows-per-batch must be at least 1, got {}",
            options.rows_per_batch
        )));
    }
    let out = &options.out;
    std::fs::create_dir_all(out).map_err(|source| ExportError::Io {
        path: out.clone(),
        source,
    })?;
    if !out.is_dir() {
        return Err(ExportError::Io {
            path: out.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let path = |name: &str| out.join(format!("{name}.{}", options.format.extension()));

    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    // UTC days, whatever the server's TimeZone.
    sqlx::query("SET LOCAL TimeZone = 'UTC'")
        .execute(&mut *tx)
        .await?;
    let (now, horizon): (DateTime<Utc>, String) =
        sqlx::query_as("SELECT now(), pg_snapshot_xmin(pg_current_snapshot())::text")
            .fetch_one(&mut *tx)
            .await?;
    let horizon: u64 = horizon.parse().map_err(|_| {
        sqlx::Error::Protocol(format!("pg_snapshot_xmin gave {horizon:?}, not an xid8"))
    })?;

    let events = export_events(&mut tx, options, &path("events"), horizon).await?;
    let usage_runs = export_usage_runs(&mut tx, options, &path("usage_runs"), now).await?;
    let usage_daily = export_usage_daily(&mut tx, options, &path("usage_daily"), now).await?;
    tx.rollback().await?;
    Ok(ExportSummary {
        format: options.format,
        now,
        horizon,
        events,
        usage_runs,
        usage_daily,
    })
}

async fn export_events(
    conn: &mut PgConnection,
    options: &ExportOptions,
    path: &Path,
    horizon: u64,
) -> Result<FileSummary, ExportError> {
    let columns = event_columns();
    let sql = format!(
        "SELECT {}
           FROM events e
          WHERE (e.tx_id, e.global_position) > ($1::text::xid8, $2)
            AND e.tx_id < $3::text::xid8
            AND ($4::timestamptz IS NULL OR e.recorded_at >= $4)
            AND ($5::timestamptz IS NULL OR e.recorded_at < $5)
          -- Qualified: the output column tx_id (a bigint) would not use the index.
          ORDER BY e.tx_id, e.global_position
          LIMIT $6",
        select_list(&columns)
    );
    let mut sink = Sink::create(path, options.format, &columns)?;
    let mut after = Cursor::ZERO;
    loop {
        let rows = sqlx::query(&sql)
            .bind(after.tx.to_string())
            .bind(after.position)
            .bind(horizon.to_string())
            .bind(options.from)
            .bind(options.to)
            .bind(options.rows_per_batch)
            .fetch_all(&mut *conn)
            .await?;
        let Some(last) = rows.last() else { break };
        let tx: i64 = last.try_get(1)?;
        after = Cursor {
            tx: u64::try_from(tx).unwrap_or_default(),
            position: last.try_get(0)?,
        };
        let full = rows.len() as i64 == options.rows_per_batch;
        for row in &rows {
            sink.write(cells(row, &columns)?)?;
        }
        if !full {
            break;
        }
    }
    sink.finish()
}

async fn export_usage_runs(
    conn: &mut PgConnection,
    options: &ExportOptions,
    path: &Path,
    now: DateTime<Utc>,
) -> Result<FileSummary, ExportError> {
    let columns = usage_run_columns(&mut *conn).await?;
    let Some(key) = columns.iter().position(|c| c.name == "run_id") else {
        return Err(sqlx::Error::ColumnNotFound("read_usage_runs.run_id".into()).into());
    };
    // A window keeps the runs that ran in it (started before its end, ended or still running
    // after its start).
    let sql = format!(
        "SELECT {}
           FROM read_usage_runs r
          WHERE ($2::uuid IS NULL OR r.run_id > $2)
            AND ($3::timestamptz IS NULL
                 OR (r.started_at IS NOT NULL AND COALESCE(r.ended_at, $1) > $3))
            AND ($4::timestamptz IS NULL OR r.started_at < $4)
          ORDER BY r.run_id
          LIMIT $5",
        select_list(&columns)
    );
    let mut sink = Sink::create(path, options.format, &columns)?;
    let mut after: Option<uuid::Uuid> = None;
    loop {
        let rows = sqlx::query(&sql)
            .bind(now)
            .bind(after)
            .bind(options.from)
            .bind(options.to)
            .bind(options.rows_per_batch)
            .fetch_all(&mut *conn)
            .await?;
        let Some(last) = rows.last() else { break };
        let last: String = last.try_get(key)?;
        after = Some(uuid::Uuid::parse_str(&last).map_err(|e| {
            sqlx::Error::Decode(format!("read_usage_runs.run_id {last:?}: {e}").into())
        })?);
        let full = rows.len() as i64 == options.rows_per_batch;
        for row in &rows {
            sink.write(cells(row, &columns)?)?;
        }
        if !full {
            break;
        }
    }
    sink.finish()
}

async fn export_usage_daily(
    conn: &mut PgConnection,
    options: &ExportOptions,
    path: &Path,
    now: DateTime<Utc>,
) -> Result<FileSummary, ExportError> {
    let columns = usage_daily_columns();
    // Each run from max(start, from) to min(end or now, to), split at UTC midnights (the
    // transaction's TimeZone is UTC).
    let sql = format!(
        "WITH runs AS (
             SELECT r.account, r.submitted_by, r.gpu_model, r.gpu_count,
                    GREATEST(r.started_at, COALESCE($2::timestamptz, r.started_at)) AS lo,
                    LEAST(COALESCE(r.ended_at, $1), COALESCE($3::timestamptz, 'infinity')) AS hi
               FROM read_usage_runs r
              WHERE r.started_at IS NOT NULL
         ), days AS (
             SELECT (d AT TIME ZONE 'UTC')::date AS day, account, submitted_by, gpu_model,
                    SUM(gpu_count * EXTRACT(EPOCH FROM
                        LEAST(hi, d + interval '1 day') - GREATEST(lo, d)))::float8 AS gpu_seconds,
                    count(*)::bigint AS runs
               FROM runs
              CROSS JOIN LATERAL generate_series(date_trunc('day', lo), hi, interval '1 day') AS d
              WHERE hi > lo AND d < hi
              GROUP BY 1, 2, 3, 4
         )
         SELECT {} FROM days ORDER BY day, account, submitted_by, gpu_model NULLS LAST",
        select_list(&columns)
    );
    let mut sink = Sink::create(path, options.format, &columns)?;
    let mut rows = sqlx::query(&sql)
        .bind(now)
        .bind(options.from)
        .bind(options.to)
        .fetch(&mut *conn);
    while let Some(row) = rows.try_next().await? {
        sink.write(cells(&row, &columns)?)?;
    }
    drop(rows);
    sink.finish()
}

/// A file being written: beside its final name until [`Sink::finish`] renames it into place.
struct Sink {
    path: PathBuf,
    partial: PathBuf,
    columns: Vec<Column>,
    rows: u64,
    /// `None` once finished.
    writer: Option<Writer>,
}

enum Writer {
    Parquet(ParquetWriter),
    Csv(csv::Writer<BufWriter<File>>),
}

impl Sink {
    fn create(path: &Path, format: Format, columns: &[Column]) -> Result<Self, ExportError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let partial = path.with_file_name(format!(".{name}.partial"));
        let file = File::create(&partial).map_err(|source| ExportError::Io {
            path: partial.clone(),
            source,
        })?;
        let file = BufWriter::with_capacity(1 << 20, file);
        let writer = match format {
            Format::Parquet => {
                Writer::Parquet(ParquetWriter::new(file, columns).map_err(|source| {
                    ExportError::Parquet {
                        path: path.to_path_buf(),
                        source,
                    }
                })?)
            }
            Format::Csv => {
                let mut csv = csv::Writer::from_writer(file);
                csv.write_record(columns.iter().map(|c| c.name.as_str()))
                    .map_err(|source| ExportError::Csv {
                        path: path.to_path_buf(),
                        source,
                    })?;
                Writer::Csv(csv)
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            partial,
            columns: columns.to_vec(),
            rows: 0,
            writer: Some(writer),
        })
    }

    fn write(&mut self, row: Vec<Cell>) -> Result<(), ExportError> {
        for (cell, column) in row.iter().zip(&self.columns) {
            if *cell == Cell::Null && !column.nullable {
                return Err(ExportError::UnexpectedNull {
                    file: self.path.display().to_string(),
                    column: column.name.clone(),
                });
            }
        }
        match self.writer.as_mut().expect("not finished") {
            Writer::Parquet(writer) => {
                writer.push(row);
                if writer.rows >= ROW_GROUP_ROWS || writer.bytes >= ROW_GROUP_BYTES {
                    writer.flush().map_err(|source| ExportError::Parquet {
                        path: self.path.clone(),
                        source,
                    })?;
                }
            }
            Writer::Csv(csv) => {
                csv.write_record(row.iter().map(csv_field))
                    .map_err(|source| ExportError::Csv {
                        path: self.path.clone(),
                        source,
                    })?;
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// Completes the file and renames it into place (an unfinished one is removed).
    fn finish(mut self) -> Result<FileSummary, ExportError> {
        let done = self.complete();
        if done.is_err() {
            let _ = std::fs::remove_file(&self.partial);
        }
        done
    }

    fn complete(&mut self) -> Result<FileSummary, ExportError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ExportError::Io { path, source }
        };
        let file = match self.writer.take().expect("not finished") {
            Writer::Parquet(writer) => writer.close().map_err(|source| ExportError::Parquet {
                path: self.path.clone(),
                source,
            })?,
            Writer::Csv(csv) => csv
                .into_inner()
                .map_err(|e| ExportError::Io {
                    path: self.partial.clone(),
                    source: e.into_error(),
                })?
                .into_inner()
                .map_err(|e| ExportError::Io {
                    path: self.partial.clone(),
                    source: e.into_error(),
                })?,
        };
        file.sync_all().map_err(io(&self.partial))?;
        drop(file);
        std::fs::rename(&self.partial, &self.path).map_err(io(&self.path))?;
        let bytes = std::fs::metadata(&self.path).map_err(io(&self.path))?.len();
        Ok(FileSummary {
            path: self.path.clone(),
            rows: self.rows,
            bytes,
        })
    }
}

impl Drop for Sink {
    /// An unfinished file is removed.
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

fn csv_field(cell: &Cell) -> String {
    match cell {
        Cell::Null => String::new(),
        Cell::Int(v) => v.to_string(),
        Cell::Float(v) => v.to_string(),
        Cell::Bool(v) => v.to_string(),
        Cell::Text(v) => v.clone(),
        Cell::Timestamp(v) => v.to_rfc3339_opts(SecondsFormat::Micros, true),
        Cell::Date(v) => v.format("%Y-%m-%d").to_string(),
    }
}

/// The values of one column buffered for the row group being built.
enum Values {
    Int64(Vec<i64>),
    Int32(Vec<i32>),
    Float64(Vec<f64>),
    Bool(Vec<bool>),
    Bytes(Vec<ByteArray>),
}

struct Buffer {
    values: Values,
    /// Definition levels (1 = present, 0 = NULL); only for nullable columns.
    levels: Option<Vec<i16>>,
}

/// Parquet through the low-level column writers: rows are buffered column by column and
/// written as one row group every [`ROW_GROUP_ROWS`] rows (or [`ROW_GROUP_BYTES`]).
struct ParquetWriter {
    writer: SerializedFileWriter<BufWriter<File>>,
    buffers: Vec<Buffer>,
    rows: usize,
    bytes: usize,
}

const EPOCH_DAY: NaiveDate = NaiveDate::from_ymd_opt(1970, 1, 1).expect("a valid date");

impl ParquetWriter {
    fn new(file: BufWriter<File>, columns: &[Column]) -> parquet::errors::Result<Self> {
        let fields = columns
            .iter()
            .map(|column| {
                let (physical, logical) = match column.kind {
                    Kind::Int64 => (PhysicalType::INT64, None),
                    Kind::Float64 => (PhysicalType::DOUBLE, None),
                    Kind::Bool => (PhysicalType::BOOLEAN, None),
                    Kind::Text => (PhysicalType::BYTE_ARRAY, Some(LogicalType::String)),
                    Kind::Json => (PhysicalType::BYTE_ARRAY, Some(LogicalType::Json)),
                    Kind::Timestamp => (
                        PhysicalType::INT64,
                        Some(LogicalType::timestamp(true, TimeUnit::MICROS)),
                    ),
                    Kind::Date => (PhysicalType::INT32, Some(LogicalType::Date)),
                };
                let repetition = if column.nullable {
                    Repetition::OPTIONAL
                } else {
                    Repetition::REQUIRED
                };
                Type::primitive_type_builder(&column.name, physical)
                    .with_logical_type(logical)
                    .with_repetition(repetition)
                    .build()
                    .map(Arc::new)
            })
            .collect::<parquet::errors::Result<Vec<_>>>()?;
        let schema = Type::group_type_builder("schema")
            .with_fields(fields)
            .build()?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by(format!("overfly-projector {}", env!("CARGO_PKG_VERSION")))
            .build();
        let writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(properties))?;
        let buffers = columns
            .iter()
            .map(|column| Buffer {
                values: match column.kind {
                    Kind::Int64 | Kind::Timestamp => Values::Int64(Vec::new()),
                    Kind::Date => Values::Int32(Vec::new()),
                    Kind::Float64 => Values::Float64(Vec::new()),
                    Kind::Bool => Values::Bool(Vec::new()),
                    Kind::Text | Kind::Json => Values::Bytes(Vec::new()),
                },
                levels: column.nullable.then(Vec::new),
            })
            .collect();
        Ok(Self {
            writer,
            buffers,
            rows: 0,
            bytes: 0,
        })
    }

    /// Buffers one row (its NULLs already checked against the columns' nullability).
    fn push(&mut self, row: Vec<Cell>) {
        for (buffer, cell) in self.buffers.iter_mut().zip(row) {
            if let Some(levels) = &mut buffer.levels {
                levels.push(i16::from(cell != Cell::Null));
            }
            self.bytes += 8;
            match (&mut buffer.values, cell) {
                (_, Cell::Null) => {}
                (Values::Int64(v), Cell::Int(x)) => v.push(x),
                (Values::Int64(v), Cell::Timestamp(x)) => v.push(x.timestamp_micros()),
                (Values::Int32(v), Cell::Date(x)) => {
                    v.push(i32::try_from((x - EPOCH_DAY).num_days()).unwrap_or(i32::MAX));
                }
                (Values::Float64(v), Cell::Float(x)) => v.push(x),
                (Values::Bool(v), Cell::Bool(x)) => v.push(x),
                (Values::Bytes(v), Cell::Text(x)) => {
                    self.bytes += x.len();
                    v.push(ByteArray::from(x.into_bytes()));
                }
                // `cells` reads each column as its kind's type: no other pairs.
                (_, other) => unreachable!("a {other:?} in a column of another kind"),
            }
        }
        self.rows += 1;
    }

    /// Writes the buffered rows as one row group.
    fn flush(&mut self) -> parquet::errors::Result<()> {
        if self.rows == 0 {
            return Ok(());
        }
        let mut group = self.writer.next_row_group()?;
        for buffer in &mut self.buffers {
            let Some(mut column) = group.next_column()? else {
                return Err(parquet::errors::ParquetError::General(
                    "fewer columns in the schema than buffered".into(),
                ));
            };
            let levels = buffer.levels.as_deref();
            match &buffer.values {
                Values::Int64(v) => column.typed::<Int64Type>().write_batch(v, levels, None)?,
                Values::Int32(v) => column.typed::<Int32Type>().write_batch(v, levels, None)?,
                Values::Float64(v) => column.typed::<DoubleType>().write_batch(v, levels, None)?,
                Values::Bool(v) => column.typed::<BoolType>().write_batch(v, levels, None)?,
                Values::Bytes(v) => column
                    .typed::<ByteArrayType>()
                    .write_batch(v, levels, None)?,
            };
            column.close()?;
            match &mut buffer.values {
                Values::Int64(v) => v.clear(),
                Values::Int32(v) => v.clear(),
                Values::Float64(v) => v.clear(),
                Values::Bool(v) => v.clear(),
                Values::Bytes(v) => v.clear(),
            }
            if let Some(levels) = &mut buffer.levels {
                levels.clear();
            }
        }
        group.close()?;
        self.rows = 0;
        self.bytes = 0;
        Ok(())
    }

    fn close(mut self) -> parquet::errors::Result<File> {
        self.flush()?;
        let mut file = self.writer.into_inner()?;
        file.flush()?;
        file.into_inner()
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e.into_error())))
    }
}

#[cfg(test)]
mod tests {
    use super::{Format, parse_time};

    #[test]
    fn times_are_rfc3339_or_utc_days() {
        assert_eq!(
            parse_time("2026-11-24T13:00:00+01:00")
                .unwrap()
                .to_rfc3339(),
            "2026-11-24T12:00:00+00:00"
        );
        assert_eq!(
            parse_time("2026-11-24").unwrap().to_rfc3339(),
            "2026-11-24T00:00:00+00:00"
        );
        let error = parse_time("yesterday").unwrap_err();
        assert!(error.contains("neither an RFC 3339 time"), "{error}");
        assert_eq!(Format::Csv.extension(), "csv");
    }
}
