//! Overfly's projectors: JetStream consumers that build the read models in Postgres, and
//! rebuilds of them from the event store.
//!
//! Three projections, each a [`Projection`] (name, consumer, locks, tables with their keys,
//! apply) run by the one [`runner::Runner`]: **jobs** (`read_jobs`, `read_runs`;
//! [`JobsProjection`]), **executors & GPUs** (`read_executors`, `read_gpus`;
//! [`ExecutorsProjection`]) and **GPU usage** (`read_usage_jobs`, `read_usage_gpus`,
//! `read_usage_runs`; [`UsageProjection`]). For every one of them, driven by the same trait
//! and no per-projection code: [`rebuild::rebuild_projection_into`] (a shadow copy from the
//! event store), [`verify::verify`] (diff a rebuild against live, every column of every row)
//! and [`swap::rebuild`] (rebuild beside live, catch up, swap in atomically);
//! [`AnyProjection`] picks one by name.
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
pub use rebuild::{
    AnyProjection, Cursor, PROJECTIONS, rebuild_into, rebuild_into_until, rebuild_projection_into,
};
pub use runner::{
    Executors, ExecutorsProjection, Jobs, JobsProjection, Outcome, Projection, Table, Usage,
    UsageProjection,
};
pub use swap::{RebuildOptions, RebuildSummary, rebuild};
pub use verify::{Difference, DifferenceKind, VerifyReport, verify};
