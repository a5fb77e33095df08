//! Integration tests of the executor: real Postgres, real nats-server, the real command
//! service, the real `overfly-executor` binary and real workload processes (`overfly-tiles`).

mod cli;
mod feeds;
mod helpers;
mod lifecycle;
mod runs;
mod scheduled;
