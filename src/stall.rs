//! The stall alert: when delivery stalls (the oldest due email has waited too long, or too
//! many recent attempts fail), postbox emails the people in `[stall_alert] alert_to`, through
//! its own queue: one email when it starts, again at most every `repeat_minutes` while it
//! lasts (the reasons grouped in one email), and one when the queue has recovered. One process
//! of a cluster checks at a time (the lease `stall-alert`); the alert's state is in the
//! database, so a takeover neither repeats nor forgets it.
//!
//! The alert travels the same relays as the mail it reports on: when every relay is down it
//! waits with the rest. `postbox_queue_oldest_age_seconds` (metrics) sees that case.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::domain::{EmailAddress, NewEmail, Priority};
use crate::settings::{ConfigError, nonzero};
use crate::store::{AlertState, StallFigures};
use crate::{Postbox, Shutdown};

const NAME: &str = "stall";
const LEASE: &str = "stall-alert";

/// `[stall_alert]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StallAlertSettings {
    /// Who gets the alert; empty: no stall alert.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alert_to: Vec<String>,
    /// Raised when the oldest due email has waited longer than this.
    pub oldest_due_secs: u64,
    /// ... or when at least this share of the attempts in `window_secs` failed (temporary or
    /// permanent), counting only windows with at least `min_attempts` attempts.
    pub failure_ratio: f64,
    pub window_secs: u64,
    pub min_attempts: u64,
    /// While it lasts, sent again at most this often.
    pub repeat_minutes: u64,
    pub check_secs: u64,
}

impl Default for StallAlertSettings {
    fn default() -> Self {
        Self {
            alert_to: Vec::new(),
            oldest_due_secs: 900,
            failure_ratio: 0.5,
            window_secs: 300,
            min_attempts: 20,
            repeat_minutes: 60,
            check_secs: 30,
        }
    }
}

impl StallAlertSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        nonzero(&[
            ("stall_alert.oldest_due_secs", self.oldest_due_secs),
            ("stall_alert.window_secs", self.window_secs),
            ("stall_alert.min_attempts", self.min_attempts),
            ("stall_alert.repeat_minutes", self.repeat_minutes),
            ("stall_alert.check_secs", self.check_secs),
        ])?;
        if !(self.failure_ratio > 0.0 && self.failure_ratio <= 1.0) {
            return Err(ConfigError::new(
                "stall_alert.failure_ratio",
                "must be greater than 0 and at most 1",
            ));
        }
        for (i, a) in self.alert_to.iter().enumerate() {
            EmailAddress::parse(a)
                .map_err(|m| ConfigError::new(format!("stall_alert.alert_to[{i}]"), m))?;
        }
        Ok(())
    }
}

