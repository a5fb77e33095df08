//! The `Executor` aggregate: one GPU host and its GPU inventory.
//!
//! Lifecycle: `registered → active → draining → gone`; a missed heartbeat lease makes it
//! `lost` (its runs are then failed as retryable by the scheduler). A restarted executor
//! registers again, which starts a new session.

mod aggregate;
mod commands;
mod error;
mod events;
#[cfg(test)]
mod tests;

pub use aggregate::{Executor, ExecutorState};
pub use commands::ExecutorCommand;
pub use error::ExecutorError;
pub use events::{ExecutorEvent, GpuInfo};
