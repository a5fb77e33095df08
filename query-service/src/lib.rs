//! Overfly's read API: jobs and runs, executors and GPUs from the read models the projector
//! keeps, with read-your-writes (`min_position`) for jobs; the audit history of any job or
//! executor and the state of a job at any past instant, straight from the event store; GPU
//! usage per account and the GPU-hours leaderboard.
//!
//! It never writes: not events, not read models.

pub mod api;
pub mod app;
mod as_of;
pub mod cli;
pub mod config;
pub mod executors;
pub mod explain;
pub mod feeds;
pub mod history;
pub mod jobs;
pub mod leaderboards;
pub mod projections;
pub mod usage;
