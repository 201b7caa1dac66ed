//! # postbox: reliable email dispatch
//!
//! Apps hand postbox emails (this library, the HTTP API, the CLI); each becomes a durable row plus
//! an apalis job in SQLite; workers render it with askama and deliver it over SMTP with lettre,
//! retrying by the SMTP reply.
//!
//! ## Codemap
//! ```text
//! main.rs      CLI (clap): serve | api | send | status | cancel | retry | migrate | config check
//! api/         HTTP (axum): routes + OpenAPI from one declaration, auth, errors as JSON;
//!              ui.rs: the /ui dashboard (askama pages, sessions, CSRF)
//! postbox.rs   Postbox: the facade every entry point calls (submit, submit_many, status,
//!              cancel, retry, run_workers)
//! config.rs    Settings: defaults <- TOML file <- POSTBOX_* env; errors name the key
//! domain/      EmailAddress, NewEmail -> Email (validated), Priority, EmailStatus, EmailId (pure)
//! render/      askama templates (templates/emails/<kind>/) -> Rendered { subject, text, html }
//! store/       the persistence seam: emails, timelines and their apalis jobs (SQLite);
//!              group commit of submits (store/group.rs)
//! delivery/    MIME building, Mailer { Smtp, File }, classify() of SMTP replies, RetryPolicy
//! queue/       apalis worker + supervisor, wake-up on submit, janitor
//! metrics.rs   Prometheus metrics (recorded where things happen; queue gauges at scrape)
//! inbound/     IMAP watchers (async-imap): rules (pure), grouping/throttling, alerts
//! ```
//!
//! ## One email's path
//! `Postbox::submit` -> `Email::parse` (every rule, every field named) -> `Store::insert_emails`
//! (email row + job `<id>:0` in ONE transaction) -> worker `Deliverer::deliver`: `Store::claim`
//! (row -> `sending`, attempt n) -> `render` -> `build_message` -> `Mailer::send` -> `classify`
//! -> `Store::finish` (attempt + new status, and for a retry the next job with its `run_at`, in ONE
//! transaction).
//!
//! ## Invariants
//! - Nothing accepted is lost: the row and its job commit together; every non-final email owns
//!   one live job; the janitor gives a new job to any email whose job vanished.
//! - A job whose `seq` is not the email's current `job_seq` does nothing, so repeated, stale or
//!   recovered jobs never send twice except for a send that was in flight at a crash
//!   (at-least-once; the resend carries the same Message-ID).
//! - SMTP reply classification happens only in `delivery::classify`; retry timing only in
//!   `RetryPolicy`; backoff is the next job's `run_at`, never a sleep.
//! - `domain`, `render` and `delivery::policy` do no IO.

pub mod api;
pub mod cli;
pub mod config;
mod db;
pub mod delivery;
pub mod domain;
#[doc(hidden)]
pub mod faults;
pub mod inbound;
pub mod metrics;
mod net;
mod postbox;
pub mod queue;
pub mod render;
mod runtime;
pub mod settings;
mod shutdown;
pub mod store;
pub mod telemetry;
mod worker;

pub use config::Settings;
pub use domain::{EmailId, EmailStatus, NewAttachment, NewEmail, Priority};
pub use postbox::{
    OpenError, Postbox, RunError, SubmitError, SubmitOptions, SubmitOutcome, Submitted,
};
pub use runtime::{Role, Runtime};
pub use shutdown::{Shutdown, shutdown_signal};
pub use store::{EmailReport, TimelineEntry};
