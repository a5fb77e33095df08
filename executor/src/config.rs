//! The executor's settings: flags, or the environment variables DESIGN.md names.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "overfly-executor",
    about = "Overfly GPU executor: registers this host's GPUs, runs the runs assigned to them, \
             reports through the command API. Never touches Postgres."
)]
pub struct Config {
    /// Stable id of this host: `[A-Za-z0-9_-]{1,64}`. Its durable JetStream consumers are
    /// named after it, so a restart with the same id resumes where it stopped.
    #[arg(long, env = "OVERFLY_EXECUTOR_ID")]
    pub executor_id: String,
    /// `nvml` (real GPUs through the NVIDIA driver) or simulated ones, e.g.
    /// `sim:4xH100-80GB` or `sim:2xA100-40GB,2xL4-24GB`.
    #[arg(long, env = "OVERFLY_GPUS", default_value = "nvml")]
    pub gpus: String,
    /// Used only when `--gpus nvml` finds no driver, e.g. `sim:4xH100-80GB`. Without it a
    /// missing driver is an error.
    #[arg(long, env = "OVERFLY_FALLBACK_GPUS")]
    pub fallback_gpus: Option<String>,
    /// The command service's base URL.
    #[arg(
        long,
        env = "OVERFLY_COMMAND_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub command_url: String,
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Each run gets a directory `<work-dir>/<run_id>` (its working directory and the
    /// executor's record of it, which a restart reads). Default: `$TMPDIR/overfly-executor/<id>`.
    #[arg(long, env = "OVERFLY_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Seconds without a heartbeat before the command service counts this executor lost;
    /// it heartbeats every third of it.
    #[arg(long, env = "OVERFLY_LEASE_S", default_value_t = 15)]
    pub lease_s: u64,
    /// On SIGTERM, how long running work may go on before it is stopped (and reported failed,
    /// retryable).
    #[arg(long, env = "OVERFLY_DRAIN_GRACE_S", default_value_t = 60)]
    pub drain_grace_s: u64,
    /// Between SIGTERM and SIGKILL when a run is cancelled, timed out or stopped.
    #[arg(long, env = "OVERFLY_KILL_GRACE_S", default_value_t = 10)]
    pub kill_grace_s: u64,
    /// Telemetry sampling interval, milliseconds.
    #[arg(long, env = "OVERFLY_TELEMETRY_INTERVAL_MS", default_value_t = 1000)]
    pub telemetry_interval_ms: u64,
    /// The JetStream stream holding the domain events (published by the command service's relay).
    #[arg(long, env = "OVERFLY_EVENTS_STREAM", default_value = overfly_schemas::subjects::EVENTS_STREAM)]
    pub events_stream: String,
}

impl Config {
    pub fn work_dir(&self) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(|| {
            std::env::temp_dir()
                .join("overfly-executor")
                .join(&self.executor_id)
        })
    }

    pub fn heartbeat_every(&self) -> Duration {
        Duration::from_millis((self.lease_s * 1000 / 3).max(200))
    }

    pub fn kill_grace(&self) -> Duration {
        Duration::from_secs(self.kill_grace_s)
    }

    /// One line per setting, for the start-up log (nothing here is secret but the URLs'
    /// credentials, which are redacted).
    pub fn describe(&self) -> String {
        format!(
            "executor_id={} gpus={} fallback_gpus={} command_url={} nats_url={} work_dir={} \
             lease_s={} drain_grace_s={} kill_grace_s={} telemetry_interval_ms={} events_stream={}",
            self.executor_id,
            self.gpus,
            self.fallback_gpus.as_deref().unwrap_or("-"),
            redact(&self.command_url),
            redact(&self.nats_url),
            self.work_dir().display(),
            self.lease_s,
            self.drain_grace_s,
            self.kill_grace_s,
            self.telemetry_interval_ms,
            self.events_stream,
        )
    }
}

/// `scheme://user:secret@host` → `scheme://user:***@host`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => format!("{}***{}", &url[..scheme + 3], &url[at..]),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_design() {
        let config = Config::parse_from(["overfly-executor", "--executor-id", "h1"]);
        assert_eq!(config.gpus, "nvml");
        assert_eq!(config.command_url, "http://127.0.0.1:8080");
        assert_eq!(config.heartbeat_every(), Duration::from_secs(5));
        assert!(config.work_dir().ends_with("overfly-executor/h1"));
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(redact("nats://u:pw@h:4222"), "nats://u:***@h:4222");
        assert_eq!(redact("nats://token@h:4222"), "nats://***@h:4222");
        assert_eq!(redact("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
    }
}
