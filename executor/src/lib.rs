//! Overfly's GPU executor: NVML inventory and telemetry (or the simulated backend), runs
//! assigned workloads as child processes and reports through the command API.
//!
//! Not built yet (issue #4): this crate holds nothing that runs. It must never touch Postgres.
