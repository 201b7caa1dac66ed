//! Every statement postbox runs on apalis's tables (`Jobs`/`Workers` on SQLite,
//! `apalis.jobs`/`apalis.workers` on PostgreSQL): setup, pushes, and the janitor's repairs.
//! apalis's own heartbeat statements run in its storage backends (`backend` on SQLite,
//! apalis-postgres's); on SQLite the fetch is apalis's statement, copied here (see
//! [`fetch_sqlite`]), run inside the one writer's transactions.

use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::metadata::MetadataStore;
use apalis_core::task::{status::Status, task_id::TaskId};
use time::OffsetDateTime;

use super::JobKind;
use crate::db::{Db, Kind, Sql, rows_of, sql};

/// apalis-level attempts, only for infrastructure errors (a database error inside a handler).
/// A handler's own retries (an SMTP 4xx) are new jobs with their own run time, never apalis
/// retries.
const JOB_MAX_ATTEMPTS: usize = 10;

/// A job to push: its payload, apalis priority (higher runs first) and when it is due (`None`:
/// now).
pub(crate) struct Push<K> {
    pub job: K,
    pub priority: usize,
    pub run_at: Option<OffsetDateTime>,
}

/// Creates or upgrades apalis's tables on `pool`'s database.
///
/// SQLite: apalis's setup switches its connection to `synchronous=OFF`, so give it a throwaway
/// pool that no delivery ever uses.
pub(crate) async fn setup(db: &Db) -> Result<(), String> {
    match db {
        Db::Sqlite { write: pool, .. } => {
            apalis_sqlite::SqliteStorage::setup(pool)
                .await
                .map_err(|e| format!("apalis setup: {e}"))?;
            // Finished rows keep lock_by, and the ack statement is planned through this index:
            // every ack would scan all rows a worker ever processed (STACK-NOTES). The unique id
            // index is the right plan.
            sqlx::query("DROP INDEX IF EXISTS LIdx")
                .execute(pool)
                .await
                .map_err(|e| format!("apalis setup: {e}"))?;
            // A partial index on (status, attempts) for Queued, Pending and Failed jobs that
            // serves apalis's per-task lock statement, which postbox turns off
            // (`worker::supervise`); no statement postbox runs reads it (the fetch reads
            // `idx_jobs_pending` and `idx_jobs_failed`, the re-queue of orphans
            // `idx_jobs_status_run_at`). Yet every job's insert, fetch and ack wrote it.
            sqlx::query("DROP INDEX IF EXISTS idx_jobs_claimable")
                .execute(pool)
                .await
                .map_err(|e| format!("apalis setup: {e}"))?;
            // apalis's `(job_type, status, run_at)` index had one reader, the due timer's
            // [`next_due`], which now reads `idx_jobs_status_run_at` (a seek to the first
            // pending run time after its horizon). Yet every job's insert, fetch and ack wrote
            // it: one more page in each submit's commit, a delete and an insert at each change
            // of status.
            sqlx::query("DROP INDEX IF EXISTS idx_jobs_job_type_status_run_at")
                .execute(pool)
                .await
                .map_err(|e| format!("apalis setup: {e}"))?;
            // The janitor's repair of jobs left Pending but locked (`requeue_abandoned`) reads
            // this: almost always empty, so it costs the hot path nothing, where the status
            // index would read every queued job.
            sqlx::query(
                "CREATE INDEX IF NOT EXISTS postbox_jobs_pending_locked ON Jobs (lock_at)
                  WHERE status = 'Pending' AND lock_by IS NOT NULL",
            )
            .execute(pool)
            .await
            .map_err(|e| format!("apalis setup: {e}"))?;
        }
        Db::Pg(pool, _) => {
            apalis_postgres::PostgresStorage::setup(pool)
                .await
                .map_err(|e| format!("apalis setup: {e}"))?;
        }
    }
    Ok(())
}

