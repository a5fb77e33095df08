//! Overfly's projectors: JetStream consumers that build the read models in Postgres (jobs,
//! executors and GPUs, GPU usage, leaderboards), and rebuild / backfill them from the event
//! store.
//!
//! Not built yet (issue #3): this crate holds nothing that runs. It must never write events.
