//! Overfly's projectors: JetStream consumers that build the read models in Postgres, and
//! rebuilds of them from the event store.
//!
//! Built so far (first slice of issue #3): the **jobs** projection (`read_jobs`, `read_runs`),
//! its JetStream runner ([`runner::JobsProjection`]), [`rebuild::rebuild_into`] (a shadow copy
//! from the event store), [`verify::verify`] (diff a rebuild against live) and
//! [`swap::rebuild`] (rebuild beside live, catch up, swap in atomically); the **executors &
//! GPUs** projection (`read_executors`, `read_gpus`; [`runner::ExecutorsProjection`], same
//! runner, JetStream only so far: no rebuild/verify yet); the **GPU usage** projection
//! (`read_usage_runs`; [`runner::UsageProjection`], JetStream only too). Still to come:
//! leaderboards.
//!
//! What it must not do: write events, or anything outside its read-model tables and
//! `projection_checkpoints`. The events are the truth; every row here can be thrown away and
//! rebuilt from them. It must never skip an event it cannot apply: that stops the projection
//! with the reason in `projection_checkpoints.last_error`.
#![forbid(unsafe_code)]

pub mod config;
mod decode;
pub mod error;
pub mod executors;
pub mod export;
pub mod jobs;
pub mod rebuild;
pub mod runner;
pub mod swap;
pub mod usage;
pub mod verify;

pub use error::ProjectionError;
pub use rebuild::{Cursor, rebuild_into, rebuild_into_until};
pub use runner::{ExecutorsProjection, JobsProjection, Outcome, Projection, UsageProjection};
pub use swap::{RebuildOptions, RebuildSummary, rebuild};
pub use verify::{Difference, VerifyReport, verify};
