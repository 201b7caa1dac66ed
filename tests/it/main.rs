//! The integration tests, as one binary (one link, one harness): each module is one area.
//! Run one area with a filter: `cargo test --test it -- delivery::`.
//!
//! `tests/metrics.rs` is a binary of its own: metrics are process-wide, and its counters must
//! see only its own emails.

mod common;

mod api;
mod api_contract;
mod cluster;
mod dashboard;
mod delivery;
mod process;
mod relays;
mod watcher;
mod webhooks;
