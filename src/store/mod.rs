//! The persistence seam. Everything postbox keeps (emails, their timelines, their jobs) goes
//! through [`Store`]; no other module writes SQL. SQLite is the embedded default; PostgreSQL
//! (`database.url = "postgres://..."`) runs the same statements for many processes on many hosts.
//!
//! Invariants kept here:
//! - an email row and the job that will deliver it commit in one transaction;
//! - every email that is not final owns exactly one live job, named `<id>:<job_seq>`; a job whose
//!   seq is not the email's current one is stale and does nothing;
//! - every status change writes its timeline entry in the same transaction.

mod batch;
mod events;
mod group;
mod inbound;
mod janitor;
mod lifecycle;
mod open;
mod reads;
mod sessions;
mod settings;
mod stall;
mod submit;
mod suppressions;
mod throttle;

use serde::Serialize;
use time::OffsetDateTime;

pub use crate::db::{Db, Kind};
pub use batch::{Completion, Recorder};
pub use events::{
    Cursor, DeliveryAttempt, DeliveryOutcome, DeliveryRecord, Event, EventData, EventPage,
    LAG_COUNT_MAX, WebhookRound, WebhookRow, WebhookSpec, event_seq,
};
pub use group::{GroupCommitter, GroupSettings};
pub use inbound::{
    AlertBuilder, DueGroup, Health, MailboxPosition, MailboxStatus, NewHit, PendingHit, RuleStatus,
    ScanOutcome, lease_name, node_lease,
};
pub use inbound::{MAX_LISTED, MAX_SENDERS};
pub use open::Store;
pub use sessions::StoredSession;
pub use settings::{DatabaseSettings, RetentionSettings, Synchronous, is_postgres_url, redact_url};
pub use stall::{AlertState, StallFigures};
pub use suppressions::{
    BounceKind, BounceRecord, BounceReportRow, SoftBounceRule, Suppression, SuppressionFilter,
    SuppressionReason, suppression_key,
};
pub use throttle::{Pause, PauseKind};

use crate::domain::{Email, EmailId, EmailStatus, Priority};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("queue error: {0}")]
    Queue(String),
    #[error("the watcher lease of mailbox {0} was lost to another process")]
    LeaseLost(String),
    #[error("stored email {id} is unreadable: {message}")]
    Corrupt { id: String, message: String },
}

/// What kind of trouble a [`StoreError`] is: decided here, once, from the driver's codes, so no
/// other layer reads SQLite or PostgreSQL error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Another writer holds the lock (SQLite busy/locked, a pool timeout, a deadlock or a
    /// serialization failure): try again shortly.
    Busy,
    /// The disk (or the database's storage) is full: nothing could be written; it clears when
    /// space is freed.
    Full,
    /// The database cannot be reached or is shutting down.
    Unavailable,
    /// Anything else: a constraint, a value the database cannot store, a bug.
    Other,
}

impl StoreError {
    pub fn fault(&self) -> Fault {
        let StoreError::Db(e) = self else {
            return Fault::Other;
        };
        match e {
            sqlx::Error::PoolTimedOut => Fault::Busy,
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => Fault::Unavailable,
            sqlx::Error::Database(d) => {
                let code = d.code();
                let code = code.as_deref().unwrap_or("");
                match code {
                    // SQLite (extended codes keep the primary one in the low byte).
                    c if c.parse::<u32>().is_ok() => match c.parse::<u32>().unwrap_or(0) & 0xff {
                        5 | 6 => Fault::Busy,
                        13 => Fault::Full,
                        10 | 14 => Fault::Unavailable,
                        _ => Fault::Other,
                    },
                    // PostgreSQL SQLSTATE classes.
                    "53100" => Fault::Full,
                    "40001" | "40P01" | "55P03" => Fault::Busy,
                    c if c.starts_with("08") || c.starts_with("57P") || c.starts_with("53") => {
                        Fault::Unavailable
                    }
                    _ => Fault::Other,
                }
            }
            _ => Fault::Other,
        }
    }

