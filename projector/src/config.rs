//! Typed configuration: every setting is a flag and an environment variable (DESIGN.md's
//! defaults), parsed once at start and printed with secrets redacted.

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "overfly-projector",
    version,
    about = "Overfly projector: keeps the read models from the event stream"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply migrations, then run the jobs, executors and usage projections from JetStream
    /// (the default).
    Run,
    /// Build PROJECTION from the event store into SCHEMA (its tables dropped and re-created
    /// there), beside the live tables, and print how many events were applied.
    RebuildInto {
        /// jobs, executors or usage.
        #[arg(value_parser = projection_name)]
        projection: String,
        /// Target schema, e.g. `rebuild_jobs`; never `public`.
        schema: String,
    },
    /// Rebuild a projection (or each) from event 0 into a shadow schema, diff it against the
    /// live tables (at the live checkpoint) and print every difference; exits non-zero on drift.
    Verify {
        /// jobs, executors, usage, or all.
        #[arg(default_value = "all", value_parser = projection_or_all)]
        projection: String,
    },
    /// Rebuild PROJECTION from event 0 beside the live one (which keeps serving), catch up,
    /// then swap it in atomically; logs progress and prints a summary.
    Rebuild {
        /// jobs, executors or usage.
        #[arg(value_parser = projection_name)]
        projection: String,
        /// Shadow schema to build in (dropped at the end; `rebuild_<projection>` by default);
        /// never `public`.
        #[arg(long)]
        schema: Option<String>,
        /// Events read from the store and applied per transaction.
        #[arg(long, default_value_t = crate::rebuild::BATCH)]
        events_per_batch: i64,
    },
    /// Write the events (commit order) and the GPU usage (per run, per UTC day) as Parquet or
    /// CSV files into DIR, for DuckDB / pandas; prints rows and bytes per file.
    Export(crate::export::ExportOptions),
}

/// A projection's name, or an error listing the known ones.
fn projection_name(name: &str) -> Result<String, String> {
    crate::rebuild::AnyProjection::from_name(name)
        .map(|_| name.to_string())
        .map_err(|e| e.to_string())
}

/// A projection's name or `all`.
fn projection_or_all(name: &str) -> Result<String, String> {
    if name == "all" {
        Ok(name.to_string())
    } else {
        projection_name(name).map_err(|e| format!("{e} (or all)"))
    }
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub postgres: overfly_infra::config::Postgres,
    #[command(flatten)]
    pub nats: overfly_infra::config::Nats,
    /// JetStream stream holding the events.
    #[arg(long, env = "OVERFLY_EVENTS_STREAM", default_value = overfly_schemas::subjects::EVENTS_STREAM, global = true)]
    pub stream: String,
    /// Messages applied per transaction.
    #[arg(
        long,
        env = "OVERFLY_PROJECTOR_BATCH_SIZE",
        default_value_t = 500,
        global = true
    )]
    pub batch_size: usize,
    /// Wait after finding no new message before fetching again.
    #[arg(
        long,
        env = "OVERFLY_PROJECTOR_IDLE_MS",
        default_value_t = 10,
        global = true
    )]
    pub idle_ms: u64,
}

impl Config {
    /// The effective configuration, secrets redacted, for the start-up log.
    pub fn describe(&self) -> String {
        format!(
            "database_url={} nats_url={} stream={} batch_size={} idle_ms={} otlp_endpoint={}",
            overfly_infra::db::redact_url(&self.postgres.database_url),
            overfly_infra::db::redact_url(&self.nats.nats_url),
            self.stream,
            self.batch_size,
            self.idle_ms,
            std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_else(|_| "unset".into()),
        )
    }

    pub fn runner(&self) -> crate::runner::RunnerConfig {
        crate::runner::RunnerConfig {
            stream: self.stream.clone(),
            batch_size: self.batch_size,
            idle_wait: std::time::Duration::from_millis(self.idle_ms),
        }
    }
}

