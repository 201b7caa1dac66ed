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

pub mod bounce;
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

pub use config::{ClusterSettings, ImapTls, Mailbox, MailboxSettings, Purpose, compile};

use crate::Postbox;
use crate::Shutdown;
use crate::domain::{EmailId, NewEmail};
use crate::render::{AlertMessage, AlertVars};
use crate::store::{DueGroup, NewRow};

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
    ///
    /// Built so that it passes validation whatever the matched mail held: its parts were
    /// cleaned and clipped when the hits were stored, the group key in the metadata is clipped
    /// to 1024 bytes, the recipients were checked against `limits.max_recipients` at start-up,
    /// and listed messages are dropped (and counted as unlisted) until the variables fit
    /// `limits.max_variables_bytes`. None only for a mailbox or rule no longer configured.
    fn build_alert(&self, g: &DueGroup) -> Option<NewRow> {
        let Some(mb) = self.mailboxes.iter().find(|m| m.name == g.mailbox) else {
            warn!(mailbox = %g.mailbox, rule = %g.rule, hits = g.count,
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
                    warn!(mailbox = %g.mailbox, rule = %g.rule, hits = g.count,
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
        let mut messages: Vec<AlertMessage> = g
            .listed
            .iter()
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
            .last
            .as_ref()
            .map(|h| text(&h.detail, "summary"))
            .filter(|s| !s.is_empty());
        if summary.is_none() && g.alerts_before > 0 {
            summary = Some(format!(
                "This group keeps matching: alert {} for it; the messages below arrived since the previous one.",
                g.alerts_before + 1
            ));
        }
        let group = (!g.group_key.is_empty()).then(|| g.group_key.clone());
        let max_bytes = self.pb.limits().max_variables_bytes;
        let vars = loop {
            let vars = AlertVars {
                rule: g.rule.clone(),
                severity: severity.clone(),
                mailbox: g.mailbox.clone(),
                count: g.count,
                first_seen: rfc3339(g.first_seen),
                last_seen: rfc3339(g.last_seen),
                summary: summary.clone(),
                group: group.clone(),
                senders: g
                    .senders
                    .iter()
                    .map(|(s, n)| format!("{s} ({n})"))
                    .collect(),
                unlisted: g.count.saturating_sub(messages.len() as u64),
                messages: messages.clone(),
            };
            let v = serde_json::to_value(&vars).expect("alert variables serialize");
            if messages.is_empty() || v.to_string().len() <= max_bytes {
                break v;
            }
            messages.pop();
        };
        let mut metadata = BTreeMap::new();
        metadata.insert("mailbox".to_string(), g.mailbox.clone());
        metadata.insert("rule".to_string(), g.rule.clone());
        if let Some(group) = group {
            metadata.insert("group".to_string(), message::clip(&group, 1024));
        }
        let new = NewEmail {
            to: to.iter().map(|a| a.to_string()).collect(),
            template: Some(template),
            variables: Some(vars),
            priority,
            tags: vec!["alert".into(), format!("mailbox:{}", g.mailbox)],
            metadata,
            ..Default::default()
        };
        match self.pb.validate_email(new) {
            Ok(row) => Some(row),
            Err(e) => {
                // Unreachable by construction (see above); if it happens, it is loud.
                tracing::error!(mailbox = %g.mailbox, rule = %g.rule, error = %e,
                    "alert email refused by validation: dropped");
                metrics::counter!("postbox_mailbox_alerts_dropped_total", "mailbox" => g.mailbox.clone())
                    .increment(1);
                None
            }
        }
    }
}

/// Runs a watcher for every configured mailbox until `shutdown`.
///
/// Each watcher first takes its mailbox's lease (see `watcher::watch`), so however many
/// processes run watchers on one database, one of them reads each mailbox and raises its
/// alerts. A watcher that panics is logged, its mailbox marked down with the panic as its error,
/// and restarted after a pause: one mailbox's bug never stops the others, nor itself for good.
pub async fn run(pb: Postbox, mailboxes: Vec<Arc<Mailbox>>, lease: Duration, shutdown: Shutdown) {
    if mailboxes.is_empty() {
        return;
    }
    let node = pb.node().to_string();
    info!(mailboxes = mailboxes.len(), %node, "IMAP watchers starting");
    let ctx = Arc::new(Inbound {
        pb,
        mailboxes: mailboxes.clone(),
        node,
        lease,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for mb in mailboxes {
        tasks.spawn(supervise(ctx.clone(), mb, shutdown.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

/// Runs one mailbox's watcher, restarting it if it panics.
async fn supervise(ctx: Arc<Inbound>, mb: Arc<Mailbox>, shutdown: Shutdown) {
    let mut pause = mb.reconnect_min;
    loop {
        let task = tokio::spawn(watcher::watch(ctx.clone(), mb.clone(), shutdown.clone()));
        let Err(e) = task.await else {
            return; // shutdown
        };
        let what = match e.try_into_panic() {
            Ok(p) => crate::telemetry::panic_message(&*p, "a panic"),
            Err(e) => e.to_string(),
        };
        let error = format!("the watcher panicked: {what}; restarting it");
        tracing::error!(mailbox = %mb.name, %error);
        metrics::counter!("postbox_mailbox_watcher_restarts_total", "mailbox" => mb.name.clone())
            .increment(1);
        metrics::gauge!("postbox_mailbox_connected", "mailbox" => mb.name.clone()).set(0.0);
        let down = crate::store::Health::Down {
            since: OffsetDateTime::now_utc(),
            error: &error,
        };
        if let Err(e) = ctx.pb.store().set_mailbox_health(&mb.name, down).await {
            warn!(mailbox = %mb.name, error = %e, "cannot record the watcher's state");
        }
        // Its lease would keep a standby out until it runs out: hand it back now.
        let _ = ctx
            .pb
            .store()
            .release_lease(&crate::store::lease_name(&mb.name), &ctx.node)
            .await;
        tokio::select! {
            _ = shutdown.clone() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(mb.reconnect_max);
    }
}

/// While this process holds `mb`'s lease: raises the alerts of its groups that fall due
/// between scans (a group's `group_wait` or `repeat_interval` ending). Returns if the lease is
/// lost.
async fn flusher(ctx: &Inbound, mb: &Mailbox) {
    let store = ctx.pb.store();
    loop {
        let wait = match store.next_alert_due(&mb.name).await {
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
        tokio::time::sleep(wait).await;
        match store
            .flush_alerts(&mb.name, &ctx.node, &|g| ctx.build_alert(g))
            .await
        {
            Ok(ids) => {
                if !ids.is_empty() {
                    info!(alerts = ids.len(), "alert emails queued for due groups");
                }
                ctx.alerted(&ids);
            }
            Err(crate::store::StoreError::LeaseLost(_)) => return,
            Err(e) => warn!(error = %e, "cannot raise due alerts"),
        }
    }
}
