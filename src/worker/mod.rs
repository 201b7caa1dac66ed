//! The workers: run the queue's jobs on apalis, one supervised apalis worker per job kind
//! ([`supervise`], [`Handler`]); this process's liveness lease; the wake-ups (in-process
//! submits, PostgreSQL's LISTEN, the due timer for delayed jobs); the janitor loop. Delivery itself (the handler
//! of [`SendJob`]) is in [`deliver`].
//!
//! Design choices forced by apalis 1.0 (see STACK-NOTES.md):
//! - a handler returns `Ok` for every outcome of its work; a retry (an SMTP 4xx) is a NEW job
//!   with a later `run_at`, pushed in the transaction that records the attempt (apalis has no
//!   backoff in the database); a write the database refuses is retried from memory;
//! - the backend is `queue::backend::QueueStorage`: apalis's own state machine and statements,
//!   batches fetched ahead, on SQLite its fetch run in the one writer's transactions;
//! - apalis's per-task lock and ack statements are off: the handler acks its job in the
//!   transaction that records what the job did (`queue::table::ack`), batched with others;
//! - the payload is read as raw JSON and parsed here, so a payload we cannot read is logged and
//!   dropped instead of killing the worker on every fetch;
//! - no apalis timeout, catch-panic or retry layers (they leave rows stuck); lettre's timeouts and
//!   the mailer's deadline bound every send;
//! - a unique worker name per start, a janitor that re-queues jobs of dead workers and repairs
//!   stuck rows, and a supervisor that restarts a worker that died on a database error;
//! - apalis is told to stop only after the handler has drained (see [`supervise`]).

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use futures::FutureExt;
use serde_json::Value;
use tracing::{debug, error, info, warn};

use crate::Shutdown;
pub use crate::queue::Wake;
use crate::queue::backend::{Fetcher, QueueStorage};
use crate::queue::{JobKind, QueueSettings, SendJob};
use crate::store::{Db, JanitorReport, RetentionSettings, Store, StoreError};

mod deliver;
pub use deliver::{Addressing, Deliverer, PauseCache, Shaping};

/// What the workers and their janitor read: the queue's section, retention, and how long
/// idempotency records are kept.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub queue: QueueSettings,
    pub retention: RetentionSettings,
    pub idempotency_ttl: Duration,
    /// `delivery.return_path` (VERP), checked.
    pub return_path: Option<String>,
    /// `api.public_url`: where one-click unsubscribe links point.
    pub public_url: Option<String>,
}

/// What runs the jobs of one kind `K`: at most [`window`] jobs per process at once (a handler
/// limits its own work within that). A job its worker did not ack before dying is handed back
/// by the janitor and runs again, so handlers are idempotent.
pub trait Handler<K: JobKind>: Send + Sync + 'static {
    /// Runs one job, and acks it (`queue::table::ack` of `task`, the apalis task id) in the
    /// transaction that records what it did: apalis's own lock and ack statements are off
    /// (see [`supervise`]). A job not acked stays taken by this worker; the janitor hands it
    /// back once the worker is gone. An error is a bug (the job is left to the janitor).
    /// `priority` is the job's apalis priority (higher first).
    fn handle(
        self: &Arc<Self>,
        job: K,
        task: String,
        priority: usize,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Acks a job whose payload could not be read (it is dropped).
    fn discard(self: &Arc<Self>, task: String) -> impl Future<Output = ()> + Send;

    /// Stops starting jobs and waits until those running have ended. Called before the apalis
    /// worker is stopped (see [`supervise`]).
    fn drain(&self) -> impl Future<Output = ()> + Send;
}

/// The apalis handler of kind `K`. An error returned here is a bug: apalis records nothing
/// (results are not persisted), so the job stays taken until the janitor hands it back once
/// this worker is gone. A payload that cannot be read, or of another version, is logged,
/// acked and dropped instead of killing the worker on every fetch.
async fn handle<K: JobKind, H: Handler<K>>(
    job: Value,
    task: TaskId,
    meta: MetadataStore,
    handler: Data<Arc<H>>,
) -> Result<(), BoxDynError> {
    let task = task.to_string();
    let priority = meta
        .get(crate::queue::table::PRIORITY_KEY)
        .and_then(|p| p.parse().ok())
        .unwrap_or_default();
    let job: K = match serde_json::from_value::<K>(job.clone()) {
        Ok(j) if j.version() == K::VERSION => j,
        Ok(j) => {
            warn!(
                kind = K::NAME,
                version = j.version(),
                "job payload version not understood; dropped"
            );
            // Boxed (as `Deliverer::defer_on_stop`): a rare path must not size the future of
            // every job a worker holds.
            Box::pin(handler.discard(task)).await;
            return Ok(());
        }
        Err(e) => {
            warn!(kind = K::NAME, error = %e, payload = %job, "unreadable job payload; dropped");
            Box::pin(handler.discard(task)).await;
            return Ok(());
        }
    };
    handler.handle(job, task, priority).await.map_err(|e| {
        error!(kind = K::NAME, error = %e,
            "the job failed; the janitor hands it back once this worker is gone");
        Box::new(e) as BoxDynError
    })
}

