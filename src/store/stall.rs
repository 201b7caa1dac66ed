//! What the stall alert reads and keeps: the queue's oldest due email and the recent
//! attempts' outcomes, and whether the alert is raised.

use time::OffsetDateTime;

use super::open::now;
use super::*;
use crate::db::sql;

/// The figures the stall alert decides on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StallFigures {
    /// Seconds the oldest due queued email has waited (None: nothing is waiting).
    pub oldest_due_secs: Option<f64>,
    /// Attempts in the window, and how many failed (temporary or permanent).
    pub attempts: u64,
    pub failures: u64,
}

/// A raised alert: since when, why, and when it was last sent.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertState {
    pub raised_at: OffsetDateTime,
    pub last_sent_at: OffsetDateTime,
    pub reason: String,
}

impl Store {
    /// The oldest due email's wait and the attempts of the last `window`.
    pub async fn stall_figures(
        &self,
        window: std::time::Duration,
    ) -> Result<StallFigures, StoreError> {
        let now = ms(now());
        let mut f = StallFigures {
            oldest_due_secs: self.oldest_queued_age_secs(now).await?,
            ..Default::default()
        };
        for r in sql("SELECT status, COUNT(*) AS n FROM postbox_events
              WHERE kind = 'attempt' AND at >= $1 GROUP BY status")
        .bind(now - window.as_millis() as i64)
        .fetch_all(&self.db)
        .await?
        {
            let n = r.get::<i64>("n")? as u64;
            f.attempts += n;
            if r.get::<String>("status")? != "sent" {
                f.failures += n;
            }
        }
        Ok(f)
    }

    /// The alert `name`'s state, if raised.
    pub async fn alert_state(&self, name: &str) -> Result<Option<AlertState>, StoreError> {
        let row =
            sql("SELECT raised_at, last_sent_at, reason FROM postbox_alert_state WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.db)
                .await?;
        row.map(|r| {
            Ok(AlertState {
                raised_at: from_ms(r.get("raised_at")?),
                last_sent_at: from_ms(r.get("last_sent_at")?),
                reason: r.get("reason")?,
            })
        })
        .transpose()
    }

    /// Records the alert `name` as raised (or sent again) now, for `reason`.
    pub async fn set_alert_state(&self, name: &str, s: &AlertState) -> Result<(), StoreError> {
        sql(
            "INSERT INTO postbox_alert_state (name, raised_at, last_sent_at, reason)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET raised_at = $2, last_sent_at = $3, reason = $4",
        )
        .bind(name)
        .bind(ms(s.raised_at))
        .bind(ms(s.last_sent_at))
        .bind(s.reason.as_str())
        .execute(&self.db)
        .await?;
        Ok(())
    }

    /// Clears the alert `name`.
    pub async fn clear_alert_state(&self, name: &str) -> Result<(), StoreError> {
        sql("DELETE FROM postbox_alert_state WHERE name = $1")
            .bind(name)
            .execute(&self.db)
            .await?;
        Ok(())
    }
}
