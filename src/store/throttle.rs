//! What throttling keeps in the database: rate limit slots shared by every worker process
//! (PostgreSQL; GCRA, one row per limit key), and operator pauses (both backends).

use serde::Serialize;
use time::OffsetDateTime;

use super::open::now;
use super::submit::push_jobs;
use super::*;
use crate::db::sql;

/// What a pause stops: mail through one relay, to one recipient domain, or with one tag.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum PauseKind {
    Relay,
    Domain,
    Tag,
}

impl PauseKind {
    pub const ALL: [PauseKind; 3] = [PauseKind::Relay, PauseKind::Domain, PauseKind::Tag];

    pub fn as_str(self) -> &'static str {
        match self {
            PauseKind::Relay => "relay",
            PauseKind::Domain => "domain",
            PauseKind::Tag => "tag",
        }
    }

    pub fn parse(s: &str) -> Option<PauseKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One pause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Pause {
    pub kind: PauseKind,
    pub value: String,
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

impl Pause {
    /// The `last_error` of an email held by this pause (its prefix names the pause, so that
    /// resuming finds the emails it held).
    pub fn hold_note(kind: PauseKind, value: &str) -> String {
        format!("paused: {} \"{value}\"", kind.as_str())
    }
}

impl Store {
    /// Reserves `n` consecutive send slots `interval_us` apart for `key` (GCRA), if the first
    /// is no later than `hold_us` from now: Ok(first slot, µs since the epoch). Otherwise
    /// reserves nothing: Err(when the next slot is free). PostgreSQL only (shared by every
    /// process); on SQLite the limiter keeps its slots in memory.
    pub async fn reserve_slots(
        &self,
        key: &str,
        interval_us: i64,
        n: u32,
        hold_us: i64,
    ) -> Result<Result<i64, i64>, StoreError> {
        let now = (now().unix_timestamp_nanos() / 1000) as i64;
        let span = interval_us * i64::from(n);
        let tat: Option<i64> = sql(
            "INSERT INTO postbox_rate_slots (key, tat) VALUES ($1, $2 + $3)
             ON CONFLICT (key) DO UPDATE
                SET tat = GREATEST(postbox_rate_slots.tat, $2) + $3
              WHERE GREATEST(postbox_rate_slots.tat, $2) <= $2 + $4
          RETURNING tat",
        )
        .bind(key)
        .bind(now)
        .bind(span)
        .bind(hold_us)
        .fetch_optional(&self.db)
        .await?
        .map(|r| r.get::<i64>("tat"))
        .transpose()?;
        if let Some(tat) = tat {
            return Ok(Ok(tat - span));
        }
        let next: Option<i64> = sql("SELECT tat FROM postbox_rate_slots WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.db)
            .await?
            .map(|r| r.get::<i64>("tat"))
            .transpose()?;
        Ok(Err(next.unwrap_or(now)))
    }

    /// Every pause, oldest first.
    pub async fn pauses(&self) -> Result<Vec<Pause>, StoreError> {
        let rows = sql(
            "SELECT kind, value, reason, created_at FROM postbox_pauses ORDER BY created_at, kind, value",
        )
        .fetch_all(&self.db)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let kind: String = r.get("kind")?;
            let Some(kind) = PauseKind::parse(&kind) else {
                continue;
            };
            out.push(Pause {
                kind,
                value: r.get("value")?,
                reason: r.get("reason")?,
                created_at: from_ms(r.get("created_at")?),
            });
        }
        Ok(out)
    }

    /// Pauses sending for `(kind, value)`; false when it was paused already.
    pub async fn pause(
        &self,
        kind: PauseKind,
        value: &str,
        reason: Option<&str>,
    ) -> Result<bool, StoreError> {
        let n = sql(
            "INSERT INTO postbox_pauses (kind, value, reason, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (kind, value) DO NOTHING",
        )
        .bind(kind.as_str())
        .bind(value)
        .bind(reason)
        .bind(ms(now()))
        .execute(&self.db)
        .await?;
        Ok(n == 1)
    }

    /// Ends a pause, and queues at once every email it held (each gets a new job; the old
    /// one, due later, then finds nothing to do). None: there was no such pause; else how
    /// many emails were released.
    pub async fn resume(&self, kind: PauseKind, value: &str) -> Result<Option<u64>, StoreError> {
        let mut tx = self.db.begin().await?;
        let n = sql("DELETE FROM postbox_pauses WHERE kind = $1 AND value = $2")
            .bind(kind.as_str())
            .bind(value)
            .execute(&mut tx)
            .await?;
        if n == 0 {
            return Ok(None);
        }
        let rows = sql("UPDATE postbox_emails
                SET job_seq = job_seq + 1, next_attempt_at = NULL, last_error = NULL,
                    updated_at = $1
              WHERE status = 'queued' AND last_error = $2
          RETURNING id, job_seq, priority")
        .bind(ms(now()))
        .bind(Pause::hold_note(kind, value))
        .fetch_all(&mut tx)
        .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.get("id")?;
            let seq: i64 = r.get("job_seq")?;
            let p: String = r.get("priority")?;
            jobs.push((id, seq, Priority::parse(&p).unwrap_or_default()));
        }
        // Each released email's timeline says so.
        let detail = format!("{} \"{value}\" resumed", kind.as_str());
        for chunk in jobs.chunks(200) {
            let mut q = sql(format!(
                "INSERT INTO postbox_events (email_id, at, kind, status, detail) VALUES {}",
                crate::db::values(chunk.len(), 5, 1)
            ));
            for (id, _, _) in chunk {
                q.add(id.as_str())
                    .add(ms(now()))
                    .add("released")
                    .add("queued")
                    .add(detail.as_str());
            }
            q.execute(&mut tx).await?;
        }
        let refs: Vec<_> = jobs
            .iter()
            .map(|(id, seq, p)| (id.as_str(), *seq, *p, None))
            .collect();
        push_jobs(&mut tx, &self.queue, &refs).await?;
        tx.commit().await?;
        Ok(Some(rows.len() as u64))
    }
}
