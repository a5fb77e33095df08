//! `verify`: an audit that a live read model (any [`Projection`]: jobs, executors, usage) is
//! exactly what the events say. Rebuilds the projection from event 0 into a shadow schema up
//! to the live checkpoint's cursor, diffs every column of every row of each of its tables both
//! ways, keyed by the table's primary key, and drops the shadow.
//!
//! Like for like while events keep coming: the bulk of the shadow is built (committed, in
//! batches) up to the live checkpoint read at the start; then one `REPEATABLE READ`
//! transaction reads the live checkpoint again, applies the events between the two to the
//! shadow, and diffs, all in that one snapshot. The live tables and their checkpoint are
//! committed together, so in the snapshot they agree; the runner is never paused.
//!
//! Generic over columns: rows are compared as `to_jsonb(row)` (so every type compares, `json`
//! included), and a differing row's columns are named from its JSON, in the live table's column
//! order. The shadow is created `LIKE` the live table, so a column a migration adds is
//! compared without any change here.

use std::fmt;

use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::rebuild::{self, Cursor, Progress, RebuildError};
use crate::runner::{Projection, Table};

/// What `verify` found for one projection.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    /// The projection verified.
    pub projection: &'static str,
    /// The live checkpoint's cursor both copies were compared at.
    pub cursor: Cursor,
    /// Each table compared, with the number of distinct keys in either copy.
    pub tables: Vec<(&'static str, u64)>,
    /// Every difference, table by table in the projection's order, each table in key order.
    pub differences: Vec<Difference>,
}

impl VerifyReport {
    /// No drift: the live read model is exactly the rebuilt one.
    pub fn is_clean(&self) -> bool {
        self.differences.is_empty()
    }

    /// Distinct keys of `table` in either copy (0 if it is not the projection's).
    pub fn compared(&self, table: &str) -> u64 {
        self.tables
            .iter()
            .find(|(name, _)| *name == table)
            .map_or(0, |(_, rows)| *rows)
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tables: Vec<String> = self
            .tables
            .iter()
            .map(|(table, rows)| format!("{table} {rows} rows"))
            .collect();
        writeln!(
            f,
            "{} projection verified at {}: {} compared, {} differences",
            self.projection,
            self.cursor,
            tables.join(", "),
            self.differences.len()
        )?;
        for difference in &self.differences {
            writeln!(f, "  {difference}")?;
        }
        Ok(())
    }
}

/// One row that differs between the live read model and the rebuild.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// The table (in `public`).
    pub table: &'static str,
    /// Its primary key column.
    pub key_column: &'static str,
    /// The row's key, as Postgres prints it (`key::text`).
    pub key: String,
    pub kind: DifferenceKind,
}

/// How a row differs.
#[derive(Debug, Clone, PartialEq)]
pub enum DifferenceKind {
    /// The events produce this row; the live table lacks it.
    MissingInLive,
    /// The live table has a row the events do not produce.
    ExtraInLive,
    /// Both have the row; these columns differ.
    Differs(Vec<ColumnDifference>),
}

/// One column of a row that differs (values as `to_jsonb` prints them).
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnDifference {
    pub column: String,
    pub live: Value,
    pub rebuilt: Value,
}

impl Difference {
    /// The key as a UUID, for tables keyed by one (`None` otherwise).
    pub fn uuid(&self) -> Option<Uuid> {
        Uuid::parse_str(&self.key).ok()
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}={}:", self.table, self.key_column, self.key)?;
        match &self.kind {
            DifferenceKind::MissingInLive => write!(f, " missing in live (the events produce it)"),
            DifferenceKind::ExtraInLive => {
                write!(f, " extra in live (the events do not produce it)")
            }
            DifferenceKind::Differs(columns) => {
                for (i, c) in columns.iter().enumerate() {
                    let sep = if i == 0 { " " } else { ", " };
                    write!(f, "{sep}{} live={} rebuilt={}", c.column, c.live, c.rebuilt)?;
                }
                Ok(())
            }
        }
    }
}

