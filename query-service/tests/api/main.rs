//! Integration tests of the read side: the real command service writes, the relay publishes
//! to a real nats-server, the jobs projection consumes, and the query service answers.

mod helpers;
mod history;
mod jobs;
mod openapi;
