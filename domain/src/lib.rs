//! Overfly's domain: the `Job` and `Executor` aggregates, their commands, events and errors,
//! and the pure rules they obey (job spec validation, retry backoff).
//!
//! Everything here is pure: no I/O, no clock, no randomness. Whatever comes from the outside
//! world (the current time, new ids, the scheduler's decision) arrives inside a command, so the
//! same events always rebuild the same state and every decision can be replayed.

pub mod executor;
pub mod job;
pub mod scheduler;
mod validate;

pub use validate::FieldError;

/// The version every event type carries today. Bump per event type when its payload changes
/// incompatibly, and add an upcaster for the old version.
pub const EVENT_VERSION_1: &str = "1";