/// Runs the command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    use anyhow::Context;
    let config = cli.config;
    println!("overfly-projector {}", config.describe());
    tracing::info!(config = %config.describe(), "starting");
    let pool = overfly_infra::db::connect(
        &config.postgres.database_url,
        4,
        std::time::Duration::from_secs(30),
    )
    .await?;
    overfly_infra::db::migrate(&pool).await?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let nats =
                overfly_infra::nats::connect(&config.nats.nats_url, "overfly-projector").await?;
            // Three runners (jobs, executors, usage) on tasks of their own, each with its own
            // consumer, checkpoint and lock. `run` returns only by panicking: then the process
            // exits with the error.
            let jobs =
                crate::runner::JobsProjection::new(pool.clone(), nats.clone(), config.runner());
            let executors = crate::runner::ExecutorsProjection::new(
                pool.clone(),
                nats.clone(),
                config.runner(),
            );
            let usage = crate::runner::UsageProjection::new(pool, nats, config.runner());
            let mut jobs = tokio::spawn(jobs.run());
            let mut executors = tokio::spawn(executors.run());
            let mut usage = tokio::spawn(usage.run());
            tokio::select! {
                result = &mut jobs => result.context("the jobs projection's task")?,
                result = &mut executors => result.context("the executors projection's task")?,
                result = &mut usage => result.context("the usage projection's task")?,
                result = tokio::signal::ctrl_c() => {
                    result.context("waiting for Ctrl-C")?;
                    tracing::info!("shutting down");
                }
            }
        }
        Command::RebuildInto { projection, schema } => {
            let projection = crate::rebuild::AnyProjection::from_name(&projection)?;
            let name = crate::Projection::name(&projection);
            let built = crate::rebuild::rebuild_projection_into(&pool, &projection, &schema)
                .await
                .with_context(|| format!("rebuilding the {name} projection into {schema}"))?;
            println!(
                "rebuilt the {name} projection into schema {schema}: {} events read, {} applied",
                built.read, built.applied
            );
        }
        Command::Verify { projection } => {
            let projections = if projection == "all" {
                crate::rebuild::AnyProjection::all()
            } else {
                vec![crate::rebuild::AnyProjection::from_name(&projection)?]
            };
            let mut drifted = Vec::new();
            for projection in &projections {
                let name = crate::Projection::name(projection);
                let report = crate::verify::verify(&pool, projection)
                    .await
                    .with_context(|| format!("verifying the {name} projection"))?;
                print!("{report}");
                if !report.is_clean() {
                    drifted.push(format!("{name}: {} differences", report.differences.len()));
                }
            }
            if !drifted.is_empty() {
                anyhow::bail!("drifted from the events: {}", drifted.join("; "));
            }
        }
        Command::Rebuild {
            projection,
            schema,
            events_per_batch,
        } => {
            let projection = crate::rebuild::AnyProjection::from_name(&projection)?;
            let options = crate::swap::RebuildOptions {
                schema,
                batch_size: events_per_batch,
                ..Default::default()
            };
            let summary = crate::swap::rebuild(&pool, &projection, &options)
                .await
                .with_context(|| {
                    format!(
                        "rebuilding the {} projection",
                        crate::Projection::name(&projection)
                    )
                })?;
            println!("{summary}");
        }
        Command::Export(options) => {
            let summary = crate::export::export(&pool, &options)
                .await
                .with_context(|| format!("exporting into {}", options.out.display()))?;
            print!("{summary}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::parse_from([
            "overfly-projector",
            "rebuild",
            "usage",
            "--events-per-batch",
            "10",
        ]);
        assert!(matches!(
            cli.command,
            Some(Command::Rebuild {
                events_per_batch: 10,
                schema: None,
                ref projection,
            }) if projection == "usage"
        ));
        assert_eq!(cli.config.batch_size, 500);
        let cli = Cli::parse_from(["overfly-projector", "verify"]);
        assert!(
            matches!(cli.command, Some(Command::Verify { ref projection }) if projection == "all")
        );
        let cli = Cli::parse_from(["overfly-projector", "verify", "executors"]);
        assert!(
            matches!(cli.command, Some(Command::Verify { ref projection }) if projection == "executors")
        );
        let cli = Cli::parse_from(["overfly-projector", "rebuild-into", "jobs", "shadow_jobs"]);
        assert!(matches!(
            cli.command,
            Some(Command::RebuildInto { ref projection, ref schema })
                if projection == "jobs" && schema == "shadow_jobs"
        ));
        // An unknown name is refused up front, naming the known ones.
        for args in [
            &["overfly-projector", "verify", "leaderboard"][..],
            &["overfly-projector", "rebuild", "leaderboard"],
            &["overfly-projector", "rebuild-into", "leaderboard", "x"],
        ] {
            let error = Cli::try_parse_from(args).unwrap_err().to_string();
            assert!(
                error.contains("unknown projection \"leaderboard\"; the projections are: jobs, executors, usage"),
                "{error}"
            );
        }
        // A rebuild names its projection.
        assert!(Cli::try_parse_from(["overfly-projector", "rebuild"]).is_err());
    }
}
