use clap::Parser;
use overfly_command_service::config::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = overfly_infra::telemetry::init("overfly-command")?;
    overfly_command_service::cli::run(Cli::parse()).await
}