/// Runs the delivery workers and the janitor until `shutdown` fires; then stops fetching, lets
/// in-flight sends finish and returns.
pub async fn run(
    settings: &WorkerSettings,
    store: Store,
    deliverer: Arc<Deliverer>,
    wake: Arc<Wake>,
    shutdown: Shutdown,
) {
    let q = settings.queue.clone();
    // This process's liveness, which keeps its claims from being taken over: renewed every
    // heartbeat, valid for three.
    let node = deliverer.recorder.node().to_string();
    let lease = crate::store::node_lease(&node);
    let heartbeat = Duration::from_secs(q.heartbeat_secs);
    if let Err(e) = store.acquire_lease(&lease, &node, heartbeat * 3).await {
        warn!(error = %e, "cannot record this process's liveness; will try again");
    }
    // Relays' `max_connections` are shared by the live processes: this one's share, before
    // it sends, then at every heartbeat.
    deliverer.share_connections().await;
    let liveness = tokio::spawn({
        let (store, lease, node, shutdown, deliverer) = (
            store.clone(),
            lease.clone(),
            node.clone(),
            shutdown.clone(),
            deliverer.clone(),
        );
        async move {
            loop {
                tokio::select! {
                    _ = shutdown.clone() => return,
                    _ = tokio::time::sleep(heartbeat) => {}
                }
                if let Err(e) = store.acquire_lease(&lease, &node, heartbeat * 3).await {
                    warn!(error = %e, "cannot renew this process's liveness; will try again");
                }
                deliverer.share_connections().await;
            }
        }
    });
    let janitor = tokio::spawn(janitor_loop(
        settings.clone(),
        store.clone(),
        node.clone(),
        wake.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(wake_when_due(
        store.clone(),
        SendJob::job_type(&q.name),
        wake.clone(),
        shutdown.clone(),
    ));
    if let Db::Pg(pool, _) = store.db() {
        tokio::spawn(listen_for_jobs(
            pool.clone(),
            wake.clone(),
            shutdown.clone(),
        ));
    }
    let fetch: Fetcher = {
        let recorder = deliverer.recorder.clone();
        Arc::new(move |req| {
            let recorder = recorder.clone();
            async move { recorder.fetch(req).await.map_err(|e| e.to_string()) }.boxed()
        })
    };
    supervise::<SendJob, _>(
        &q,
        store.db(),
        &node,
        deliverer.clone(),
        &fetch,
        &wake,
        &shutdown,
    )
    .await;
    // Sends started by a worker that died are still running: let them finish and record.
    deliverer.drain().await;
    let _ = janitor.await;
    let _ = liveness.await;
    if let Err(e) = store.release_lease(&lease, &node).await {
        warn!(error = %e, "cannot release this process's liveness lease; it runs out by itself");
    }
}

/// Runs an apalis worker for the jobs of kind `K` until `shutdown`, restarting it (after
/// `queue.restart_delay_ms`) when it dies: apalis 1.0 ends a worker on one failed heartbeat or
/// fetch. The handler's jobs in flight are drained before apalis is told to stop. On SQLite
/// its fetches run in the one writer's transactions (`fetch`, see `queue::backend`).
async fn supervise<K: JobKind, H: Handler<K>>(
    q: &QueueSettings,
    db: &Db,
    node: &str,
    handler: Arc<H>,
    fetch: &Fetcher,
    wake: &Arc<Wake>,
    shutdown: &Shutdown,
) {
    let job_type = K::job_type(&q.name);
    let mut restarts = 0u32;
    loop {
        let name = format!("postbox-{}-{node}-{restarts}", K::NAME);
        restarts += 1;
        let strategy = || {
            Strategy::new()
                .stream(wake.stream())
                .interval(Duration::from_millis(q.poll_interval_ms))
        };
        let heartbeat = Duration::from_secs(q.heartbeat_secs);
        // apalis is stopped only after our deliveries in flight have finished and recorded
        // (`drain`), not when the process is told to stop. apalis 1.0 stops polling its own
        // futures at once, and one of them can be inside a short write transaction (a
        // heartbeat, a fetch, an ack): SQLite's write lock then stays taken until `run_until`
        // returns, which waits for the in-flight handlers, whose outcomes need that lock.
        // Seen as every outcome of a clean stop failing with "database is locked" (1 stop in
        // ~10 under load) and those emails sent again after the restart.
        let stop = {
            let (sd, h) = (shutdown.clone(), handler.clone());
            async move {
                sd.await;
                h.drain().await;
                Ok::<(), std::io::Error>(())
            }
        };
        info!(worker = %name, concurrency = q.concurrency, "worker started");
        // A new worker looks for work at once: a wake-up the worker before it consumed (a
        // fetch that failed and ended it, or one made before it was registered) is not lost
        // until the next poll (`queue.poll_interval_ms`, long when the due timer and NOTIFY
        // do the waking).
        wake.notify();
        let config = apalis_sqlite::Config::default()
            .queue(&job_type)
            .batch_size(fetch_size(q, db))
            .heartbeat_interval(heartbeat)
            .lock_tasks(false)
            .persist_results(false);
        let storage = match db {
            Db::Sqlite { write: pool, .. } => {
                QueueStorage::sqlite(pool, config, fetch.clone(), wake.clone())
            }
            Db::Pg(pool, _) => QueueStorage::postgres(pool, config, wake.clone()),
        };
        let res = WorkerBuilder::new(name.as_str())
            .backend(storage.poll_with_strategy(strategy()))
            .data(handler.clone())
            .concurrency(window(q, db))
            .build(handle::<K, H>)
            .run_until(stop)
            .await
            .map_err(|e| e.to_string());
        if shutdown.clone().now_or_never().is_some() {
            info!(worker = %name, "worker stopped");
            break;
        }
        match res {
            Ok(()) => warn!(worker = %name, "worker ended unexpectedly; restarting"),
            Err(e) => error!(worker = %name, error = %e, "worker died; restarting"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(q.restart_delay_ms)) => {}
            _ = shutdown.clone() => break,
        }
    }
}

/// Jobs a worker holds at once (fetched and not yet ended): on PostgreSQL twice
/// `queue.concurrency + queue.batch_size`, on SQLite [`SQLITE_WINDOW`] times that. A job holds
/// its place from its fetch to the commit of its outcome, and every write between (fetch,
/// claim, outcome) waits its turn on the one writer. What is claimed of them ahead of the send
/// slots is limited apart (`Deliverer::claims_ahead`); the rest are taken by this worker but
/// not claimed, and go back to the queue if it dies (no resend, no `interrupted`). Each claimed
/// one is what a crash can leave `sending` (README, "Duplicates").
///
/// On PostgreSQL a worker's jobs are taken from other processes' reach (`FOR UPDATE SKIP
/// LOCKED`), so it holds few. On SQLite one process does the work, and what bounds it is the
/// writer: every transaction costs a few milliseconds whatever it carries (its statements'
/// round trips to SQLite's thread, the fsync), so throughput is the emails per transaction
/// over that. Measured at the peer harness's settings (concurrency 8, batch 8; 5,000 emails
/// POSTed in batches of 500 to `postbox serve`, `synchronous = FULL`): twice (c + b) and
/// fetches of 8 made 632 transactions of 8 claims and 8 outcomes, 1,240-1,340 delivered/s;
/// holding 16 x (c + b), fetching up to a quarter of it and claiming ahead as
/// `Deliverer::claims_ahead` allows, 107-118 transactions of ~45, 1,962-2,263 delivered/s
/// (alternated three times in one sitting, `smtp-sink -c`).
fn window(q: &QueueSettings, db: &Db) -> usize {
    match db {
        Db::Sqlite { .. } => SQLITE_WINDOW * (q.concurrency + q.batch_size),
        Db::Pg(..) => 2 * (q.concurrency + q.batch_size),
    }
}

/// See [`window`].
const SQLITE_WINDOW: usize = 16;

/// Jobs per fetch: `queue.batch_size`; on SQLite, where a fetch is a statement in the
/// writer's transaction rather than a round trip, up to a quarter of the [`window`] (at least
/// `queue.batch_size`), so that one transaction can take what the last one finished.
fn fetch_size(q: &QueueSettings, db: &Db) -> usize {
    match db {
        Db::Sqlite { .. } => q.batch_size.max(window(q, db) / 4),
        Db::Pg(..) => q.batch_size,
    }
}

/// How long the due timer trusts what it read: it reads again this often even when this
/// process scheduled nothing (another process may have: PostgreSQL, or the CLI on SQLite).
const DUE_RECHECK: Duration = Duration::from_secs(5);

/// Wakes this process's idle workers when the next delayed job (a retry's backoff, a
/// `send_at`) falls due: a timer set for the earliest pending run time, read again after each
/// commit that scheduled one (`Store::scheduled`) and every [`DUE_RECHECK`]. So a retry runs
/// on time without the workers polling; `queue.poll_interval_ms` is only the backstop.
async fn wake_when_due(store: Store, job_type: String, wake: Arc<Wake>, shutdown: Shutdown) {
    let now_s = || time::OffsetDateTime::now_utc().unix_timestamp();
    // Jobs due at or before this second have had their wake-up.
    let mut horizon = now_s();
    loop {
        let next = match crate::queue::table::next_due(store.db(), &job_type, horizon).await {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %StoreError::from(e), "cannot read when the next job is due; will try again");
                None
            }
        };
        let now = time::OffsetDateTime::now_utc();
        let wait = match next {
            Some(t) if t <= now.unix_timestamp() => {
                horizon = now.unix_timestamp();
                wake.notify();
                continue;
            }
            Some(t) => {
                let until = time::OffsetDateTime::from_unix_timestamp(t).unwrap_or(now) - now;
                Duration::try_from(until)
                    .unwrap_or_default()
                    .min(DUE_RECHECK)
            }
            None => DUE_RECHECK,
        };
        tokio::select! {
            _ = shutdown.clone() => return,
            _ = store.scheduled().notified() => {}
            _ = tokio::time::sleep(wait) => {
                if next.is_some_and(|t| t <= now_s()) {
                    horizon = now_s();
                    wake.notify();
                }
            }
        }
    }
}

