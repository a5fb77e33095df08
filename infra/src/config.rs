//! The connection settings every service shares, as flags and environment variables with
//! DESIGN.md's defaults. Services flatten them into their own `Config`.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct Postgres {
    /// Postgres connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/overfly",
        global = true
    )]
    pub database_url: String,
}

#[derive(Debug, Clone, Args)]
pub struct Nats {
    /// NATS server URL.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
}

/// The scheduling policy's knobs, shared by the scheduler (command-service) and `explain`
/// (query-service) so both reason with the same policy.
#[derive(Debug, Clone, Copy, Args)]
pub struct SchedulerPolicy {
    /// Priority points a queued job gains by waiting the whole horizon.
    #[arg(
        long,
        env = "OVERFLY_SCHEDULER_AGE_BONUS",
        default_value_t = 50.0,
        global = true
    )]
    pub age_bonus: f64,
    /// Seconds of waiting for the full age bonus; a job waiting longer is starving and goes
    /// before every job that is not.
    #[arg(
        long,
        env = "OVERFLY_SCHEDULER_AGE_HORIZON_S",
        default_value_t = 86_400.0,
        global = true
    )]
    pub age_horizon_s: f64,
    /// Half-life of past GPU time in fair share.
    #[arg(
        long,
        env = "OVERFLY_SCHEDULER_USAGE_HALF_LIFE_S",
        default_value_t = 604_800.0,
        global = true
    )]
    pub usage_half_life_s: f64,
}
