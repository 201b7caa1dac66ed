//! The queue's section: `[queue]`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{ConfigError, nonzero};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// The apalis queue name. Renaming it orphans jobs already queued: don't, without a migration.
    pub name: String,
    /// Emails delivered at once by one process.
    pub concurrency: usize,
    /// Jobs fetched per database round trip (on SQLite, where a fetch rides the writer's
    /// transaction, up to a quarter of the jobs a worker holds: `worker::window`). Priority
    /// decides which jobs a fetch takes; a fetched batch starts in submission order, so keep
    /// this at or below `concurrency`.
    pub batch_size: usize,
    /// How often an idle worker looks for due jobs anyway. Only a backstop: submits made in
    /// this process wake it at once, a timer wakes it when the next delayed job falls due
    /// (`worker::wake_when_due`), and on PostgreSQL other processes' submits wake it by
    /// LISTEN/NOTIFY. What it still finds late: a job queued by another process on SQLite (the
    /// CLI's `send` while `serve` runs).
    pub poll_interval_ms: u64,
    /// Worker heartbeat; a worker silent for two of these is dead and its jobs are re-queued.
    pub heartbeat_secs: u64,
    /// How often the janitor repairs stuck rows, expires mail and applies retention.
    pub janitor_interval_secs: u64,
    /// A job running longer than this is considered stuck and handed back to the queue.
    pub stuck_after_secs: u64,
    /// Pause before restarting a worker that died on a database error.
    pub restart_delay_ms: u64,
    /// Backpressure: at most this many emails waiting (queued, retrying or sending). A submit
    /// past it is refused whole (HTTP 503 with Retry-After); 0 means no cap.
    pub max_depth: u64,
    /// Submits that arrive together share one transaction (group commit), up to this many emails.
    pub group_commit_max: usize,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            name: "postbox::send".into(),
            concurrency: 32,
            batch_size: 32,
            poll_interval_ms: 1000,
            heartbeat_secs: 10,
            janitor_interval_secs: 15,
            stuck_after_secs: 600,
            restart_delay_ms: 1_000,
            max_depth: 1_000_000,
            group_commit_max: 2_000,
        }
    }
}

impl QueueSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        nonzero(&[
            ("queue.concurrency", self.concurrency as u64),
            ("queue.batch_size", self.batch_size as u64),
            ("queue.poll_interval_ms", self.poll_interval_ms),
            ("queue.heartbeat_secs", self.heartbeat_secs),
            ("queue.janitor_interval_secs", self.janitor_interval_secs),
            ("queue.stuck_after_secs", self.stuck_after_secs),
            ("queue.group_commit_max", self.group_commit_max as u64),
        ])?;
        if self.name.trim().is_empty() {
            return Err(ConfigError::new("queue.name", "must not be empty"));
        }
        Ok(())
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }

    pub fn stuck_after(&self) -> Duration {
        Duration::from_secs(self.stuck_after_secs)
    }
}
