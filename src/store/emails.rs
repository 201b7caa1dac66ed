//! The emails side of the store: submission (group commit), claims and attempts, manual
//! transitions, listings and stats, the janitor. Every statement is written once for both
//! databases (see `db.rs`); the apalis job tables are the one place the two differ.

use std::str::FromStr;
use std::time::Duration;

use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use time::OffsetDateTime;

use super::Fault;
use super::db::{Db, DbRow, Kind, Lock, On, Sql, Tx, lock_hash, sql, values};
use super::settings::{DatabaseSettings, is_postgres_url};
use super::*;
use std::sync::atomic::Ordering;

/// apalis-level attempts, only for infrastructure errors (a DB error inside the handler); SMTP
/// retries are new jobs with their own run time, never apalis retries.
const JOB_MAX_ATTEMPTS: usize = 10;

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pub(super) db: Db,
    queue: String,
    /// The last write refused because the disk is full, until a write succeeds again.
    full: std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, String)>>>,
    /// SQLite: a checkpoint failed (the disk is full) and the WAL has not been truncated
    /// since; deliveries wait (see [`Store::wal_reclaimed`]).
    wal_trouble: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// How long a refused write keeps `/readyz` not ready (unless a write succeeds sooner).
const FULL_REMEMBERED: Duration = Duration::from_secs(10);
/// How often WAL frames are copied back into the database, off the commit path.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

pub(super) fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// WAL frames past which the WAL is truncated while the disk has been in trouble (16 MiB of
/// 4 KiB pages).
const WAL_TIGHT_FRAMES: i64 = 4_096;
/// How long after a failed checkpoint the WAL is kept tight.
const TROUBLE_REMEMBERED: Duration = Duration::from_secs(600);

/// Copies WAL frames back into the database every [`CHECKPOINT_EVERY`], off the commit path.
///
/// In normal operation only passive checkpoints run: they never wait. But they never restart
/// the WAL either (SQLite reuses it from its start only when every frame was copied back and no
/// reader still holds it, and under sustained load some reader always does), so the WAL grows:
/// measured, `scripts/bench-http.sh 10` left a 206 MB WAL, and a delivery backlog adds ~80 KB
/// per email. Forcing restarts holds writers while readers finish, and that cost tail latency
/// (bench-http single POSTs, p99 12 ms -> 61-72 ms with a restart past 64 MiB; a TRUNCATE past
/// 16 MiB cost 18% of a drain's rate), so they are left out of normal operation.
///
/// A full disk is where an unbounded WAL hurts: on a 32 MiB disk, space freed after it filled
/// up was eaten again within a second by the backlog. So after a failed checkpoint, TRUNCATE
/// checkpoints run until one succeeds (giving the WAL's space back to the disk), and for
/// [`TROUBLE_REMEMBERED`] afterwards the WAL is truncated whenever it passes
/// [`WAL_TIGHT_FRAMES`]. Until the first truncation succeeds, `trouble` is set: deliveries
/// wait, so that a backlog (~80 KB of WAL per delivery) does not eat the space freed for the
/// truncation. Measured under load before they waited: 648 truncations in a row failed on a
/// disk 40 MB of which had just been freed.
async fn checkpoints(
    pool: sqlx::SqlitePool,
    trouble: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let mut mode = "PASSIVE";
    let mut trouble_until: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(CHECKPOINT_EVERY).await;
        if pool.is_closed() {
            return;
        }
        let res = sqlx::query_as::<_, (i64, i64, i64)>(sqlx::AssertSqlSafe(format!(
            "PRAGMA wal_checkpoint({mode})"
        )))
        .fetch_one(&pool)
        .await;
        if mode == "TRUNCATE"
            && matches!(res, Ok((0, _, _)))
            && trouble.swap(false, Ordering::AcqRel)
        {
            tracing::info!("the WAL was truncated; deliveries resume");
        }
        // A write refused for a full disk (noted by the store) counts like a failed checkpoint.
        if mode != "TRUNCATE" && trouble.load(Ordering::Acquire) {
            trouble_until = Some(std::time::Instant::now() + TROUBLE_REMEMBERED);
            mode = "TRUNCATE";
            continue;
        }
        let tight = trouble_until.is_some_and(|t| std::time::Instant::now() < t);
        mode = match res {
            // Readers could not be waited out: try again.
            Ok((busy, _, _)) if mode == "TRUNCATE" && busy != 0 => "TRUNCATE",
            Ok((_, log, _)) if tight && log > WAL_TIGHT_FRAMES => "TRUNCATE",
            Ok(_) => "PASSIVE",
            Err(e) => {
                if pool.is_closed() {
                    return;
                }
                if mode != "TRUNCATE" {
                    tracing::warn!(error = %e, "WAL checkpoint failed; truncating the WAL until it succeeds");
                }
                trouble_until = Some(std::time::Instant::now() + TROUBLE_REMEMBERED);
                if !trouble.swap(true, Ordering::AcqRel) {
                    tracing::warn!("deliveries wait until the WAL can be truncated");
                }
                "TRUNCATE"
            }
        };
    }
}

