//! Integration tests of the write side against a real Postgres and a real nats-server.

mod cli;
mod concurrency;
mod delivery;
mod executors;
mod helpers;
mod idempotency;
mod job_spec;
mod openapi;
mod rejections;
mod scheduler;
mod telemetry;
