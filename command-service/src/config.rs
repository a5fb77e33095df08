//! Typed configuration: every setting is a flag and an environment variable (DESIGN.md's
//! defaults), parsed once at start and printed with secrets redacted.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "overfly-command",
    version,
    about = "Overfly command service: write API + relay"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply migrations, then serve the HTTP API and run the relay (the default).
    Serve,
    /// Run only the relay (Postgres → JetStream).
    Relay,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the OpenAPI document of the command API.
    Openapi,
    /// Print the JetStream event stream's state and the relay's position.
    StreamInfo,
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub postgres: overfly_infra::config::Postgres,
    #[command(flatten)]
    pub nats: overfly_infra::config::Nats,
    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(
        long,
        env = "OVERFLY_COMMAND_ADDR",
        default_value = "127.0.0.1:8080",
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
    /// Run the relay inside `serve` (only one relay publishes at a time anyway).
    #[arg(long, env = "OVERFLY_RELAY_ENABLED", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub relay_enabled: bool,
    /// Run the scheduler inside `serve` (only one schedules at a time anyway). Off, runs are
    /// assigned only through `POST /jobs/{id}/runs` (an external scheduler, or tests).
    #[arg(long, env = "OVERFLY_SCHEDULER_ENABLED", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub scheduler_enabled: bool,
    /// How often the scheduler looks again when no commit woke it (backoffs ending, leases
    /// expiring, other instances' commits).
    #[arg(
        long,
        env = "OVERFLY_SCHEDULER_POLL_MS",
        default_value_t = 50,
        global = true
    )]
    pub scheduler_poll_ms: u64,
    #[command(flatten)]
    pub policy: overfly_infra::config::SchedulerPolicy,
    /// Backoff before the first automatic retry of a failed run; doubles per failure.
    #[arg(
        long,
        env = "OVERFLY_RETRY_BASE_S",
        default_value_t = 10,
        global = true
    )]
    pub retry_base_s: u64,
    /// Longest backoff between automatic retries.
    #[arg(
        long,
        env = "OVERFLY_RETRY_MAX_S",
        default_value_t = 600,
        global = true
    )]
    pub retry_max_s: u64,
    #[command(flatten)]
    pub relay: RelayConfig,
}

#[derive(Debug, Clone, Args)]
pub struct RelayConfig {
    /// Events read from Postgres and published (in flight together) per batch.
    #[arg(
        long = "relay-batch-size",
        env = "OVERFLY_RELAY_BATCH_SIZE",
        default_value_t = 500,
        global = true
    )]
    pub batch_size: i64,
    /// How often the relay looks for new events when nothing woke it.
    #[arg(
        long = "relay-poll-ms",
        env = "OVERFLY_RELAY_POLL_MS",
        default_value_t = 10,
        global = true
    )]
    pub poll_ms: u64,
    /// After being woken by a commit, wait this long so that concurrent commits share a batch.
    #[arg(
        long = "relay-linger-ms",
        env = "OVERFLY_RELAY_LINGER_MS",
        default_value_t = 2,
        global = true
    )]
    pub linger_ms: u64,
    /// JetStream stream that receives the events.
    #[arg(long = "relay-stream", env = "OVERFLY_EVENTS_STREAM", default_value = overfly_schemas::subjects::EVENTS_STREAM, global = true)]
    pub stream: String,
    /// Fault injection for tests: abort the process after this many publishes were acked,
    /// before the position is stored (simulates a crash mid-batch). Never set in production.
    #[arg(
        long = "relay-abort-after",
        env = "OVERFLY_RELAY_ABORT_AFTER",
        hide = true,
        global = true
    )]
    pub abort_after: Option<u64>,
}

impl RelayConfig {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }

    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }
}

impl Config {
    pub fn scheduler(&self) -> crate::scheduler::SchedulerConfig {
        crate::scheduler::SchedulerConfig {
            policy: overfly_domain::scheduler::Policy {
                age_bonus: self.policy.age_bonus,
                age_horizon_s: self.policy.age_horizon_s,
                usage_half_life_s: self.policy.usage_half_life_s,
            },
            poll: std::time::Duration::from_millis(self.scheduler_poll_ms),
        }
    }

    pub fn job_services(&self) -> overfly_domain::job::JobServices {
        overfly_domain::job::JobServices {
            retry: overfly_domain::job::RetryPolicy {
                base_backoff_s: self.retry_base_s,
                max_backoff_s: self.retry_max_s,
            },
        }
    }

    /// The effective configuration, secrets redacted, for the start-up log.
    pub fn describe(&self) -> String {
        format!(
            "database_url={} nats_url={} addr={} db_pool_size={} relay_enabled={} scheduler_enabled={} scheduler_poll_ms={} age_bonus={} age_horizon_s={} usage_half_life_s={} retry_base_s={} retry_max_s={} relay_batch_size={} relay_poll_ms={} relay_linger_ms={} relay_stream={} otlp_endpoint={}",
            overfly_infra::db::redact_url(&self.postgres.database_url),
            overfly_infra::db::redact_url(&self.nats.nats_url),
            self.addr,
            self.db_pool_size,
            self.relay_enabled,
            self.scheduler_enabled,
            self.scheduler_poll_ms,
            self.policy.age_bonus,
            self.policy.age_horizon_s,
            self.policy.usage_half_life_s,
            self.retry_base_s,
            self.retry_max_s,
            self.relay.batch_size,
            self.relay.poll_ms,
            self.relay.linger_ms,
            self.relay.stream,
            std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_else(|_| "unset".into()),
        )
    }
}
