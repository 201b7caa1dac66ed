//! The email state machine, as ONE table: every change of an email's `status`, the states it
//! may come from, the timeline entry it writes and the event it raises. The store builds every
//! status-changing statement from this table ([`Step::to`], [`Step::guard`]); the README's state
//! diagram is checked against it (`readme_states_match_the_table`), and the events feed derives
//! an event's type from a timeline entry by it ([`event_of`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::EmailStatus;
use EmailStatus::*;

/// What happened to an email, as apps see it (webhooks, `GET /v1/events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum EventType {
    /// Accepted and queued (also after a person's retry of a dead letter).
    #[serde(rename = "email.queued")]
    Queued,
    /// The relay answered 2xx.
    #[serde(rename = "email.sent")]
    Sent,
    /// A temporary failure (4xx, timeout, network): will be retried.
    #[serde(rename = "email.deferred")]
    Deferred,
    /// A permanent failure, or the retry budget spent: a dead letter.
    #[serde(rename = "email.failed")]
    Failed,
    /// Cancelled by a person or an app.
    #[serde(rename = "email.cancelled")]
    Cancelled,
    /// Not sent before its `expires_at`.
    #[serde(rename = "email.expired")]
    Expired,
    /// Not sent: every recipient is on the suppression list.
    #[serde(rename = "email.suppressed")]
    Suppressed,
    /// A delivery status notification came back after `sent` (data says hard or soft).
    #[serde(rename = "email.bounced")]
    Bounced,
    /// A recipient reported it as spam (an ARF feedback report).
    #[serde(rename = "email.complained")]
    Complained,
    /// A recipient used its one-click unsubscribe link (RFC 8058).
    #[serde(rename = "email.unsubscribed")]
    Unsubscribed,
    /// A watched mailbox's watcher lost its connection (or could not make one).
    #[serde(rename = "mailbox.down")]
    MailboxDown,
    /// ... and has it again.
    #[serde(rename = "mailbox.up")]
    MailboxUp,
    /// A watched mailbox's rule raised an alert (its email is `data.email_id`).
    #[serde(rename = "alert.raised")]
    AlertRaised,
}

impl EventType {
    pub const ALL: [EventType; 13] = [
        EventType::Queued,
        EventType::Sent,
        EventType::Deferred,
        EventType::Failed,
        EventType::Cancelled,
        EventType::Expired,
        EventType::Suppressed,
        EventType::Bounced,
        EventType::Complained,
        EventType::Unsubscribed,
        EventType::MailboxDown,
        EventType::MailboxUp,
        EventType::AlertRaised,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Queued => "email.queued",
            EventType::Sent => "email.sent",
            EventType::Deferred => "email.deferred",
            EventType::Failed => "email.failed",
            EventType::Cancelled => "email.cancelled",
            EventType::Expired => "email.expired",
            EventType::Suppressed => "email.suppressed",
            EventType::Bounced => "email.bounced",
            EventType::Complained => "email.complained",
            EventType::Unsubscribed => "email.unsubscribed",
            EventType::MailboxDown => "mailbox.down",
            EventType::MailboxUp => "mailbox.up",
            EventType::AlertRaised => "alert.raised",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One kind of status change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// A new email (the only step with no state before it).
    Submit,
    /// A worker takes it for one attempt. From `sending`: its claimer died mid-send (the
    /// timeline says `interrupted`).
    Claim,
    /// The relay said 2xx.
    Deliver,
    /// A temporary failure; the next attempt is scheduled.
    Defer,
    /// A permanent failure, or the retry budget spent (or the stored email cannot be read).
    Fail,
    /// Past its `expires_at` before it was sent.
    Expire,
    /// A person or an app cancelled it.
    Cancel,
    /// A person re-drove a dead letter: a fresh retry budget.
    Requeue,
    /// Every recipient is on the suppression list: not sent.
    Suppress,
    /// A rate limit or a pause: it waits for its turn. Not an attempt (the claim's count is
    /// taken back), no timeline entry, no event.
    Hold,
}

/// A row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Transition {
    pub step: Step,
    pub from: &'static [EmailStatus],
    pub to: EmailStatus,
    /// The timeline entry's `kind` this step writes (None: the claim writes none, unless it
    /// takes over an interrupted send).
    pub entry: Option<&'static str>,
    /// The event it raises.
    pub event: Option<EventType>,
    /// Why, as the README's diagram says it.
    pub why: &'static str,
}

