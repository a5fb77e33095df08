use clap::Parser;
use overfly_query_service::config::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = overfly_infra::telemetry::init("overfly-query")?;
    overfly_query_service::cli::run(Cli::parse()).await
}
