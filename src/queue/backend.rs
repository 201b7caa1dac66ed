//! The apalis backend of the queue: apalis's own `Persisted` state machine (register,
//! heartbeat, fetch, buffer, close) over apalis-sqlite's or apalis-postgres's own statements,
//! with two differences from their `SqliteStorage` / `PostgresStorage`: batches are fetched
//! ahead of the worker's requests ([`FETCH_AHEAD`]), and on SQLite the fetch statement runs
//! inside the transaction of the one writer (`store::Recorder`), beside the claims and
//! completions it is committing anyway. (That statement is apalis's, copied into
//! `queue::table` with its LIMIT written in, so that SQLite does not compile it again at every
//! fetch.)
//!
//! Why: on SQLite every write waits its turn on one connection, and each commit pays an fsync
//! (`synchronous = FULL`). A delivery's writes were three commits in a row (apalis's fetch,
//! then the claim, then the outcome), so at the peer harness's settings (concurrency 8, batch
//! 8) the sends sat idle waiting for the writer. Riding in the writer's transaction, the next
//! batch's fetch costs a statement, not a commit. On PostgreSQL a fetch is apalis's
//! `get_jobs` (`FOR UPDATE SKIP LOCKED`) as one statement of ours on the pool (`queue::table`).
//!
//! Everything else (worker registration, heartbeats and the re-queue of a dead worker's jobs,
//! the re-queue of a closing worker's buffered jobs) is apalis's statements in their own
//! transactions, as its storages run them (on SQLite on the writer's pool).

use std::sync::Arc;
use std::task::{Context, Poll};

use apalis_core::backend::finalize::Durable;
use apalis_core::backend::persistence::{Persisted, Persistence, TaskEvent, TaskPersistLayer};
use apalis_core::backend::{Backend, BackendConfig, WireFormatBackend, WorkerFilter};
use apalis_core::task::Task;
use apalis_core::worker::context::WorkerContext;
use apalis_postgres::PgPool;
use apalis_sqlite::queries;
use apalis_sqlite::{Config, JsonCodec, SqlitePool};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;
use ulid::Ulid;

use crate::db::Tx;
use crate::queue::Wake;

/// Jobs as apalis fetched them: payload bytes, task id, attempt.
pub(crate) type Fetched = Vec<Task<Vec<u8>>>;

/// One fetch for a worker: what apalis's fetch statement needs.
#[derive(Debug, Clone)]
pub(crate) struct FetchRequest {
    pub config: Arc<Config>,
    pub worker: WorkerContext,
}

/// Runs a [`FetchRequest`] in the writer's next transaction (see [`fetch_in`]).
pub(crate) type Fetcher =
    Arc<dyn Fn(FetchRequest) -> BoxFuture<'static, Result<Fetched, String>> + Send + Sync>;

/// apalis's fetch statement (up to `batch_size` due jobs of the queue, highest priority first,
/// marked taken by the worker; `table::fetch_sqlite`), inside the caller's SQLite transaction.
pub(crate) async fn fetch_in(tx: &mut Tx, req: &FetchRequest) -> Result<Fetched, sqlx::Error> {
    match tx {
        Tx::Sqlite(t) => super::table::fetch_sqlite(t, &req.config, req.worker.name(), "").await,
        Tx::SqliteOwn(t) => {
            let prefix = t.prefix()?;
            let res =
                super::table::fetch_sqlite(t.conn(), &req.config, req.worker.name(), prefix).await;
            t.ran(res)
        }
        Tx::Pg(_) => Err(sqlx::Error::Protocol(
            "the writer's fetch runs on SQLite only".into(),
        )),
    }
}

/// apalis-postgres's worker registration (`queries/worker/register.sql`) with `NOW()` for its
/// `last_seen` (apalis binds its own timestamp type, which it does not export): a worker name
/// taken by a live worker (holding the name's advisory lock) is refused.
const REGISTER_PG: &str =
    "INSERT INTO apalis.workers (id, worker_type, storage_name, layers, last_seen)
     VALUES ($1, $2, $3, $4, NOW())
     ON CONFLICT (id) DO UPDATE SET worker_type = EXCLUDED.worker_type,
         storage_name = EXCLUDED.storage_name, layers = EXCLUDED.layers, last_seen = NOW()
     WHERE pg_try_advisory_lock(hashtext(workers.id))";

