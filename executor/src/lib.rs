//! Overfly's GPU executor: NVML inventory and telemetry (or the simulated backend), runs
//! assigned workloads as child processes and reports through the command API. It talks to
//! the command service over HTTP and to NATS; it never touches Postgres.

pub mod agent;
pub mod client;
pub mod config;
pub mod gpu;
pub mod progress;
pub mod run;
pub mod wire;

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