/// The statement that pushes `jobs` of kind `K` (to run inside the caller's transaction), many
/// per statement; None for no jobs.
///
/// The row is exactly what apalis's own `push_tasks` writes (status Pending, 0 attempts, a ULID
/// id, `ON CONFLICT(job_type, idempotency_key) DO NOTHING`), but push_tasks runs one statement
/// per job, and each statement is a round trip: at a thousand jobs a batch that was most of the
/// submit cost. `run_at` is rounded up to apalis's whole seconds, so nothing runs before its
/// time. On PostgreSQL apalis's insert trigger notifies listening workers (LISTEN/NOTIFY).
///
/// SQLite: with `pad` above the number of jobs, the text is that of `pad` rows, the rest NULL
/// ([`crate::db::rows_of`]).
pub(crate) fn push_sql<K: JobKind>(
    kind: Kind,
    queue: &str,
    jobs: &[Push<K>],
    pad: usize,
) -> Option<Sql> {
    if jobs.is_empty() {
        return None;
    }
    let now_s = OffsetDateTime::now_utc().unix_timestamp();
    let mut q = match kind {
        Kind::Sqlite => sql(format!(
            "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, priority,
                 metadata, idempotency_key) {}
             ON CONFLICT(job_type, idempotency_key) DO NOTHING",
            rows_of(jobs.len(), 10, pad)
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
    let job_type = K::job_type(queue);
    for p in jobs {
        let payload = serde_json::to_vec(&p.job).expect("a job payload always serializes");
        let run_at = p.run_at.map_or(now_s, |t| {
            let ms = (t.unix_timestamp_nanos() / 1_000_000) as i64;
            ((ms + 999) / 1000).max(0)
        });
        q.add(payload)
            .add(ulid::Ulid::generate().to_string())
            .add(job_type.as_str());
        if kind == Kind::Sqlite {
            q.add("Pending").add(0i64).add(JOB_MAX_ATTEMPTS as i64);
        }
        q.add(run_at).add(p.priority as i64);
        if kind == Kind::Sqlite {
            q.add("{}");
        }
        q.add(p.job.key());
    }
    if kind == Kind::Sqlite {
        q.nulls_to(pad * 10);
    }
    Some(q)
}

/// Marks the jobs `ids` (apalis task ids) done. postbox acks its own jobs, in the
/// transaction that records what the job did (a claim that found nothing to do, an attempt's
/// outcome, a deferral): apalis's own per-task lock and ack statements are turned off
/// (`worker::supervise`), so a job and its email's state commit together, and one statement
/// acks a whole batch. Rows of the other states (already done, or taken back) are left alone.
pub(crate) async fn ack<'a>(
    on: impl Into<crate::db::On<'a>>,
    kind: Kind,
    ids: &[&str],
) -> Result<u64, sqlx::Error> {
    match ack_sql(kind, ids) {
        Some(q) => q.execute(on).await,
        None => Ok(0),
    }
}

/// The statement [`ack`] runs (for a [`crate::db::Script`]); None for no ids.
pub(crate) fn ack_sql(kind: Kind, ids: &[&str]) -> Option<Sql> {
    if ids.is_empty() {
        return None;
    }
    let (jobs, _) = tables(kind);
    let now = match kind {
        Kind::Sqlite => "strftime('%s', 'now')",
        Kind::Postgres => "NOW()",
    };
    let list: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
    let mut q = sql(format!(
        "UPDATE {jobs} SET status = 'Done', done_at = {now}, attempts = attempts + 1
          WHERE id IN ({}) AND status IN ('Pending', 'Queued', 'Running')",
        list.join(", ")
    ));
    for id in ids {
        q.add(*id);
    }
    Some(q)
}

/// `text` with apalis's table names and time parameters for `kind`'s dialect: `{jobs}` and
/// `{workers}` are the tables; `{t2}` and `{t3}` are parameters $2 and $3 given as unix
/// seconds, compared with apalis's time columns (integers on SQLite, timestamptz on
/// PostgreSQL).
fn jobs_sql(kind: Kind, text: &str) -> Sql {
    let (jobs, workers) = tables(kind);
    let (t2, t3) = match kind {
        Kind::Sqlite => ("$2", "$3"),
        Kind::Postgres => ("to_timestamp($2)", "to_timestamp($3)"),
    };
    sql(text
        .replace("{jobs}", jobs)
        .replace("{workers}", workers)
        .replace("{t2}", t2)
        .replace("{t3}", t3))
}

/// apalis's jobs and workers tables in `kind`'s database.
fn tables(kind: Kind) -> (&'static str, &'static str) {
    match kind {
        Kind::Sqlite => ("Jobs", "Workers"),
        Kind::Postgres => ("apalis.jobs", "apalis.workers"),
    }
}

/// A condition, for a query on another table, that a job of kind `K` keyed by the SQL
/// expression `key` is live (pending, running, or failed with apalis attempts left). `$1` must
/// be bound to `K::job_type(queue)`.
pub(crate) fn live_job_exists(kind: Kind, key: &str) -> String {
    let (jobs, _) = tables(kind);
    format!(
        "EXISTS (SELECT 1 FROM {jobs} j
                  WHERE j.job_type = $1 AND j.idempotency_key = {key}
                    AND (j.status IN ('Pending', 'Queued', 'Running')
                         OR (j.status = 'Failed' AND j.attempts < j.max_attempts)))"
    )
}

