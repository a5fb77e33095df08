//! What executors publish besides domain events (JSON message bodies on their own streams),
//! read back by the query service's log and telemetry feeds. With the `openapi` feature the
//! types are also OpenAPI objects, so the feeds describe exactly what travels.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One message on `overfly.logs.<job_id>.<run_id>`: consecutive lines of one run
/// (`Nats-Msg-Id = <run_id>:<first line number>`, so a retried publish is stored once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(poem_openapi::Object))]
pub struct LogBatch {
    pub executor_id: String,
    pub job_id: Uuid,
    pub run_id: Uuid,
    pub lines: Vec<LogLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(poem_openapi::Object))]
pub struct LogLine {
    /// 1-based, per run, across both streams: the order the executor read them.
    pub n: u64,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub at: DateTime<Utc>,
    /// At most [`MAX_LINE_BYTES`]; longer lines are cut and end with `…`.
    pub line: String,
}

pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// One message on `overfly.telemetry.<executor_id>.<gpu_index>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(poem_openapi::Object))]
pub struct TelemetrySample {
    pub executor_id: String,
    pub at: DateTime<Utc>,
    /// `nvml` or `sim`.
    pub backend: String,
    /// The run holding the GPU, if any.
    pub run_id: Option<Uuid>,
    pub job_id: Option<Uuid>,
    #[serde(flatten)]
    #[cfg_attr(feature = "openapi", oai(flatten))]
    pub gpu: GpuSample,
}

/// One telemetry sample of one GPU. Fields a backend cannot read are `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(poem_openapi::Object))]
pub struct GpuSample {
    pub index: u32,
    pub uuid: String,
    /// 0..=1: fraction of the last sample period a kernel was running.
    pub utilisation: f64,
    /// 0..=1: fraction of the period device memory was read or written.
    pub memory_utilisation: Option<f64>,
    pub memory_used_mb: u64,
    pub memory_total_mb: u64,
    pub temperature_c: Option<u32>,
    pub power_w: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    /// Uncorrected ECC errors since the driver loaded (volatile counter), where ECC is on.
    pub ecc_uncorrected: Option<u64>,
    /// `ok`, or why the GPU looks unhealthy (e.g. uncorrected ECC errors).
    pub health: String,
}
