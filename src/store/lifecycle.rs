//! Every status change after submission but claims and attempts (those are batched, in
//! `batch`): deferrals, manual cancel and retry. Each writes its timeline entry in the same
//! transaction, and each that needs a new job pushes it there too.

use time::OffsetDateTime;

use super::open::now;
use super::submit::push_job;
use super::*;
use crate::db::{On, Sql, Tx, sql};
use crate::domain::lifecycle::Step;

impl Store {
    /// Gives job `<id>:<seq>` up without running it: the email (if still waiting for that job)
    /// gets a new job due at `at`. Used while the process stops: the job that apalis handed
    /// over is acked, and the email keeps a live job for the next process.
    pub async fn defer(
        &self,
        id: &str,
        seq: i64,
        at: OffsetDateTime,
        task: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().await?;
        crate::queue::table::ack(&mut tx, self.db.kind(), &[task]).await?;
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

    /// Acks jobs (apalis task ids) that had nothing to do.
    pub async fn ack_jobs(&self, tasks: &[&str]) -> Result<(), StoreError> {
        crate::queue::table::ack(&self.db, self.db.kind(), tasks).await?;
        Ok(())
    }

    /// Cancels a queued, retrying or failed email; `origin` (a request id) goes into the timeline.
    pub async fn cancel(&self, id: &EmailId, origin: Option<&str>) -> Result<(), TransitionError> {
        let now = now();
        let mut tx = self.db.begin().await.map_err(StoreError::from)?;
        let res = sql(format!(
            "UPDATE postbox_emails
                SET status = '{}', job_seq = job_seq + 1, updated_at = $1,
                    next_attempt_at = NULL
              WHERE id = $2 AND {}",
            Step::Cancel.to(),
            Step::Cancel.guard("status")
        ))
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
        self.wrote_events();
        Ok(())
    }

    /// Re-drives a failed email: a fresh retry budget, a new job, the same Message-ID.
    pub async fn retry(&self, id: &EmailId, origin: Option<&str>) -> Result<(), TransitionError> {
        let now = now();
        let mut tx = self.db.begin().await.map_err(StoreError::from)?;
        let row = sql(format!(
            "UPDATE postbox_emails
                SET status = '{}', job_seq = job_seq + 1, attempts = 0, age_from = $1,
                    next_attempt_at = NULL, updated_at = $1
              WHERE id = $2 AND {}
          RETURNING job_seq, priority",
            Step::Requeue.to(),
            Step::Requeue.guard("status")
        ))
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
        self.wrote_events();
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

/// The `submitted` timeline entries (and so the `email.queued` events) of new emails
/// `(id, request id)`, in one statement (its text for `pad` rows: [`crate::db::rows_of`]); None
/// for no rows.
pub(super) fn submitted_sql(rows: &[(&str, Option<&str>)], now_ms: i64, pad: usize) -> Option<Sql> {
    if rows.is_empty() {
        return None;
    }
    let t = Step::Submit.row();
    let mut q = sql(format!(
        "INSERT INTO postbox_events (email_id, at, kind, status, detail) {}",
        crate::db::rows_of(rows.len(), 5, pad)
    ));
    for (id, request_id) in rows {
        q.add(*id)
            .add(now_ms)
            .add(t.entry.unwrap_or("submitted"))
            .add(t.to.as_str())
            .add(request_id.map(|r| format!("request {r}")));
    }
    q.nulls_to(pad * 5);
    Some(q)
}
