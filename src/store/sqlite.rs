//! The SQLite store (the embedded default): our tables plus apalis-sqlite's `Jobs`.

use std::str::FromStr;
use std::time::Duration;

use apalis_sqlite::SqliteStorage;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use time::OffsetDateTime;

use super::*;
use crate::config::Settings;

/// apalis-level attempts, only for infrastructure errors (a DB error inside the handler); SMTP
/// retries are new jobs with their own run time, never apalis retries.
const JOB_MAX_ATTEMPTS: usize = 10;

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    queue: String,
}
/// How often WAL frames are copied back into the database, off the commit path.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

pub(super) fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl Store {
    /// Opens (creating if missing) the database and applies every migration: apalis's, then
    /// ours (bookkept in `postbox_migrations`), then drops the index that makes acks quadratic.
    pub async fn open(settings: &Settings) -> Result<Store, StoreError> {
        let opts = SqliteConnectOptions::from_str(&settings.database.url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_millis(settings.database.busy_timeout_ms))
            .pragma("temp_store", "MEMORY")
            .pragma("cache_size", "-16000")
            // Checkpoints run in a background task (see below), not inside whichever commit
            // crosses the threshold; this high mark is only a backstop.
            .pragma("wal_autocheckpoint", "50000");
        // apalis's setup() switches one connection to synchronous=OFF: run it on a throwaway pool
        // so no connection we keep has durability turned off.
        let setup = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await?;
        SqliteStorage::setup(&setup)
            .await
            .map_err(|e| StoreError::Queue(format!("apalis setup: {e}")))?;
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.dangerous_set_table_name("postbox_migrations");
        migrator.run(&setup).await?;
        // Finished rows keep lock_by, and the ack statement is planned through this index: every
        // ack would scan all rows a worker ever processed (STACK-NOTES). The unique id index is
        // the right plan.
        sqlx::query("DROP INDEX IF EXISTS LIdx")
            .execute(&setup)
            .await?;
        setup.close().await;

        let pool = SqlitePoolOptions::new()
            .max_connections(settings.database.max_connections)
            .min_connections(1)
            .connect_with(opts)
            .await?;
        let checkpointer = pool.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CHECKPOINT_EVERY).await;
                if checkpointer.is_closed() {
                    return;
                }
                if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&checkpointer)
                    .await
                {
                    if checkpointer.is_closed() {
                        return;
                    }
                    tracing::debug!(error = %e, "WAL checkpoint failed; will try again");
                }
            }
        });
        Ok(Store {
            pool,
            queue: settings.queue.name.clone(),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Commits a group of submissions in ONE transaction (group commit): for each, in order,
    /// its idempotency key is checked, then the depth cap; then the emails of every submission
    /// let through are inserted together (multi-row statements) with their jobs. One outcome per
    /// request. The transaction takes SQLite's write lock first (`BEGIN IMMEDIATE`), so checks
    /// and inserts see every other writer's committed rows.
    pub async fn insert_group(
        &self,
        reqs: &[InsertRequest],
        max_depth: u64,
        idempotency_ttl: Duration,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        enum Plan {
            Done(InsertOutcome),
            /// Rows `[from, from + n)` of the combined insert.
            Insert {
                from: usize,
                n: usize,
            },
            /// Same key and payload as an earlier request of this group: its result.
            SameAs(usize),
        }
        let now = now();
        let now_ms = ms(now);
        let cutoff = now_ms - idempotency_ttl.as_millis() as i64;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut depth: Option<u64> = None;
        let mut plans = Vec::with_capacity(reqs.len());
        let mut rows: Vec<(&NewRow, Option<&str>)> = Vec::new();
        let mut keys: std::collections::HashMap<(&str, &str), (usize, &str)> = Default::default();
        for (i, req) in reqs.iter().enumerate() {
            if let Some(c) = &req.idempotency {
                if let Some((first, fp)) = keys.get(&(c.scope.as_str(), c.key.as_str())) {
                    plans.push(if *fp == c.fingerprint {
                        Plan::SameAs(*first)
                    } else {
                        Plan::Done(InsertOutcome::KeyReused)
                    });
                    continue;
                }
                sqlx::query(
                    "DELETE FROM postbox_idempotency WHERE scope = ?1 AND key = ?2 AND created_at < ?3",
                )
                .bind(&c.scope)
                .bind(&c.key)
                .bind(cutoff)
                .execute(&mut *tx)
                .await?;
                let seen = sqlx::query(
                    "SELECT fingerprint, response FROM postbox_idempotency WHERE scope = ?1 AND key = ?2",
                )
                .bind(&c.scope)
                .bind(&c.key)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(seen) = seen {
                    let fingerprint: String = seen.try_get("fingerprint")?;
                    plans.push(Plan::Done(if fingerprint != c.fingerprint {
                        InsertOutcome::KeyReused
                    } else {
                        InsertOutcome::Replayed(decode_ids(
                            &seen.try_get::<String, _>("response")?,
                        )?)
                    }));
                    continue;
                }
            }
            if max_depth > 0 {
                let d = match depth {
                    Some(d) => d,
                    None => self.depth(&mut tx).await?,
                };
                if d + req.rows.len() as u64 > max_depth {
                    depth = Some(d);
                    plans.push(Plan::Done(InsertOutcome::QueueFull {
                        depth: d,
                        max_depth,
                    }));
                    continue;
                }
                // Counted as new even if an email's own key turns out to exist: conservative.
                depth = Some(d + req.rows.len() as u64);
            }
            if let Some(c) = &req.idempotency {
                keys.insert((&c.scope, &c.key), (i, &c.fingerprint));
            }
            plans.push(Plan::Insert {
                from: rows.len(),
                n: req.rows.len(),
            });
            rows.extend(req.rows.iter().map(|r| (r, req.request_id.as_deref())));
        }
        let ids = self.insert_rows(&mut tx, &rows, now_ms).await?;
        let mut out: Vec<InsertOutcome> = Vec::with_capacity(reqs.len());
        for (req, plan) in reqs.iter().zip(plans) {
            let outcome = match plan {
                Plan::Done(o) => o,
                Plan::SameAs(first) => match &out[first] {
                    InsertOutcome::Inserted(ids) => InsertOutcome::Replayed(ids.clone()),
                    other => other.clone(),
                },
                Plan::Insert { from, n } => {
                    let mine = ids[from..from + n].to_vec();
                    if let Some(c) = &req.idempotency {
                        sqlx::query(
                            "INSERT INTO postbox_idempotency (scope, key, fingerprint, response, created_at)
                             VALUES (?1, ?2, ?3, ?4, ?5)",
                        )
                        .bind(&c.scope)
                        .bind(&c.key)
                        .bind(&c.fingerprint)
                        .bind(encode_ids(&mine))
                        .bind(now_ms)
                        .execute(&mut *tx)
                        .await?;
                    }
                    InsertOutcome::Inserted(mine)
                }
            };
            out.push(outcome);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Emails waiting or in flight: one row kept exact by triggers (migration
    /// `..._depth_counter.sql`), so checking the cap costs the same at any depth.
    async fn depth(&self, conn: &mut SqliteConnection) -> Result<u64, StoreError> {
        let n: Option<i64> =
            sqlx::query_scalar("SELECT n FROM postbox_counters WHERE name = 'depth'")
                .fetch_optional(conn)
                .await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// Inserts emails (with the request that submitted each) and their jobs on `tx`, many rows
    /// per statement. An email whose own idempotency key is already present gets the existing
    /// email's id with `false`, and nothing is created for it.
    pub(super) async fn insert_rows(
        &self,
        tx: &mut SqliteConnection,
        rows: &[(&NewRow, Option<&str>)],
        now_ms: i64,
    ) -> Result<Vec<(EmailId, bool)>, StoreError> {
        /// 14 parameters a row: 140 rows stay far below SQLite's 32,766 parameters.
        const CHUNK: usize = 140;
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(CHUNK) {
            let mut prepared = Vec::with_capacity(chunk.len());
            for ((id, email, message_id), request_id) in chunk {
                let spec = serde_json::to_string(email).map_err(|e| StoreError::Corrupt {
                    id: id.to_string(),
                    message: e.to_string(),
                })?;
                let recipients = email
                    .recipients()
                    .map(|a| a.address())
                    .collect::<Vec<_>>()
                    .join(" ");
                prepared.push((id, email, message_id, *request_id, spec, recipients));
            }
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO postbox_emails (id, status, priority, spec, message_id, idempotency_key,
                     template, recipients, tags, send_at, expires_at, age_from, created_at,
                     updated_at, request_id) ",
            );
            q.push_values(
                &prepared,
                |mut b, (id, email, message_id, request_id, spec, recipients)| {
                    let send_at = email.send_at.map(ms);
                    b.push_bind(id.as_str())
                        .push_bind("queued")
                        .push_bind(email.priority.as_str())
                        .push_bind(spec.as_str())
                        .push_bind(message_id.as_str())
                        .push_bind(email.idempotency_key.as_deref())
                        .push_bind(email.content.template_name())
                        .push_bind(recipients.as_str())
                        .push_bind(email.tags.join(" "))
                        .push_bind(send_at)
                        .push_bind(email.expires_at.map(ms))
                        .push_bind(send_at.unwrap_or(now_ms).max(now_ms))
                        .push_bind(now_ms)
                        .push_bind(now_ms)
                        .push_bind(*request_id);
                },
            );
            q.push(" ON CONFLICT(idempotency_key) DO NOTHING RETURNING id");
            let inserted: std::collections::HashSet<String> = q
                .build_query_scalar::<String>()
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            let mut jobs = Vec::with_capacity(inserted.len());
            for (id, email, ..) in &prepared {
                if inserted.contains(id.as_str()) {
                    jobs.push((id.as_str(), 0, email.priority, email.send_at));
                    out.push(((*id).clone(), true));
                } else {
                    let existing: String = sqlx::query_scalar(
                        "SELECT id FROM postbox_emails WHERE idempotency_key = ?1",
                    )
                    .bind(email.idempotency_key.as_deref())
                    .fetch_one(&mut *tx)
                    .await?;
                    out.push((EmailId::from_db(existing), false));
                }
            }
            push_jobs(tx, &self.queue, &jobs).await?;
        }
        Ok(out)
    }

    /// Claims an email for one attempt, if `seq` still owns it and it is not final.
    ///
    /// The claim is one autocommit statement (the hot path: no BEGIN/COMMIT round trips); the
    /// rare expiry and interrupted-send notes are written after it.
    pub async fn claim(&self, id: &str, seq: i64) -> Result<ClaimResult, StoreError> {
        let now = now();
        let row = sqlx::query(
            "UPDATE postbox_emails
                SET status = 'sending', attempts = attempts + 1,
                    interrupted = (status = 'sending'), updated_at = ?1
              WHERE id = ?2 AND job_seq = ?3 AND status IN ('queued', 'retrying', 'sending')
                AND (expires_at IS NULL OR expires_at > ?1)
          RETURNING spec, message_id, attempts, priority, age_from, interrupted",
        )
        .bind(ms(now))
        .bind(id)
        .bind(seq)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            let mut tx = self.pool.begin().await?;
            let expired = sqlx::query(
                "UPDATE postbox_emails
                    SET status = 'expired', job_seq = job_seq + 1, updated_at = ?1,
                        next_attempt_at = NULL, last_error = 'expired before it could be delivered'
                  WHERE id = ?2 AND job_seq = ?3 AND status IN ('queued', 'retrying', 'sending')
                    AND expires_at <= ?1",
            )
            .bind(ms(now))
            .bind(id)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            if expired.rows_affected() == 1 {
                insert_expired(&mut tx, id, now).await?;
                tx.commit().await?;
                return Ok(ClaimResult::Expired);
            }
            tx.commit().await?;
            return Ok(ClaimResult::Skip("final, cancelled or superseded"));
        };
        let spec: String = row.try_get("spec")?;
        let email: Email = serde_json::from_str(&spec).map_err(|e| StoreError::Corrupt {
            id: id.to_string(),
            message: e.to_string(),
        })?;
        let attempt: i64 = row.try_get("attempts")?;
        let interrupted: bool = row.try_get("interrupted")?;
        if interrupted {
            let mut conn = self.pool.acquire().await?;
            insert_event(
                &mut conn,
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
        let priority: String = row.try_get("priority")?;
        Ok(ClaimResult::Claimed(Box::new(Claim {
            id: EmailId::from_db(id.to_string()),
            email,
            message_id: row.try_get("message_id")?,
            attempt: attempt as u32,
            seq,
            priority: Priority::parse(&priority).unwrap_or_default(),
            age_from: from_ms(row.try_get("age_from")?),
            interrupted,
        })))
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
        let mut tx = self.pool.begin().await?;
        let res = sqlx::query(
            "UPDATE postbox_emails
                SET status = ?1, next_attempt_at = ?2, last_error = ?3, sent_at = ?4,
                    updated_at = ?5, job_seq = job_seq + ?6
              WHERE id = ?7 AND job_seq = ?8 AND status = 'sending'",
        )
        .bind(status)
        .bind(next_at)
        .bind(last_error.as_deref())
        .bind(sent_at)
        .bind(ms(now))
        .bind(bump)
        .bind(claim.id.as_str())
        .bind(claim.seq)
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        let detail = match finish {
            Finish::Sent => None,
            Finish::Retry { at } => Some(format!("retry at {}", rfc3339(*at))),
            Finish::Failed { reason } => Some(reason.clone()),
        };
        sqlx::query(
            "INSERT INTO postbox_events (email_id, at, kind, status, attempt, smtp_code, smtp_text,
                 duration_ms, detail)
             VALUES (?1, ?2, 'attempt', ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(claim.id.as_str())
        .bind(ms(rec.started_at))
        .bind(status)
        .bind(claim.attempt as i64)
        .bind(rec.smtp_code.map(i64::from))
        .bind(&rec.smtp_text)
        .bind(rec.duration_ms)
        .bind(detail)
        .execute(&mut *tx)
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
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let res = sqlx::query(
            "UPDATE postbox_emails
                SET status = 'cancelled', job_seq = job_seq + 1, updated_at = ?1,
                    next_attempt_at = NULL
              WHERE id = ?2 AND status IN ('queued', 'retrying', 'failed')",
        )
        .bind(ms(now))
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        if res.rows_affected() == 0 {
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
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let row = sqlx::query(
            "UPDATE postbox_emails
                SET status = 'queued', job_seq = job_seq + 1, attempts = 0, age_from = ?1,
                    next_attempt_at = NULL, updated_at = ?1
              WHERE id = ?2 AND status = 'failed'
          RETURNING job_seq, priority",
        )
        .bind(ms(now))
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        let Some(row) = row else {
            drop(tx);
            return Err(self.refusal(id, "retry", "failed").await);
        };
        let seq: i64 = row.try_get("job_seq").map_err(StoreError::from)?;
        let priority: String = row.try_get("priority").map_err(StoreError::from)?;
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

    async fn refusal(
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

    pub async fn status_of(&self, id: &EmailId) -> Result<Option<EmailStatus>, StoreError> {
        let s: Option<String> =
            sqlx::query_scalar("SELECT status FROM postbox_emails WHERE id = ?1")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await?;
        Ok(s.and_then(|s| EmailStatus::parse(&s)))
    }

    /// An email's state and timeline.
    pub async fn report(&self, id: &EmailId) -> Result<Option<EmailReport>, StoreError> {
        let Some(row) = sqlx::query("SELECT * FROM postbox_emails WHERE id = ?1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let events = sqlx::query("SELECT * FROM postbox_events WHERE email_id = ?1 ORDER BY seq")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await?;
        Ok(Some(report_from(row, events)?))
    }

    /// The validated email as stored (for previews).
    pub async fn email(&self, id: &EmailId) -> Result<Option<Email>, StoreError> {
        let spec: Option<String> =
            sqlx::query_scalar("SELECT spec FROM postbox_emails WHERE id = ?1")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
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
        let rows = sqlx::query(
            "SELECT at / 60000 AS m, sum(status = 'sent') AS sent, sum(status = 'failed') AS failed
               FROM postbox_events WHERE at >= ?1 AND kind = 'attempt' GROUP BY m",
        )
        .bind(from * 60_000)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<MinuteCounts> = (from..=now_min)
            .map(|m| MinuteCounts {
                minute: from_ms(m * 60_000),
                sent: 0,
                failed: 0,
            })
            .collect();
        for r in rows {
            let m: i64 = r.try_get("m")?;
            if let Some(slot) = out.get_mut((m - from) as usize) {
                slot.sent = r.try_get::<i64, _>("sent")? as u64;
                slot.failed = r.try_get::<i64, _>("failed")? as u64;
            }
        }
        Ok(out)
    }

    /// Emails by status.
    pub async fn counts(&self) -> Result<Counts, StoreError> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM postbox_emails GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        let mut c = Counts::default();
        for r in rows {
            let s: String = r.try_get("status")?;
            let n: i64 = r.try_get("n")?;
            c.by_status.insert(s, n as u64);
        }
        Ok(c)
    }

    /// Is the database answering?
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// A page of emails, newest first (by id, which is time-ordered and unique: a stable order).
    pub async fn list(&self, f: &ListFilter) -> Result<EmailPage, StoreError> {
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "SELECT id, status, priority, json_extract(spec, '$.subject') AS subject, template,
                    recipients, tags, attempts, created_at, updated_at, sent_at, last_error
               FROM postbox_emails WHERE 1 = 1",
        );
        if let Some(s) = f.status {
            q.push(" AND status = ").push_bind(s.as_str());
        }
        if let Some(t) = &f.tag {
            q.push(" AND instr(' ' || tags || ' ', ")
                .push_bind(format!(" {t} "))
                .push(") > 0");
        }
        if let Some(r) = &f.recipient {
            q.push(" AND instr(' ' || lower(recipients) || ' ', ")
                .push_bind(format!(" {} ", r.to_lowercase()))
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
        let rows = q.build().fetch_all(&self.pool).await?;
        let mut emails = Vec::with_capacity(rows.len());
        for row in rows.iter().take(limit as usize) {
            let id: String = row.try_get("id")?;
            let status: String = row.try_get("status")?;
            let priority: String = row.try_get("priority")?;
            let split =
                |s: String| -> Vec<String> { s.split_whitespace().map(str::to_string).collect() };
            emails.push(EmailSummary {
                status: EmailStatus::parse(&status).ok_or_else(|| StoreError::Corrupt {
                    id: id.clone(),
                    message: format!("unknown status {status}"),
                })?,
                id: EmailId::from_db(id),
                priority: Priority::parse(&priority).unwrap_or_default(),
                subject: row.try_get("subject")?,
                template: row.try_get("template")?,
                recipients: split(row.try_get("recipients")?),
                tags: split(row.try_get("tags")?),
                attempts: row.try_get::<i64, _>("attempts")? as u32,
                created_at: from_ms(row.try_get("created_at")?),
                updated_at: from_ms(row.try_get("updated_at")?),
                sent_at: row.try_get::<Option<i64>, _>("sent_at")?.map(from_ms),
                last_error: row.try_get("last_error")?,
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

    /// The queue at a glance.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let now = ms(now());
        let mut st = Stats::default();
        for r in sqlx::query(
            "SELECT status, priority, COUNT(*) AS n FROM postbox_emails
              WHERE status IN ('queued', 'retrying', 'sending') GROUP BY status, priority",
        )
        .fetch_all(&self.pool)
        .await?
        {
            let n: i64 = r.try_get("n")?;
            st.depth
                .entry(r.try_get("status")?)
                .or_default()
                .insert(r.try_get("priority")?, n as u64);
        }
        st.totals = self.counts().await?.by_status;
        st.in_flight = st.totals.get("sending").copied().unwrap_or(0);
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(age_from) FROM postbox_emails WHERE status = 'queued' AND age_from <= ?1",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        st.oldest_queued_age_secs = oldest.map(|t| (now - t).max(0) as f64 / 1000.0);
        for (window, ago) in [
            (&mut st.last_minute, 60_000),
            (&mut st.last_hour, 3_600_000),
        ] {
            for r in sqlx::query(
                "SELECT status, COUNT(*) AS n FROM postbox_events
                  WHERE kind = 'attempt' AND at >= ?1 GROUP BY status",
            )
            .bind(now - ago)
            .fetch_all(&self.pool)
            .await?
            {
                let n = r.try_get::<i64, _>("n")? as u64;
                match r.try_get::<String, _>("status")?.as_str() {
                    "sent" => window.sent = n,
                    "failed" => window.failed = n,
                    "retrying" => window.retried = n,
                    _ => {}
                }
            }
        }
        Ok(st)
    }

    /// One janitor pass: repairs what apalis 1.0 can leave stuck, expires mail, applies retention.
    pub async fn janitor(
        &self,
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
        let jobs_requeued = sqlx::query(
            "UPDATE Jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL
              WHERE job_type = ?1 AND (
                    (status IN ('Running', 'Queued') AND lock_by IN
                        (SELECT id FROM Workers WHERE worker_type = ?1 AND last_seen < ?2))
                 OR (status IN ('Running', 'Queued') AND lock_at < ?3)
                 OR (status = 'Pending' AND lock_by IS NOT NULL AND lock_at < ?3))",
        )
        .bind(&self.queue)
        .bind(now_s - dead_after.as_secs() as i64)
        .bind(now_s - stuck_after.as_secs() as i64)
        .execute(&self.pool)
        .await?
        .rows_affected();
        let mut r = JanitorReport {
            jobs_requeued,
            ..Default::default()
        };

        // 2. Emails that are not final but own no live job (a job killed or exhausted by
        //    infrastructure errors): give them a new one. Nothing accepted is ever dropped.
        let orphans = sqlx::query(
            "SELECT e.id, e.job_seq, e.priority, e.next_attempt_at, e.send_at FROM postbox_emails e
              WHERE e.status IN ('queued', 'retrying', 'sending') AND e.updated_at < ?2
                AND NOT EXISTS (SELECT 1 FROM Jobs j
                     WHERE j.job_type = ?1 AND j.idempotency_key = e.id || ':' || e.job_seq
                       AND (j.status IN ('Pending', 'Queued', 'Running')
                            OR (j.status = 'Failed' AND j.attempts < j.max_attempts)))
              LIMIT 1000",
        )
        .bind(&self.queue)
        .bind(ms(now) - stuck_after.as_millis() as i64)
        .fetch_all(&self.pool)
        .await?;
        for o in orphans {
            let id: String = o.try_get("id")?;
            let seq: i64 = o.try_get("job_seq")?;
            let priority: String = o.try_get("priority")?;
            let at: Option<i64> = o
                .try_get::<Option<i64>, _>("next_attempt_at")?
                .or(o.try_get("send_at")?);
            let mut tx = self.pool.begin().await?;
            let moved = sqlx::query(
                "UPDATE postbox_emails SET job_seq = job_seq + 1, updated_at = ?1
                  WHERE id = ?2 AND job_seq = ?3 AND status IN ('queued', 'retrying', 'sending')",
            )
            .bind(ms(now))
            .bind(&id)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            if moved.rows_affected() == 1 {
                let status: String =
                    sqlx::query_scalar("SELECT status FROM postbox_emails WHERE id = ?1")
                        .bind(&id)
                        .fetch_one(&mut *tx)
                        .await?;
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
        let mut tx = self.pool.begin().await?;
        let expired = sqlx::query(
            "UPDATE postbox_emails
                SET status = 'expired', job_seq = job_seq + 1, updated_at = ?1, next_attempt_at = NULL,
                    last_error = 'expired before it could be delivered'
              WHERE status IN ('queued', 'retrying') AND expires_at <= ?1
          RETURNING id",
        )
        .bind(ms(now))
        .fetch_all(&mut *tx)
        .await?;
        for row in &expired {
            let id: String = row.try_get("id")?;
            insert_expired(&mut tx, &id, now).await?;
        }
        tx.commit().await?;
        r.emails_expired = expired.len() as u64;

        // 4. Retention.
        r.jobs_deleted = sqlx::query(
            "DELETE FROM Jobs WHERE job_type = ?1 AND done_at IS NOT NULL AND done_at < ?2
                AND (status IN ('Done', 'Killed') OR (status = 'Failed' AND attempts >= max_attempts))",
        )
        .bind(&self.queue)
        .bind(now_s - finished_jobs.as_secs() as i64)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if let Some(keep) = emails_after {
            let cutoff = ms(now) - keep.as_millis() as i64;
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "DELETE FROM postbox_events WHERE email_id IN (SELECT id FROM postbox_emails
                  WHERE status IN ('sent', 'failed', 'cancelled', 'expired') AND updated_at < ?1)",
            )
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
            r.emails_deleted = sqlx::query(
                "DELETE FROM postbox_emails
                  WHERE status IN ('sent', 'failed', 'cancelled', 'expired') AND updated_at < ?1",
            )
            .bind(cutoff)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            // Alerted rule matches age out with the emails (a UIDVALIDITY resync recognises
            // messages by these rows, so only this window is protected from re-alerting).
            sqlx::query(
                "DELETE FROM postbox_alert_hits WHERE alert_id IS NOT NULL AND seen_at < ?1",
            )
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        sqlx::query("DELETE FROM postbox_idempotency WHERE created_at < ?1")
            .bind(ms(now) - idempotency_ttl.as_millis() as i64)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "DELETE FROM Workers WHERE worker_type = ?1 AND last_seen < ?2
                AND NOT EXISTS (SELECT 1 FROM Jobs WHERE Jobs.lock_by = Workers.id)",
        )
        .bind(&self.queue)
        .bind(now_s - 24 * 3600)
        .execute(&self.pool)
        .await?;
        Ok(r)
    }
}

fn with_origin(what: &str, origin: Option<&str>) -> String {
    match origin {
        Some(r) => format!("{what} (request {r})"),
        None => what.to_string(),
    }
}

/// The remembered result of an idempotent request: `[[id, created], ...]`.
fn encode_ids(ids: &[(EmailId, bool)]) -> String {
    serde_json::to_string(ids).expect("ids always serialize")
}

fn decode_ids(s: &str) -> Result<Vec<(EmailId, bool)>, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
        id: "(idempotency record)".into(),
        message: e.to_string(),
    })
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Pushes the job that owns `<id>:<seq>`.
async fn push_job(
    conn: &mut SqliteConnection,
    queue: &str,
    id: &str,
    seq: i64,
    priority: Priority,
    run_at: Option<OffsetDateTime>,
) -> Result<(), StoreError> {
    push_jobs(conn, queue, &[(id, seq, priority, run_at)]).await
}

/// Pushes jobs `(email id, seq, priority, run_at)` into apalis's `Jobs`, many per statement.
///
/// The row is exactly what `apalis_sqlite::queries::push_tasks` writes (its `sink.sql`: status
/// Pending, 0 attempts, `{}` metadata, a ULID id, `ON CONFLICT(job_type, idempotency_key) DO
/// NOTHING`), but push_tasks runs one statement per job, and each statement is a round trip to
/// sqlx's SQLite thread: at a thousand jobs a batch that hand-off was most of the submit cost.
/// `run_at` is rounded up to apalis's whole seconds, so nothing is sent before its time.
async fn push_jobs(
    conn: &mut SqliteConnection,
    queue: &str,
    jobs: &[(&str, i64, Priority, Option<OffsetDateTime>)],
) -> Result<(), StoreError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let now_s = now().unix_timestamp();
    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
        "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, priority,
             metadata, idempotency_key) ",
    );
    q.push_values(jobs, |mut b, (id, seq, priority, run_at)| {
        let payload = serde_json::to_vec(&SendJob {
            v: SendJob::VERSION,
            email_id: id.to_string(),
            seq: *seq,
        })
        .expect("a job payload always serializes");
        let run_at = run_at.map_or(now_s, |t| ((ms(t) + 999) / 1000).max(0));
        b.push_bind(payload)
            .push_bind(ulid::Ulid::generate().to_string())
            .push_bind(queue)
            .push_bind("Pending")
            .push_bind(0i64)
            .push_bind(JOB_MAX_ATTEMPTS as i64)
            .push_bind(run_at)
            .push_bind(priority.job_priority() as i64)
            .push_bind("{}")
            .push_bind(format!("{id}:{seq}"));
    });
    q.push(" ON CONFLICT(job_type, idempotency_key) DO NOTHING");
    q.build().execute(conn).await?;
    Ok(())
}

/// The timeline entry of an email that expired before delivery.
async fn insert_expired(
    conn: &mut SqliteConnection,
    id: &str,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    insert_event(
        conn,
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
async fn insert_event(
    conn: &mut SqliteConnection,
    id: &str,
    at: OffsetDateTime,
    kind: &str,
    status: &str,
    attempt: Option<i64>,
    smtp_code: Option<i64>,
    detail: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO postbox_events (email_id, at, kind, status, attempt, smtp_code, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .bind(id)
    .bind(ms(at))
    .bind(kind)
    .bind(status)
    .bind(attempt)
    .bind(smtp_code)
    .bind(detail)
    .execute(conn)
    .await?;
    Ok(())
}

fn report_from(row: SqliteRow, events: Vec<SqliteRow>) -> Result<EmailReport, StoreError> {
    let id: String = row.try_get("id")?;
    let spec: String = row.try_get("spec")?;
    let email: Email = serde_json::from_str(&spec).map_err(|e| StoreError::Corrupt {
        id: id.clone(),
        message: e.to_string(),
    })?;
    let status: String = row.try_get("status")?;
    let priority: String = row.try_get("priority")?;
    let opt = |c: &str| -> Result<Option<OffsetDateTime>, StoreError> {
        Ok(row.try_get::<Option<i64>, _>(c)?.map(from_ms))
    };
    let request_id: Option<String> = row.try_get("request_id")?;
    let submitted = TimelineEntry {
        at: from_ms(row.try_get("created_at")?),
        kind: "submitted".into(),
        status: "queued".into(),
        attempt: None,
        smtp_code: None,
        smtp_text: None,
        duration_ms: None,
        detail: request_id.as_ref().map(|r| format!("request {r}")),
    };
    let timeline = std::iter::once(Ok(submitted))
        .chain(events.into_iter().map(|e| {
            Ok(TimelineEntry {
                at: from_ms(e.try_get("at")?),
                kind: e.try_get("kind")?,
                status: e.try_get("status")?,
                attempt: e.try_get::<Option<i64>, _>("attempt")?.map(|a| a as u32),
                smtp_code: e.try_get::<Option<i64>, _>("smtp_code")?.map(|c| c as u16),
                smtp_text: e.try_get("smtp_text")?,
                duration_ms: e.try_get("duration_ms")?,
                detail: e.try_get("detail")?,
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
        message_id: row.try_get("message_id")?,
        subject: email.subject.clone(),
        template: email.content.template_name().map(str::to_string),
        to: email.to.iter().map(|a| a.to_string()).collect(),
        tags: email.tags.clone(),
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        created_at: from_ms(row.try_get("created_at")?),
        updated_at: from_ms(row.try_get("updated_at")?),
        sent_at: opt("sent_at")?,
        next_attempt_at: opt("next_attempt_at")?,
        send_at: opt("send_at")?,
        expires_at: opt("expires_at")?,
        last_error: row.try_get("last_error")?,
        request_id,
        timeline,
    })
}
