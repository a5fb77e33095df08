//! Overfly's GPU executor: NVML inventory and telemetry (or the simulated backend), runs
//! assigned workloads as child processes and reports through the command API. It talks to
//! the command service over HTTP and to NATS; it never touches Postgres.
//!
//! ```sh
//! # against a local command service (OVERFLY_COMMAND_URL) and NATS (NATS_URL), simulated GPUs:
//! overfly-executor --executor-id gpu-host-1 --gpus sim:4xH100-80GB
//! # real GPUs (fails with a clear message without a driver), or real ones with a fallback:
//! overfly-executor --executor-id gpu-host-1 --gpus nvml --fallback-gpus sim:4xH100-80GB
//! ```
//!
//! - Consumers: `executor-<id>` (`overfly.events.job.*.RunAssigned`) and `executor-<id>-cancel`
//!   (`overfly.events.job.*.JobCancelled`), durable, created before registering with
//!   `DeliverPolicy::New`. Two consumers because nats-server 2.9 allows one filter subject
//!   per consumer and the executor needs two event types, not every job event.
//! - Runs: [`run`] (what is reported for every way a run can end).
//! - Job specs: `GET /jobs/{id}/spec` on the command service (`RunAssigned` carries no spec).
//! - Streams it writes: `OVERFLY_LOGS` (`overfly.logs.<job>.<run>`, 7 days, [`wire::LogBatch`])
//!   and `OVERFLY_TELEMETRY` (`overfly.telemetry.<executor>.<gpu index>`, 1 hour,
//!   [`wire::TelemetrySample`]), created if missing.
//! - SIGTERM (or Ctrl-C): drain — `POST /executors/{id}/drain`, new assignments are reported
//!   failed (retryable), running work may finish for `--drain-grace-s`, what remains is stopped
//!   and reported failed (retryable, "executor shut down"), then deregister and exit 0. A
//!   second signal skips the rest of the grace.
//! - Restart with the same id and `--work-dir`: the consumers resume; runs accepted but not
//!   started are started; runs whose process was started are killed (if their process still
//!   lives) and reported failed, retryable.

pub mod agent;
pub mod client;
pub mod config;
pub mod gpu;
pub mod progress;
pub mod run;
pub use overfly_schemas::wire;

use gpu::{GpuBackend, GpuError};

/// The backend `--gpus` asks for; with `--fallback-gpus`, that one when NVML is unavailable.
pub fn open_backend(config: &config::Config) -> Result<Box<dyn GpuBackend>, GpuError> {
    match gpu::open(&config.gpus, &config.executor_id) {
        Err(GpuError::Unavailable(reason)) if config.fallback_gpus.is_some() => {
            let fallback = config.fallback_gpus.as_deref().unwrap_or_default();
            tracing::warn!(%reason, %fallback, "NVML unavailable; using the fallback GPUs");
            gpu::open(fallback, &config.executor_id)
        }
        other => other,
    }
}
