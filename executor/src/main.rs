//! `overfly-executor`: one per GPU host. See `overfly_executor::agent`.

use clap::Parser;
use overfly_executor::config::Config;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Config::parse();
    eprintln!(
        "overfly-executor effective configuration: {}",
        config.describe()
    );
    let backend = match overfly_executor::open_backend(&config) {
        Ok(backend) => backend,
        Err(error) => {
            eprintln!("overfly-executor: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing::info!(backend = backend.kind(), "GPU backend");
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let (second_tx, second_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .expect("SIGINT handler");
        let next = async |term: &mut tokio::signal::unix::Signal,
                          int: &mut tokio::signal::unix::Signal| {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        };
        let signal = next(&mut term, &mut int).await;
        tracing::info!(signal, "shutting down: draining");
        let _ = first_tx.send(());
        let signal = next(&mut term, &mut int).await;
        tracing::info!(signal, "asked again: stopping running work now");
        let _ = second_tx.send(());
    });
    let shutdown = async {
        let _ = first_rx.await;
    };
    let hurry = async {
        if second_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    match overfly_executor::agent::run(config, backend, shutdown, hurry).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("overfly-executor: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
