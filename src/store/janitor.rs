//! The janitor: repairs what apalis 1.0 can leave stuck, rescues emails whose job was lost,
//! expires mail and applies retention.

use std::time::{Duration, Instant};

use super::lifecycle::insert_event;
use super::lifecycle::insert_expired;
use super::open::now;
use super::submit::push_job;
use super::*;
use crate::db::sql;
use crate::domain::lifecycle::Step;
use crate::queue::table;
use crate::queue::{JobKind, SendJob};

/// Rows deleted per retention statement (emails: with their timelines).
const CHUNK: i64 = 2_000;
/// How long one janitor pass spends on retention at most; the rest waits for the next pass.
const RETENTION_BUDGET: Duration = Duration::from_secs(2);

/// Runs `chunk` (one retention statement or transaction, deleting at most [`CHUNK`] rows)
/// until it deletes fewer, or `deadline` has passed: (rows deleted, whether some are left).
async fn in_chunks<F, Fut>(deadline: Instant, mut chunk: F) -> Result<(u64, bool), StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, StoreError>>,
{
    let mut total = 0;
    loop {
        let n = chunk().await?;
        total += n;
        if n < CHUNK as u64 {
            return Ok((total, false));
        }
        if Instant::now() >= deadline {
            return Ok((total, true));
        }
    }
}