/// Hands back to the queue the jobs of `job_type` held by workers not seen since `dead_before`,
/// running since before `stuck_before` (longer than any handler can), or left Pending but
/// locked. Returns how many.
///
/// SQLite reads it through the status indexes, named: without statistics its planner took the
/// idempotency index on `job_type` instead, i.e. every job of the queue, finished ones included
/// (290 ms with a million rows, on the one writer, every janitor pass; 0.9 ms so).
pub(crate) async fn requeue_abandoned(
    db: &Db,
    job_type: &str,
    dead_before: i64,
    stuck_before: i64,
) -> Result<u64, sqlx::Error> {
    let text = match db.kind() {
        Kind::Sqlite => {
            "UPDATE Jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL
              WHERE rowid IN (
                    SELECT rowid FROM Jobs INDEXED BY idx_jobs_status_run_at
                     WHERE status IN ('Running', 'Queued') AND job_type = $1
                       AND (lock_by IN (SELECT id FROM Workers
                                         WHERE worker_type = $1 AND last_seen < $2)
                            OR lock_at < $3)
                    UNION ALL
                    SELECT rowid FROM Jobs INDEXED BY postbox_jobs_pending_locked
                     WHERE status = 'Pending' AND lock_by IS NOT NULL AND job_type = $1
                       AND lock_at < $3)"
        }
        Kind::Postgres => {
            "UPDATE {jobs} SET status = 'Pending', lock_by = NULL, lock_at = NULL
              WHERE job_type = $1 AND (
                    (status IN ('Running', 'Queued') AND lock_by IN
                        (SELECT id FROM {workers} WHERE worker_type = $1 AND last_seen < {t2}))
                 OR (status IN ('Running', 'Queued') AND lock_at < {t3})
                 OR (status = 'Pending' AND lock_by IS NOT NULL AND lock_at < {t3}))"
        }
    };
    jobs_sql(db.kind(), text)
        .bind(job_type)
        .bind(dead_before)
        .bind(stuck_before)
        .execute(db)
        .await
}

/// Deletes up to `limit` finished jobs of `job_type` done before `before` (unix seconds), in
/// one statement of its own (the janitor calls it until fewer come back, so a large backlog
/// never holds the writer for long). Returns how many.
pub(crate) async fn delete_finished(
    db: &Db,
    job_type: &str,
    before: i64,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    // SQLite: through apalis's index of finished jobs, named (see `requeue_abandoned`; the
    // idempotency index on `job_type` read every job: 210 ms with a million, none due, 0.9 ms
    // so). The status list is written as the index's own condition is, or SQLite cannot use it.
    let text = match db.kind() {
        Kind::Sqlite => {
            "DELETE FROM Jobs WHERE rowid IN (
                SELECT rowid FROM Jobs INDEXED BY idx_jobs_completed_done_at
                 WHERE status IN ('Done', 'Failed', 'Killed') AND done_at IS NOT NULL
                   AND done_at < $2 AND job_type = $1
                   AND (status <> 'Failed' OR attempts >= max_attempts)
                 LIMIT $3)"
        }
        Kind::Postgres => {
            "DELETE FROM {jobs} WHERE id IN (
                SELECT id FROM {jobs} WHERE job_type = $1 AND done_at IS NOT NULL
                   AND done_at < {t2}
                   AND (status IN ('Done', 'Killed')
                        OR (status = 'Failed' AND attempts >= max_attempts))
                 LIMIT $3)"
        }
    };
    jobs_sql(db.kind(), text)
        .bind(job_type)
        .bind(before)
        .bind(limit)
        .execute(db)
        .await
}

/// Deletes the workers of `job_type` not seen for a day that hold no job.
pub(crate) async fn delete_gone_workers(db: &Db, job_type: &str) -> Result<u64, sqlx::Error> {
    jobs_sql(
        db.kind(),
        "DELETE FROM {workers} WHERE worker_type = $1 AND last_seen < {t2}
            AND NOT EXISTS (SELECT 1 FROM {jobs} WHERE {jobs}.lock_by = {workers}.id)",
    )
    .bind(job_type)
    .bind(OffsetDateTime::now_utc().unix_timestamp() - 24 * 3600)
    .execute(db)
    .await
}