/// PostgreSQL: wakes this process's idle workers when any process queues a job that is due
/// now (apalis's insert trigger sends NOTIFY on `apalis::job::insert`; a burst of notifications
/// makes one wake-up). Delayed jobs are found by the poll interval. Reconnects on error.
async fn listen_for_jobs(pool: sqlx::PgPool, wake: Arc<Wake>, shutdown: Shutdown) {
    use futures::StreamExt;
    loop {
        let listened = async {
            let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
            l.listen("apalis::job::insert").await?;
            debug!("listening for new jobs");
            // Jobs queued while we were not listening.
            wake.notify();
            let mut stream = l.into_stream();
            while let Some(n) = stream.next().await {
                n?;
                wake.notify();
            }
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            _ = shutdown.clone() => return,
            r = listened => if let Err(e) = r {
                warn!(error = %e, "LISTEN connection lost; reconnecting");
            },
        }
        tokio::select! {
            _ = shutdown.clone() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// One janitor pass with the thresholds the settings give.
pub async fn janitor_pass(
    settings: &WorkerSettings,
    store: &Store,
    me: &str,
) -> Result<JanitorReport, StoreError> {
    let q = &settings.queue;
    let r = &settings.retention;
    store
        .janitor(
            me,
            Duration::from_secs(q.heartbeat_secs * 2),
            Duration::from_secs(q.stuck_after_secs),
            Duration::from_secs(r.finished_jobs_hours * 3600),
            (r.emails_days > 0).then(|| Duration::from_secs(r.emails_days * 24 * 3600)),
            settings.idempotency_ttl,
        )
        .await
}

async fn janitor_loop(
    settings: WorkerSettings,
    store: Store,
    me: String,
    wake: Arc<Wake>,
    shutdown: Shutdown,
) {
    let interval = Duration::from_secs(settings.queue.janitor_interval_secs);
    let mut failures = 0u32;
    loop {
        let mut pause = interval;
        match janitor_pass(&settings, &store, &me).await {
            Ok(r) => {
                failures = 0;
                if r != Default::default() {
                    info!(report = ?r, "janitor pass");
                }
                // Jobs it handed back (a dead worker's, a lost one's) are taken now, not at
                // the next poll: the workers are woken as by a submit.
                if r.jobs_requeued > 0 || r.emails_rescued > 0 {
                    wake.notify();
                }
                // Retention has more to delete: the next pass after a breath, not a whole
                // interval (each pass spends at most RETENTION_BUDGET on it).
                if r.retention_left {
                    pause = pause.min(Duration::from_secs(1));
                }
            }
            Err(e) => {
                failures += 1;
                warn!(error = %e, failures, "janitor pass failed; will try again");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.clone() => return,
        }
    }
}

/// A name for this process, unique across hosts and restarts: `host-pid-ulid`.
pub(crate) fn node_name() -> String {
    format!(
        "{}-{}-{}",
        hostname(),
        std::process::id(),
        ulid::Ulid::generate()
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}
