//! Small shared plumbing for Overfly's services: tracing + OTLP export, the Postgres pool and
//! migrations, the NATS connection.
//!
//! It holds no business logic and knows nothing of jobs or executors; keep it that way.

pub mod config;
pub mod db;
pub mod nats;
pub mod shutdown;
pub mod telemetry;
