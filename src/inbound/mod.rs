//! The IMAP watcher: one task per `[[mailboxes]]` entry reads new messages, the rules engine
//! ([`rules`], pure) decides which rules each matches, and matches become grouped, throttled
//! alert emails, submitted through the same store and queue as every other email.
//!
//! ## One inbound message's path
//! `watcher::scan` (UID SEARCH above the stored last UID, UID FETCH in batches) ->
//! `message::parse` (mail-parser; never fails) -> `rules::evaluate` -> `Store::record_scan`: the
//! batch's hits, the advanced (UIDVALIDITY, last UID) and the alert emails of every group that is
//! due commit in ONE transaction -> workers deliver the alerts -> the message is marked seen or
//! moved on the server if its rule says so.
//!
//! ## Grouping and throttling
//! Matches of one rule with the same `group_by` values form a group. A group with nothing
//! pending opens at its first match and is due `group_wait_secs` later, but never sooner than
//! `repeat_interval_secs` after its previous alert; when due, one alert lists every match it
//! holds. The flusher here makes alerts of groups that fall due between scans.
//!
//! ## Crash safety
//! A crash before a batch commits re-reads the batch after restart. Hits are unique per
//! (mailbox, UIDVALIDITY, UID, rule) and per (mailbox, rule, header fingerprint), and an alert
//! email is created in the same transaction that marks its hits alerted, so a message never
//! alerts twice.

pub mod config;
mod imap;
pub mod message;
pub mod rules;
mod watcher;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tracing::{info, warn};

pub use config::{ImapTls, Mailbox, MailboxSettings, compile};

use crate::Postbox;
use crate::domain::{EmailId, NewEmail};
use crate::queue::Shutdown;
use crate::render::{AlertMessage, AlertVars};
use crate::store::{DueGroup, NewRow};

/// Messages listed in one alert; the rest are counted.
const MAX_LISTED: usize = 25;
/// Distinct senders named in one alert.
const MAX_SENDERS: usize = 10;

