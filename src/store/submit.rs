//! Submission: a group of requests committed in one transaction (idempotency keys, the depth
//! cap, the emails and their jobs).

use std::time::Duration;

use time::OffsetDateTime;

use super::lifecycle::submitted_sql;
use super::open::now;
use super::*;
use crate::db::{Kind, Lock, Script, Sql, Tx, lock_hash, rows_of, sql};
use crate::domain::lifecycle::Step;
use crate::queue::SendJob;
use crate::queue::table::{self, Push};

impl Store {
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
        let reqs_later = reqs
            .iter()
            .flat_map(|r| &r.rows)
            .any(|(_, email, _)| email.send_at.is_some_and(|t| t > now));
        let unkeyed = reqs.iter().all(|r| {
            r.idempotency.is_none() && r.rows.iter().all(|(_, e, _)| e.idempotency_key.is_none())
        });
        let quick = if unkeyed && self.db.kind() == Kind::Sqlite {
            self.insert_unkeyed_sqlite(reqs, max_depth, now_ms).await?
        } else if unkeyed && max_depth > 0 {
            self.insert_under_cap(reqs, max_depth, now_ms).await?
        } else {
            None
        };
        if let Some(out) = quick {
            self.wrote_events();
            if reqs_later {
                self.scheduled.notify_one();
            }
            return Ok(out);
        }
        let mut tx = self.db.begin_write().await?;
        // Other nodes commit groups concurrently (PostgreSQL; on SQLite `BEGIN IMMEDIATE` holds
        // the one write lock and these locks are no-ops): hold every idempotency key of this
        // group (in one global order, so two groups never deadlock), then the depth cap.
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
        self.wrote_events();
        if reqs_later {
            self.scheduled.notify_one();
        }
        Ok(out)
    }

    /// [`Store::insert_group`] on PostgreSQL when no submission or email of the group carries
    /// an idempotency key (the common case; SQLite's is [`Store::insert_unkeyed_sqlite`]):
    /// every email is inserted first, and the depth read after them. The whole group fits
    /// under the cap exactly when each submission would have in turn. When it does not, the
    /// transaction is rolled back and None returned: the caller then decides submission by
    /// submission.
    async fn insert_under_cap(
        &self,
        reqs: &[InsertRequest],
        max_depth: u64,
        now_ms: i64,
    ) -> Result<Option<Vec<InsertOutcome>>, StoreError> {
        let mut tx = self.db.begin_write().await?;
        tx.lock(Lock::Depth).await?;
        let rows = group_rows(reqs);
        let (ids, depth) = self.insert_chunks(&mut tx, &rows, now_ms, true).await?;
        if depth.is_none_or(|d| d > max_depth) {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(inserted(reqs, &ids)))
    }

    /// [`Store::insert_under_cap`] (or, with no cap, the insert) on SQLite, for a group without
    /// idempotency keys (every group of single submits, every plain batch): a transaction of
    /// postbox's own ([`crate::db::Db::begin_own`]) whose `BEGIN` goes in the first chunk's text
    /// and whose `COMMIT` goes in the last's, after [`DEPTH_GUARD`]: one round trip to the
    /// writer's thread per chunk, where sqlx's transaction and the depth read took two more. A
    /// group of single submits (one chunk) is one round trip in all. Past the cap the guard
    /// stops the transaction before its `COMMIT`: None, as from [`Store::insert_under_cap`].
    async fn insert_unkeyed_sqlite(
        &self,
        reqs: &[InsertRequest],
        max_depth: u64,
        now_ms: i64,
    ) -> Result<Option<Vec<InsertOutcome>>, StoreError> {
        let rows = group_rows(reqs);
        let pieces = pieces(&rows);
        // A group of one piece (single submits, small batches) runs the kept text of its
        // padded size; the halves of a larger group's rest are prepared for their run, as a
        // kept 64-row text with a `BEGIN` and another with a `COMMIT` cost ~1-2 MB of peak RSS
        // at the peer harness's batches of 500.
        let one = pieces.len() == 1;
        let build = |piece: &[_]| {
            let rows = if one {
                padded(piece.len())
            } else {
                piece.len()
            };
            self.unkeyed_sql(Kind::Sqlite, piece, now_ms, rows)
                .map(Script::joined_sqlite)
        };
        // The first piece is built before the writer's connection is taken, and each next one
        // while the one before runs on the connection's thread: the group's writes wait only
        // on SQLite, not on building their statements.
        let Some(&first) = pieces.first() else {
            return Ok(Some(inserted(reqs, &[])));
        };
        let mut last = build(first)?;
        let mut tx = self.db.begin_own().await?;
        for &next in &pieces[1..] {
            let (ran, built) = tokio::join!(last.execute(&mut tx), async { build(next) });
            ran?;
            last = built?;
        }
        if max_depth > 0 {
            last.push(sql(DEPTH_GUARD).bind(max_depth as i64).keep());
        }
        match tx.commit_with::<i64>(last).await {
            Ok(_) => {
                let ids: Vec<_> = rows
                    .iter()
                    .map(|((id, _, _), _)| (id.clone(), true))
                    .collect();
                Ok(Some(inserted(reqs, &ids)))
            }
            Err(e) if over_cap(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Emails waiting or in flight: kept exact by triggers (migration `..._depth_counter.sql`),
    /// so checking the cap costs the same at any depth. PostgreSQL spreads the counter over
    /// shards (one per connection slot) so concurrent writers do not queue on one row.
    pub(super) async fn depth(&self, tx: &mut Tx) -> Result<u64, StoreError> {
        Ok(depth_of(sql(DEPTH).scalar(&mut *tx).await?))
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
        Ok(self.insert_chunks(tx, rows, now_ms, false).await?.0)
    }

    /// [`Store::insert_rows`], and with `read_depth` the depth after them (see
    /// [`Store::depth`]), read in the last rows' script when it can be.
    async fn insert_chunks(
        &self,
        tx: &mut Tx,
        rows: &[(&NewRow, Option<&str>)],
        now_ms: i64,
        read_depth: bool,
    ) -> Result<(Vec<(EmailId, bool)>, Option<u64>), StoreError> {
        let mut out = Vec::with_capacity(rows.len());
        let mut depth = None;
        let chunks = rows.len().div_ceil(CHUNK);
        for (i, chunk) in rows.chunks(CHUNK).enumerate() {
            // Without idempotency keys every row goes in (ids are new ULIDs): the emails, their
            // jobs and their timeline entries are then one script, one round trip on SQLite.
            let keyed = chunk
                .iter()
                .any(|((_, e, _), _)| e.idempotency_key.is_some());
            if !keyed {
                let mut script = self.unkeyed_sql(tx.kind(), chunk, now_ms, chunk.len())?;
                if read_depth && i + 1 == chunks {
                    script.push(sql(DEPTH).keep());
                    let n = script.column::<i64>(&mut *tx).await?;
                    depth = Some(depth_of(n.first().copied()));
                } else {
                    script.execute(&mut *tx).await?;
                }
                out.extend(chunk.iter().map(|((id, _, _), _)| (id.clone(), true)));
                continue;
            }
            let q = emails_sql(chunk, now_ms, true, chunk.len())?;
            let q = if kept(chunk.len()) { q.keep() } else { q };
            let inserted: std::collections::HashSet<String> =
                q.column::<String>(&mut *tx).await?.into_iter().collect();
            let mut jobs = Vec::with_capacity(inserted.len());
            let mut entries = Vec::with_capacity(inserted.len());
            let mut new = Vec::with_capacity(inserted.len());
            for ((id, email, _), request_id) in chunk {
                if inserted.contains(id.as_str()) {
                    new.push(email);
                    jobs.push((id.as_str(), 0, email.priority, email.send_at));
                    entries.push((id.as_str(), *request_id));
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
            let mut script = Script::new();
            script.extend(counters_sql(tx.kind(), new.into_iter()));
            script.extend(send_jobs_sql(tx.kind(), &self.queue, &jobs, jobs.len()));
            script.extend(submitted_sql(&entries, now_ms, entries.len()));
            script.execute(&mut *tx).await?;
        }
        if read_depth && depth.is_none() {
            depth = Some(self.depth(tx).await?);
        }
        Ok((out, depth))
    }
}

impl Store {
    /// A chunk of emails none of which has an idempotency key: its emails, the counters, its
    /// jobs and its timeline entries, as one script (every statement's text depends only on the
    /// chunk's size; see [`kept`]).
    fn unkeyed_sql(
        &self,
        kind: Kind,
        chunk: &[(&NewRow, Option<&str>)],
        now_ms: i64,
        rows: usize,
    ) -> Result<Script, StoreError> {
        let keep = |q: Sql| if kept(rows) { q.keep() } else { q };
        let jobs: Vec<_> = chunk
            .iter()
            .map(|((id, email, _), _)| (id.as_str(), 0, email.priority, email.send_at))
            .collect();
        let entries: Vec<_> = chunk
            .iter()
            .map(|((id, _, _), request_id)| (id.as_str(), *request_id))
            .collect();
        let mut script = Script::new();
        script.push(keep(emails_sql(chunk, now_ms, false, rows)?));
        script.extend(counters_sql(kind, chunk.iter().map(|((_, e, _), _)| e)));
        script.extend(send_jobs_sql(kind, &self.queue, &jobs, rows).map(keep));
        script.extend(submitted_sql(&entries, now_ms, rows).map(keep));
        Ok(script)
    }
}

/// The INSERT of a chunk of emails; with `returning`, it returns the id of each email inserted
/// (one whose idempotency key exists is not).
fn emails_sql(
    chunk: &[(&NewRow, Option<&str>)],
    now_ms: i64,
    returning: bool,
    pad: usize,
) -> Result<Sql, StoreError> {
    const COLS: usize = 16;
    let mut q = sql(format!(
        "INSERT INTO postbox_emails (id, status, priority, spec, message_id, idempotency_key,
             template, recipients, tags, send_at, expires_at, age_from, created_at,
             updated_at, request_id, subject) {}
         ON CONFLICT(idempotency_key) DO NOTHING{}",
        rows_of(chunk.len(), COLS, pad),
        if returning { " RETURNING id" } else { "" }
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
            .add(Step::Submit.to().as_str())
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
    q.nulls_to(pad * COLS);
    Ok(q)
}

/// The most rows [`Store::insert_chunks`] puts in one statement: 16 parameters a row, 2,048
/// in all, far below SQLite's 32,766. Rows go in chunks of this many and the rest in one
/// (1,000 -> 7 x 128 + 104).
const CHUNK: usize = 128;

/// Whether the statements of a chunk of `size` rows are kept prepared on SQLite (`Sql::keep`;
/// a statement's text depends only on its size): a [`CHUNK`] or a power of two below, at most
/// 8 texts. The others are prepared for each run, except that a group of one piece runs a
/// padded text ([`padded`]) on SQLite; the halves of a larger group's rest, keyed submissions
/// and PostgreSQL's statements prepare theirs. A group of single submits goes in one round trip
/// to the writer's thread (cut into powers of two, a group of 63 took six).
fn kept(size: usize) -> bool {
    size.is_power_of_two() && size <= CHUNK
}

/// How [`Store::insert_unkeyed_sqlite`] cuts a group into statements. One piece when it fits
/// one chunk (run as a kept text, [`padded`]). Otherwise full chunks (kept) between two halves
/// of the rest (prepared for each run): the first piece's text carries the `BEGIN` and the
/// last's the depth check and `COMMIT`, so a full chunk with either would be one more kept
/// text, ~1 MB more peak RSS at the peer harness's batches of 500. With a rest of 0 or 1 row
/// the ends are full chunks (kept with their `BEGIN`, or their `COMMIT`).
fn pieces<T>(rows: &[T]) -> Vec<&[T]> {
    let rest = rows.len() % CHUNK;
    if rows.len() <= CHUNK || rest < 2 {
        return rows.chunks(CHUNK).collect();
    }
    let (head, more) = rows.split_at(rest / 2);
    let (full, tail) = more.split_at(more.len() - (rest - rest / 2));
    let mut out = vec![head];
    out.extend(full.chunks(CHUNK));
    out.push(tail);
    out
}

/// The rows of the text a group of one piece of `n` rows (at most [`CHUNK`]) runs on SQLite:
/// the next power of two, so its text is kept ([`kept`]) and not compiled for its run; the rows
/// past `n` are NULL and inserted by none of its statements ([`crate::db::rows_of`]).
fn padded(n: usize) -> usize {
    n.next_power_of_two()
}

/// The depth: what [`Store::depth`] reads.
const DEPTH: &str =
    "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM postbox_counters WHERE name = 'depth'";

/// SQLite: fails with "integer overflow" when the depth is over `$1`, so that the text it is in
/// stops before its `COMMIT` ([`crate::db::Tx::commit_with`]); otherwise one row of 0.
/// SQLite has no `RAISE` outside triggers; `abs()` of the smallest integer is an error its
/// documentation names, and a `CASE` evaluates only the branch it takes.
const DEPTH_GUARD: &str = "SELECT CASE WHEN COALESCE(SUM(n), 0) > $1
         THEN abs(-9223372036854775807 - 1) ELSE 0 END
    FROM postbox_counters WHERE name = 'depth'";

/// Whether `e` is [`DEPTH_GUARD`]'s error.
fn over_cap(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.message() == "integer overflow")
}

/// Every email of the group, in order, with the request that submitted it.
fn group_rows(reqs: &[InsertRequest]) -> Vec<(&NewRow, Option<&str>)> {
    reqs.iter()
        .flat_map(|r| r.rows.iter().map(|row| (row, r.request_id.as_deref())))
        .collect()
}

/// Each submission's share of `ids` (the group's emails, in order), all inserted.
fn inserted(reqs: &[InsertRequest], ids: &[(EmailId, bool)]) -> Vec<InsertOutcome> {
    let mut from = 0;
    reqs.iter()
        .map(|r| {
            let mine = ids[from..from + r.rows.len()].to_vec();
            from += r.rows.len();
            InsertOutcome::Inserted(mine)
        })
        .collect()
}

/// The depth [`DEPTH`] answered (never below 0).
fn depth_of(n: Option<i64>) -> u64 {
    n.unwrap_or(0).max(0) as u64
}

/// SQLite: the counters behind `GET /v1/stats` and the depth cap (`postbox_counters`) raised
/// for `emails` just inserted (all `queued`), in one statement of one text (kept prepared).
/// Triggers keep them exact for every other change, but an insert trigger fires per row: two
/// UPDATEs a row took ~30% of a 140-row insert (migration `..._insert_counters.sql`).
/// PostgreSQL's triggers run once per statement: nothing to do there.
fn counters_sql<'a>(kind: Kind, emails: impl Iterator<Item = &'a Email>) -> Vec<Sql> {
    if kind != Kind::Sqlite {
        return Vec::new();
    }
    // A new email is `queued`, which the depth counts (`postbox_depth_update`'s set).
    let status = Step::Submit.to();
    let mut by_priority = [0i64; 3];
    for e in emails {
        by_priority[e.priority.job_priority()] += 1;
    }
    let total: i64 = by_priority.iter().sum();
    if total == 0 {
        return Vec::new();
    }
    let [high, normal, low] = [Priority::High, Priority::Normal, Priority::Low].map(|p| {
        (
            format!("status:{}:{}", status.as_str(), p.as_str()),
            by_priority[p.job_priority()],
        )
    });
    vec![
        sql(
            "UPDATE postbox_counters SET n = n + CASE name WHEN 'depth' THEN $1 WHEN $2 THEN $3
                 WHEN $4 THEN $5 WHEN $6 THEN $7 ELSE 0 END
             WHERE name IN ('depth', $2, $4, $6)",
        )
        .bind(total)
        .bind(high.0)
        .bind(high.1)
        .bind(normal.0)
        .bind(normal.1)
        .bind(low.0)
        .bind(low.1)
        .keep(),
    ]
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

/// Pushes the job that owns `<id>:<seq>`.
pub(super) async fn push_job(
    tx: &mut Tx,
    queue: &str,
    id: &str,
    seq: i64,
    priority: Priority,
    run_at: Option<OffsetDateTime>,
) -> Result<(), StoreError> {
    push_jobs(tx, queue, &[(id, seq, priority, run_at)]).await
}

/// Pushes the delivery jobs `(email id, seq, priority, run_at)` inside `tx` (the queue writes
/// the rows).
pub(super) async fn push_jobs(
    tx: &mut Tx,
    queue: &str,
    jobs: &[(&str, i64, Priority, Option<OffsetDateTime>)],
) -> Result<(), StoreError> {
    if let Some(q) = send_jobs_sql(tx.kind(), queue, jobs, jobs.len()) {
        q.execute(&mut *tx).await?;
    }
    Ok(())
}

/// The statement [`push_jobs`] runs; None for no jobs.
fn send_jobs_sql(
    kind: Kind,
    queue: &str,
    jobs: &[(&str, i64, Priority, Option<OffsetDateTime>)],
    pad: usize,
) -> Option<Sql> {
    let jobs: Vec<Push<SendJob>> = jobs
        .iter()
        .map(|(id, seq, priority, run_at)| Push {
            job: SendJob::new(id, *seq),
            priority: priority.job_priority(),
            run_at: *run_at,
        })
        .collect();
    table::push_sql(kind, queue, &jobs, pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The depth guard passes at the cap and fails the transaction past it, with the error
    /// [`over_cap`] tells from others, before anything commits.
    #[tokio::test]
    async fn the_depth_guard_stops_the_commit_only_past_the_cap() {
        let (pool, db) = crate::db::memory_db(&[
            "CREATE TABLE postbox_counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL)",
            "CREATE TABLE t (a INTEGER)",
            "INSERT INTO postbox_counters VALUES ('depth', 5), ('status:queued:normal', 9)",
        ])
        .await;
        let guarded = |cap: i64| {
            let mut s = Script::new();
            s.push(sql("INSERT INTO t VALUES (1)"));
            s.push(sql(DEPTH_GUARD).bind(cap).keep());
            s
        };
        let once = |cap: i64| {
            let db = db.clone();
            async move { db.begin_own().await?.commit_with::<i64>(guarded(cap)).await }
        };
        assert_eq!(once(5).await.unwrap(), [0]);
        let e = once(4).await.unwrap_err();
        assert!(over_cap(&e), "{e}");
        assert!(!over_cap(&sqlx::Error::RowNotFound));
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 1, "the guarded insert past the cap did not commit");
    }

    #[test]
    fn a_group_is_cut_into_full_chunks_between_two_halves_of_the_rest_and_a_small_one_padded() {
        let sizes = |n: usize| {
            let rows: Vec<usize> = (0..n).collect();
            let p = pieces(&rows);
            // Every row once, in order.
            let again: Vec<usize> = p.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(again, rows);
            p.iter().map(|c| c.len()).collect::<Vec<_>>()
        };
        assert_eq!(sizes(1), [1]);
        assert_eq!(sizes(37), [37]);
        assert_eq!(sizes(CHUNK), [CHUNK]);
        assert_eq!(sizes(500), [58, CHUNK, CHUNK, CHUNK, 58]);
        assert_eq!(sizes(1000)[0], 52);
        assert_eq!(sizes(1000)[8], 52);
        assert_eq!(sizes(131), [1, CHUNK, 2]);
        assert_eq!(sizes(2 * CHUNK), [CHUNK, CHUNK]);
        assert_eq!(sizes(2 * CHUNK + 1), [CHUNK, CHUNK, 1]);
        // A group of one piece runs a kept text, of as many rows or more.
        for n in 1..=CHUNK {
            assert_eq!(sizes(n), [n]);
            assert!(kept(padded(n)) && padded(n) >= n, "{n}");
        }
        assert_eq!(
            (padded(37), padded(58), padded(1), padded(CHUNK)),
            (64, 64, 1, CHUNK)
        );
    }

    #[test]
    fn full_chunks_and_powers_of_two_are_kept_and_only_they() {
        assert!(kept(CHUNK) && kept(64) && kept(1));
        assert!(!kept(104) && !kept(63) && !kept(0) && !kept(2 * CHUNK));
        assert_eq!((1..=2000).filter(|n| kept(*n)).count(), 8);
    }
}
