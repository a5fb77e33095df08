use clap::Parser;
use overfly_projector::config::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = overfly_infra::telemetry::init("overfly-projector")?;
    overfly_projector::config::run(Cli::parse()).await
}