/// THE state machine. Nothing else decides which status may follow which.
pub const TABLE: &[Transition] = &[
    Transition {
        step: Step::Submit,
        from: &[],
        to: Queued,
        entry: Some("submitted"),
        event: Some(EventType::Queued),
        why: "accepted",
    },
    Transition {
        step: Step::Claim,
        from: &[Queued, Retrying, Sending],
        to: Sending,
        entry: None,
        event: None,
        why: "a worker takes it; from sending: its claimer died mid-send",
    },
    Transition {
        step: Step::Deliver,
        from: &[Sending],
        to: Sent,
        entry: Some("attempt"),
        event: Some(EventType::Sent),
        why: "the relay said 2xx",
    },
    Transition {
        step: Step::Defer,
        from: &[Sending],
        to: Retrying,
        entry: Some("attempt"),
        event: Some(EventType::Deferred),
        why: "4xx, timeout, network error",
    },
    Transition {
        step: Step::Fail,
        from: &[Sending],
        to: Failed,
        entry: Some("attempt"),
        event: Some(EventType::Failed),
        why: "5xx, or retry budget spent: dead letter",
    },
    Transition {
        step: Step::Expire,
        from: &[Queued, Retrying, Sending],
        to: Expired,
        entry: Some("expired"),
        event: Some(EventType::Expired),
        why: "past expires_at",
    },
    Transition {
        step: Step::Cancel,
        from: &[Queued, Retrying, Failed],
        to: Cancelled,
        entry: Some("cancelled"),
        event: Some(EventType::Cancelled),
        why: "postbox cancel ID",
    },
    Transition {
        step: Step::Requeue,
        from: &[Failed],
        to: Queued,
        entry: Some("requeued"),
        event: Some(EventType::Queued),
        why: "postbox retry ID: fresh budget, same Message-ID",
    },
    Transition {
        step: Step::Suppress,
        from: &[Sending],
        to: Suppressed,
        entry: Some("suppressed"),
        event: Some(EventType::Suppressed),
        why: "every recipient is on the suppression list",
    },
    Transition {
        step: Step::Hold,
        from: &[Sending],
        to: Queued,
        entry: None,
        event: None,
        why: "a rate limit or a pause: waits, not an attempt",
    },
];

/// Timeline entries that raise an event without changing the status: what is learnt about an
/// email after it was sent.
pub const NOTES: &[(&str, EventType)] = &[
    ("bounced", EventType::Bounced),
    ("complained", EventType::Complained),
    ("unsubscribed", EventType::Unsubscribed),
    ("mailbox_down", EventType::MailboxDown),
    ("mailbox_up", EventType::MailboxUp),
    ("alert_raised", EventType::AlertRaised),
];

impl Step {
    pub fn row(self) -> &'static Transition {
        TABLE
            .iter()
            .find(|t| t.step == self)
            .expect("every step has a row")
    }

    /// The status this step writes.
    pub fn to(self) -> EmailStatus {
        self.row().to
    }

    /// The SQL condition that the email's `status` column (named `col`) allows this step:
    /// `col IN ('queued', 'retrying')`.
    pub fn guard(self, col: &str) -> String {
        self.guard_from(col, self.row().from)
    }

    /// As [`Step::guard`], narrowed to `from` (which must be allowed by the table).
    pub fn guard_from(self, col: &str, from: &[EmailStatus]) -> String {
        assert!(
            from.iter().all(|s| self.row().from.contains(s)),
            "{self:?} is not allowed from all of {from:?}"
        );
        let list: Vec<String> = from.iter().map(|s| format!("'{}'", s.as_str())).collect();
        format!("{col} IN ({})", list.join(", "))
    }
}

/// Whether the table lets an email go from `from` to `to` (by any step).
pub fn allowed(from: EmailStatus, to: EmailStatus) -> bool {
    TABLE.iter().any(|t| t.to == to && t.from.contains(&from))
}

/// The event a timeline entry (its `kind` and the status it left) stands for, if any.
pub fn event_of(kind: &str, status: &str) -> Option<EventType> {
    if let Some((_, e)) = NOTES.iter().find(|(k, _)| *k == kind) {
        return Some(*e);
    }
    let status = EmailStatus::parse(status)?;
    TABLE
        .iter()
        .find(|t| t.entry == Some(kind) && t.to == status)
        .and_then(|t| t.event)
        // An email whose stored copy cannot be read fails at its claim, with no attempt: its
        // entry is `failed` (Step::Fail all the same).
        .or(match (kind, status) {
            ("failed", Failed) => Some(EventType::Failed),
            _ => None,
        })
}

