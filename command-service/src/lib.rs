//! Overfly's write side: the HTTP command API over cqrs-es / postgres-es, and the relay that
//! carries the event store to JetStream in commit order.
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
pub mod relay;
