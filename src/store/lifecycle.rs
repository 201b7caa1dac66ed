//! Every status change after submission: claims and attempts, deferrals, manual cancel and
//! retry. Each writes its timeline entry in the same transaction, and each that needs a new
//! job pushes it there too.

use time::OffsetDateTime;

use super::open::now;
use super::submit::push_job;
use super::*;
use crate::db::{On, Tx, sql};

impl Store {
    /// Claims an email for one attempt, if `seq` still owns it and it is not final.
    ///
    /// The claim is one autocommit statement (the hot path: no BEGIN/COMMIT round trips); the
    /// rare expiry and interrupted-send notes are written after it.
    ///
    /// `node` is the claiming process; it is recorded so that an email still `sending` is
    /// re-claimed only when its claimer is gone (its node lease ran out): a crash. A live
    /// claimer may still be recording the outcome of a send that went through.
    pub async fn claim(&self, id: &str, seq: i64, node: &str) -> Result<ClaimResult, StoreError> {
        let now = now();
        let row = sql("UPDATE postbox_emails
                SET status = 'sending', attempts = attempts + 1,
                    interrupted = CASE WHEN status = 'sending' THEN 1 ELSE 0 END, updated_at = $1,
                    claimed_by = $4
              WHERE id = $2 AND job_seq = $3 AND status IN ('queued', 'retrying', 'sending')
                AND (expires_at IS NULL OR expires_at > $1)
                AND (status <> 'sending' OR claimed_by IS NULL OR NOT EXISTS
                     (SELECT 1 FROM postbox_leases l
                       WHERE l.name = 'node:' || postbox_emails.claimed_by AND l.expires_at >= $1))
          RETURNING spec, message_id, attempts, priority, age_from, interrupted")
        .bind(ms(now))
        .bind(id)
        .bind(seq)
        .bind(node)
        .fetch_optional(&self.db)
        .await?;
        let Some(row) = row else {
            let mut tx = self.db.begin().await?;
            let expired = sql("UPDATE postbox_emails
                    SET status = 'expired', job_seq = job_seq + 1, updated_at = $1,
                        next_attempt_at = NULL, last_error = 'expired before it could be delivered'
                  WHERE id = $2 AND job_seq = $3 AND status IN ('queued', 'retrying', 'sending')
                    AND expires_at <= $1")
            .bind(ms(now))
            .bind(id)
            .bind(seq)
            .execute(&mut tx)
            .await?;
            if expired == 1 {
                insert_expired(&mut tx, id, now).await?;
                tx.commit().await?;
                return Ok(ClaimResult::Expired);
            }
            tx.commit().await?;
            return Ok(ClaimResult::Skip(
                "final, cancelled, superseded, or in flight in a live process",
            ));
        };
        let spec: String = row.get("spec")?;
        let email: Email = match serde_json::from_str(&spec) {
            Ok(e) => e,
            Err(e) => {
                // Retrying cannot make it readable: fail it, with the reason, instead of
                // claiming it again and again.
                let reason = format!("the stored email cannot be read: {e}");
                self.fail_claimed(id, seq, &reason).await?;
                return Ok(ClaimResult::Failed(reason));
            }
        };
        let attempt: i64 = row.get("attempts")?;
        let interrupted = row.get::<i64>("interrupted")? != 0;
        if interrupted {
            insert_event(
                &self.db,
                id,
                now,
                "interrupted",
                "sending",
                Some(attempt - 1),
                None,
                "the previous attempt was cut off (worker stopped mid-send); sending again \
                 with the same Message-ID",
            )
            .await?;
        }
        let priority: String = row.get("priority")?;
        Ok(ClaimResult::Claimed(Box::new(Claim {
            id: EmailId::from_db(id.to_string()),
            email,
            message_id: row.get("message_id")?,
            attempt: attempt as u32,
            seq,
            priority: Priority::parse(&priority).unwrap_or_default(),
            age_from: from_ms(row.get("age_from")?),
            interrupted,
        })))
    }

    /// Gives job `<id>:<seq>` up without running it: the email (if still waiting for that job)
    /// gets a new job due at `at`. Used while the process stops: the job that apalis handed
    /// over is acked, and the email keeps a live job for the next process.
    pub async fn defer(&self, id: &str, seq: i64, at: OffsetDateTime) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().await?;
        let row = sql(
            "UPDATE postbox_emails SET job_seq = job_seq + 1, updated_at = $1
              WHERE id = $2 AND job_seq = $3 AND status IN ('queued', 'retrying')
          RETURNING priority",
        )
        .bind(ms(now()))
        .bind(id)
        .bind(seq)
        .fetch_optional(&mut tx)
        .await?;
        if let Some(row) = row {
            let priority: String = row.get("priority")?;
            push_job(
                &mut tx,
                &self.queue,
                id,
                seq + 1,
                Priority::parse(&priority).unwrap_or_default(),
                Some(at),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Fails a claimed email without an attempt record (it could not even be tried).
    async fn fail_claimed(&self, id: &str, seq: i64, reason: &str) -> Result<(), StoreError> {
        let now = now();
        let mut tx = self.db.begin().await?;
        let n = sql("UPDATE postbox_emails
                SET status = 'failed', next_attempt_at = NULL, last_error = $1, updated_at = $2
              WHERE id = $3 AND job_seq = $4 AND status = 'sending'")
        .bind(reason)
        .bind(ms(now))
        .bind(id)
        .bind(seq)
        .execute(&mut tx)
        .await?;
        if n == 1 {
            insert_event(&mut tx, id, now, "failed", "failed", None, None, reason).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records an attempt and the email's new state in ONE transaction (with the next job, when
    /// retrying). Returns false when the claim was superseded meanwhile (nothing written).
    pub async fn finish(
        &self,
        claim: &Claim,
        rec: &AttemptRecord,
        finish: &Finish,
    ) -> Result<bool, StoreError> {
        let now = now();
        let (status, next_at, last_error, sent_at, bump) = match finish {
            Finish::Sent => ("sent", None, None, Some(ms(now)), 0),
            Finish::Retry { at } => (
                "retrying",
                Some(ms(*at)),
                Some(rec.smtp_text.clone()),
                None,
                1,
            ),
            Finish::Failed { reason } => ("failed", None, Some(reason.clone()), None, 0),
        };
        let mut tx = self.db.begin().await?;
        let res = sql("UPDATE postbox_emails
                SET status = $1, next_attempt_at = $2, last_error = $3, sent_at = $4,
                    updated_at = $5, job_seq = job_seq + $6
              WHERE id = $7 AND job_seq = $8 AND status = 'sending'")
        .bind(status)
        .bind(next_at)
        .bind(last_error.as_deref())
        .bind(sent_at)
        .bind(ms(now))
        .bind(bump)
        .bind(claim.id.as_str())
        .bind(claim.seq)
        .execute(&mut tx)
        .await?;
        if res == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        let detail = match finish {
            Finish::Sent => None,
            Finish::Retry { at } => Some(format!("retry at {}", rfc3339(*at))),
            Finish::Failed { reason } => Some(reason.clone()),
        };
        sql(
            "INSERT INTO postbox_events (email_id, at, kind, status, attempt, smtp_code, smtp_text,
                 duration_ms, detail)
             VALUES ($1, $2, 'attempt', $3, $4, $5, $6, $7, $8)",
        )
        .bind(claim.id.as_str())
        .bind(ms(rec.started_at))
        .bind(status)
        .bind(claim.attempt as i64)
        .bind(rec.smtp_code.map(i64::from))
        .bind(&rec.smtp_text)
        .bind(rec.duration_ms)
        .bind(detail)
        .execute(&mut tx)
        .await?;
        if let Finish::Retry { at } = finish {
            push_job(
                &mut tx,
                &self.queue,
                claim.id.as_str(),
                claim.seq + 1,
                claim.priority,
                Some(*at),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Cancels a queued, retrying or failed email; `origin` (a request id) goes into the timeline.
    pub async fn cancel(&self, id: &EmailId, origin: Option<&str>) -> Result<(), TransitionError> {
        let now = now();
        let mut tx = self.db.begin().await.map_err(StoreError::from)?;
        let res = sql("UPDATE postbox_emails
                SET status = 'cancelled', job_seq = job_seq + 1, updated_at = $1,
                    next_attempt_at = NULL
              WHERE id = $2 AND status IN ('queued', 'retrying', 'failed')")
        .bind(ms(now))
        .bind(id.as_str())
        .execute(&mut tx)
        .await
        .map_err(StoreError::from)?;
        if res == 0 {
            drop(tx);
            return Err(self
                .refusal(id, "cancel", "queued, retrying or failed")
                .await);
        }
        insert_event(
            &mut tx,
            id.as_str(),
            now,
            "cancelled",
            "cancelled",
            None,
            None,
            &with_origin("cancelled", origin),
        )
        .await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    /// Re-drives a failed email: a fresh retry budget, a new job, the same Message-ID.
    pub async fn retry(&self, id: &EmailId, origin: Option<&str>) -> Result<(), TransitionError> {
        let now = now();
        let mut tx = self.db.begin().await.map_err(StoreError::from)?;
        let row = sql("UPDATE postbox_emails
                SET status = 'queued', job_seq = job_seq + 1, attempts = 0, age_from = $1,
                    next_attempt_at = NULL, updated_at = $1
              WHERE id = $2 AND status = 'failed'
          RETURNING job_seq, priority")
        .bind(ms(now))
        .bind(id.as_str())
        .fetch_optional(&mut tx)
        .await
        .map_err(StoreError::from)?;
        let Some(row) = row else {
            drop(tx);
            return Err(self.refusal(id, "retry", "failed").await);
        };
        let seq: i64 = row.get("job_seq").map_err(StoreError::from)?;
        let priority: String = row.get("priority").map_err(StoreError::from)?;
        insert_event(
            &mut tx,
            id.as_str(),
            now,
            "requeued",
            "queued",
            None,
            None,
            &with_origin("manual retry", origin),
        )
        .await?;
        push_job(
            &mut tx,
            &self.queue,
            id.as_str(),
            seq,
            Priority::parse(&priority).unwrap_or_default(),
            None,
        )
        .await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    pub(super) async fn refusal(
        &self,
        id: &EmailId,
        action: &'static str,
        allowed: &'static str,
    ) -> TransitionError {
        match self.status_of(id).await {
            Ok(Some(status)) => TransitionError::Conflict {
                id: id.clone(),
                status,
                action,
                allowed,
            },
            Ok(None) => TransitionError::NotFound(id.clone()),
            Err(e) => TransitionError::Store(e),
        }
    }
}

fn with_origin(what: &str, origin: Option<&str>) -> String {
    match origin {
        Some(r) => format!("{what} (request {r})"),
        None => what.to_string(),
    }
}

pub(super) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The timeline entry of an email that expired before delivery.
pub(super) async fn insert_expired(
    tx: &mut Tx,
    id: &str,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    insert_event(
        &mut *tx,
        id,
        at,
        "expired",
        "expired",
        None,
        None,
        "expires_at passed",
    )
    .await
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn insert_event<'a>(
    on: impl Into<On<'a>>,
    id: &str,
    at: OffsetDateTime,
    kind: &str,
    status: &str,
    attempt: Option<i64>,
    smtp_code: Option<i64>,
    detail: &str,
) -> Result<(), StoreError> {
    sql(
        "INSERT INTO postbox_events (email_id, at, kind, status, attempt, smtp_code, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(ms(at))
    .bind(kind)
    .bind(status)
    .bind(attempt)
    .bind(smtp_code)
    .bind(detail)
    .execute(on)
    .await?;
    Ok(())
}
