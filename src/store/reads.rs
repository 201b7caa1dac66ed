//! Reads: one email's report, listings, counts, stats and the metrics gauges. They read columns
//! (and the trigger-kept per-status counters), never the stored email's JSON, except for `to`
//! with display names.

use time::OffsetDateTime;

use super::open::now;
use super::*;
use crate::db::{DbRow, sql};

/// The oldest due queued email's `age_from` ([`Store::oldest_queued_age_secs`]). Its literal
/// `status = 'queued'` is what lets SQLite and PostgreSQL use the partial index
/// `postbox_emails_queued_age` (a bound status would not).
const OLDEST_QUEUED: &str =
    "SELECT MIN(age_from) FROM postbox_emails WHERE status = 'queued' AND age_from <= $1";

impl Store {
    pub async fn status_of(&self, id: &EmailId) -> Result<Option<EmailStatus>, StoreError> {
        let s: Option<String> = sql("SELECT status FROM postbox_emails WHERE id = $1")
            .bind(id.as_str())
            .scalar(&self.db)
            .await?;
        Ok(s.and_then(|s| EmailStatus::parse(&s)))
    }

    /// An email's state and timeline.
    pub async fn report(&self, id: &EmailId) -> Result<Option<EmailReport>, StoreError> {
        let Some(row) = sql("SELECT * FROM postbox_emails WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.db)
            .await?
        else {
            return Ok(None);
        };
        let events = sql("SELECT * FROM postbox_events WHERE email_id = $1 ORDER BY seq")
            .bind(id.as_str())
            .fetch_all(&self.db)
            .await?;
        Ok(Some(report_from(row, events)?))
    }

    /// The validated email as stored (for previews).
    pub async fn email(&self, id: &EmailId) -> Result<Option<Email>, StoreError> {
        let spec: Option<String> = sql("SELECT spec FROM postbox_emails WHERE id = $1")
            .bind(id.as_str())
            .scalar(&self.db)
            .await?;
        spec.map(|s| {
            serde_json::from_str(&s).map_err(|e| StoreError::Corrupt {
                id: id.to_string(),
                message: e.to_string(),
            })
        })
        .transpose()
    }

    /// Attempts that ended sent / failed per minute over the last `minutes` (oldest first,
    /// every minute present).
    pub async fn throughput(&self, minutes: u32) -> Result<Vec<MinuteCounts>, StoreError> {
        let now_min = ms(now()) / 60_000;
        let from = now_min - i64::from(minutes) + 1;
        let rows = sql(
            "SELECT at / 60000 AS m, COUNT(*) FILTER (WHERE status = 'sent') AS sent,
                    COUNT(*) FILTER (WHERE status = 'failed') AS failed
               FROM postbox_events WHERE at >= $1 AND kind = 'attempt' GROUP BY m",
        )
        .bind(from * 60_000)
        .fetch_all(&self.db)
        .await?;
        let mut out: Vec<MinuteCounts> = (from..=now_min)
            .map(|m| MinuteCounts {
                minute: from_ms(m * 60_000),
                sent: 0,
                failed: 0,
            })
            .collect();
        for r in rows {
            let m: i64 = r.get("m")?;
            if let Some(slot) = out.get_mut((m - from) as usize) {
                slot.sent = r.get::<i64>("sent")? as u64;
                slot.failed = r.get::<i64>("failed")? as u64;
            }
        }
        Ok(out)
    }

    /// Emails by status.
    pub async fn counts(&self) -> Result<Counts, StoreError> {
        let rows = sql("SELECT status, COUNT(*) AS n FROM postbox_emails GROUP BY status")
            .fetch_all(&self.db)
            .await?;
        let mut c = Counts::default();
        for r in rows {
            let s: String = r.get("status")?;
            let n: i64 = r.get("n")?;
            c.by_status.insert(s, n as u64);
        }
        Ok(c)
    }

    /// A page of emails, newest first (by id, which is time-ordered and unique: a stable order).
    pub async fn list(&self, f: &ListFilter) -> Result<EmailPage, StoreError> {
        let contains = self.db.kind().position_fn();
        let mut q = sql("SELECT id, status, priority, subject, template,
                    recipients, tags, attempts, created_at, updated_at, sent_at, last_error
               FROM postbox_emails WHERE 1 = 1");
        if let Some(s) = f.status {
            q.push(" AND status = ").push_bind(s.as_str());
        }
        if let Some(t) = &f.tag {
            q.push(&format!(" AND {contains}(' ' || tags || ' ', "))
                .push_bind(format!(" {t} "))
                .push(") > 0");
        }
        if let Some(r) = &f.recipient {
            q.push(&format!(
                " AND {contains}(' ' || lower(recipients) || ' ', "
            ))
            .push_bind(format!(" {} ", r.to_lowercase()))
            .push(") > 0");
        }
        if let Some(d) = &f.domain {
            q.push(&format!(
                " AND {contains}(' ' || lower(recipients) || ' ', "
            ))
            .push_bind(format!("@{} ", d.to_lowercase()))
            .push(") > 0");
        }
        if let Some(t) = f.created_after {
            q.push(" AND created_at >= ").push_bind(ms(t));
        }
        if let Some(t) = f.created_before {
            q.push(" AND created_at < ").push_bind(ms(t));
        }
        if let Some(id) = &f.before_id {
            q.push(" AND id < ").push_bind(id.as_str().to_string());
        }
        let limit = f.limit.max(1);
        q.push(" ORDER BY id DESC LIMIT ")
            .push_bind(limit as i64 + 1);
        let rows = q.fetch_all(&self.db).await?;
        let mut emails = Vec::with_capacity(rows.len());
        for row in rows.iter().take(limit as usize) {
            let id: String = row.get("id")?;
            let status: String = row.get("status")?;
            let priority: String = row.get("priority")?;
            let split =
                |s: String| -> Vec<String> { s.split_whitespace().map(str::to_string).collect() };
            emails.push(EmailSummary {
                status: EmailStatus::parse(&status).ok_or_else(|| StoreError::Corrupt {
                    id: id.clone(),
                    message: format!("unknown status {status}"),
                })?,
                id: EmailId::from_db(id),
                priority: Priority::parse(&priority).unwrap_or_default(),
                subject: row.get("subject")?,
                template: row.get("template")?,
                recipients: split(row.get("recipients")?),
                tags: split(row.get("tags")?),
                attempts: row.get::<i64>("attempts")? as u32,
                created_at: from_ms(row.get("created_at")?),
                updated_at: from_ms(row.get("updated_at")?),
                sent_at: row.get::<Option<i64>>("sent_at")?.map(from_ms),
                last_error: row.get("last_error")?,
            });
        }
        let next_cursor = if rows.len() > limit as usize {
            emails.last().map(|e| e.id.to_string())
        } else {
            None
        };
        Ok(EmailPage {
            emails,
            next_cursor,
        })
    }

    /// Emails by status and priority, from the trigger-kept counters (21 rows, whatever the
    /// size of the table): `(status, priority, n)`.
    async fn status_counters(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        let rows = sql(
            "SELECT name, CAST(SUM(n) AS BIGINT) AS n FROM postbox_counters
              WHERE name LIKE 'status:%' GROUP BY name",
        )
        .fetch_all(&self.db)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let name: String = r.get("name")?;
            let n: i64 = r.get("n")?;
            let mut parts = name.splitn(3, ':').skip(1);
            if let (Some(status), Some(priority)) = (parts.next(), parts.next()) {
                out.push((status.to_string(), priority.to_string(), n.max(0) as u64));
            }
        }
        Ok(out)
    }

    /// The age of the oldest email that is due and still queued (an index seek on the partial
    /// index `postbox_emails_queued_age`).
    pub(super) async fn oldest_queued_age_secs(&self, now: i64) -> Result<Option<f64>, StoreError> {
        let oldest: Option<i64> = sql(OLDEST_QUEUED)
            .bind(now)
            .scalar::<Option<i64>>(&self.db)
            .await?
            .flatten();
        Ok(oldest.map(|t| (now - t).max(0) as f64 / 1000.0))
    }

    /// What the `/metrics` queue gauges show: emails waiting or in flight by state, and the
    /// oldest queued email's age. Cheap at any queue size.
    pub async fn queue_gauges(&self) -> Result<QueueGauges, StoreError> {
        let mut g = QueueGauges::default();
        for state in ["queued", "retrying", "sending"] {
            g.depth.insert(state.to_string(), 0);
        }
        for (status, _, n) in self.status_counters().await? {
            if let Some(d) = g.depth.get_mut(&status) {
                *d += n;
            }
        }
        g.oldest_queued_age_secs = self.oldest_queued_age_secs(ms(now())).await?;
        Ok(g)
    }

    /// The queue at a glance.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let now = ms(now());
        let mut st = Stats::default();
        for (status, priority, n) in self.status_counters().await? {
            if n == 0 {
                continue;
            }
            *st.totals.entry(status.clone()).or_default() += n;
            if matches!(status.as_str(), "queued" | "retrying" | "sending") {
                st.depth.entry(status).or_default().insert(priority, n);
            }
        }
        st.in_flight = st.totals.get("sending").copied().unwrap_or(0);
        st.oldest_queued_age_secs = self.oldest_queued_age_secs(now).await?;
        for (window, ago) in [
            (&mut st.last_minute, 60_000),
            (&mut st.last_hour, 3_600_000),
        ] {
            for r in sql("SELECT status, COUNT(*) AS n FROM postbox_events
                  WHERE kind = 'attempt' AND at >= $1 GROUP BY status")
            .bind(now - ago)
            .fetch_all(&self.db)
            .await?
            {
                let n = r.get::<i64>("n")? as u64;
                match r.get::<String>("status")?.as_str() {
                    "sent" => window.sent = n,
                    "failed" => window.failed = n,
                    "retrying" => window.retried = n,
                    _ => {}
                }
            }
        }
        Ok(st)
    }
}

fn report_from(row: DbRow, events: Vec<DbRow>) -> Result<EmailReport, StoreError> {
    let id: String = row.get("id")?;
    // Columns where they exist; the stored email only for `to` with display names, and the
    // recipients column when it cannot be read (an unreadable email can still be looked at).
    let spec: String = row.get("spec")?;
    let to = match serde_json::from_str::<Email>(&spec) {
        Ok(email) => email.to.iter().map(|a| a.to_string()).collect(),
        Err(_) => row
            .get::<String>("recipients")?
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    };
    let status: String = row.get("status")?;
    let priority: String = row.get("priority")?;
    let opt = |c: &str| -> Result<Option<OffsetDateTime>, StoreError> {
        Ok(row.get::<Option<i64>>(c)?.map(from_ms))
    };
    let request_id: Option<String> = row.get("request_id")?;
    let submitted = TimelineEntry {
        at: from_ms(row.get("created_at")?),
        kind: "submitted".into(),
        status: "queued".into(),
        attempt: None,
        smtp_code: None,
        smtp_text: None,
        duration_ms: None,
        detail: request_id.as_ref().map(|r| format!("request {r}")),
    };
    // Emails stored before timeline entries were written at submission have none: theirs is
    // made up from the row.
    let has_submitted = events
        .first()
        .map(|e| e.get::<String>("kind"))
        .transpose()?
        .is_some_and(|k| k == "submitted");
    let timeline = (!has_submitted)
        .then_some(Ok(submitted))
        .into_iter()
        .chain(events.into_iter().map(|e| {
            Ok(TimelineEntry {
                at: from_ms(e.get("at")?),
                kind: e.get("kind")?,
                status: e.get("status")?,
                attempt: e.get::<Option<i64>>("attempt")?.map(|a| a as u32),
                smtp_code: e.get::<Option<i64>>("smtp_code")?.map(|c| c as u16),
                smtp_text: e.get("smtp_text")?,
                duration_ms: e.get("duration_ms")?,
                detail: e.get("detail")?,
            })
        }))
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(EmailReport {
        id: EmailId::from_db(id.clone()),
        status: EmailStatus::parse(&status).ok_or_else(|| StoreError::Corrupt {
            id: id.clone(),
            message: format!("unknown status {status}"),
        })?,
        priority: Priority::parse(&priority).unwrap_or_default(),
        message_id: row.get("message_id")?,
        subject: row.get("subject")?,
        template: row.get("template")?,
        to,
        tags: row
            .get::<String>("tags")?
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        attempts: row.get::<i64>("attempts")? as u32,
        created_at: from_ms(row.get("created_at")?),
        updated_at: from_ms(row.get("updated_at")?),
        sent_at: opt("sent_at")?,
        next_attempt_at: opt("next_attempt_at")?,
        send_at: opt("send_at")?,
        expires_at: opt("expires_at")?,
        last_error: row.get("last_error")?,
        request_id,
        timeline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The oldest queued email is found with a seek on the partial index of queued emails,
    /// never a scan: the `/metrics` age gauge must cost the same at any depth.
    #[tokio::test]
    async fn the_oldest_queued_email_is_a_seek_on_the_queued_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, read) = crate::store::sqlite_for_plans(dir.path()).await;
        let details = crate::store::query_plan(&read, OLDEST_QUEUED, 1).await;
        assert!(
            details
                .iter()
                .any(|d| d.contains("USING COVERING INDEX postbox_emails_queued_age")),
            "{details:?}"
        );
        assert!(
            !details.iter().any(|d| d.starts_with("SCAN")),
            "{details:?}"
        );
        assert!(
            !crate::store::schema_has(&read, "postbox_emails_status_age").await,
            "the full (status, age_from) index is gone"
        );
    }
}