/// Whether a connection given back to the pool may be used again. A transaction whose COMMIT
/// or ROLLBACK failed (SQLite on a full disk rolls a transaction back by itself, so the
/// driver's ROLLBACK then fails too) leaves the driver believing it is still inside one: the
/// next `BEGIN IMMEDIATE` on it fails ("non-zero transaction depth") and other writers wait on
/// it. Such a connection is closed instead of reused, whoever used it (apalis included). A
/// rollback the driver has merely queued is let through first (the ping runs after it).
async fn still_clean<C: sqlx::Connection>(conn: &mut C) -> Result<bool, sqlx::Error> {
    if conn.is_in_transaction() {
        conn.ping().await?;
    }
    let clean = !conn.is_in_transaction();
    if !clean {
        tracing::warn!("closing a database connection left inside a failed transaction");
    }
    Ok(clean)
}

impl Store {
    /// Opens the database named by `database.url` (SQLite, or PostgreSQL for `postgres://`)
    /// and applies every migration: apalis's, then ours (bookkept in `postbox_migrations`).
    pub async fn open(settings: &DatabaseSettings, queue: &str) -> Result<Store, StoreError> {
        let wal_trouble = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let db = if is_postgres_url(&settings.url) {
            Self::open_postgres(settings).await?
        } else {
            Self::open_sqlite(settings, wal_trouble.clone()).await?
        };
        Ok(Store {
            db,
            queue: queue.to_string(),
            full: Default::default(),
            wal_trouble,
        })
    }

    /// PostgreSQL: apalis-postgres's schema `apalis` (it needs the hstore extension: the first
    /// start must be allowed to `CREATE EXTENSION`), then `migrations/postgres`. Both migrators
    /// hold sqlx's advisory lock, so many processes can start at once.
    async fn open_postgres(settings: &DatabaseSettings) -> Result<Db, StoreError> {
        let opts = PgConnectOptions::from_str(&settings.url)?;
        let breaker = std::sync::Arc::new(super::db::Breaker::new(opts.clone()));
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(1)
            .after_release(|conn, _| Box::pin(still_clean(conn)))
            .acquire_timeout(Duration::from_millis(settings.busy_timeout_ms.max(1000)))
            .connect_with(opts)
            .await?;
        PostgresStorage::setup(&pool)
            .await
            .map_err(|e| StoreError::Queue(format!("apalis setup: {e}")))?;
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        migrator.dangerous_set_table_name("postbox_migrations");
        migrator.run(&pool).await?;
        Ok(Db::Pg(pool, breaker))
    }