/// The earliest run time (unix seconds) after `after` of a pending job of `job_type`: when the
/// next delayed job (a retry's backoff, a `send_at`) falls due. On SQLite a seek on apalis's
/// `(status, run_at)` index to the first pending run time after `after` ([`NEXT_DUE_SQLITE`]):
/// one probe, as the jobs of one database are of one kind (`SendJob`) and almost always of one
/// queue.
pub(crate) async fn next_due(
    db: &Db,
    job_type: &str,
    after: i64,
) -> Result<Option<i64>, sqlx::Error> {
    let text = match db.kind() {
        Kind::Sqlite => NEXT_DUE_SQLITE,
        Kind::Postgres => {
            "SELECT CAST(EXTRACT(EPOCH FROM MIN(run_at)) AS BIGINT) FROM apalis.jobs
              WHERE job_type = $1 AND status = 'Pending' AND run_at > to_timestamp($2)"
        }
    };
    sql(text)
        .bind(job_type)
        .bind(after)
        .scalar::<Option<i64>>(db)
        .await
        .map(Option::flatten)
}

/// [`next_due`] on SQLite. `ORDER BY .. LIMIT 1` rather than `MIN()`: the index does not hold
/// `job_type`, and SQLite reads MIN from an index's first entry only when every condition is in
/// the index; so it walks from the first entry after `$2` to the first of the kind.
/// A scalar subquery, so that none is one row of NULL, as `MIN()` of none is.
const NEXT_DUE_SQLITE: &str = "SELECT (SELECT run_at FROM Jobs INDEXED BY idx_jobs_status_run_at
      WHERE status = 'Pending' AND run_at > $2 AND job_type = $1
      ORDER BY run_at LIMIT 1)";

/// apalis-sqlite 1.0's fetch statement (`queries/backend/fetch_next.sql`: up to `batch` due
/// jobs of the queue, highest priority first, marked taken by the worker), with one change:
/// the batch size is written into the text instead of bound. SQLite's planner reads a bound
/// LIMIT's value, which marks the statement to be compiled again whenever that parameter is
/// bound: at every fetch. Compiling this statement is costly (a CTE of two ordered
/// subqueries): perf showed recompiles at ~10% of the SQLite threads' time in a 5,000-email
/// drain (`sqlite3Reprepare`, all of them this statement). Literal, it is compiled once per
/// connection.
fn fetch_text(batch: usize) -> String {
    let candidates = |status: &str| {
        format!(
            "SELECT * FROM (
                 SELECT ROWID, priority, run_at, id FROM Jobs
                  WHERE job_type = ?2 AND {status}
                    AND (run_at IS NULL OR run_at <= ?3)
                  ORDER BY priority DESC, run_at ASC, id ASC
                  LIMIT {batch})"
        )
    };
    format!(
        "UPDATE Jobs SET status = 'Queued', lock_by = ?1, lock_at = strftime('%s', 'now')
          WHERE ROWID IN (
                WITH candidates AS ({} UNION ALL {})
                SELECT ROWID FROM candidates
                 ORDER BY priority DESC, run_at ASC, id ASC
                 LIMIT {batch})
          RETURNING *",
        candidates("status = 'Pending' AND lock_by IS NULL"),
        candidates("status = 'Failed' AND attempts < max_attempts"),
    )
}

/// Runs apalis's fetch ([`fetch_text`]) for `worker` in the caller's SQLite transaction and
/// reads the rows as apalis-sqlite does.
pub(crate) async fn fetch_sqlite(
    tx: &mut sqlx::SqliteConnection,
    config: &apalis_sqlite::Config,
    worker: &str,
    prefix: &str,
) -> Result<super::backend::Fetched, sqlx::Error> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let text = format!("{prefix}{}", fetch_text(config.batch_size));
    let rows = sqlx::query(sqlx::AssertSqlSafe(text))
        .bind(worker)
        .bind(config.queue.as_ref())
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
    let (tasks, unreadable) = read_fetched(rows.iter().map(task_from_row));
    for (id, reason) in &unreadable {
        sqlx::query(
            "UPDATE Jobs SET status = 'Killed', lock_by = NULL, done_at = ?3, last_result = ?2
              WHERE id = ?1",
        )
        .bind(id)
        .bind(reason)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    Ok(tasks)
}

