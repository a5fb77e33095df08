use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::GpuInfo;

/// Everything that can be asked of an executor. `at` is when the command service received it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ExecutorCommand {
    /// The executor (re)starts and announces its GPUs. `lease_s` is how long it may go
    /// without a heartbeat before it is considered lost.
    RegisterExecutor {
        executor_id: String,
        hostname: String,
        gpus: Vec<GpuInfo>,
        lease_s: u32,
        at: DateTime<Utc>,
    },
    /// The executor is alive; extends its lease.
    Heartbeat { at: DateTime<Utc> },
    /// Stop taking new work; running work may finish.
    Drain {
        by: String,
        reason: String,
        at: DateTime<Utc>,
    },
    /// The executor leaves for good (shut down cleanly).
    Deregister { reason: String, at: DateTime<Utc> },
    /// The lease expired without a heartbeat (issued by the scheduler's lease watch).
    MarkLost { at: DateTime<Utc> },
}

impl ExecutorCommand {
    pub fn name(&self) -> &'static str {
        match self {
            Self::RegisterExecutor { .. } => "RegisterExecutor",
            Self::Heartbeat { .. } => "Heartbeat",
            Self::Drain { .. } => "Drain",
            Self::Deregister { .. } => "Deregister",
            Self::MarkLost { .. } => "MarkLost",
        }
    }
}
