use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::{self, FieldError};

/// One GPU as the executor discovered it (through NVML or the simulated backend).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GpuInfo {
    /// NVML's stable id, e.g. `GPU-5f1c…`.
    pub uuid: String,
    /// The index the host's driver gives it (what `CUDA_VISIBLE_DEVICES` refers to).
    pub index: u32,
    /// Model name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total memory in MiB.
    pub memory_mb: u64,
    /// CUDA compute capability, `major.minor`, e.g. `9.0`.
    pub compute_capability: String,
}

impl GpuInfo {
    pub(crate) fn validate_inventory(gpus: &[GpuInfo]) -> Result<(), FieldError> {
        if gpus.is_empty() || gpus.len() > 64 {
            return Err(FieldError::new("gpus", "an executor has 1 to 64 GPUs"));
        }
        for (i, gpu) in gpus.iter().enumerate() {
            let field = |name: &str| format!("gpus[{i}].{name}");
            validate::text(&field("uuid"), &gpu.uuid, 128)?;
            validate::text(&field("name"), &gpu.name, 128)?;
            validate::range(&field("memory_mb"), gpu.memory_mb, 1, 1024 * 1024)?;
            let capability_ok =
                gpu.compute_capability
                    .split_once('.')
                    .is_some_and(|(major, minor)| {
                        major.parse::<u8>().is_ok() && minor.parse::<u8>().is_ok()
                    });
            if !capability_ok {
                return Err(FieldError::new(
                    field("compute_capability"),
                    "must be major.minor, e.g. 9.0",
                ));
            }
            if gpus[..i].iter().any(|other| other.uuid == gpu.uuid) {
                return Err(FieldError::new(field("uuid"), "duplicate GPU uuid"));
            }
            if gpus[..i].iter().any(|other| other.index == gpu.index) {
                return Err(FieldError::new(field("index"), "duplicate GPU index"));
            }
        }
        Ok(())
    }
}

/// Everything that happened to an executor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub enum ExecutorEvent {
    ExecutorRegistered {
        executor_id: String,
        hostname: String,
        gpus: Vec<GpuInfo>,
        lease_s: u32,
        /// 1 for the first registration, then one more per restart.
        session: u32,
        at: DateTime<Utc>,
    },
    /// First heartbeat of a session: the executor takes work from now on.
    ExecutorActivated {
        at: DateTime<Utc>,
    },
    ExecutorHeartbeat {
        lease_expires_at: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    ExecutorDraining {
        by: String,
        reason: String,
        at: DateTime<Utc>,
    },
    ExecutorDeregistered {
        reason: String,
        at: DateTime<Utc>,
    },
    ExecutorLost {
        last_heartbeat_at: Option<DateTime<Utc>>,
        lease_expired_at: DateTime<Utc>,
        at: DateTime<Utc>,
    },
}

impl ExecutorEvent {
    pub const TYPES: &[&str] = &[
        "ExecutorRegistered",
        "ExecutorActivated",
        "ExecutorHeartbeat",
        "ExecutorDraining",
        "ExecutorDeregistered",
        "ExecutorLost",
    ];
}

impl DomainEvent for ExecutorEvent {
    fn event_type(&self) -> String {
        let name = match self {
            Self::ExecutorRegistered { .. } => "ExecutorRegistered",
            Self::ExecutorActivated { .. } => "ExecutorActivated",
            Self::ExecutorHeartbeat { .. } => "ExecutorHeartbeat",
            Self::ExecutorDraining { .. } => "ExecutorDraining",
            Self::ExecutorDeregistered { .. } => "ExecutorDeregistered",
            Self::ExecutorLost { .. } => "ExecutorLost",
        };
        name.to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION_1.to_string()
    }
}
