//! The persistence seam. Everything postbox keeps (emails, their timelines, their jobs) goes
//! through [`Store`]; no other module writes SQL. SQLite is the embedded default; a PostgreSQL
//! store will sit beside it with the same methods.
//!
//! Invariants kept here:
//! - an email row and the job that will deliver it commit in one transaction;
//! - every email that is not final owns exactly one live job, named `<id>:<job_seq>`; a job whose
//!   seq is not the email's current one is stale and does nothing;
//! - every status change writes its timeline entry in the same transaction.

mod sqlite;

use serde::Serialize;
use time::OffsetDateTime;

pub use sqlite::Store;

use crate::domain::{Email, EmailId, EmailStatus, Priority};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("queue error: {0}")]
    Queue(String),
    #[error("stored email {id} is unreadable: {message}")]
    Corrupt { id: String, message: String },
}

/// The job payload: small, versioned, ids only. Unknown versions are dropped with a warning, so
/// a payload written by a newer postbox never stops an older worker.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SendJob {
    pub v: u32,
    pub email_id: String,
    pub seq: i64,
}

impl SendJob {
    pub const VERSION: u32 = 1;
}

/// An email a worker has claimed for one attempt.
#[derive(Debug, Clone)]
pub struct Claim {
    pub id: EmailId,
    pub email: Email,
    pub message_id: String,
    /// This attempt's number (1-based, since submission or the last manual retry).
    pub attempt: u32,
    pub seq: i64,
    pub priority: Priority,
    /// When `retry.max_age` starts counting.
    pub age_from: OffsetDateTime,
    /// The previous attempt was cut off by a crash (the row was still `sending`).
    pub interrupted: bool,
}

/// What a worker's claim found.
#[derive(Debug)]
pub enum ClaimResult {
    Claimed(Box<Claim>),
    /// Final, cancelled, stale job, or unknown id: nothing to do.
    Skip(&'static str),
    /// Past `expires_at`: marked expired.
    Expired,
}

/// How an attempt ends, as the store records it.
#[derive(Debug, Clone)]
pub enum Finish {
    Sent,
    Retry { at: OffsetDateTime },
    Failed { reason: String },
}

/// One attempt's facts for the timeline.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub started_at: OffsetDateTime,
    pub duration_ms: i64,
    pub smtp_code: Option<u16>,
    pub smtp_text: String,
}

/// One timeline entry.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub kind: String,
    pub status: String,
    pub attempt: Option<u32>,
    pub smtp_code: Option<u16>,
    pub smtp_text: Option<String>,
    pub duration_ms: Option<i64>,
    pub detail: Option<String>,
}

/// An email's state and history, for `status` (library, CLI, API).
#[derive(Debug, Clone, Serialize)]
pub struct EmailReport {
    pub id: EmailId,
    pub status: EmailStatus,
    pub priority: Priority,
    pub message_id: String,
    pub subject: Option<String>,
    pub template: Option<String>,
    pub to: Vec<String>,
    pub tags: Vec<String>,
    pub attempts: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub sent_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub send_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    pub timeline: Vec<TimelineEntry>,
}

/// Why a cancel or retry was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    #[error("no email with id {0}")]
    NotFound(EmailId),
    #[error("email {id} is {status}; {action} needs {allowed}")]
    Conflict {
        id: EmailId,
        status: EmailStatus,
        action: &'static str,
        allowed: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one janitor pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct JanitorReport {
    pub jobs_requeued: u64,
    pub emails_rescued: u64,
    pub emails_expired: u64,
    pub jobs_deleted: u64,
    pub emails_deleted: u64,
}

/// Emails by status (and the queue's oldest waiting email).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    pub by_status: std::collections::BTreeMap<String, u64>,
}

impl Counts {
    pub fn get(&self, s: EmailStatus) -> u64 {
        self.by_status.get(s.as_str()).copied().unwrap_or(0)
    }
}

pub(crate) fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

pub(crate) fn from_ms(v: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(v as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}
