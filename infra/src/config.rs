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
