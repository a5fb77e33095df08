//! Integration tests of the read side: the real command service writes, the relay publishes
//! to a real nats-server, the jobs, executors and usage projections consume, and the query
//! service answers.

mod executors;
mod explain;
mod feeds;
mod helpers;
mod history;
mod jobs;
mod leaderboards;
mod openapi;
mod projections;
mod usage;