/// A fetch's rows as tasks, in the order its statement chose them. A row that cannot be read
/// (written by no postbox: an id that is not a ULID, a column of the wrong type) is left out
/// and returned with the reason, to be set aside (`Killed`, the reason as its `last_result`):
/// failing the whole fetch for it would fetch it again first every time, and no other job
/// would ever be handed out. Its email, left without a live job, gets a new one from the
/// janitor.
fn read_fetched(
    rows: impl Iterator<Item = (String, Result<Task<Vec<u8>>, sqlx::Error>)>,
) -> (super::backend::Fetched, Vec<(String, String)>) {
    let mut tasks = Vec::new();
    let mut unreadable = Vec::new();
    for (id, task) in rows {
        match task {
            Ok(t) => tasks.push(t),
            Err(e) => {
                let reason = serde_json::json!({
                    "Err": format!("postbox cannot read this job: {e}")
                })
                .to_string();
                tracing::warn!(job = %id, error = %e, "a job the queue cannot read is set aside");
                metrics::counter!("postbox_jobs_unreadable_total").increment(1);
                unreadable.push((id, reason));
            }
        }
    }
    (in_fetch_order(tasks), unreadable)
}

/// A fetch's tasks in the order its statement chose them (highest priority first, then the
/// earliest due, then the oldest id): an UPDATE's RETURNING lists its rows in whatever order it
/// updated them (on SQLite the table's), and apalis hands a batch out in the order given.
fn in_fetch_order(mut tasks: super::backend::Fetched) -> super::backend::Fetched {
    tasks.sort_by_cached_key(|t| {
        let c = t.ctx();
        (
            std::cmp::Reverse(c.priority().unwrap_or_default()),
            c.run_at().unwrap_or_default(),
            c.task_id().map(|id| id.to_string()).unwrap_or_default(),
        )
    });
    tasks
}

/// The job's priority in its task's metadata, as [`task_from_row`] puts it there (in memory
/// only: no statement writes a fetched task's metadata back). apalis keeps a task's priority
/// where a handler cannot read it; the handler reads it here (`worker::handle`).
pub(crate) const PRIORITY_KEY: &str = "postbox.priority";

/// One row of apalis's fetch, read as apalis reads it, from either database: both fetch
/// statements return the same columns with the same types (integers as 64-bit, timestamps as
/// whole seconds, metadata as a JSON object). The job's id (empty if even that cannot be
/// read), and its task or why it cannot be read.
fn task_from_row<R>(r: &R) -> (String, Result<Task<Vec<u8>>, sqlx::Error>)
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'v> Vec<u8>: sqlx::Decode<'v, R::Database> + sqlx::Type<R::Database>,
    for<'v> String: sqlx::Decode<'v, R::Database> + sqlx::Type<R::Database>,
    for<'v> i64: sqlx::Decode<'v, R::Database> + sqlx::Type<R::Database>,
{
    let bad = |e: String| sqlx::Error::Decode(e.into());
    let id: String = match r.try_get("id") {
        Ok(id) => id,
        Err(e) => return (String::new(), Err(e)),
    };
    let task = (|| {
        let status: String = r.try_get("status")?;
        let metadata: Option<String> = r.try_get("metadata")?;
        let priority = r.try_get::<Option<i64>, _>("priority")?.unwrap_or_default() as usize;
        let mut meta: MetadataStore = metadata
            .map(|m| serde_json::from_str(&m).unwrap_or_default())
            .unwrap_or_default();
        let _ = meta.remove(PRIORITY_KEY);
        meta.insert(PRIORITY_KEY, priority.to_string())
            .map_err(|e| bad(e.to_string()))?;
        let mut task = TaskBuilder::new(r.try_get::<Vec<u8>, _>("job")?)
            .task_id(TaskId::from_ulid(
                ulid::Ulid::from_string(&id).map_err(|e| bad(e.to_string()))?,
            ))
            .queue(r.try_get::<String, _>("job_type")?.into())
            .status(status.parse::<Status>().map_err(|e| bad(e.to_string()))?)
            .attempt(r.try_get::<i64, _>("attempts")? as usize)
            .max_attempts(r.try_get::<Option<i64>, _>("max_attempts")?.unwrap_or(25) as usize)
            .run_at_timestamp(r.try_get::<i64, _>("run_at")? as u64)
            .lock_at(r.try_get::<Option<i64>, _>("lock_at")?.map(|t| t as u64))
            .done_at(r.try_get::<Option<i64>, _>("done_at")?.map(|t| t as u64))
            .lock_by(r.try_get("lock_by")?)
            .priority(priority)
            .with_metadata(meta);
        if let Some(key) = r.try_get::<Option<String>, _>("idempotency_key")? {
            task = task.idempotency_key(key);
        }
        Ok(task.build())
    })();
    (id, task)
}

