//! Typed configuration: flags and environment variables (DESIGN.md's defaults).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "overfly-query",
    version,
    about = "Overfly query service: read API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the read API (the default).
    Serve,
    /// Print the OpenAPI document of the read API.
    Openapi,
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub postgres: overfly_infra::config::Postgres,
    #[command(flatten)]
    pub nats: overfly_infra::config::Nats,
    /// JetStream stream the live feeds read.
    #[arg(long, env = "OVERFLY_EVENTS_STREAM", default_value = overfly_schemas::subjects::EVENTS_STREAM, global = true)]
    pub stream: String,
    /// Events the live feeds' shared buffer holds; a client further behind is reset.
    #[arg(
        long,
        env = "OVERFLY_FEED_BUFFER",
        default_value_t = 4096,
        global = true
    )]
    pub feed_buffer: usize,
    /// The scheduler's policy (the same values as the command service's), for `explain`.
    #[command(flatten)]
    pub policy: overfly_infra::config::SchedulerPolicy,
    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(
        long,
        env = "OVERFLY_QUERY_ADDR",
        default_value = "127.0.0.1:8081",
        global = true
    )]
    pub addr: SocketAddr,
    /// Postgres connections in the pool.
    #[arg(
        long,
        env = "OVERFLY_DB_POOL_SIZE",
        default_value_t = 16,
        global = true
    )]
    pub db_pool_size: u32,
    /// How long a query with `min_position` waits for the projection before answering 503.
    #[arg(
        long,
        env = "OVERFLY_READ_YOUR_WRITES_WAIT_MS",
        default_value_t = 2000,
        global = true
    )]
    pub read_your_writes_wait_ms: u64,
}

impl Config {
    pub fn policy(&self) -> overfly_domain::scheduler::Policy {
        overfly_domain::scheduler::Policy {
            age_bonus: self.policy.age_bonus,
            age_horizon_s: self.policy.age_horizon_s,
            usage_half_life_s: self.policy.usage_half_life_s,
        }
    }

    pub fn read_your_writes_wait(&self) -> Duration {
        Duration::from_millis(self.read_your_writes_wait_ms)
    }

    pub fn describe(&self) -> String {
        format!(
            "database_url={} nats_url={} stream={} feed_buffer={} addr={} db_pool_size={} read_your_writes_wait_ms={} otlp_endpoint={}",
            overfly_infra::db::redact_url(&self.postgres.database_url),
            overfly_infra::db::redact_url(&self.nats.nats_url),
            self.stream,
            self.feed_buffer,
            self.addr,
            self.db_pool_size,
            self.read_your_writes_wait_ms,
            std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_else(|_| "unset".into()),
        )
    }
}