/// Why delivery counts as stalled now, if it does.
pub fn stalled(f: &StallFigures, s: &StallAlertSettings) -> Option<String> {
    let mut why = Vec::new();
    if let Some(age) = f.oldest_due_secs
        && age > s.oldest_due_secs as f64
    {
        why.push(format!(
            "the oldest due email has waited {age:.0} s (alert after {} s)",
            s.oldest_due_secs
        ));
    }
    if f.attempts >= s.min_attempts {
        let ratio = f.failures as f64 / f.attempts as f64;
        if ratio >= s.failure_ratio {
            why.push(format!(
                "{} of the last {} attempts failed in {} s ({:.0}%, alert at {:.0}%)",
                f.failures,
                f.attempts,
                s.window_secs,
                ratio * 100.0,
                s.failure_ratio * 100.0
            ));
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Checks every `check_secs` until `shutdown` (returns at once when no `alert_to` is set).
pub async fn run(pb: Postbox, s: StallAlertSettings, lease: Duration, shutdown: Shutdown) {
    if s.alert_to.is_empty() {
        return;
    }
    let every = Duration::from_secs(s.check_secs);
    loop {
        if let Err(e) = check(&pb, &s, lease.max(every * 2)).await {
            warn!(error = %e, "stall alert check failed; will try again");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.clone() => break,
        }
    }
    let _ = pb.store().release_lease(LEASE, pb.node()).await;
}

async fn check(pb: &Postbox, s: &StallAlertSettings, lease: Duration) -> anyhow::Result<()> {
    let store = pb.store();
    if !store.acquire_lease(LEASE, pb.node(), lease).await? {
        return Ok(());
    }
    let figures = store
        .stall_figures(Duration::from_secs(s.window_secs))
        .await?;
    let now = OffsetDateTime::now_utc();
    let state = store.alert_state(NAME).await?;
    match (stalled(&figures, s), state) {
        (Some(why), None) => {
            send(pb, s, "delivery stalled", &why, &figures).await?;
            store
                .set_alert_state(
                    NAME,
                    &AlertState {
                        raised_at: now,
                        last_sent_at: now,
                        reason: why.clone(),
                    },
                )
                .await?;
            warn!(reason = %why, "stall alert raised");
        }
        (Some(why), Some(st))
            if now - st.last_sent_at >= Duration::from_secs(s.repeat_minutes * 60) =>
        {
            let since = crate::inbound::rfc3339(st.raised_at);
            send(
                pb,
                s,
                "delivery still stalled",
                &format!("{why} (stalled since {since})"),
                &figures,
            )
            .await?;
            store
                .set_alert_state(
                    NAME,
                    &AlertState {
                        last_sent_at: now,
                        reason: why,
                        ..st
                    },
                )
                .await?;
        }
        (None, Some(st)) => {
            let lasted = (now - st.raised_at).whole_seconds();
            send(
                pb,
                s,
                "delivery recovered",
                &format!("recovered after {lasted} s; it was: {}", st.reason),
                &figures,
            )
            .await?;
            store.clear_alert_state(NAME).await?;
            info!("stall alert cleared");
        }
        _ => {}
    }
    Ok(())
}

async fn send(
    pb: &Postbox,
    s: &StallAlertSettings,
    what: &str,
    why: &str,
    f: &StallFigures,
) -> anyhow::Result<()> {
    let body = format!(
        "postbox: {what}.\n\n{why}\n\nNow: oldest due email waited {}; {} attempts in the last \
         {} s, {} failed.\n\nSee GET /v1/stats, GET /v1/relays and the dashboard.\n",
        f.oldest_due_secs.map_or_else(
            || "nothing (the queue is empty)".into(),
            |a| format!("{a:.0} s")
        ),
        f.attempts,
        s.window_secs,
        f.failures
    );
    let email = NewEmail {
        to: s.alert_to.clone(),
        subject: Some(format!("[postbox] {what}")),
        text: Some(body),
        tags: vec!["postbox-stall-alert".into()],
        priority: Priority::High,
        ..Default::default()
    };
    pb.submit(email).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_by_age_or_by_failure_ratio_over_enough_attempts() {
        let s = StallAlertSettings {
            oldest_due_secs: 60,
            failure_ratio: 0.5,
            min_attempts: 10,
            ..Default::default()
        };
        let f = |age: Option<f64>, attempts, failures| StallFigures {
            oldest_due_secs: age,
            attempts,
            failures,
        };
        assert_eq!(stalled(&f(None, 0, 0), &s), None);
        assert_eq!(stalled(&f(Some(59.0), 100, 49), &s), None);
        assert!(stalled(&f(Some(61.0), 0, 0), &s).unwrap().contains("61 s"));
        assert!(
            stalled(&f(None, 10, 5), &s)
                .unwrap()
                .contains("5 of the last 10")
        );
        assert_eq!(
            stalled(&f(None, 9, 9), &s),
            None,
            "too few attempts to judge"
        );
        let both = stalled(&f(Some(120.0), 20, 20), &s).unwrap();
        assert!(
            both.contains("120 s") && both.contains("20 of the last 20"),
            "{both}"
        );
    }
}