/// The diagram the README shows, one line per row: `from | from -> to  event  why`.
pub fn diagram() -> String {
    TABLE
        .iter()
        .map(|t| {
            let from = if t.from.is_empty() {
                "(new)".to_string()
            } else {
                t.from
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            let event = t.event.map_or("-", EventType::as_str);
            format!(
                "{from:<27} -> {:<10}  {event:<16}  {}",
                t.to.as_str(),
                t.why
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [EmailStatus; 8] = EmailStatus::ALL;

    /// Every (from, to) pair: allowed exactly where this matrix says so.
    #[test]
    fn every_allowed_and_refused_transition() {
        // rows: from; columns: to, in the order of ALL.
        #[rustfmt::skip]
        let want: [[bool; 8]; 8] = [
            //             queued sending sent  retrying failed cancelled expired suppressed
            /* queued */   [false, true,  false, false,  false, true,     true,   false],
            /* sending */  [true,  true,  true,  true,   true,  false,    true,   true ],
            /* sent */     [false, false, false, false,  false, false,    false,  false],
            /* retrying */ [false, true,  false, false,  false, true,     true,   false],
            /* failed */   [true,  false, false, false,  false, true,     false,  false],
            /* cancelled */[false, false, false, false,  false, false,    false,  false],
            /* expired */  [false, false, false, false,  false, false,    false,  false],
            /* suppressed*/[false, false, false, false,  false, false,    false,  false],
        ];
        for (i, from) in ALL.iter().enumerate() {
            for (j, to) in ALL.iter().enumerate() {
                assert_eq!(allowed(*from, *to), want[i][j], "{from} -> {to}");
            }
        }
        // Final states stay final (a person's retry of a dead letter is the one way back).
        for s in ALL.into_iter().filter(|s| s.is_final() && *s != Failed) {
            assert!(ALL.iter().all(|to| !allowed(s, *to)), "{s} is final");
        }
    }

    #[test]
    fn guards_are_sql_over_the_table() {
        assert_eq!(
            Step::Cancel.guard("status"),
            "status IN ('queued', 'retrying', 'failed')"
        );
        assert_eq!(
            Step::Expire.guard_from("e.status", &[Queued, Retrying]),
            "e.status IN ('queued', 'retrying')"
        );
    }

    /// The completions' one statement guards with Deliver's states for all three outcomes.
    #[test]
    fn an_attempts_outcomes_all_leave_sending() {
        for s in [
            Step::Deliver,
            Step::Defer,
            Step::Fail,
            Step::Suppress,
            Step::Hold,
        ] {
            assert_eq!(s.row().from, &[Sending]);
        }
    }

    #[test]
    #[should_panic(expected = "not allowed")]
    fn a_guard_wider_than_the_table_is_refused() {
        Step::Requeue.guard_from("status", &[Sent]);
    }

    #[test]
    fn timeline_entries_map_to_events() {
        assert_eq!(event_of("submitted", "queued"), Some(EventType::Queued));
        assert_eq!(event_of("requeued", "queued"), Some(EventType::Queued));
        assert_eq!(event_of("attempt", "sent"), Some(EventType::Sent));
        assert_eq!(event_of("attempt", "retrying"), Some(EventType::Deferred));
        assert_eq!(event_of("attempt", "failed"), Some(EventType::Failed));
        assert_eq!(event_of("failed", "failed"), Some(EventType::Failed));
        assert_eq!(
            event_of("cancelled", "cancelled"),
            Some(EventType::Cancelled)
        );
        assert_eq!(event_of("expired", "expired"), Some(EventType::Expired));
        assert_eq!(event_of("interrupted", "sending"), None);
        assert_eq!(
            event_of("suppressed", "suppressed"),
            Some(EventType::Suppressed)
        );
        assert_eq!(event_of("bounced", "sent"), Some(EventType::Bounced));
        assert_eq!(event_of("complained", "sent"), Some(EventType::Complained));
        assert_eq!(event_of("mailbox_down", ""), Some(EventType::MailboxDown));
        assert_eq!(
            event_of("alert_raised", "queued"),
            Some(EventType::AlertRaised)
        );
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
    }

    /// The README's state diagram is this table.
    #[test]
    fn readme_states_match_the_table() {
        let readme = include_str!("../../README.md");
        let block = readme
            .split("## States and retries\n\n```\n")
            .nth(1)
            .and_then(|s| s.split("\n```").next())
            .expect("README has a States and retries diagram");
        assert_eq!(
            block,
            diagram(),
            "README's diagram differs from domain::lifecycle::TABLE; paste diagram()'s output"
        );
    }
}