    /// Busy, full or unavailable: the same write may work later. `Other` will not.
    pub fn is_transient(&self) -> bool {
        self.fault() != Fault::Other
    }
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
    /// Its recipients on the suppression list now (lowercased addresses).
    pub suppressed: Vec<String>,
}

/// What a worker's claim found.
#[derive(Debug)]
pub enum ClaimResult {
    Claimed(Box<Claim>),
    /// Final, cancelled, stale job, or unknown id: nothing to do.
    Skip(&'static str),
    /// Past `expires_at`: marked expired.
    Expired,
    /// The stored email cannot be read: marked failed with this reason.
    Failed(String),
}

/// How an attempt ends, as the store records it.
#[derive(Debug, Clone)]
pub enum Finish {
    Sent,
    Retry {
        at: OffsetDateTime,
    },
    Failed {
        reason: String,
    },
    /// Not sent: every recipient is suppressed (listed in the reason).
    Suppressed {
        reason: String,
    },
    /// Not tried: a rate limit or a pause. Back to `queued` until `at`,
    /// the claim's attempt taken back; no timeline entry, no event (`reason` is its
    /// `last_error` meanwhile).
    Wait {
        at: OffsetDateTime,
        reason: String,
    },
    /// The relay said "slow down" (`[throttle]` patterns): retried at `at` like a temporary
    /// failure (timeline, `email.deferred` with the reason) without spending the retry budget.
    Throttled {
        at: OffsetDateTime,
        reason: String,
    },
}

impl Finish {
    /// Whether the email gets a new job (`Some(its run time)`).
    pub fn next_run(&self) -> Option<OffsetDateTime> {
        match self {
            Finish::Retry { at } | Finish::Wait { at, .. } | Finish::Throttled { at, .. } => {
                Some(*at)
            }
            _ => None,
        }
    }
}

/// One attempt's facts for the timeline.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub started_at: OffsetDateTime,
    pub duration_ms: i64,
    pub smtp_code: Option<u16>,
    pub smtp_text: String,
    /// Said on the timeline with the outcome (recipients left out as suppressed, ...).
    pub note: Option<String>,
}

impl AttemptRecord {
    /// The record of an email that was not tried (suppressed, waiting): now, no reply.
    pub fn untried() -> AttemptRecord {
        AttemptRecord {
            started_at: OffsetDateTime::now_utc(),
            duration_ms: 0,
            smtp_code: None,
            smtp_text: String::new(),
            note: None,
        }
    }
}

/// One timeline entry.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TimelineEntry {
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
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
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub sent_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub send_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    /// The HTTP request that submitted it, if any.
    pub request_id: Option<String>,
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
    /// Retention stopped at its time budget with more to delete: the next pass comes soon
    /// (each pass spends at most `RETENTION_BUDGET`, two seconds, on it).
    pub retention_left: bool,
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

/// A validated email ready to insert: its new id, the email, its Message-ID.
pub type NewRow = (EmailId, Email, String);

/// One submission (one email or one batch) waiting for a group commit.
#[derive(Debug, Clone)]
pub struct InsertRequest {
    pub rows: Vec<NewRow>,
    /// The HTTP request (or other origin) that submitted it; shown in the timeline.
    pub request_id: Option<String>,
    pub idempotency: Option<IdempotencyClaim>,
}

/// An `Idempotency-Key`: the same (scope, key) with the same fingerprint replays the first
/// result; with another fingerprint it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyClaim {
    /// Whose key this is (the API token's name), so two clients never collide.
    pub scope: String,
    pub key: String,
    /// A digest of what was asked (method, path, body).
    pub fingerprint: String,
}

/// What became of one [`InsertRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Committed: each email's id and whether it was created (false: its own idempotency_key
    /// matched an email stored earlier).
    Inserted(Vec<(EmailId, bool)>),
    /// The idempotency key was seen with the same request: the first result, nothing created.
    Replayed(Vec<(EmailId, bool)>),
    /// The idempotency key was seen with a different request: nothing created.
    KeyReused,
    /// Accepting it would pass `queue.max_depth`: nothing created.
    QueueFull { depth: u64, max_depth: u64 },
}

