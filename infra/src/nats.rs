//! The NATS connection shared by a service.

use anyhow::Context;

/// Connects to NATS. With `retry_on_initial_connect` the client also comes up while the
/// server is down and keeps reconnecting: the write path never depends on NATS being up.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}
