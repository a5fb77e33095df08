//! What the benchmark binaries share: their child processes, scratch databases, ports,
//! readiness waits and percentiles.

use std::time::Duration;

use anyhow::{Result, bail};
use tokio::process::Child;

/// Child processes, killed on drop.
pub struct Processes(pub Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.start_kill();
        }
    }
}

/// `url` with its database replaced by `db` (query parameters kept).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, ""), |(b, q)| (b, q));
    let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", base));
    let host = rest.split('/').next().unwrap_or(rest);
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{scheme}://{host}/{db}{query}")
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until nats-server accepts connections on `port`.
pub async fn wait_port(port: u16) -> Result<()> {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("nats-server did not start on port {port}")
}

/// Waits until `url` answers 2xx, failing early if `child` exits.
pub async fn wait_ready(url: &str, child: &mut Child, what: &str) -> Result<()> {
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if http
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited while starting: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} not ready after 60 s")
}

/// The `p`th percentile (nearest rank) of `values` (sorted in place); NaN when empty.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}