impl Store {
    /// Deletes up to [`CHUNK`] final emails last changed before `cutoff` (unix ms) with their
    /// timelines, in one transaction. Returns how many.
    async fn delete_old_emails(&self, cutoff: i64) -> Result<u64, StoreError> {
        let finals: Vec<String> = EmailStatus::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(|s| format!("'{s}'"))
            .collect();
        let mut tx = self.db.begin_write().await?;
        let ids: Vec<String> = sql(format!(
            "SELECT id FROM postbox_emails WHERE status IN ({}) AND updated_at < $1 LIMIT $2",
            finals.join(", ")
        ))
        .bind(cutoff)
        .bind(CHUNK)
        .fetch_all(&mut tx)
        .await?
        .iter()
        .map(|row| row.get::<String>("id"))
        .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let list = (1..=ids.len())
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ");
        for table in ["postbox_events WHERE email_id", "postbox_emails WHERE id"] {
            let mut q = sql(format!("DELETE FROM {table} IN ({list})"));
            for id in &ids {
                q.add(id.as_str());
            }
            q.execute(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(ids.len() as u64)
    }

    /// One janitor pass: repairs what apalis 1.0 can leave stuck, expires mail, applies retention.
    ///
    /// `me` is the process running it: its own claims are never taken for a dead process's
    /// (its liveness lease may have lapsed while the database refused writes).
    pub async fn janitor(
        &self,
        me: &str,
        dead_after: Duration,
        stuck_after: Duration,
        finished_jobs: Duration,
        emails_after: Option<Duration>,
        idempotency_ttl: Duration,
    ) -> Result<JanitorReport, StoreError> {
        let now = now();
        let now_s = now.unix_timestamp();

        // 1. Jobs held by dead workers, jobs running far longer than any send can, and jobs left
        //    Pending but locked: hand them back to the queue.
        let job_type = SendJob::job_type(&self.queue);
        let jobs_requeued = table::requeue_abandoned(
            &self.db,
            &job_type,
            now_s - dead_after.as_secs() as i64,
            now_s - stuck_after.as_secs() as i64,
        )
        .await?;
        let mut r = JanitorReport {
            jobs_requeued,
            ..Default::default()
        };

        // 2. Emails that are not final but own no live job (a job killed or exhausted by
        //    infrastructure errors): give them a new one. Nothing accepted is ever dropped.
        //    Quiet for stuck_after, or at once for an email still `sending` whose claimer is
        //    gone (its node lease ran out: a crash): its job was acked by a process that found
        //    the claimer still alive a moment earlier.
        let orphans = sql(format!(
            "SELECT e.id, e.job_seq, e.priority, e.next_attempt_at, e.send_at FROM postbox_emails e
              WHERE e.status IN ('queued', 'retrying', 'sending')
                AND (e.updated_at < $2
                     OR (e.status = 'sending' AND COALESCE(e.claimed_by, '') <> $4
                         AND NOT EXISTS (SELECT 1 FROM postbox_leases l
                          WHERE l.name = 'node:' || e.claimed_by AND l.expires_at >= $3)))
                AND NOT {}
              LIMIT 1000",
            table::live_job_exists(self.db.kind(), "e.id || ':' || e.job_seq")
        ))
        .bind(&job_type)
        .bind(ms(now) - stuck_after.as_millis() as i64)
        .bind(ms(now))
        .bind(me)
        .fetch_all(&self.db)
        .await?;
        for o in orphans {
            let id: String = o.get("id")?;
            let seq: i64 = o.get("job_seq")?;
            let priority: String = o.get("priority")?;
            let at: Option<i64> = o
                .get::<Option<i64>>("next_attempt_at")?
                .or(o.get("send_at")?);
            let mut tx = self.db.begin().await?;
            let moved = sql(
                "UPDATE postbox_emails SET job_seq = job_seq + 1, updated_at = $1
                  WHERE id = $2 AND job_seq = $3 AND status IN ('queued', 'retrying', 'sending')",
            )
            .bind(ms(now))
            .bind(&id)
            .bind(seq)
            .execute(&mut tx)
            .await?;
            if moved == 1 {
                let status: String = sql("SELECT status FROM postbox_emails WHERE id = $1")
                    .bind(&id)
                    .scalar(&mut tx)
                    .await?
                    .ok_or(sqlx::Error::RowNotFound)?;
                insert_event(
                    &mut tx,
                    &id,
                    now,
                    "requeued",
                    &status,
                    None,
                    None,
                    "its job was lost; re-queued by the janitor",
                )
                .await?;
                push_job(
                    &mut tx,
                    &self.queue,
                    &id,
                    seq + 1,
                    Priority::parse(&priority).unwrap_or_default(),
                    at.map(from_ms),
                )
                .await?;
                r.emails_rescued += 1;
            }
            tx.commit().await?;
        }

        // 3. Expiry of mail still waiting (a running send is left to finish).
        let mut tx = self.db.begin().await?;
        let expired = sql(format!(
            "UPDATE postbox_emails
                SET status = '{}', job_seq = job_seq + 1, updated_at = $1, next_attempt_at = NULL,
                    last_error = 'expired before it could be delivered'
              WHERE {} AND expires_at <= $1
          RETURNING id",
            Step::Expire.to(),
            Step::Expire.guard_from("status", &[EmailStatus::Queued, EmailStatus::Retrying])
        ))
        .bind(ms(now))
        .fetch_all(&mut tx)
        .await?;
        for row in &expired {
            let id: String = row.get("id")?;
            insert_expired(&mut tx, &id, now).await?;
        }
        tx.commit().await?;
        r.emails_expired = expired.len() as u64;

        // 4. Retention, in chunks: each a short transaction of its own, so that a pass with
        //    a lot to delete (retention first turned on, or a backlog after an outage) never
        //    holds SQLite's one writer for long: submits, claims and outcomes get it between
        //    chunks. A pass stops after RETENTION_BUDGET; the next one comes soon.
        let deadline = Instant::now() + RETENTION_BUDGET;
        let finished_before = now_s - finished_jobs.as_secs() as i64;
        (r.jobs_deleted, r.retention_left) = in_chunks(deadline, || async {
            Ok(table::delete_finished(&self.db, &job_type, finished_before, CHUNK).await?)
        })
        .await?;
        table::delete_gone_workers(&self.db, &job_type).await?;
        if let Some(keep) = emails_after.filter(|_| !r.retention_left) {
            let cutoff = ms(now) - keep.as_millis() as i64;
            (r.emails_deleted, r.retention_left) =
                in_chunks(deadline, || self.delete_old_emails(cutoff)).await?;
            // Webhook deliveries that are over (delivered, or retries spent) age out alike.
            if !r.retention_left {
                let key = match self.db.kind() {
                    Kind::Sqlite => "rowid",
                    Kind::Postgres => "id",
                };
                let delete = sql(format!(
                    "DELETE FROM postbox_webhook_deliveries WHERE {key} IN (
                        SELECT {key} FROM postbox_webhook_deliveries
                         WHERE state <> 'retrying' AND updated_at < $1 LIMIT $2)"
                ))
                .bind(cutoff)
                .bind(CHUNK);
                (_, r.retention_left) =
                    in_chunks(deadline, || async { Ok(delete.execute(&self.db).await?) }).await?;
            }
            let mut tx = self.db.begin().await?;
            // Alerted rule matches age out with the emails (a UIDVALIDITY resync recognises
            // messages by these rows, so only this window is protected from re-alerting).
            sql("DELETE FROM postbox_alert_hits WHERE alert_id IS NOT NULL AND seen_at < $1")
                .bind(cutoff)
                .execute(&mut tx)
                .await?;
            // Events about mailboxes themselves (no email) age out alike.
            sql("DELETE FROM postbox_events WHERE email_id = '' AND at < $1")
                .bind(cutoff)
                .execute(&mut tx)
                .await?;
            tx.commit().await?;
        }
        sql("DELETE FROM postbox_idempotency WHERE created_at < $1")
            .bind(ms(now) - idempotency_ttl.as_millis() as i64)
            .execute(&self.db)
            .await?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk that deletes fewer than CHUNK rows ends the work; full chunks go on until the
    /// deadline, and a pass stopped by it says that rows are left (the next pass resumes).
    #[tokio::test]
    async fn retention_chunks_stop_at_the_budget_and_say_what_is_left() {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut left = [CHUNK as u64, CHUNK as u64, 7].into_iter();
        let r = in_chunks(far, || {
            let n = left.next().expect("no chunk after a short one");
            async move { Ok(n) }
        })
        .await
        .unwrap();
        assert_eq!(r, (2 * CHUNK as u64 + 7, false));

        // Out of budget: one full chunk, then stop, with rows left.
        let mut calls = 0;
        let r = in_chunks(Instant::now(), || {
            calls += 1;
            async { Ok(CHUNK as u64) }
        })
        .await
        .unwrap();
        assert_eq!((r, calls), ((CHUNK as u64, true), 1));
    }
}
