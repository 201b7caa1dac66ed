//! Claims and completions, batched: the delivery hot path's writes.
//!
//! Every delivery writes twice: a claim before it sends (the email becomes `sending`, its
//! attempt is counted) and a completion after (the attempt's outcome, its timeline entry, the
//! retry's job). Issued one by one from each delivery, those writes fought for SQLite's lock
//! (4.7 ms per statement under load, 14.7 ms of busy-handler sleep per email) and each commit
//! paid its own fsync. Here deliveries hand them to ONE task, the [`Recorder`], which takes
//! whatever is waiting (up to [`MAX_BATCH`]), writes it in ONE transaction with multi-row
//! statements (one UPDATE for all claims, one UPDATE + one INSERT for all completions, one
//! INSERT for the retries' jobs) and answers each delivery after the commit. Nothing waits to
//! fill a batch: an idle queue's claim goes alone, at once; under load batches grow by
//! themselves while the previous commit runs (River's completer and Oban's bundled acks work
//! the same way).
//!
//! On SQLite the workers' fetches ride along (`queue::backend`): apalis's fetch statement for
//! the next batch of due jobs runs in the same transaction, so it costs a statement, not a
//! commit of its own. So do the webhook dispatchers' rounds (`webhooks::dispatch`): what a
//! round's POSTs got and the endpoint's new place in the feed are a few statements in the
//! next transaction, not a transaction (and, with `synchronous = FULL`, a sync to disk) of
//! their own that the deliveries' next one would wait behind.
//!
//! A failed batch (one row the database refuses) is retried one operation per transaction,
//! so one bad operation never sinks the others. A completion that cannot be committed is
//! retried from memory by its delivery (`worker::deliver`), never by sending again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::events::webhook_round_in;
use super::lifecycle::{insert_event, insert_expired, rfc3339};
use super::open::now;
use super::submit::push_jobs;
use super::suppressions::suppressed_among;
use super::*;
use crate::db::{DbRow, Kind, Script, Sql, Tx, sql, values};
use crate::domain::lifecycle::Step;
use crate::queue::backend::{FetchRequest, Fetched, fetch_in};
use crate::queue::table;

/// Operations per transaction at most.
const MAX_BATCH: usize = 256;

/// A finished attempt, to record: the claim it ends, the attempt's facts and the outcome.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: EmailId,
    pub seq: i64,
    pub attempt: u32,
    pub priority: Priority,
    pub rec: AttemptRecord,
    pub finish: Finish,
    /// The job's apalis task id: acked with the outcome.
    pub task: String,
}