/// Rebuilds `projection` from event 0 into a shadow schema up to the live checkpoint, diffs it
/// against the live tables and drops the shadow (also when the diff fails).
#[tracing::instrument(name = "projector.verify", skip_all, fields(projection = projection.name()))]
pub async fn verify(
    pool: &PgPool,
    projection: &impl Projection,
) -> Result<VerifyReport, RebuildError> {
    let shadow = format!(
        "verify_{}_{}",
        projection.name(),
        &Uuid::new_v4().simple().to_string()[..12]
    );
    let result = verify_in(pool, projection, &shadow).await;
    if let Err(error) = rebuild::drop_shadow(pool, &shadow).await {
        tracing::warn!(schema = %shadow, error = %error, "could not drop the verify schema");
    }
    result
}

async fn verify_in(
    pool: &PgPool,
    projection: &impl Projection,
    shadow: &str,
) -> Result<VerifyReport, RebuildError> {
    let name = projection.name();
    rebuild::create_shadow(pool, projection, shadow).await?;
    let mut progress = Progress::new(
        name,
        "verify",
        rebuild::event_count(pool, projection).await?,
        std::time::Duration::from_secs(1),
    );
    let mut conn = pool.acquire().await?;
    let first = live_cursor(&mut conn, name).await?;
    drop(conn);
    let built = rebuild::build(
        pool,
        projection,
        shadow,
        Cursor::ZERO,
        Some(first),
        rebuild::BATCH,
        &mut progress,
    )
    .await?;

    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    // The snapshot is taken here: the live tables and this checkpoint agree in it.
    let cursor = live_cursor(&mut tx, name).await?;
    let mut at = built.cursor;
    while let Some(batch) = rebuild::apply_batch(
        &mut tx,
        projection,
        shadow,
        at,
        Some(cursor),
        rebuild::BATCH,
    )
    .await?
    {
        at = batch.cursor;
        progress.advance(batch.read);
    }
    sqlx::query("SET LOCAL search_path TO public")
        .execute(&mut *tx)
        .await?;
    let mut report = VerifyReport {
        projection: name,
        cursor,
        tables: Vec::new(),
        differences: Vec::new(),
    };
    for table in projection.tables() {
        let (compared, differences) = diff(&mut tx, shadow, table).await?;
        report.tables.push((table.name, compared));
        report.differences.extend(differences);
    }
    tx.rollback().await?;
    tracing::info!(
        projection = name,
        cursor = %report.cursor,
        tables = ?report.tables,
        differences = report.differences.len(),
        "projection verified"
    );
    Ok(report)
}

/// The live checkpoint's cursor (zero before the first batch).
async fn live_cursor(conn: &mut PgConnection, projection: &str) -> Result<Cursor, RebuildError> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT tx_id::text, position FROM public.projection_checkpoints WHERE projection = $1",
    )
    .bind(projection)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row
        .and_then(|(tx, position)| Cursor::parse(&tx, position))
        .unwrap_or_default())
}

/// A differing row: its key (text), whether the rebuild and live have it, and for a row both
/// have, `[column, live, rebuilt]` of each differing column.
type DiffRow = (String, bool, bool, Option<Value>);