/// apalis-postgres 1.0's fetch (the body of its SQL function `apalis.get_jobs`: up to `$3` due
/// jobs of the queue, highest priority first, `FOR UPDATE SKIP LOCKED`, marked taken by worker
/// `$1`), as a statement of our own. Called as a function it is planned again at every call
/// (PostgreSQL does not cache the plans of a non-inlinable SQL function): 2.6 ms a fetch of 32
/// in a 5,000-email drain (`pg_stat_statements`), against ~1 ms for the same statement
/// prepared once per connection. Its columns are typed as SQLite's fetch returns them
/// ([`task_from_row`] reads both): timestamps in whole seconds, as apalis reads them.
const FETCH_PG: &str = "WITH jobs AS (
        SELECT id FROM apalis.jobs
         WHERE (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
           AND run_at < now() AND job_type = $2
         ORDER BY priority DESC, run_at ASC
         LIMIT $3
         FOR UPDATE SKIP LOCKED)
    UPDATE apalis.jobs j SET status = 'Queued', lock_by = $1, lock_at = now()
      FROM jobs WHERE j.id = jobs.id
    RETURNING j.job, j.id, j.job_type, j.status,
              CAST(j.attempts AS BIGINT) AS attempts,
              CAST(j.max_attempts AS BIGINT) AS max_attempts,
              CAST(FLOOR(EXTRACT(EPOCH FROM j.run_at)) AS BIGINT) AS run_at,
              CAST(FLOOR(EXTRACT(EPOCH FROM j.lock_at)) AS BIGINT) AS lock_at,
              CAST(FLOOR(EXTRACT(EPOCH FROM j.done_at)) AS BIGINT) AS done_at,
              j.lock_by, CAST(j.priority AS BIGINT) AS priority, j.idempotency_key,
              CAST(hstore_to_json(j.metadata) AS TEXT) AS metadata";

/// Runs apalis's fetch ([`FETCH_PG`]) for `worker` on a PostgreSQL connection (one statement,
/// its own transaction) and reads the rows as apalis-postgres does.
pub(crate) async fn fetch_pg(
    conn: &mut sqlx::PgConnection,
    config: &apalis_sqlite::Config,
    worker: &str,
) -> Result<super::backend::Fetched, sqlx::Error> {
    let rows = sqlx::query(FETCH_PG)
        .bind(worker)
        .bind(config.queue.as_ref())
        .bind(i32::try_from(config.batch_size).unwrap_or(i32::MAX))
        .fetch_all(&mut *conn)
        .await?;
    let (tasks, unreadable) = read_fetched(rows.iter().map(task_from_row));
    for (id, reason) in &unreadable {
        sqlx::query(
            "UPDATE apalis.jobs SET status = 'Killed', lock_by = NULL, done_at = now(),
                    last_result = CAST($2 AS JSONB)
              WHERE id = $1",
        )
        .bind(id)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The due timer's read is a seek on apalis's `(status, run_at)` index, never a scan, and
    /// the `(job_type, status, run_at)` index, which only it read, is gone.
    #[tokio::test]
    async fn the_next_due_job_is_a_seek_and_the_job_type_status_index_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, read) = crate::store::sqlite_for_plans(dir.path()).await;
        let details = crate::store::query_plan(&read, NEXT_DUE_SQLITE, 2).await;
        assert!(
            details
                .iter()
                .any(|d| d.contains("USING INDEX idx_jobs_status_run_at (status=? AND run_at>?)")),
            "{details:?}"
        );
        assert!(
            !details.iter().any(|d| d.starts_with("SCAN Jobs")),
            "{details:?}"
        );
        assert!(crate::store::schema_has(&read, "idx_jobs_status_run_at").await);
        assert!(
            !crate::store::schema_has(&read, "idx_jobs_job_type_status_run_at").await,
            "the (job_type, status, run_at) index is gone"
        );
    }
}
