//! The `overfly-query` subcommands.

use crate::app::{self, Application};
use crate::config::{Cli, Command};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            tracing::info!(config = %cli.config.describe(), "overfly-query serve");
            let app = Application::build(&cli.config).await?;
            app.run_until(overfly_infra::shutdown::signal()).await
        }
        Command::Openapi => {
            println!("{}", app::openapi_json());
            Ok(())
        }
    }
}
