//! `verify`: an audit that the live jobs read model is exactly what the events say. Rebuilds
//! the projection from event 0 into a shadow schema up to the live checkpoint's cursor, diffs
//! every column of every row both ways, and drops the shadow.
//!
//! Like for like while events keep coming: the bulk of the shadow is built (committed, in
//! batches) up to the live checkpoint read at the start; then one `REPEATABLE READ`
//! transaction reads the live checkpoint again, applies the events between the two to the
//! shadow, and diffs, all in that one snapshot. The live tables and their checkpoint are
//! committed together, so in the snapshot they agree; the runner is never paused.

use std::fmt;

use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::rebuild::{self, Cursor, Progress, RebuildError};

/// What `verify` found.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    /// The live checkpoint's cursor both copies were compared at.
    pub cursor: Cursor,
    /// Distinct job ids in either copy.
    pub jobs_compared: u64,
    /// Distinct run ids in either copy.
    pub runs_compared: u64,
    /// Every difference, `read_jobs` first, each table in key order.
    pub differences: Vec<Difference>,
}

impl VerifyReport {
    /// No drift: the live read model is exactly the rebuilt one.
    pub fn is_clean(&self) -> bool {
        self.differences.is_empty()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "jobs projection verified at {}: {} jobs, {} runs compared, {} differences",
            self.cursor,
            self.jobs_compared,
            self.runs_compared,
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
pub enum Difference {
    /// The events produce this row; the live table lacks it.
    MissingInLive { table: &'static str, key: Uuid },
    /// The live table has a row the events do not produce.
    ExtraInLive { table: &'static str, key: Uuid },
    /// Both have the row; these columns differ.
    Differs {
        table: &'static str,
        key: Uuid,
        columns: Vec<ColumnDifference>,
    },
}

/// One column of a row that differs (values as `to_jsonb` prints them).
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnDifference {
    pub column: String,
    pub live: Value,
    pub rebuilt: Value,
}

impl Difference {
    pub fn table(&self) -> &'static str {
        match self {
            Self::MissingInLive { table, .. }
            | Self::ExtraInLive { table, .. }
            | Self::Differs { table, .. } => table,
        }
    }

    pub fn key(&self) -> Uuid {
        match self {
            Self::MissingInLive { key, .. }
            | Self::ExtraInLive { key, .. }
            | Self::Differs { key, .. } => *key,
        }
    }
}

fn noun(table: &str) -> &'static str {
    if table == "read_runs" { "run" } else { "job" }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingInLive { table, key } => {
                write!(f, "{} {key}: missing in live {table}", noun(table))
            }
            Self::ExtraInLive { table, key } => write!(
                f,
                "{} {key}: extra in live {table} (the events do not produce it)",
                noun(table)
            ),
            Self::Differs {
                table,
                key,
                columns,
            } => {
                write!(f, "{} {key}:", noun(table))?;
                for (i, c) in columns.iter().enumerate() {
                    let sep = if i == 0 { " " } else { ", " };
                    write!(f, "{sep}{} live={} rebuilt={}", c.column, c.live, c.rebuilt)?;
                }
                Ok(())
            }
        }
    }
}

/// The tables compared, with their keys.
const COMPARED: &[(&str, &str)] = &[("read_jobs", "job_id"), ("read_runs", "run_id")];

