//! What the executor publishes on its own JetStream streams (JSON message bodies).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::gpu::GpuSample;

/// One message on `overfly.logs.<job_id>.<run_id>`: consecutive lines of one run
/// (`Nats-Msg-Id = <run_id>:<first line number>`, so a retried publish is stored once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogBatch {
    pub executor_id: String,
    pub job_id: Uuid,
    pub run_id: Uuid,
    pub lines: Vec<LogLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
pub struct TelemetrySample {
    pub executor_id: String,
    pub at: DateTime<Utc>,
    /// `nvml` or `sim`.
    pub backend: String,
    /// The run holding the GPU, if any.
    pub run_id: Option<Uuid>,
    pub job_id: Option<Uuid>,
    #[serde(flatten)]
    pub gpu: GpuSample,
}