/// Rows of `table` in `shadow` and `public` that differ, both ways, and how many keys were
/// compared. Rows are compared as `to_jsonb` (every column, whatever its type); the differing
/// columns of a row both copies have are found in SQL too, so values compare as Postgres
/// compares `jsonb` (e.g. `1.0` equals `1`), and come in the live table's column order.
async fn diff(
    conn: &mut PgConnection,
    shadow: &str,
    table: &Table,
) -> Result<(u64, Vec<Difference>), RebuildError> {
    let Table { name, key } = *table;
    let key_column = key;
    let compared: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {shadow}.{name} s FULL JOIN public.{name} l ON s.{key} = l.{key}"
    ))
    .fetch_one(&mut *conn)
    .await?;
    let rows: Vec<DiffRow> = sqlx::query_as(&format!(
        "SELECT COALESCE(s.{key}, l.{key})::text, s.{key} IS NOT NULL, l.{key} IS NOT NULL,
                CASE WHEN s.{key} IS NOT NULL AND l.{key} IS NOT NULL THEN (
                    SELECT jsonb_agg(jsonb_build_array(c.name, to_jsonb(l) -> c.name,
                                                       to_jsonb(s) -> c.name)
                                     ORDER BY a.attnum NULLS LAST, c.name)
                      FROM jsonb_object_keys(to_jsonb(s) || to_jsonb(l)) AS c(name)
                      LEFT JOIN pg_attribute a
                        ON a.attrelid = 'public.{name}'::regclass AND a.attname = c.name
                     WHERE (to_jsonb(l) -> c.name) IS DISTINCT FROM (to_jsonb(s) -> c.name))
                END
           FROM {shadow}.{name} s FULL JOIN public.{name} l ON s.{key} = l.{key}
          WHERE s.{key} IS NULL OR l.{key} IS NULL OR to_jsonb(s) <> to_jsonb(l)
          ORDER BY COALESCE(s.{key}, l.{key})"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let differences = rows
        .into_iter()
        .map(|(key, rebuilt, live, columns)| Difference {
            table: name,
            key_column,
            key,
            kind: match (rebuilt, live) {
                (true, true) => DifferenceKind::Differs(column_differences(columns)),
                (true, false) => DifferenceKind::MissingInLive,
                _ => DifferenceKind::ExtraInLive,
            },
        })
        .collect();
    Ok((u64::try_from(compared).unwrap_or(0), differences))
}

/// `[[column, live, rebuilt], …]` as built by [`diff`]'s query.
fn column_differences(columns: Option<Value>) -> Vec<ColumnDifference> {
    let Some(Value::Array(columns)) = columns else {
        return Vec::new();
    };
    columns
        .into_iter()
        .filter_map(|triple| {
            let Value::Array(mut triple) = triple else {
                return None;
            };
            if triple.len() != 3 {
                return None;
            }
            let rebuilt = triple.pop().unwrap_or(Value::Null);
            let live = triple.pop().unwrap_or(Value::Null);
            let column = triple.pop()?.as_str()?.to_string();
            Some(ColumnDifference {
                column,
                live,
                rebuilt,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn differing_columns_are_named_with_both_values() {
        let columns = column_differences(Some(json!([
            ["state", "failed", "running"],
            ["attempts", 1, null]
        ])));
        assert_eq!(
            columns,
            vec![
                ColumnDifference {
                    column: "state".into(),
                    live: json!("failed"),
                    rebuilt: json!("running"),
                },
                ColumnDifference {
                    column: "attempts".into(),
                    live: json!(1),
                    rebuilt: Value::Null,
                }
            ]
        );
        let difference = Difference {
            table: "read_jobs",
            key_column: "job_id",
            key: Uuid::nil().to_string(),
            kind: DifferenceKind::Differs(columns),
        };
        assert_eq!(
            difference.to_string(),
            "read_jobs job_id=00000000-0000-0000-0000-000000000000: state live=\"failed\" \
             rebuilt=\"running\", attempts live=1 rebuilt=null"
        );
        assert_eq!(difference.uuid(), Some(Uuid::nil()));
        let missing = Difference {
            table: "read_gpus",
            key_column: "gpu_uuid",
            key: "host-a-gpu0".into(),
            kind: DifferenceKind::MissingInLive,
        };
        assert_eq!(
            missing.to_string(),
            "read_gpus gpu_uuid=host-a-gpu0: missing in live (the events produce it)"
        );
        assert_eq!(missing.uuid(), None);
    }
}
