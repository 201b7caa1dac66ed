//! Identity and state of a stored email: its id, priority and status.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A stable, sortable email id (a ULID).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = String, example = "01KAQ3N2W4XGZ8Y5B7C9D1E3F5")]
pub struct EmailId(String);

impl EmailId {
    pub fn generate() -> Self {
        Self(ulid::Ulid::generate().to_string())
    }

    /// Parses an id given by a user (CLI, API); only well-formed ULIDs are accepted.
    pub fn parse(s: &str) -> Result<Self, String> {
        ulid::Ulid::from_string(s.trim())
            .map(|u| Self(u.to_string()))
            .map_err(|_| format!("`{s}` is not an email id (expected a 26-character ULID)"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Only for ids read back from our own database.
    pub(crate) fn from_db(s: String) -> Self {
        Self(s)
    }
}

impl fmt::Display for EmailId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Queue priority: `high` jumps ahead of everything queued at `normal` and `low`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    /// The apalis job priority (higher runs first).
    pub fn job_priority(self) -> usize {
        match self {
            Priority::Low => 0,
            Priority::Normal => 1,
            Priority::High => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            other => Err(format!("`{other}` is not a priority (high, normal, low)")),
        }
    }
}

/// Where an email is in its life. Transitions are listed in DESIGN.md and enforced by the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EmailStatus {
    Queued,
    Sending,
    Sent,
    Retrying,
    Failed,
    Cancelled,
    Expired,
    /// Not sent: every recipient is on the suppression list (final).
    Suppressed,
}

impl EmailStatus {
    /// Every status, in the order of the lifecycle.
    pub const ALL: [EmailStatus; 8] = [
        EmailStatus::Queued,
        EmailStatus::Sending,
        EmailStatus::Sent,
        EmailStatus::Retrying,
        EmailStatus::Failed,
        EmailStatus::Cancelled,
        EmailStatus::Expired,
        EmailStatus::Suppressed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EmailStatus::Queued => "queued",
            EmailStatus::Sending => "sending",
            EmailStatus::Sent => "sent",
            EmailStatus::Retrying => "retrying",
            EmailStatus::Failed => "failed",
            EmailStatus::Cancelled => "cancelled",
            EmailStatus::Expired => "expired",
            EmailStatus::Suppressed => "suppressed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => EmailStatus::Queued,
            "sending" => EmailStatus::Sending,
            "sent" => EmailStatus::Sent,
            "retrying" => EmailStatus::Retrying,
            "failed" => EmailStatus::Failed,
            "cancelled" => EmailStatus::Cancelled,
            "expired" => EmailStatus::Expired,
            "suppressed" => EmailStatus::Suppressed,
            _ => return None,
        })
    }

    /// No worker will touch an email in a final state again (unless a person re-drives it).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            EmailStatus::Sent
                | EmailStatus::Failed
                | EmailStatus::Cancelled
                | EmailStatus::Expired
                | EmailStatus::Suppressed
        )
    }
}

impl fmt::Display for EmailStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
