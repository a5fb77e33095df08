//! Overfly's read API: OpenAPI query endpoints over the read models, audit history from the
//! event store, and live SSE feeds.
//!
//! Not built yet (issues #3 and #5): this crate holds nothing that runs. It must never write
//! events or read models.
