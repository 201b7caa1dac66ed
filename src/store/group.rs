//! Group commit: submissions that arrive together share one transaction.
//!
//! Every submit (library, CLI, HTTP) hands its validated rows to one writer task and waits for
//! that task's answer. The writer takes whatever is waiting (up to `queue.group_commit_max`
//! emails), commits it in ONE transaction and answers each submitter. The promise does not
//! weaken: a submitter gets `Ok` only after the transaction holding its rows has committed.
//! Under load the commits amortise SQLite's write lock and fsync over many requests; an idle
//! submit goes through alone, at once.
//!
//! If a group's transaction fails, each of its submissions is retried in a transaction of its
//! own, so one bad submission never sinks the others.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{InsertOutcome, InsertRequest, Store, StoreError};

struct Job {
    req: InsertRequest,
    reply: oneshot::Sender<Result<InsertOutcome, StoreError>>,
}

/// Handle to the writer task; cheap to clone. The task ends when every handle is dropped.
#[derive(Debug, Clone)]
pub struct GroupCommitter {
    tx: mpsc::Sender<Job>,
}

/// How a group commit behaves.
#[derive(Debug, Clone, Copy)]
pub struct GroupSettings {
    /// Emails per transaction at most.
    pub max_rows: usize,
    /// `queue.max_depth` (0: no cap).
    pub max_depth: u64,
    pub idempotency_ttl: Duration,
}

impl GroupCommitter {
    /// Starts the writer task on the current tokio runtime.
    pub fn start(store: Store, settings: GroupSettings) -> GroupCommitter {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(writer(store, settings, rx));
        GroupCommitter { tx }
    }

    /// Commits one submission (possibly together with others) and returns its outcome once the
    /// transaction holding it has committed.
    pub async fn submit(&self, req: InsertRequest) -> Result<InsertOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job { req, reply })
            .await
            .map_err(|_| StoreError::Queue("the group-commit writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Queue("the group-commit writer stopped mid-commit".into()))?
    }
}

async fn writer(store: Store, settings: GroupSettings, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut rows = first.req.rows.len();
        let mut jobs = vec![first];
        while rows < settings.max_rows {
            match rx.try_recv() {
                Ok(job) => {
                    rows += job.req.rows.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let (reqs, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| (j.req, j.reply)).unzip();
        let started = std::time::Instant::now();
        let result = store
            .insert_group(&reqs, settings.max_depth, settings.idempotency_ttl)
            .await;
        store.note_write(&result);
        let took = started.elapsed();
        if took > std::time::Duration::from_secs(1) {
            tracing::warn!(
                submissions = reqs.len(),
                emails = rows,
                ms = took.as_millis() as u64,
                "slow group commit: submitters waited this long"
            );
        } else if took > std::time::Duration::from_millis(20) {
            tracing::debug!(
                submissions = reqs.len(),
                emails = rows,
                ms = took.as_millis() as u64,
                "slow group commit"
            );
        }
        match result {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) if reqs.len() == 1 => {
                let _ = replies.into_iter().next().expect("one").send(Err(e));
            }
            Err(e) => {
                tracing::warn!(error = %e, submissions = reqs.len(),
                    "group commit failed; committing its submissions one by one");
                for (req, reply) in reqs.iter().zip(replies) {
                    let res = store
                        .insert_group(
                            std::slice::from_ref(req),
                            settings.max_depth,
                            settings.idempotency_ttl,
                        )
                        .await
                        .map(|mut v| v.pop().expect("one request, one outcome"));
                    store.note_write(&res);
                    let _ = reply.send(res);
                }
            }
        }
    }
}
