//! Overfly's wire contract, shared by every process that reads or writes events:
//! the event envelope, JetStream stream and subject names, message headers, and the JSON
//! Schemas of every event version (generated from the domain types, checked in under
//! `schemas/json/`, drift-tested). The exported OpenAPI documents live in `schemas/openapi/`.
//!
//! Only data definitions live here: no I/O.

mod envelope;
pub mod json_schema;
pub mod subjects;
pub mod wire;

pub use envelope::EventEnvelope;