/// apalis's fetch on PostgreSQL (`table::fetch_pg`: up to `batch_size` due jobs, highest
/// priority first, `FOR UPDATE SKIP LOCKED`, marked taken by the worker): one statement, its
/// own transaction.
async fn fetch_pg(
    pool: PgPool,
    config: Arc<Config>,
    worker: WorkerContext,
) -> Result<Fetched, String> {
    let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
    super::table::fetch_pg(&mut conn, &config, worker.name())
        .await
        .map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum BackendError {
    #[error(transparent)]
    Apalis(#[from] apalis_sqlite::Error),
    #[error(transparent)]
    ApalisPg(#[from] apalis_postgres::Error),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error("fetch: {0}")]
    Fetch(String),
}

/// Batches fetched ahead of the worker's requests. apalis asks for the next batch only once it
/// has handed out the last one; waiting for the database then (on SQLite the writer's
/// transaction in progress, then its own; on PostgreSQL a round trip) left the handlers idle.
/// On SQLite it capped delivery at one batch per two transactions: at the peer harness's
/// settings (concurrency 8, batch 8) 629 fetches of 8 for 5,000 emails, each waiting 6.3 ms.
/// Fetched ahead, two batches go in one transaction with the claims and completions waiting,
/// and transactions carry 8 claims instead of 5. (On SQLite a fetch now takes up to a quarter
/// of the jobs a worker holds, not `batch_size`: `worker::window`.)
///
/// Their jobs are taken by this worker but not claimed (nothing is sent): they go back to the
/// queue when the worker closes (`QueueStorage::poll_close`), or when it dies through
/// apalis's re-queue of a dead worker's jobs and the janitor. They may go before a
/// higher-priority job submitted after them (README: priority).
pub(crate) const FETCH_AHEAD: usize = 2;

/// A fetch running ahead of the worker's next request.
type Ahead = tokio::task::JoinHandle<Result<Fetched, String>>;

/// Where a worker's jobs are, and how its statements run.
#[derive(Clone)]
enum Queue {
    /// The writer's pool (one connection); fetches in the writer's transactions (`fetch`).
    Sqlite { pool: SqlitePool, fetch: Fetcher },
    /// The pool; apalis-postgres's statements.
    Pg { pool: PgPool },
}

#[derive(Clone)]
pub(crate) struct QueuePersistence {
    queue: Queue,
    config: Arc<Config>,
    /// Fetches running ahead of the worker's requests, oldest first: at most [`FETCH_AHEAD`]
    /// (see `fetch_next`).
    ahead: Arc<std::sync::Mutex<std::collections::VecDeque<Ahead>>>,
    /// The worker's wake-ups: one that came while a fetch ran makes it fetch again
    /// (`fetch_next`).
    wake: Arc<Wake>,
}

impl std::fmt::Debug for QueuePersistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePersistence")
            .field("queue", &self.config.queue)
            .finish_non_exhaustive()
    }
}

impl QueuePersistence {
    /// A fetch for a worker waiting on it. Found nothing while a wake-up came (a submit that
    /// committed after the fetch's statement read the queue)? Fetch again: apalis consumed
    /// that wake-up during this fetch and would not fetch for it (`queue::wake`), leaving the
    /// new job to the next poll. A fetch that found jobs is followed by another one anyway.
    async fn fetch_now(&self, worker: &WorkerContext) -> Result<Fetched, BackendError> {
        loop {
            let seen = self.wake.seq();
            let batch = self.fetch(worker).await.map_err(BackendError::Fetch)?;
            if crate::faults::hit(crate::faults::FETCH_SLOW, self.config.queue.as_ref()) {
                tokio::time::sleep(crate::faults::FETCH_SLOW_FOR).await;
            }
            if !batch.is_empty() || self.wake.seq() == seen {
                return Ok(batch);
            }
        }
    }

    /// One fetch of up to `batch_size` due jobs for `worker`.
    fn fetch(&self, worker: &WorkerContext) -> BoxFuture<'static, Result<Fetched, String>> {
        match &self.queue {
            Queue::Sqlite { fetch, .. } => fetch(FetchRequest {
                config: self.config.clone(),
                worker: worker.clone(),
            }),
            Queue::Pg { pool } => {
                fetch_pg(pool.clone(), self.config.clone(), worker.clone()).boxed()
            }
        }
    }
}

impl Persistence for QueuePersistence {
    type Compact = Vec<u8>;
    type Response = Value;
    type Error = BackendError;