    async fn open_sqlite(
        settings: &DatabaseSettings,
        wal_trouble: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Db, StoreError> {
        let opts = SqliteConnectOptions::from_str(&settings.url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_millis(settings.busy_timeout_ms))
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
            .max_connections(settings.max_connections)
            .min_connections(1)
            .after_release(|conn, _| Box::pin(still_clean(conn)))
            .connect_with(opts)
            .await?;
        tokio::spawn(checkpoints(pool.clone(), wal_trouble));
        Ok(Db::Sqlite(pool))
    }

    /// The database pool (the queue builds its apalis backend on it).
    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn kind(&self) -> Kind {
        self.db.kind()
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    pub async fn close(&self) {
        self.db.close().await;
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
        if reqs.iter().any(|r| {
            let key = r.request_id.as_deref().unwrap_or("");
            crate::faults::hit(crate::faults::GROUP_COMMIT_FAIL, key)
        }) {
            return Err(StoreError::Queue(
                "injected fault: this group commit fails".into(),
            ));
        }
        let mut tx = self.db.begin_write().await?;
        if tx.kind() == Kind::Postgres {
            // Other nodes commit groups concurrently: hold every idempotency key of this group
            // (in one global order, so two groups never deadlock), then the depth cap.
            let mut hashes: Vec<i32> = reqs
                .iter()
                .filter_map(|r| r.idempotency.as_ref())
                .map(|c| lock_hash(&[&c.scope, &c.key]))
                .collect();
            hashes.sort_unstable();
            hashes.dedup();
            for h in hashes {
                tx.lock(Lock::Idempotency(h)).await?;
            }
            if max_depth > 0 {
                tx.lock(Lock::Depth).await?;
            }
        }
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
                sql(
                    "DELETE FROM postbox_idempotency WHERE scope = $1 AND key = $2 AND created_at < $3",
                )
                .bind(&c.scope)
                .bind(&c.key)
                .bind(cutoff)
                .execute(&mut tx)
                .await?;
                let seen = sql(
                    "SELECT fingerprint, response FROM postbox_idempotency WHERE scope = $1 AND key = $2",
                )
                .bind(&c.scope)
                .bind(&c.key)
                .fetch_optional(&mut tx)
                .await?;
                if let Some(seen) = seen {
                    let fingerprint: String = seen.get("fingerprint")?;
                    plans.push(Plan::Done(if fingerprint != c.fingerprint {
                        InsertOutcome::KeyReused
                    } else {
                        InsertOutcome::Replayed(decode_ids(&seen.get::<String>("response")?)?)
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
                        sql(
                            "INSERT INTO postbox_idempotency (scope, key, fingerprint, response, created_at)
                             VALUES ($1, $2, $3, $4, $5)",
                        )
                        .bind(&c.scope)
                        .bind(&c.key)
                        .bind(&c.fingerprint)
                        .bind(encode_ids(&mine))
                        .bind(now_ms)
                        .execute(&mut tx)
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

    /// Emails waiting or in flight: kept exact by triggers (migration `..._depth_counter.sql`),
    /// so checking the cap costs the same at any depth. PostgreSQL spreads the counter over
    /// shards (one per connection slot) so concurrent writers do not queue on one row.
    async fn depth(&self, tx: &mut Tx) -> Result<u64, StoreError> {
        let n: Option<i64> = sql(
            "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM postbox_counters WHERE name = 'depth'",
        )
        .scalar(&mut *tx)
        .await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// Inserts emails (with the request that submitted each) and their jobs on `tx`, many rows
    /// per statement. An email whose own idempotency key is already present gets the existing
    /// email's id with `false`, and nothing is created for it.
    pub(super) async fn insert_rows(
        &self,
        tx: &mut Tx,
        rows: &[(&NewRow, Option<&str>)],
        now_ms: i64,
    ) -> Result<Vec<(EmailId, bool)>, StoreError> {
        /// 16 parameters a row: 140 rows stay far below SQLite's 32,766 parameters.
        const CHUNK: usize = 140;
        const COLS: usize = 16;
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(CHUNK) {
            let mut q = sql(format!(
                "INSERT INTO postbox_emails (id, status, priority, spec, message_id, idempotency_key,
                     template, recipients, tags, send_at, expires_at, age_from, created_at,
                     updated_at, request_id, subject) VALUES {}
                 ON CONFLICT(idempotency_key) DO NOTHING RETURNING id",
                values(chunk.len(), COLS, 1)
            ));
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
                let send_at = email.send_at.map(ms);
                q.add(id.as_str())
                    .add("queued")
                    .add(email.priority.as_str())
                    .add(spec)
                    .add(message_id.as_str())
                    .add(email.idempotency_key.as_deref())
                    .add(email.content.template_name())
                    .add(recipients)
                    .add(email.tags.join(" "))
                    .add(send_at)
                    .add(email.expires_at.map(ms))
                    .add(send_at.unwrap_or(now_ms).max(now_ms))
                    .add(now_ms)
                    .add(now_ms)
                    .add(*request_id)
                    .add(email.subject.as_deref());
            }
            let inserted: std::collections::HashSet<String> = q
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.get_at::<String>(0))
                .collect::<Result<_, _>>()?;
            let mut jobs = Vec::with_capacity(inserted.len());
            for ((id, email, _), _) in chunk {
                if inserted.contains(id.as_str()) {
                    jobs.push((id.as_str(), 0, email.priority, email.send_at));
                    out.push((id.clone(), true));
                } else {
                    let existing: Option<String> =
                        sql("SELECT id FROM postbox_emails WHERE idempotency_key = $1")
                            .bind(email.idempotency_key.as_deref())
                            .scalar(&mut *tx)
                            .await?;
                    let existing = existing.ok_or(sqlx::Error::RowNotFound)?;
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

    /// Is the database answering?
    pub async fn ping(&self) -> Result<(), StoreError> {
        sql("SELECT 1").execute(&self.db).await?;
        Ok(())
    }

    /// Notes how a submission's write went: a refusal for a full disk is remembered (readiness
    /// says so, so that a load balancer sends submissions elsewhere) until a submission commits
    /// or [`FULL_REMEMBERED`] passes.
    pub fn note_write<T>(&self, r: &Result<T, StoreError>) {
        let mut full = self.full.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(_) => *full = None,
            Err(e) if e.fault() == Fault::Full => {
                self.saw(e);
                *full = Some((std::time::Instant::now(), e.to_string()))
            }
            Err(_) => {}
        }
    }

    /// Notes an error of any write: one refused for a full disk sets SQLite's WAL trouble, so
    /// that deliveries wait and the checkpointer truncates the WAL as soon as it can (before
    /// the backlog eats freed space: see `checkpoints`).
    pub fn saw(&self, e: &StoreError) {
        if e.fault() == Fault::Full
            && self.db.kind() == Kind::Sqlite
            && !self.wal_trouble.swap(true, Ordering::AcqRel)
        {
            tracing::warn!("the disk is full: deliveries wait until the WAL can be truncated");
        }
    }

    /// Waits while SQLite's WAL must be reclaimed after a full disk (a failed checkpoint not
    /// yet followed by a truncation), or until `stop` fires. Returns at once otherwise.
    pub async fn wal_reclaimed(&self, stop: impl std::future::Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        while self.wal_trouble.load(Ordering::Acquire) {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// A recent write refused for a full disk, not followed by a successful one.
    pub fn storage_full(&self) -> Option<String> {
        let full = self.full.lock().unwrap_or_else(|p| p.into_inner());
        full.as_ref()
            .filter(|(at, _)| at.elapsed() < FULL_REMEMBERED)
            .map(|(_, e)| format!("writes were refused: {e}"))
    }

    /// Does the database take a write now? One row rewritten in a transaction of its own: it
    /// fails on a full disk, on a lock held past the busy timeout, on an unreachable server.
    pub async fn write_probe(&self) -> Result<(), StoreError> {
        if let Some(full) = self.storage_full() {
            return Err(StoreError::Queue(full));
        }
        let mut tx = self.db.begin_write().await?;
        let probe = match self.db.kind() {
            Kind::Sqlite => "UPDATE postbox_counters SET n = n WHERE name = 'depth'",
            Kind::Postgres => {
                "UPDATE postbox_counters SET n = n WHERE name = 'depth' AND shard = 0"
            }
        };
        sql(probe).execute(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A page of emails, newest first (by id, which is time-ordered and unique: a stable order).
    pub async fn list(&self, f: &ListFilter) -> Result<EmailPage, StoreError> {
        let contains = match self.db.kind() {
            Kind::Sqlite => "instr",
            Kind::Postgres => "strpos",
        };
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

    /// The age of the oldest email that is due and still queued (an index seek).
    async fn oldest_queued_age_secs(&self, now: i64) -> Result<Option<f64>, StoreError> {
        let oldest: Option<i64> = sql(
            "SELECT MIN(age_from) FROM postbox_emails WHERE status = 'queued' AND age_from <= $1",
        )
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

    /// A statement on apalis's tables, whose names and time columns differ: `{jobs}` and
    /// `{workers}` are the tables; `{t2}` and `{t3}` are parameters $2 and $3 given as unix
    /// seconds, compared with apalis's time columns (integers on SQLite, timestamptz on
    /// PostgreSQL).
    fn jobs_sql(&self, text: &str) -> Sql {
        let (jobs, workers, t2, t3) = match self.db.kind() {
            Kind::Sqlite => ("Jobs", "Workers", "$2", "$3"),
            Kind::Postgres => (
                "apalis.jobs",
                "apalis.workers",
                "to_timestamp($2)",
                "to_timestamp($3)",
            ),
        };
        sql(text
            .replace("{jobs}", jobs)
            .replace("{workers}", workers)
            .replace("{t2}", t2)
            .replace("{t3}", t3))
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
        let jobs_requeued = self
            .jobs_sql(
                "UPDATE {jobs} SET status = 'Pending', lock_by = NULL, lock_at = NULL
                  WHERE job_type = $1 AND (
                        (status IN ('Running', 'Queued') AND lock_by IN
                            (SELECT id FROM {workers} WHERE worker_type = $1 AND last_seen < {t2}))
                     OR (status IN ('Running', 'Queued') AND lock_at < {t3})
                     OR (status = 'Pending' AND lock_by IS NOT NULL AND lock_at < {t3}))",
            )
            .bind(&self.queue)
            .bind(now_s - dead_after.as_secs() as i64)
            .bind(now_s - stuck_after.as_secs() as i64)
            .execute(&self.db)
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
        let orphans = self
            .jobs_sql(
            "SELECT e.id, e.job_seq, e.priority, e.next_attempt_at, e.send_at FROM postbox_emails e
              WHERE e.status IN ('queued', 'retrying', 'sending')
                AND (e.updated_at < $2
                     OR (e.status = 'sending' AND COALESCE(e.claimed_by, '') <> $4
                         AND NOT EXISTS (SELECT 1 FROM postbox_leases l
                          WHERE l.name = 'node:' || e.claimed_by AND l.expires_at >= $3)))
                AND NOT EXISTS (SELECT 1 FROM {jobs} j
                     WHERE j.job_type = $1 AND j.idempotency_key = e.id || ':' || e.job_seq
                       AND (j.status IN ('Pending', 'Queued', 'Running')
                            OR (j.status = 'Failed' AND j.attempts < j.max_attempts)))
              LIMIT 1000",
        )
        .bind(&self.queue)
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
        let expired = sql(
            "UPDATE postbox_emails
                SET status = 'expired', job_seq = job_seq + 1, updated_at = $1, next_attempt_at = NULL,
                    last_error = 'expired before it could be delivered'
              WHERE status IN ('queued', 'retrying') AND expires_at <= $1
          RETURNING id",
        )
        .bind(ms(now))
        .fetch_all(&mut tx)
        .await?;
        for row in &expired {
            let id: String = row.get("id")?;
            insert_expired(&mut tx, &id, now).await?;
        }
        tx.commit().await?;
        r.emails_expired = expired.len() as u64;

        // 4. Retention.
        r.jobs_deleted = self
            .jobs_sql(
            "DELETE FROM {jobs} WHERE job_type = $1 AND done_at IS NOT NULL AND done_at < {t2}
                AND (status IN ('Done', 'Killed') OR (status = 'Failed' AND attempts >= max_attempts))",
        )
        .bind(&self.queue)
        .bind(now_s - finished_jobs.as_secs() as i64)
        .execute(&self.db)
        .await?
        ;
        if let Some(keep) = emails_after {
            let cutoff = ms(now) - keep.as_millis() as i64;
            let mut tx = self.db.begin().await?;
            sql(
                "DELETE FROM postbox_events WHERE email_id IN (SELECT id FROM postbox_emails
                  WHERE status IN ('sent', 'failed', 'cancelled', 'expired') AND updated_at < $1)",
            )
            .bind(cutoff)
            .execute(&mut tx)
            .await?;
            r.emails_deleted = sql("DELETE FROM postbox_emails
                  WHERE status IN ('sent', 'failed', 'cancelled', 'expired') AND updated_at < $1")
            .bind(cutoff)
            .execute(&mut tx)
            .await?;
            // Alerted rule matches age out with the emails (a UIDVALIDITY resync recognises
            // messages by these rows, so only this window is protected from re-alerting).
            sql("DELETE FROM postbox_alert_hits WHERE alert_id IS NOT NULL AND seen_at < $1")
                .bind(cutoff)
                .execute(&mut tx)
                .await?;
            tx.commit().await?;
        }
        sql("DELETE FROM postbox_idempotency WHERE created_at < $1")
            .bind(ms(now) - idempotency_ttl.as_millis() as i64)
            .execute(&self.db)
            .await?;
        self.jobs_sql(
            "DELETE FROM {workers} WHERE worker_type = $1 AND last_seen < {t2}
                AND NOT EXISTS (SELECT 1 FROM {jobs} WHERE {jobs}.lock_by = {workers}.id)",
        )
        .bind(&self.queue)
        .bind(now_s - 24 * 3600)
        .execute(&self.db)
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
    tx: &mut Tx,
    queue: &str,
    id: &str,
    seq: i64,
    priority: Priority,
    run_at: Option<OffsetDateTime>,
) -> Result<(), StoreError> {
    push_jobs(tx, queue, &[(id, seq, priority, run_at)]).await
}

/// Pushes jobs `(email id, seq, priority, run_at)` into apalis's table, many per statement.
///
/// The row is exactly what apalis's own `push_tasks` writes (status Pending, 0 attempts, a ULID
/// id, `ON CONFLICT(job_type, idempotency_key) DO NOTHING`), but push_tasks runs one statement
/// per job, and each statement is a round trip: at a thousand jobs a batch that was most of the
/// submit cost. `run_at` is rounded up to apalis's whole seconds, so nothing is sent before its
/// time. On PostgreSQL apalis's insert trigger notifies listening workers (LISTEN/NOTIFY).
async fn push_jobs(
    tx: &mut Tx,
    queue: &str,
    jobs: &[(&str, i64, Priority, Option<OffsetDateTime>)],
) -> Result<(), StoreError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let now_s = now().unix_timestamp();
    let mut q = match tx.kind() {
        Kind::Sqlite => sql(format!(
            "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, priority,
                 metadata, idempotency_key) VALUES {}
             ON CONFLICT(job_type, idempotency_key) DO NOTHING",
            values(jobs.len(), 10, 1)
        )),
        Kind::Postgres => {
            let rows: Vec<String> = (0..jobs.len())
                .map(|i| {
                    let b = i * 6;
                    format!(
                        "(${}, ${}, ${}, 'Pending', 0, {JOB_MAX_ATTEMPTS}, to_timestamp(${}), ${}, NULL, ${})",
                        b + 1, b + 2, b + 3, b + 4, b + 5, b + 6
                    )
                })
                .collect();
            sql(format!(
                "INSERT INTO apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at,
                     priority, metadata, idempotency_key) VALUES {}
                 ON CONFLICT(job_type, idempotency_key) DO NOTHING",
                rows.join(", ")
            ))
        }
    };
    for (id, seq, priority, run_at) in jobs {
        let payload = serde_json::to_vec(&SendJob {
            v: SendJob::VERSION,
            email_id: id.to_string(),
            seq: *seq,
        })
        .expect("a job payload always serializes");
        let run_at = run_at.map_or(now_s, |t| ((ms(t) + 999) / 1000).max(0));
        q.add(payload)
            .add(ulid::Ulid::generate().to_string())
            .add(queue);
        if tx.kind() == Kind::Sqlite {
            q.add("Pending").add(0i64).add(JOB_MAX_ATTEMPTS as i64);
        }
        q.add(run_at).add(priority.job_priority() as i64);
        if tx.kind() == Kind::Sqlite {
            q.add("{}");
        }
        q.add(format!("{id}:{seq}"));
    }
    q.execute(&mut *tx).await?;
    Ok(())
}

/// The timeline entry of an email that expired before delivery.
async fn insert_expired(tx: &mut Tx, id: &str, at: OffsetDateTime) -> Result<(), StoreError> {
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
async fn insert_event<'a>(
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
    let timeline = std::iter::once(Ok(submitted))
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
