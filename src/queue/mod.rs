//! The job queue: apalis's tables, and the kinds of job postbox runs on them. This module owns
//! every statement on those tables (`table`: pushes inside a caller's transaction, the
//! janitor's repairs, setup); the workers that run jobs are in `worker`, the rows a job acts
//! on in `store`.
//!
//! A job is a [`JobKind`]: a name, a small versioned payload of ids (never the data it acts
//! on, which the handler reads from its own tables, so a stale or repeated job can tell it is
//! one), and a handler registered with the worker. Adding a kind touches this module (the
//! payload type) and the worker (its handler), never the store.
//!
//! Invariants kept here:
//! - a job is pushed in the transaction that writes the rows it acts on, keyed by an
//!   idempotency key unique per kind (a second push of one key does nothing);
//! - `run_at` is rounded up to apalis's whole seconds, so no job runs before its time.

pub(crate) mod backend;
mod settings;
pub(crate) mod table;
mod wake;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use settings::QueueSettings;
pub use wake::Wake;

/// A kind of job.
pub trait JobKind: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The kind's name (logs, metrics).
    const NAME: &'static str;
    /// The payload's version: a worker drops (with a warning) a payload of another version, so
    /// one written by a newer postbox never stops an older worker.
    const VERSION: u32;

    /// The apalis job type (its "queue") this kind's jobs are stored under, given the configured
    /// `queue.name`.
    fn job_type(queue: &str) -> String {
        format!("{queue}.{}", Self::NAME)
    }

    /// The payload's version as read back.
    fn version(&self) -> u32;

    /// The idempotency key: a second job with the same key is not pushed.
    fn key(&self) -> String;
}

/// Delivers one email: the job that owns `<email_id>:<seq>`. A job whose seq is not the
/// email's current one is stale and does nothing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SendJob {
    pub v: u32,
    pub email_id: String,
    pub seq: i64,
}

impl SendJob {
    pub fn new(email_id: &str, seq: i64) -> SendJob {
        SendJob {
            v: Self::VERSION,
            email_id: email_id.to_string(),
            seq,
        }
    }
}

impl JobKind for SendJob {
    const NAME: &'static str = "send";
    const VERSION: u32 = 1;

    /// The queue's name itself: delivery jobs were its only kind, and stored jobs keep working.
    fn job_type(queue: &str) -> String {
        queue.to_string()
    }

    fn version(&self) -> u32 {
        self.v
    }

    fn key(&self) -> String {
        format!("{}:{}", self.email_id, self.seq)
    }
}