enum Op {
    Claim {
        id: String,
        seq: i64,
        task: String,
        reply: oneshot::Sender<Result<ClaimResult, StoreError>>,
    },
    Complete {
        done: Box<Completion>,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    /// apalis's fetch of the next due jobs (SQLite: `queue::backend`).
    Fetch {
        req: Box<FetchRequest>,
        reply: oneshot::Sender<Result<Fetched, StoreError>>,
    },
    /// What a webhook dispatcher's round did (`webhooks`).
    WebhookRound {
        round: Box<WebhookRound>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// Handle to the task that batches claims and completions; cheap to clone. The task ends when
/// every handle is dropped.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Op>,
    /// This process, as recorded in its claims.
    node: Arc<str>,
    /// Outcomes per transaction lately: the last transaction's count, or three quarters of
    /// the figure before it when that is more (it follows a rise at once and a fall slowly).
    recent: Arc<AtomicUsize>,
}

impl Recorder {
    /// Starts the task on the current tokio runtime; `node` is this process, as recorded in
    /// its claims.
    pub fn start(store: Store, node: String) -> Recorder {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let recent = Arc::new(AtomicUsize::new(0));
        let node: Arc<str> = node.into();
        tokio::spawn(run(store, node.clone(), rx, recent.clone()));
        Recorder { tx, node, recent }
    }

    /// This process's name in the cluster, as recorded in its claims.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Outcomes (completions) the recent transactions committed, per transaction.
    pub fn recent_completions(&self) -> usize {
        self.recent.load(Ordering::Relaxed)
    }

    /// Claims an email for one attempt, if job `seq` still owns it and it is not final.
    /// A claim that finds nothing to do acks the job (`task`) in the same transaction.
    pub async fn claim(&self, id: &str, seq: i64, task: &str) -> Result<ClaimResult, StoreError> {
        self.ask(|reply| Op::Claim {
            id: id.to_string(),
            seq,
            task: task.to_string(),
            reply,
        })
        .await
    }

    /// Records a finished attempt; false when the claim was superseded meanwhile (nothing
    /// written). Returns once the transaction holding it has committed.
    pub async fn complete(&self, done: Completion) -> Result<bool, StoreError> {
        self.ask(|reply| Op::Complete {
            done: Box::new(done),
            reply,
        })
        .await
    }

    /// Runs apalis's fetch for a worker in the next transaction, with the claims and
    /// completions waiting: on SQLite a fetch then costs a statement, not a commit of its own.
    pub(crate) async fn fetch(&self, req: FetchRequest) -> Result<Fetched, StoreError> {
        self.ask(|reply| Op::Fetch {
            req: Box::new(req),
            reply,
        })
        .await
    }

    /// Records a webhook dispatcher's round in the next transaction, with the claims and
    /// completions waiting: a round's bookkeeping costs delivery a few statements, not a
    /// transaction (and a sync to disk) of its own on the one write connection.
    pub async fn record_webhook_round(&self, round: WebhookRound) -> Result<(), StoreError> {
        self.ask(|reply| Op::WebhookRound {
            round: Box::new(round),
            reply,
        })
        .await
    }

    /// Hands the task one operation (`op`, given where to answer) and waits for its answer,
    /// which comes once the transaction holding it has committed (or failed).
    async fn ask<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(op(reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Queue("the claim and completion writer has stopped".into())
}

/// [`Recorder::recent_completions`] after a transaction of `done` outcomes, from `was`: a
/// rise is followed at once, a fall by a quarter per transaction (one small transaction
/// between big ones, a fetch alone, does not shrink the claims the workers keep ahead).
fn recent_after(was: usize, done: usize) -> usize {
    done.max(was * 3 / 4)
}

async fn run(store: Store, node: Arc<str>, mut rx: mpsc::Receiver<Op>, recent: Arc<AtomicUsize>) {
    while let Some(first) = rx.recv().await {
        let mut ops = vec![first];
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut claims = Vec::new();
        let mut claim_replies = Vec::new();
        let mut dones = Vec::new();
        let mut done_replies = Vec::new();
        let mut fetches = Vec::new();
        let mut fetch_replies = Vec::new();
        let mut rounds = Vec::new();
        let mut round_replies = Vec::new();
        for op in ops {
            match op {
                Op::Claim {
                    id,
                    seq,
                    task,
                    reply,
                } => {
                    claims.push((id, seq, task));
                    claim_replies.push(reply);
                }
                Op::Complete { done, reply } => {
                    dones.push(*done);
                    done_replies.push(reply);
                }
                Op::Fetch { req, reply } => {
                    fetches.push(*req);
                    fetch_replies.push(reply);
                }
                Op::WebhookRound { round, reply } => {
                    rounds.push(*round);
                    round_replies.push(reply);
                }
            }
        }
        let was = recent.load(Ordering::Relaxed);
        recent.store(recent_after(was, dones.len()), Ordering::Relaxed);
        metrics::histogram!("postbox_write_batch_size", "kind" => "claims")
            .record(claims.len() as f64);
        metrics::histogram!("postbox_write_batch_size", "kind" => "completions")
            .record(dones.len() as f64);
        metrics::histogram!("postbox_write_batch_size", "kind" => "fetches")
            .record(fetches.len() as f64);
        metrics::histogram!("postbox_write_batch_size", "kind" => "webhook_rounds")
            .record(rounds.len() as f64);
        match store
            .record_batch(&claims, &dones, &fetches, &rounds, &node)
            .await
        {
            Ok((claimed, recorded, fetched)) => {
                for (reply, r) in claim_replies.into_iter().zip(claimed) {
                    let _ = reply.send(Ok(r));
                }
                for (reply, r) in done_replies.into_iter().zip(recorded) {
                    let _ = reply.send(Ok(r));
                }
                for (reply, r) in fetch_replies.into_iter().zip(fetched) {
                    let _ = reply.send(Ok(r));
                }
                for reply in round_replies {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                store.saw(&e);
                if claims.len() + dones.len() + fetches.len() + rounds.len() == 1 {
                    if let Some(reply) = done_replies.pop() {
                        let _ = reply.send(Err(e));
                    } else if let Some(reply) = claim_replies.pop() {
                        let _ = reply.send(Err(e));
                    } else if let Some(reply) = fetch_replies.pop() {
                        let _ = reply.send(Err(e));
                    } else if let Some(reply) = round_replies.pop() {
                        let _ = reply.send(Err(e));
                    }
                    continue;
                }
                tracing::warn!(error = %e, claims = claims.len(), completions = dones.len(),
                    "a batch of claims and completions failed; writing them one by one");
                // Completions first: they free what claims may need.
                for (done, reply) in dones.iter().zip(done_replies) {
                    let r = store
                        .record_batch(&[], std::slice::from_ref(done), &[], &[], &node)
                        .await
                        .map(|(_, mut v, _)| v.pop().unwrap_or(false));
                    if let Err(e) = &r {
                        store.saw(e);
                    }
                    let _ = reply.send(r);
                }
                for (claim, reply) in claims.iter().zip(claim_replies) {
                    let r = store
                        .record_batch(std::slice::from_ref(claim), &[], &[], &[], &node)
                        .await
                        .map(|(mut v, _, _)| v.pop().expect("one claim, one answer"));
                    if let Err(e) = &r {
                        store.saw(e);
                    }
                    let _ = reply.send(r);
                }
                for (req, reply) in fetches.iter().zip(fetch_replies) {
                    let r = store
                        .record_batch(&[], &[], std::slice::from_ref(req), &[], &node)
                        .await
                        .map(|(_, _, mut v)| v.pop().expect("one fetch, one answer"));
                    if let Err(e) = &r {
                        store.saw(e);
                    }
                    let _ = reply.send(r);
                }
                for (round, reply) in rounds.iter().zip(round_replies) {
                    let r = store
                        .record_batch(&[], &[], &[], std::slice::from_ref(round), &node)
                        .await
                        .map(|_| ());
                    if let Err(e) = &r {
                        store.saw(e);
                    }
                    let _ = reply.send(r);
                }
            }
        }
    }
}

impl Store {
    /// Writes `claims` and `completions` in ONE transaction: completions first, then claims,
    /// then apalis's `fetches`, then the webhook `rounds`. One answer per claim, completion
    /// and fetch, in order.
    async fn record_batch(
        &self,
        claims: &[(String, i64, String)],
        completions: &[Completion],
        fetches: &[FetchRequest],
        rounds: &[WebhookRound],
        node: &str,
    ) -> Result<(Vec<ClaimResult>, Vec<bool>, Vec<Fetched>), StoreError> {
        // On SQLite its BEGIN goes with its first statement: one round trip fewer.
        let mut tx = self.db.begin_own().await?;
        let recorded = if completions.is_empty() {
            Vec::new()
        } else {
            self.complete_in(&mut tx, completions).await?
        };
        let claimed = if claims.is_empty() {
            Vec::new()
        } else {
            self.claim_in(&mut tx, claims, node).await?
        };
        let mut fetched = Vec::with_capacity(fetches.len());
        for req in fetches {
            fetched.push(fetch_in(&mut tx, req).await?);
        }
        for round in rounds {
            webhook_round_in(&mut tx, round).await?;
        }
        if completions
            .iter()
            .any(|c| crate::faults::hit(crate::faults::RECORD_COMMIT_FAIL, c.id.as_str()))
            || claims
                .iter()
                .any(|c| crate::faults::hit(crate::faults::CLAIM_COMMIT_FAIL, &c.0))
            || fetches.iter().any(|f| {
                crate::faults::hit(crate::faults::FETCH_COMMIT_FAIL, f.config.queue.as_ref())
            })
        {
            tx.rollback().await?;
            return Err(StoreError::Queue(
                "injected fault: this batch's commit fails".into(),
            ));
        }
        tx.commit().await?;
        self.wrote_events();
        if completions.iter().any(|c| c.finish.next_run().is_some()) {
            self.scheduled.notify_one();
        }
        Ok((claimed, recorded, fetched))
    }

    /// Claims emails for one attempt each, in one statement: those whose job `(id, seq)` still
    /// owns them and that are not final.
    ///
    /// `node` is the claiming process; it is recorded so that an email still `sending` is
    /// re-claimed only when its claimer is gone (its node lease ran out): a crash. A live
    /// claimer may still be recording the outcome of a send that went through.
    async fn claim_in(
        &self,
        tx: &mut Tx,
        claims: &[(String, i64, String)],
        node: &str,
    ) -> Result<Vec<ClaimResult>, StoreError> {
        let now = now();
        // $1 now, $2 node, then per claim: id, seq.
        let ids: Vec<String> = (0..claims.len())
            .map(|i| format!("${}", 3 + 2 * i))
            .collect();
        let cases: String = (0..claims.len())
            .map(|i| format!(" WHEN ${} THEN ${}", 3 + 2 * i, 4 + 2 * i))
            .collect();
        let mut q = sql(format!(
            "UPDATE postbox_emails
                SET status = '{to}', attempts = attempts + 1,
                    interrupted = CASE WHEN status = 'sending' THEN 1 ELSE 0 END, updated_at = $1,
                    claimed_by = $2
              WHERE id IN ({}) AND job_seq = CASE id{} END
                AND {guard}
                AND (expires_at IS NULL OR expires_at > $1)
                AND (status <> 'sending' OR claimed_by IS NULL OR NOT EXISTS
                     (SELECT 1 FROM postbox_leases l
                       WHERE l.name = 'node:' || postbox_emails.claimed_by AND l.expires_at >= $1))
          RETURNING id, spec, message_id, attempts, priority, age_from, interrupted",
            ids.join(", "),
            cases,
            to = Step::Claim.to(),
            guard = Step::Claim.guard("status"),
        ));
        q.add(ms(now)).add(node);
        for (id, seq, _) in claims {
            q.add(id.as_str()).add(*seq);
        }
        let rows = q.fetch_all(&mut *tx).await?;
        let mut found: HashMap<String, DbRow> = HashMap::with_capacity(rows.len());
        for row in rows {
            found.insert(row.get("id")?, row);
        }
        let mut out = Vec::with_capacity(claims.len());
        // Jobs with nothing to send: acked here.
        let mut done: Vec<&str> = Vec::new();
        for (id, seq, task) in claims {
            let Some(row) = found.remove(id) else {
                out.push(self.not_claimed(tx, id, *seq, now).await?);
                done.push(task);
                continue;
            };
            let spec: String = row.get("spec")?;
            let email: Email = match serde_json::from_str(&spec) {
                Ok(e) => e,
                Err(e) => {
                    // Retrying cannot make it readable: fail it, with the reason, instead of
                    // claiming it again and again.
                    let reason = format!("the stored email cannot be read: {e}");
                    fail_claimed(tx, id, *seq, &reason, now).await?;
                    out.push(ClaimResult::Failed(reason));
                    done.push(task);
                    continue;
                }
            };
            let attempt: i64 = row.get("attempts")?;
            let interrupted = row.get::<i64>("interrupted")? != 0;
            if interrupted {
                insert_event(
                    &mut *tx,
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
            out.push(ClaimResult::Claimed(Box::new(Claim {
                id: EmailId::from_db(id.to_string()),
                email,
                message_id: row.get("message_id")?,
                attempt: attempt as u32,
                seq: *seq,
                priority: Priority::parse(&priority).unwrap_or_default(),
                age_from: from_ms(row.get("age_from")?),
                interrupted,
                suppressed: Vec::new(),
            })));
        }
        table::ack(&mut *tx, self.db.kind(), &done).await?;
        // Recipients on the suppression list, for every claim at once.
        let addresses: Vec<String> = out
            .iter()
            .filter_map(|c| match c {
                ClaimResult::Claimed(c) => Some(c),
                _ => None,
            })
            .flat_map(|c| c.email.recipients().map(|a| a.address().to_string()))
            .collect();
        if !addresses.is_empty() {
            let hit = suppressed_among(tx, &addresses, ms(now)).await?;
            if !hit.is_empty() {
                for c in out.iter_mut() {
                    if let ClaimResult::Claimed(c) = c {
                        c.suppressed = c
                            .email
                            .recipients()
                            .map(|a| suppression_key(a.address()))
                            .filter(|k| hit.contains(k))
                            .collect();
                    }
                }
            }
        }
        Ok(out)
    }

    /// Why job `(id, seq)` claimed nothing: its email expired (marked so here), or the job has
    /// nothing to do.
    async fn not_claimed(
        &self,
        tx: &mut Tx,
        id: &str,
        seq: i64,
        now: time::OffsetDateTime,
    ) -> Result<ClaimResult, StoreError> {
        let expired = sql(format!(
            "UPDATE postbox_emails
                SET status = '{}', job_seq = job_seq + 1, updated_at = $1,
                    next_attempt_at = NULL, last_error = 'expired before it could be delivered'
              WHERE id = $2 AND job_seq = $3 AND {} AND expires_at <= $1",
            Step::Expire.to(),
            Step::Expire.guard("status")
        ))
        .bind(ms(now))
        .bind(id)
        .bind(seq)
        .execute(&mut *tx)
        .await?;
        if expired == 1 {
            insert_expired(tx, id, now).await?;
            return Ok(ClaimResult::Expired);
        }
        Ok(ClaimResult::Skip(
            "final, cancelled, superseded, or in flight in a live process",
        ))
    }

    /// Records attempts and their emails' new states: one UPDATE for every email, one INSERT
    /// for their timeline entries, one for the retries' jobs. An entry whose claim was
    /// superseded meanwhile writes nothing and answers false.
    async fn complete_in(
        &self,
        tx: &mut Tx,
        items: &[Completion],
    ) -> Result<Vec<bool>, StoreError> {
        let now = now();
        // An email a pause holds gets one timeline entry when that pause first holds it (not
        // at every re-check): written before the UPDATE below changes its `last_error`.
        for c in items {
            if let Finish::Wait { reason, .. } = &c.finish
                && reason.starts_with("paused: ")
            {
                sql(
                    "INSERT INTO postbox_events (email_id, at, kind, status, detail)
                     SELECT id, $1, 'held', 'queued', $2 FROM postbox_emails
                      WHERE id = $3 AND job_seq = $4 AND status = 'sending'
                        AND (last_error IS NULL OR last_error <> $2)",
                )
                .bind(ms(now))
                .bind(reason.as_str())
                .bind(c.id.as_str())
                .bind(c.seq)
                .execute(&mut *tx)
                .await?;
            }
        }
        const COLS: usize = 8;
        let mut q = sql(format!(
            "WITH v(vid, vseq, vstatus, vnext, verr, vsent, vbump, vuncount) AS (VALUES {})
             UPDATE postbox_emails
                SET status = v.vstatus, next_attempt_at = v.vnext, last_error = v.verr,
                    sent_at = v.vsent, updated_at = $1, job_seq = postbox_emails.job_seq + v.vbump,
                    attempts = postbox_emails.attempts - v.vuncount
               FROM v
              WHERE postbox_emails.id = v.vid AND postbox_emails.job_seq = v.vseq
                AND {}
          RETURNING postbox_emails.id",
            values(items.len(), COLS, 2),
            // Deliver, Defer, Fail, Suppress and Hold all leave `sending` (the table says so;
            // a test checks).
            Step::Deliver.guard("postbox_emails.status")
        ));
        q.add(ms(now));
        for c in items {
            let (status, next_at, last_error, sent_at, bump) = columns(c, now);
            q.add(c.id.as_str())
                .add(c.seq)
                .add(status)
                .add(next_at)
                .add(last_error)
                .add(sent_at)
                .add(bump)
                .add(i64::from(matches!(
                    c.finish,
                    Finish::Wait { .. } | Finish::Throttled { .. }
                )));
        }
        // Every job ends here, recorded or superseded.
        let tasks: Vec<&str> = items.iter().map(|c| c.task.as_str()).collect();
        let ack = table::ack_sql(self.db.kind(), &tasks);
        // A wait is no attempt: no timeline entry.
        let entry = |c: &&Completion| !matches!(c.finish, Finish::Wait { .. });
        let updated: std::collections::HashSet<String> = if tx.kind() == Kind::Sqlite {
            // One script, one round trip: the entries first, each only if the UPDATE after it
            // will change its email (the same condition; nothing else writes in between, the
            // transaction holds SQLite's write lock from its first statement).
            let entries: Vec<&Completion> = items.iter().filter(entry).collect();
            let mut script = Script::new();
            script
                .extend(entries_sql(&entries, now, true))
                .push(q)
                .extend(ack);
            script
                .column::<String>(&mut *tx)
                .await?
                .into_iter()
                .collect()
        } else {
            // Other processes write too: the entries only for the emails the UPDATE changed.
            let updated: std::collections::HashSet<String> =
                q.column::<String>(&mut *tx).await?.into_iter().collect();
            let entries: Vec<&Completion> = items
                .iter()
                .filter(|c| updated.contains(c.id.as_str()))
                .filter(entry)
                .collect();
            let mut rest = Script::new();
            rest.extend(entries_sql(&entries, now, false)).extend(ack);
            rest.execute(&mut *tx).await?;
            updated
        };
        let done: Vec<&Completion> = items
            .iter()
            .filter(|c| updated.contains(c.id.as_str()))
            .collect();
        let retries: Vec<_> = done
            .iter()
            .filter_map(|c| {
                let at = c.finish.next_run()?;
                Some((c.id.as_str(), c.seq + 1, c.priority, Some(at)))
            })
            .collect();
        if !retries.is_empty() {
            push_jobs(tx, &self.queue, &retries).await?;
        }
        Ok(items
            .iter()
            .map(|c| updated.contains(c.id.as_str()))
            .collect())
    }
}

/// The timeline entries of finished attempts: one INSERT. `guarded`: each only if its email
/// is still claimed by that attempt (job `seq`, `sending`), the condition under which
/// `complete_in`'s UPDATE changes it; for running before that UPDATE.
fn entries_sql(entries: &[&Completion], now: time::OffsetDateTime, guarded: bool) -> Option<Sql> {
    if entries.is_empty() {
        return None;
    }
    let mut ev = sql(format!(
        "WITH v(vid, vseq, vat, vkind, vstatus, vattempt, vcode, vtext, vms, vdetail) AS (VALUES {})
         INSERT INTO postbox_events (email_id, at, kind, status, attempt, smtp_code, smtp_text,
             duration_ms, detail)
         SELECT vid, vat, vkind, vstatus, vattempt, vcode, vtext, vms, vdetail FROM v{}",
        values(entries.len(), 10, 1),
        if guarded {
            format!(
                " WHERE EXISTS (SELECT 1 FROM postbox_emails e
                                  WHERE e.id = v.vid AND e.job_seq = v.vseq AND {})",
                Step::Deliver.guard("e.status")
            )
        } else {
            String::new()
        }
    ));
    for c in entries {
        let detail = match &c.finish {
            Finish::Sent => None,
            Finish::Retry { at } => Some(format!("retry at {}", rfc3339(*at))),
            Finish::Throttled { at, reason } => {
                Some(format!("{reason}; retry at {}", rfc3339(*at)))
            }
            Finish::Failed { reason }
            | Finish::Suppressed { reason }
            | Finish::Wait { reason, .. } => Some(reason.clone()),
        };
        let detail = match (detail, &c.rec.note) {
            (Some(d), Some(n)) => Some(format!("{d}; {n}")),
            (d, n) => d.or_else(|| n.clone()),
        };
        let (kind, attempt) = match c.finish {
            Finish::Suppressed { .. } => (Step::Suppress.row().entry.unwrap_or("suppressed"), None),
            _ => ("attempt", Some(c.attempt as i64)),
        };
        ev.add(c.id.as_str())
            .add(c.seq)
            .add(ms(c.rec.started_at))
            .add(kind)
            .add(columns(c, now).0)
            .add(attempt)
            .add(c.rec.smtp_code.map(i64::from))
            .add(c.rec.smtp_text.as_str())
            .add(c.rec.duration_ms)
            .add(detail);
    }
    Some(ev)
}

/// A completion's new status, next attempt, last error, sent time and job_seq increment.
fn columns(
    c: &Completion,
    now: time::OffsetDateTime,
) -> (&'static str, Option<i64>, Option<String>, Option<i64>, i64) {
    match &c.finish {
        Finish::Sent => (Step::Deliver.to().as_str(), None, None, Some(ms(now)), 0),
        Finish::Retry { at } => (
            Step::Defer.to().as_str(),
            Some(ms(*at)),
            Some(c.rec.smtp_text.clone()),
            None,
            1,
        ),
        Finish::Throttled { at, reason } => (
            Step::Defer.to().as_str(),
            Some(ms(*at)),
            Some(reason.clone()),
            None,
            1,
        ),
        Finish::Wait { at, reason } => (
            Step::Hold.to().as_str(),
            Some(ms(*at)),
            Some(reason.clone()),
            None,
            1,
        ),
        Finish::Failed { reason } => (
            Step::Fail.to().as_str(),
            None,
            Some(reason.clone()),
            None,
            0,
        ),
        Finish::Suppressed { reason } => (
            Step::Suppress.to().as_str(),
            None,
            Some(reason.clone()),
            None,
            0,
        ),
    }
}

/// Fails a claimed email without an attempt record (it could not even be tried).
async fn fail_claimed(
    tx: &mut Tx,
    id: &str,
    seq: i64,
    reason: &str,
    now: time::OffsetDateTime,
) -> Result<(), StoreError> {
    let n = sql(format!(
        "UPDATE postbox_emails
            SET status = '{}', next_attempt_at = NULL, last_error = $1, updated_at = $2
          WHERE id = $3 AND job_seq = $4 AND {}",
        Step::Fail.to(),
        Step::Fail.guard("status")
    ))
    .bind(reason)
    .bind(ms(now))
    .bind(id)
    .bind(seq)
    .execute(&mut *tx)
    .await?;
    if n == 1 {
        insert_event(&mut *tx, id, now, "failed", "failed", None, None, reason).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::recent_after;

    #[test]
    fn recent_completions_follow_a_rise_at_once_and_a_fall_slowly() {
        assert_eq!(recent_after(8, 40), 40);
        let mut r = 100;
        let mut seen = Vec::new();
        for _ in 0..4 {
            r = recent_after(r, 2);
            seen.push(r);
        }
        assert_eq!(seen, [75, 56, 42, 31]);
        // Down to what the transactions carry, and to nothing when idle.
        for _ in 0..40 {
            r = recent_after(r, 2);
        }
        assert_eq!(r, 2);
        assert_eq!(recent_after(1, 0), 0);
    }
}