/// Filters of an email listing. Newest first; `before` is the cursor (an id).
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<EmailStatus>,
    pub tag: Option<String>,
    /// Any envelope recipient equal to this address (case-insensitive).
    pub recipient: Option<String>,
    /// Any envelope recipient at this domain (case-insensitive).
    pub domain: Option<String>,
    pub created_after: Option<OffsetDateTime>,
    pub created_before: Option<OffsetDateTime>,
    pub before_id: Option<EmailId>,
    pub limit: u32,
}

/// One email in a listing.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EmailSummary {
    pub id: EmailId,
    pub status: EmailStatus,
    pub priority: Priority,
    pub subject: Option<String>,
    pub template: Option<String>,
    /// Envelope recipients (to, cc and bcc).
    pub recipients: Vec<String>,
    pub tags: Vec<String>,
    pub attempts: u32,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub sent_at: Option<OffsetDateTime>,
    pub last_error: Option<String>,
}

/// A page of a listing; `next_cursor` continues it (None: this was the last page).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EmailPage {
    pub emails: Vec<EmailSummary>,
    pub next_cursor: Option<String>,
}

impl Stats {
    /// Emails waiting or in flight in `state` (queued, retrying, sending), as
    /// (high, normal, low) priority counts.
    pub fn depth_of(&self, state: &str) -> (u64, u64, u64) {
        let row = self.depth.get(state);
        let n = |p: &str| row.and_then(|r| r.get(p)).copied().unwrap_or(0);
        (n("high"), n("normal"), n("low"))
    }
}

/// Attempts that ended in one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MinuteCounts {
    pub minute: OffsetDateTime,
    pub sent: u64,
    pub failed: u64,
}

/// Attempts that ended in a window of time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WindowCounts {
    pub sent: u64,
    pub failed: u64,
    /// Attempts that failed temporarily and were scheduled again.
    pub retried: u64,
}

/// The `/metrics` queue gauges.
#[derive(Debug, Default, Clone)]
pub struct QueueGauges {
    /// Emails queued, retrying and sending.
    pub depth: std::collections::BTreeMap<String, u64>,
    pub oldest_queued_age_secs: Option<f64>,
}

/// The queue at a glance.
#[derive(Debug, Default, Clone, Serialize, utoipa::ToSchema)]
pub struct Stats {
    /// Emails waiting or in flight, by status then priority.
    pub depth: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    /// All emails by status.
    pub totals: std::collections::BTreeMap<String, u64>,
    /// Age of the oldest email that is due and still queued (seconds).
    pub oldest_queued_age_secs: Option<f64>,
    pub in_flight: u64,
    pub last_minute: WindowCounts,
    pub last_hour: WindowCounts,
}

/// Tests: a store on a fresh SQLite file in `dir`, and its readers' pool.
#[cfg(test)]
pub(crate) async fn sqlite_for_plans(dir: &std::path::Path) -> (Store, sqlx::SqlitePool) {
    let s = DatabaseSettings {
        url: format!("sqlite://{}", dir.join("t.db").display()),
        ..Default::default()
    };
    let store = Store::open(&s, "q").await.expect("open");
    let crate::db::Db::Sqlite { read, .. } = store.db() else {
        panic!("not SQLite")
    };
    let read = read.clone();
    (store, read)
}

/// Tests: whether the SQLite schema has an object (table, index, trigger) named `name`.
#[cfg(test)]
pub(crate) async fn schema_has(read: &sqlx::SqlitePool, name: &str) -> bool {
    sqlx::query("SELECT 1 FROM sqlite_master WHERE name = ?")
        .bind(name)
        .fetch_optional(read)
        .await
        .expect("schema")
        .is_some()
}

/// Tests: SQLite's `EXPLAIN QUERY PLAN` of `text` with `args` arguments (all 0), one detail
/// line per step.
#[cfg(test)]
pub(crate) async fn query_plan(read: &sqlx::SqlitePool, text: &str, args: usize) -> Vec<String> {
    let mut q = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {text}")));
    for _ in 0..args {
        q = q.bind(0i64);
    }
    q.fetch_all(read)
        .await
        .expect("plan")
        .iter()
        .map(|r| sqlx::Row::get(r, 3))
        .collect()
}