/// Rebuilds the jobs projection from event 0 into a shadow schema up to the live checkpoint,
/// diffs it against the live tables and drops the shadow (also when the diff fails).
#[tracing::instrument(name = "projector.jobs.verify", skip_all)]
pub async fn verify(pool: &PgPool) -> Result<VerifyReport, RebuildError> {
    let shadow = format!("verify_jobs_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let result = verify_in(pool, &shadow).await;
    if let Err(error) = rebuild::drop_shadow(pool, &shadow).await {
        tracing::warn!(schema = %shadow, error = %error, "could not drop the verify schema");
    }
    result
}

async fn verify_in(pool: &PgPool, shadow: &str) -> Result<VerifyReport, RebuildError> {
    rebuild::create_shadow(pool, shadow).await?;
    let mut progress = Progress::new(
        "verify",
        rebuild::job_events(pool).await?,
        std::time::Duration::from_secs(1),
    );
    let mut conn = pool.acquire().await?;
    let first = live_cursor(&mut conn).await?;
    drop(conn);
    let built = rebuild::build(
        pool,
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
    let cursor = live_cursor(&mut tx).await?;
    let mut at = built.cursor;
    while let Some(batch) =
        rebuild::apply_batch(&mut tx, shadow, at, Some(cursor), rebuild::BATCH).await?
    {
        at = batch.cursor;
        progress.advance(batch.read);
    }
    sqlx::query("SET LOCAL search_path TO public")
        .execute(&mut *tx)
        .await?;
    let mut report = VerifyReport {
        cursor,
        jobs_compared: 0,
        runs_compared: 0,
        differences: Vec::new(),
    };
    for (table, key) in COMPARED {
        let (compared, differences) = diff(&mut tx, shadow, table, key).await?;
        if *table == "read_jobs" {
            report.jobs_compared = compared;
        } else {
            report.runs_compared = compared;
        }
        report.differences.extend(differences);
    }
    tx.rollback().await?;
    tracing::info!(
        cursor = %report.cursor,
        jobs = report.jobs_compared,
        runs = report.runs_compared,
        differences = report.differences.len(),
        "jobs projection verified"
    );
    Ok(report)
}

/// The live checkpoint's cursor (zero before the first batch).
async fn live_cursor(conn: &mut PgConnection) -> Result<Cursor, RebuildError> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT tx_id::text, position FROM public.projection_checkpoints WHERE projection = $1",
    )
    .bind(crate::jobs::NAME)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row
        .and_then(|(tx, position)| Cursor::parse(&tx, position))
        .unwrap_or_default())
}

/// Rows of `table` in `shadow` and `public` that differ, both ways, and how many keys were
/// compared. Rows are compared column by column with each type's equality (the shadow is
/// created `LIKE` the live table, so the columns line up); only differing rows are turned into
/// JSON to name their columns.
async fn diff(
    conn: &mut PgConnection,
    shadow: &str,
    table: &'static str,
    key: &str,
) -> Result<(u64, Vec<Difference>), RebuildError> {
    let compared: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {shadow}.{table} s FULL JOIN public.{table} l ON s.{key} = l.{key}"
    ))
    .fetch_one(&mut *conn)
    .await?;
    let rows: Vec<(Uuid, Option<Value>, Option<Value>)> = sqlx::query_as(&format!(
        "SELECT COALESCE(s.{key}, l.{key}), to_jsonb(s), to_jsonb(l)
           FROM {shadow}.{table} s FULL JOIN public.{table} l ON s.{key} = l.{key}
          WHERE ROW(s.*) IS DISTINCT FROM ROW(l.*)
          ORDER BY 1"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let differences = rows
        .into_iter()
        .map(|(key, rebuilt, live)| match (rebuilt, live) {
            (Some(rebuilt), Some(live)) => Difference::Differs {
                table,
                key,
                columns: columns(&live, &rebuilt),
            },
            (Some(_), None) => Difference::MissingInLive { table, key },
            _ => Difference::ExtraInLive { table, key },
        })
        .collect();
    Ok((u64::try_from(compared).unwrap_or(0), differences))
}

/// The columns whose values differ (by name), with both values.
fn columns(live: &Value, rebuilt: &Value) -> Vec<ColumnDifference> {
    let (Some(live), Some(rebuilt)) = (live.as_object(), rebuilt.as_object()) else {
        return Vec::new();
    };
    let mut names: Vec<&String> = rebuilt.keys().collect();
    names.extend(live.keys().filter(|k| !rebuilt.contains_key(*k)));
    names
        .into_iter()
        .filter_map(|name| {
            let l = live.get(name).cloned().unwrap_or(Value::Null);
            let r = rebuilt.get(name).cloned().unwrap_or(Value::Null);
            (l != r).then(|| ColumnDifference {
                column: name.clone(),
                live: l,
                rebuilt: r,
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
        let live = json!({"job_id": "a", "state": "failed", "attempts": 1});
        let rebuilt = json!({"job_id": "a", "state": "running", "attempts": 1});
        let columns = columns(&live, &rebuilt);
        assert_eq!(
            columns,
            vec![ColumnDifference {
                column: "state".into(),
                live: json!("failed"),
                rebuilt: json!("running"),
            }]
        );
        let difference = Difference::Differs {
            table: "read_jobs",
            key: Uuid::nil(),
            columns,
        };
        assert_eq!(
            difference.to_string(),
            "job 00000000-0000-0000-0000-000000000000: state live=\"failed\" rebuilt=\"running\""
        );
    }
}
