//! The `overfly-command` subcommands.

use std::time::Duration;

use anyhow::anyhow;

use crate::app::{self, Application};
use crate::config::{Cli, Command, Config};
use crate::relay::{self, Relay};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            tracing::info!(config = %config.describe(), "overfly-command serve");
            let app = Application::build(&config).await?;
            app.run_until(overfly_infra::shutdown::signal()).await
        }
        Command::Relay => {
            tracing::info!(config = %config.describe(), "overfly-command relay");
            let pool = connect(&config).await?;
            let nats = overfly_infra::nats::connect(&config.nats.nats_url, "overfly-relay").await?;
            let relay = Relay::new(pool, nats, config.relay.clone(), Default::default());
            tokio::select! {
                () = relay.run() => Ok(()),
                () = overfly_infra::shutdown::signal() => Ok(()),
            }
        }
        Command::Migrate => {
            connect(&config).await?;
            println!(
                "migrations applied to {}",
                overfly_infra::db::redact_url(&config.postgres.database_url)
            );
            Ok(())
        }
        Command::Openapi => {
            println!("{}", app::openapi_json());
            Ok(())
        }
        Command::StreamInfo => stream_info(&config).await,
    }
}

async fn connect(config: &Config) -> anyhow::Result<sqlx::PgPool> {
    let pool =
        overfly_infra::db::connect(&config.postgres.database_url, 2, Duration::from_secs(30))
            .await?;
    overfly_infra::db::migrate(&pool).await?;
    Ok(pool)
}

async fn stream_info(config: &Config) -> anyhow::Result<()> {
    let nats = async_nats::connect(&config.nats.nats_url).await?;
    let jetstream = async_nats::jetstream::new(nats);
    let mut stream = jetstream
        .get_stream(&config.relay.stream)
        .await
        .map_err(|e| anyhow!("stream {}: {e}", config.relay.stream))?;
    let info = stream
        .info()
        .await
        .map_err(|e| anyhow!("stream info: {e}"))?;
    println!("stream {}", info.config.name);
    println!("  subjects   {:?}", info.config.subjects);
    println!("  storage    {:?}", info.config.storage);
    println!("  messages   {}", info.state.messages);
    println!("  bytes      {}", info.state.bytes);
    println!(
        "  sequences  {}..={}",
        info.state.first_sequence, info.state.last_sequence
    );
    let pool = overfly_infra::db::connect(&config.postgres.database_url, 1, Duration::from_secs(5))
        .await?;
    let mut conn = pool.acquire().await?;
    let position = relay::load_position(&mut conn, &config.relay.stream).await?;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut *conn)
        .await?;
    println!(
        "relay position  tx={} global_position={}",
        position.tx, position.position
    );
    println!("events in Postgres  {events}");
    Ok(())
}