    async fn register(&mut self, worker: &WorkerContext) -> Result<(), BackendError> {
        match &self.queue {
            Queue::Sqlite { pool, .. } => {
                let mut tx = pool.begin().await?;
                queries::reenqueue_orphaned(
                    &mut *tx,
                    self.config.heartbeat_interval.as_secs() as i64,
                    self.config.queue.as_ref(),
                    &WorkerFilter::Only(worker.name().to_owned()),
                )
                .await?;
                queries::register_worker(&mut *tx, &self.config, worker, "SqliteStorage").await?;
                tx.commit().await?;
            }
            Queue::Pg { pool } => {
                let mut tx = pool.begin().await?;
                let queue = self.config.queue.as_ref();
                apalis_postgres::queries::reenqueue_orphaned(
                    &mut *tx,
                    queue,
                    self.config.orphaned_duration().as_secs(),
                )
                .await?;
                let done = sqlx::query(REGISTER_PG)
                    .bind(worker.name())
                    .bind(queue)
                    .bind("PgStorage")
                    .bind(worker.get_service())
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(apalis_postgres::Error::WorkerAlreadyExists(
                        worker.name().to_owned(),
                    )
                    .into());
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    async fn heartbeat(&mut self, worker: &WorkerContext) -> Result<(), BackendError> {
        match &self.queue {
            Queue::Sqlite { pool, .. } => {
                let mut tx = pool.begin().await?;
                queries::keep_alive(&mut *tx, &self.config, worker).await?;
                queries::reenqueue_orphaned(
                    &mut *tx,
                    self.config.orphaned_duration().as_secs() as i64,
                    self.config.queue.as_ref(),
                    &WorkerFilter::AllExcept(worker.name().to_owned()),
                )
                .await?;
                tx.commit().await?;
            }
            Queue::Pg { pool } => {
                let mut tx = pool.begin().await?;
                let queue = self.config.queue.as_ref();
                apalis_postgres::queries::keep_alive(&mut *tx, queue, worker).await?;
                apalis_postgres::queries::reenqueue_orphaned(
                    &mut *tx,
                    queue,
                    self.config.orphaned_duration().as_secs(),
                )
                .await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// A fetch that filled its batch is followed at once by the next [`FETCH_AHEAD`] ones (on
    /// SQLite in the writer's next transaction), so the worker finds a batch ready when it
    /// asks.
    async fn fetch_next(&mut self, worker: &WorkerContext) -> Result<Fetched, BackendError> {
        let batch = loop {
            let ahead = self.ahead.lock().expect("not poisoned").pop_front();
            let Some(h) = ahead else {
                break self.fetch_now(worker).await?;
            };
            let batch = h
                .await
                .map_err(|e| BackendError::Fetch(e.to_string()))?
                .map_err(BackendError::Fetch)?;
            // An empty batch fetched ahead is stale: apalis asks again after a wake-up (a
            // submit), and answering it with what was due before would park the worker with
            // the new job waiting for the next poll. The next one ahead, or a fetch now.
            if !batch.is_empty() {
                break batch;
            }
        };
        if batch.len() >= self.config.batch_size {
            let mut ahead = self.ahead.lock().expect("not poisoned");
            while ahead.len() < FETCH_AHEAD {
                ahead.push_back(tokio::spawn(self.fetch(worker)));
            }
        }
        Ok(batch)
    }

    async fn reenqueue_abandoned(
        &mut self,
        tasks: Fetched,
        worker: &WorkerContext,
    ) -> Result<u64, BackendError> {
        let ids: Vec<String> = tasks
            .iter()
            .filter_map(|t| t.task_id().map(|id| id.to_string()))
            .collect();
        let n = match &self.queue {
            Queue::Sqlite { pool, .. } => {
                let mut tx = pool.begin().await?;
                let n = queries::reenqueue_abandoned(
                    &mut *tx,
                    self.config.queue.as_ref(),
                    worker.name(),
                    &ids,
                )
                .await?;
                tx.commit().await?;
                n
            }
            Queue::Pg { pool } => {
                let mut tx = pool.begin().await?;
                let n = apalis_postgres::queries::reenqueue_abandoned(
                    &mut *tx,
                    self.config.queue.as_ref(),
                    worker.name(),
                    &ids,
                )
                .await?;
                tx.commit().await?;
                n
            }
        };
        Ok(n)
    }

    /// apalis's lock and ack events are off (`lock_tasks(false)`, `persist_results(false)`):
    /// handlers ack in the transaction that records what the job did.
    async fn handle_events(
        &mut self,
        _events: Vec<TaskEvent<Value>>,
        _worker: &WorkerContext,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    async fn push_tasks(&mut self, tasks: Fetched) -> Result<(), BackendError> {
        match &self.queue {
            Queue::Sqlite { pool, .. } => {
                let mut tx = pool.begin().await?;
                queries::push_tasks(&mut *tx, self.config.queue.as_ref(), &tasks).await?;
                tx.commit().await?;
            }
            Queue::Pg { pool } => {
                let mut tx = pool.begin().await?;
                apalis_postgres::queries::push_tasks(&mut *tx, self.config.queue.as_ref(), tasks)
                    .await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }
}

/// The queue's apalis backend on either database (see the module's documentation).
pub(crate) struct QueueStorage {
    persistence: Persisted<QueuePersistence>,
    codec: JsonCodec<Vec<u8>>,
    /// At close: the batches fetched ahead, handed back to the queue.
    closing: Option<BoxFuture<'static, Result<(), BackendError>>>,
}

impl QueueStorage {
    /// SQLite: `pool` is the writer's pool (one connection), `fetch` runs a fetch in the
    /// writer's next transaction; `config` must have apalis's lock and result events off;
    /// `wake` is what the worker's poll strategy waits on.
    pub(crate) fn sqlite(
        pool: &SqlitePool,
        config: Config,
        fetch: Fetcher,
        wake: Arc<Wake>,
    ) -> QueueStorage {
        let queue = Queue::Sqlite {
            pool: pool.clone(),
            fetch,
        };
        QueueStorage::new(queue, config, wake)
    }

    /// PostgreSQL; as [`QueueStorage::sqlite`].
    pub(crate) fn postgres(pool: &PgPool, config: Config, wake: Arc<Wake>) -> QueueStorage {
        QueueStorage::new(Queue::Pg { pool: pool.clone() }, config, wake)
    }

    fn new(queue: Queue, config: Config, wake: Arc<Wake>) -> QueueStorage {
        QueueStorage {
            persistence: Persisted::new(QueuePersistence {
                queue,
                config: Arc::new(config),
                ahead: Default::default(),
                wake,
            }),
            closing: None,
            codec: JsonCodec::default(),
        }
    }
}

impl Backend for QueueStorage {
    type Task = Task<Vec<u8>>;
    type Error = BackendError;

    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), BackendError>> {
        let beat = self.persistence.config.heartbeat_interval;
        self.persistence.poll_ready(cx, worker, beat)
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Task<Vec<u8>>, BackendError>>> {
        self.persistence.poll_next(cx, worker)
    }

    /// apalis hands back the jobs it buffered; the batches fetched ahead go back first.
    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), BackendError>> {
        if self.closing.is_none() {
            let ahead = std::mem::take(&mut *self.persistence.ahead.lock().expect("not poisoned"));
            let (mut p, worker) = (self.persistence.clone(), worker.clone());
            self.closing = Some(Box::pin(async move {
                for h in ahead {
                    if let Ok(Ok(tasks)) = h.await
                        && !tasks.is_empty()
                    {
                        p.reenqueue_abandoned(tasks, &worker).await?;
                    }
                }
                Ok(())
            }));
        }
        if let Some(f) = self.closing.as_mut() {
            match f.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => {
                    // Done: poll_close may be called again; nothing is left ahead.
                    self.closing = Some(Box::pin(async { Ok(()) }));
                    r?;
                }
            }
        }
        self.persistence.poll_close(cx, worker)
    }
}

impl BackendConfig for QueueStorage {
    type Args = Value;
    type Id = Ulid;
    type Kind = Durable;
    type Config = Config;
    type Layer = TaskPersistLayer<JsonCodec<Value>, Value>;

    fn config(&self) -> &Config {
        &self.persistence.config
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        let batch = self.persistence.config.batch_size;
        self.persistence
            .layer(JsonCodec::default(), batch)
            .persist_results(false)
            .lock_tasks(false)
    }
}

impl WireFormatBackend for QueueStorage {
    type Codec = JsonCodec<Vec<u8>>;
    type Compact = Vec<u8>;

    fn codec(&self) -> &Self::Codec {
        &self.codec
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use apalis_core::task::builder::TaskBuilder;
    use futures::FutureExt;

    use super::*;

    /// A worker woken by a submit after a burst must get the new job, not the empty answer a
    /// fetch ahead got before the submit (which parked it until the next poll).
    #[tokio::test]
    async fn an_empty_batch_fetched_ahead_is_not_the_answer_after_a_wake_up() {
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch: Fetcher = {
            let calls = calls.clone();
            Arc::new(move |_req| {
                // 1: a full batch (of 1); 2 and 3 (the two fetched ahead): the queue is empty;
                // from 4 on: a job submitted since.
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    Ok(if n == 2 || n == 3 {
                        Vec::new()
                    } else {
                        vec![TaskBuilder::new(Vec::new()).build()]
                    })
                }
                .boxed()
            })
        };
        let pool = SqlitePool::connect_lazy("sqlite::memory:").unwrap();
        let config = Config::default().batch_size(1);
        let mut storage = QueueStorage::sqlite(&pool, config, fetch, Default::default());
        let p = &mut storage.persistence;
        let worker = WorkerContext::new("w");
        assert_eq!(p.fetch_next(&worker).await.unwrap().len(), 1);
        // Let both fetches ahead finish (empty) before the worker asks again.
        while calls.load(Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            p.fetch_next(&worker).await.unwrap().len(),
            1,
            "the job submitted after the fetches ahead"
        );
        assert!(calls.load(Ordering::SeqCst) >= 4);
    }

    /// A fetch that found nothing while a wake-up came (a submit committed after its
    /// statement read the queue) fetches again; one that found nothing and heard nothing
    /// answers empty (the worker parks until the next wake-up).
    #[tokio::test]
    async fn an_empty_fetch_that_raced_a_wake_up_fetches_again() {
        let calls = Arc::new(AtomicUsize::new(0));
        let wake = Arc::new(Wake::default());
        let fetch: Fetcher = {
            let (calls, wake) = (calls.clone(), wake.clone());
            Arc::new(move |_req| {
                // 1: the queue is empty, and a submit wakes the worker as the fetch answers;
                // 2: the job it submitted; 3: empty again, nothing heard.
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 {
                    wake.notify();
                }
                async move {
                    Ok(if n == 2 {
                        vec![TaskBuilder::new(Vec::new()).build()]
                    } else {
                        Vec::new()
                    })
                }
                .boxed()
            })
        };
        let pool = SqlitePool::connect_lazy("sqlite::memory:").unwrap();
        let config = Config::default().batch_size(8);
        let mut storage = QueueStorage::sqlite(&pool, config, fetch, wake);
        let p = &mut storage.persistence;
        let worker = WorkerContext::new("w");
        assert_eq!(p.fetch_next(&worker).await.unwrap().len(), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(p.fetch_next(&worker).await.unwrap().is_empty());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "no wake-up, no second fetch"
        );
    }

    /// At a clean stop the batches fetched ahead (taken by this worker, never handed to
    /// apalis) go back to the queue; the batch apalis already has is apalis's to hand back.
    #[tokio::test]
    async fn batches_fetched_ahead_go_back_to_the_queue_when_the_worker_closes() {
        use apalis_core::task::task_id::TaskId;
        let pool = apalis_sqlite::SqlitePool::connect("sqlite::memory:")
            .await
            .unwrap();
        apalis_sqlite::SqliteStorage::setup(&pool).await.unwrap();
        let ids: Vec<Ulid> = (0..3u64)
            .map(|i| Ulid::from_parts(1_700_000_000_000 + i, u128::from(i)))
            .collect();
        sqlx::query(
            "INSERT INTO Workers (id, worker_type, storage_name, layers, last_seen)
             VALUES ('w', 'default', 'SqliteStorage', '', strftime('%s', 'now'))",
        )
        .execute(&pool)
        .await
        .unwrap();
        for id in &ids {
            sqlx::query(
                "INSERT INTO Jobs (job, id, job_type, status, lock_by, lock_at)
                 VALUES (x'00', ?1, 'default', 'Queued', 'w', strftime('%s', 'now'))",
            )
            .bind(id.to_string())
            .execute(&pool)
            .await
            .unwrap();
        }
        // The first fetch: a full batch (of 1), the first job; the two fetched ahead: the others.
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch: Fetcher = {
            let (calls, ids) = (calls.clone(), ids.clone());
            Arc::new(move |_req| {
                let id = ids[calls.fetch_add(1, Ordering::SeqCst).min(2)];
                async move {
                    Ok(vec![
                        TaskBuilder::new(Vec::new())
                            .task_id(TaskId::from_ulid(id))
                            .build(),
                    ])
                }
                .boxed()
            })
        };
        let mut storage = QueueStorage::sqlite(
            &pool,
            Config::default().batch_size(1),
            fetch,
            Default::default(),
        );
        let worker = WorkerContext::new("w");
        assert_eq!(
            storage.persistence.fetch_next(&worker).await.unwrap().len(),
            1
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3, "two batches fetched ahead");
        futures::future::poll_fn(|cx| storage.poll_close(cx, &worker))
            .await
            .unwrap();
        let pending: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM Jobs WHERE status = 'Pending' AND lock_by IS NULL ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let mut back = vec![ids[1].to_string(), ids[2].to_string()];
        back.sort();
        assert_eq!(
            pending, back,
            "the two batches fetched ahead, and only those"
        );
    }
}