/// What every watcher shares.
pub(crate) struct Inbound {
    pub(crate) pb: Postbox,
    mailboxes: Vec<Arc<Mailbox>>,
    /// This process, as a lease holder: `host-pid-ulid`.
    node: String,
    lease: Duration,
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Inbound {
    /// Wakes the workers for alerts just queued.
    fn alerted(&self, alerts: &[(String, EmailId)]) {
        for (mailbox, _) in alerts {
            metrics::counter!("postbox_mailbox_alerts_total", "mailbox" => mailbox.clone())
                .increment(1);
        }
        if !alerts.is_empty() {
            self.pb.notify_workers();
        }
    }

    /// The alert email of a due group, rendered later by the worker from the rule's template.
    fn build_alert(&self, g: &DueGroup) -> Option<NewRow> {
        let Some(mb) = self.mailboxes.iter().find(|m| m.name == g.mailbox) else {
            warn!(mailbox = %g.mailbox, rule = %g.rule, hits = g.hits.len(),
                "matches of a mailbox no longer configured: dropped");
            return None;
        };
        let (to, severity, priority, template) = if g.rule == config::DOWN_RULE {
            (
                mb.alert_to.clone(),
                "critical".to_string(),
                crate::Priority::High,
                "alert".to_string(),
            )
        } else {
            match mb.rules.iter().find(|r| r.name == g.rule) {
                Some(r) => (
                    r.recipients.clone(),
                    r.severity.clone(),
                    r.priority,
                    r.template.clone(),
                ),
                None => {
                    warn!(mailbox = %g.mailbox, rule = %g.rule, hits = g.hits.len(),
                        "matches of a rule no longer configured: dropped");
                    return None;
                }
            }
        };
        let text = |v: &serde_json::Value, k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let mut senders: BTreeMap<String, u64> = BTreeMap::new();
        for h in &g.hits {
            let s = text(&h.detail, "sender");
            if !s.is_empty() {
                *senders.entry(s).or_default() += 1;
            }
        }
        let mut senders: Vec<(String, u64)> = senders.into_iter().collect();
        senders.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let messages: Vec<AlertMessage> = g
            .hits
            .iter()
            .take(MAX_LISTED)
            .map(|h| AlertMessage {
                from: text(&h.detail, "from"),
                subject: text(&h.detail, "subject"),
                date: text(&h.detail, "date"),
                snippet: text(&h.detail, "snippet"),
                captures: serde_json::from_value(
                    h.detail.get("captures").cloned().unwrap_or_default(),
                )
                .unwrap_or_default(),
            })
            .collect();
        let mut summary = g
            .hits
            .last()
            .map(|h| text(&h.detail, "summary"))
            .filter(|s| !s.is_empty());
        if summary.is_none() && g.alerts_before > 0 {
            summary = Some(format!(
                "This group keeps matching: alert {} for it; the messages below arrived since the previous one.",
                g.alerts_before + 1
            ));
        }
        let first = g.hits.first().map(|h| h.seen_at);
        let last = g.hits.last().map(|h| h.seen_at);
        let vars = AlertVars {
            rule: g.rule.clone(),
            severity,
            mailbox: g.mailbox.clone(),
            count: g.hits.len() as u64,
            first_seen: first.map(rfc3339).unwrap_or_default(),
            last_seen: last.map(rfc3339).unwrap_or_default(),
            summary,
            group: (!g.group_key.is_empty()).then(|| g.group_key.clone()),
            senders: senders
                .iter()
                .take(MAX_SENDERS)
                .map(|(s, n)| format!("{s} ({n})"))
                .collect(),
            unlisted: g.hits.len().saturating_sub(messages.len()) as u64,
            messages,
        };
        let mut metadata = BTreeMap::new();
        metadata.insert("mailbox".to_string(), g.mailbox.clone());
        metadata.insert("rule".to_string(), g.rule.clone());
        if !g.group_key.is_empty() {
            metadata.insert("group".to_string(), g.group_key.clone());
        }
        let new = NewEmail {
            to: to.iter().map(|a| a.to_string()).collect(),
            template: Some(template),
            variables: Some(serde_json::to_value(&vars).expect("alert variables serialize")),
            priority,
            tags: vec!["alert".into(), format!("mailbox:{}", g.mailbox)],
            metadata,
            ..Default::default()
        };
        match self.pb.validate_email(new) {
            Ok(row) => Some(row),
            Err(e) => {
                warn!(mailbox = %g.mailbox, rule = %g.rule, error = %e,
                    "alert email refused by validation: dropped");
                None
            }
        }
    }
}

/// Runs a watcher for every configured mailbox, and the flusher that raises alerts of groups
/// falling due between scans, until `shutdown`.
///
/// Each watcher first takes its mailbox's lease (see `watcher::watch`), so however many
/// processes run watchers on one database, one of them reads each mailbox.
pub async fn run(pb: Postbox, mailboxes: Vec<Arc<Mailbox>>, lease: Duration, shutdown: Shutdown) {
    if mailboxes.is_empty() {
        return;
    }
    let node = crate::queue::node_name();
    info!(mailboxes = mailboxes.len(), %node, "IMAP watchers starting");
    let ctx = Arc::new(Inbound {
        pb,
        mailboxes: mailboxes.clone(),
        node,
        lease,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for mb in mailboxes {
        tasks.spawn(watcher::watch(ctx.clone(), mb, shutdown.clone()));
    }
    tasks.spawn(flusher(ctx, shutdown));
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            warn!(error = %e, "an inbound task panicked");
        }
    }
}

/// Raises the alerts of groups whose `group_wait` or `repeat_interval` ends between scans.
async fn flusher(ctx: Arc<Inbound>, shutdown: Shutdown) {
    loop {
        let wait = match ctx.pb.store().next_alert_due().await {
            Ok(Some(due)) => (due - OffsetDateTime::now_utc())
                .try_into()
                .unwrap_or(Duration::ZERO)
                .min(Duration::from_secs(1)),
            Ok(None) => Duration::from_secs(1),
            Err(e) => {
                warn!(error = %e, "cannot read pending alert groups");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = shutdown.clone() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match ctx.pb.store().flush_alerts(&|g| ctx.build_alert(g)).await {
            Ok(ids) => {
                if !ids.is_empty() {
                    info!(alerts = ids.len(), "alert emails queued for due groups");
                }
                ctx.alerted(&ids);
            }
            Err(e) => warn!(error = %e, "cannot raise due alerts"),
        }
    }
}
