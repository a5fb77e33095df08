//! HTTP plumbing shared by Overfly's APIs (command-service, query-service): RFC 9457
//! `application/problem+json` errors, JSON request bodies whose errors name the field at
//! fault, and W3C trace context for every request.
//!
//! No business logic and no knowledge of jobs or executors lives here.

pub mod body;
pub mod problem;
pub mod server;
pub mod trace;

pub use body::Body;
pub use problem::{ApiError, Problem, ProblemJson};
