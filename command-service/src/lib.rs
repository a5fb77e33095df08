//! Overfly's write side: the HTTP command API over cqrs-es / postgres-es, the relay that
//! carries the event store to JetStream in commit order, and the scheduler (a process manager
//! that assigns queued jobs to GPUs by the pure policy in `overfly_domain::scheduler`).
//!
//! It must not read models or serve queries (that is query-service), and nothing here may
//! publish an event that is not committed in Postgres first.

pub mod api;
pub mod app;
pub mod bus;
pub mod cli;
pub mod config;
mod event_store;
mod group_commit;
pub mod idempotency;
mod leader;
pub mod relay;
pub mod scheduler;
