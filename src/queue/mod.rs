//! The queue side: the apalis worker that delivers emails, its supervisor, the wake-up signal for
//! in-process submits, and the janitor.
//!
//! Design choices forced by apalis 1.0 (see STACK-NOTES.md):
//! - the handler always returns `Ok` for anything SMTP says; a retry is a NEW job with a later
//!   `run_at`, written in the same transaction as the attempt (apalis has no backoff in the DB);
//! - the job payload is read as raw JSON and parsed here, so a payload we cannot read is logged and
//!   dropped instead of killing the worker on every fetch;
//! - no apalis timeout, catch-panic or retry layers (they leave rows stuck); lettre's timeouts and
//!   the mailer's deadline bound every send;
//! - a unique worker name per start, a janitor that re-queues jobs of dead workers and repairs
//!   stuck rows, and a supervisor that restarts a worker that died on a database error.

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use futures::task::AtomicWaker;
use serde_json::Value;
use time::OffsetDateTime;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::Settings;

mod settings;
use crate::delivery::{Decision, Mailer, Outcome, RetryPolicy, build_message};
use crate::domain::address::mask;
use crate::render::render;
use crate::store::{
    AttemptRecord, Claim, ClaimResult, Db, Finish, JanitorReport, SendJob, Store, StoreError,
};
pub use settings::QueueSettings;

/// A shutdown signal every loop can await (cloneable).
pub type Shutdown = Shared<BoxFuture<'static, ()>>;

/// Turns any future into a [`Shutdown`].
pub fn shutdown_signal(f: impl Future<Output = ()> + Send + 'static) -> Shutdown {
    f.boxed().shared()
}

/// Wakes an idle worker at once when this process submits mail, so latency is not the poll
/// interval. Coalescing: a thousand submits make one wake-up.
#[derive(Debug, Default)]
pub struct Wake {
    pending: AtomicBool,
    waker: AtomicWaker,
}

impl Wake {
    pub fn notify(&self) {
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn stream(self: &Arc<Self>) -> WakeStream {
        WakeStream(self.clone())
    }
}

struct WakeStream(Arc<Wake>);

impl futures::Stream for WakeStream {
    type Item = ();
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        self.0.waker.register(cx.waker());
        if self.0.pending.swap(false, Ordering::AcqRel) {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

/// Everything a delivery needs; shared by all concurrent handler calls.
///
/// Each delivery runs as a task of its own ([`Deliverer::spawn`]), not inside the apalis
/// worker's future: when a worker dies (one failed heartbeat ends it), its sends in flight still
/// finish and are recorded. [`Deliverer::drain`] waits for them at shutdown.
#[derive(Debug)]
pub struct Deliverer {
    store: Store,
    mailer: Mailer,
    policy: RetryPolicy,
    /// This process, as recorded in its claims.
    node: String,
    /// Emails being delivered by this process now: a second job for one of them (a repeated or
    /// recovered job) does nothing.
    in_flight: std::sync::Mutex<std::collections::HashSet<String>>,
    tasks: tokio_util::task::TaskTracker,
    /// Fires when the process is stopping: recording retries give up after [`RECORD_GRACE`].
    shutdown: Shutdown,
    /// Set once the process is stopping: jobs handed over from then on are deferred, not run.
    stopping: AtomicBool,
}

/// How long a known outcome is retried into the database once the process is stopping.
const RECORD_GRACE: Duration = Duration::from_secs(10);
/// When a job handed over while the process stops is due again (not at once, or the stopping
/// worker would fetch it again and again).
const DEFER_ON_STOP: Duration = Duration::from_secs(2);

/// Removes an email from the in-flight set when its delivery ends, however it ends.
struct InFlight<'a> {
    set: &'a std::sync::Mutex<std::collections::HashSet<String>>,
    id: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Deliverer {
    pub fn new(
        store: Store,
        mailer: Mailer,
        policy: RetryPolicy,
        node: String,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            store,
            mailer,
            policy,
            node,
            in_flight: Default::default(),
            tasks: tokio_util::task::TaskTracker::new(),
            shutdown,
            stopping: AtomicBool::new(false),
        }
    }

    /// Runs [`Deliverer::deliver`] as a task of its own and waits for it. Once the process is
    /// stopping, the job is deferred instead (its email gets a new job for the next process).
    pub async fn spawn(self: &Arc<Self>, job: SendJob) -> Result<(), StoreError> {
        if self.stopping.load(Ordering::Acquire) {
            let later = OffsetDateTime::now_utc() + DEFER_ON_STOP;
            return self.store.defer(&job.email_id, job.seq, later).await;
        }
        let me = self.clone();
        match self.tasks.spawn(async move { me.deliver(job).await }).await {
            Ok(r) => r,
            // deliver() catches panics around the attempt; one elsewhere is a bug, reported
            // as an error (the job runs again, and a claim that went through is safe).
            Err(e) => Err(StoreError::Queue(format!("a delivery task failed: {e}"))),
        }
    }

    /// Stops starting deliveries and waits until every delivery task has ended.
    pub async fn drain(&self) {
        self.stopping.store(true, Ordering::Release);
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Runs one job: claim, render, send, record. Idempotent: a stale or repeated job does nothing.
    pub async fn deliver(&self, job: SendJob) -> Result<(), StoreError> {
        if !self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.email_id.clone())
        {
            debug!(email_id = %job.email_id, seq = job.seq, "already being delivered by this process");
            return Ok(());
        }
        let _in_flight = InFlight {
            set: &self.in_flight,
            id: job.email_id.clone(),
        };
        // After a full disk, SQLite's WAL must be given back before deliveries write again.
        self.store.wal_reclaimed(self.shutdown.clone()).await;
        let claimed = self.store.claim(&job.email_id, job.seq, &self.node).await;
        if let Err(e) = &claimed {
            self.store.saw(e);
        }
        let claim = match claimed? {
            ClaimResult::Claimed(c) => c,
            ClaimResult::Skip(why) => {
                debug!(email_id = %job.email_id, seq = job.seq, why, "job has nothing to do");
                return Ok(());
            }
            ClaimResult::Expired => {
                info!(email_id = %job.email_id, "email expired before delivery");
                return Ok(());
            }
            ClaimResult::Failed(reason) => {
                warn!(email_id = %job.email_id, %reason, "failed; moved to dead letters");
                return Ok(());
            }
        };
        let span = info_span!("deliver", email_id = %claim.id, attempt = claim.attempt);
        async {
            if claim.interrupted {
                warn!("previous attempt was interrupted; sending again with the same Message-ID");
            }
            let started_at = OffsetDateTime::now_utc();
            let t0 = Instant::now();
            // A panic (a bug in rendering, MIME building or a transport) fails this email with
            // the reason; nothing else stops.
            let outcome = match AssertUnwindSafe(self.attempt(&claim)).catch_unwind().await {
                Ok(o) => o,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    error!(panic = %what, "the delivery panicked; failing this email");
                    Outcome::Permanent {
                        code: None,
                        text: format!("internal error: the delivery panicked ({what})"),
                    }
                }
            };
            let rec = AttemptRecord {
                started_at,
                duration_ms: t0.elapsed().as_millis() as i64,
                smtp_code: outcome.code(),
                smtp_text: outcome.text().to_string(),
            };
            let finish = match &outcome {
                Outcome::Sent { .. } => Finish::Sent,
                Outcome::Permanent { text, .. } => Finish::Failed {
                    reason: format!("permanent failure: {text}"),
                },
                Outcome::Temporary { text, .. } => {
                    let age = (OffsetDateTime::now_utc() - claim.age_from)
                        .try_into()
                        .unwrap_or(Duration::ZERO);
                    match self
                        .policy
                        .after_temporary_failure(claim.attempt, age, rand::random::<f64>())
                    {
                        Decision::RetryAfter(d) => Finish::Retry {
                            at: OffsetDateTime::now_utc() + d,
                        },
                        Decision::GiveUp(why) => Finish::Failed {
                            reason: format!("{why}; last reply: {text}"),
                        },
                    }
                }
            };
            let recorded = self.record(&claim, &rec, &finish).await?;
            metrics::histogram!("postbox_smtp_transaction_seconds")
                .record(rec.duration_ms as f64 / 1e3);
            metrics::counter!("postbox_smtp_replies_total",
                "code" => rec.smtp_code.map_or_else(|| "none".to_string(), |c| c.to_string()))
            .increment(1);
            if recorded {
                let [(_, priority), (_, template)] = crate::metrics::email_labels(&claim.email);
                let name = match finish {
                    Finish::Sent => "postbox_emails_sent_total",
                    Finish::Retry { .. } => "postbox_emails_retried_total",
                    Finish::Failed { .. } => "postbox_emails_failed_total",
                };
                metrics::counter!(name, "priority" => priority, "template" => template).increment(1);
            }
            let rcpts: Vec<String> = claim.email.recipients().map(|a| mask(a.address())).collect();
            match (&finish, recorded) {
                (_, false) => warn!("attempt superseded while in flight; not recorded"),
                (Finish::Sent, _) => info!(code = ?rec.smtp_code, ms = rec.duration_ms, to = ?rcpts, "sent"),
                (Finish::Retry { at }, _) => warn!(code = ?rec.smtp_code, reply = %rec.smtp_text, retry_at = %at, "temporary failure; will retry"),
                (Finish::Failed { reason }, _) => warn!(code = ?rec.smtp_code, %reason, to = ?rcpts, "failed; moved to dead letters"),
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Render, build the MIME message, send.
    async fn attempt(&self, claim: &Claim) -> Outcome {
        let first = claim.email.to.first().map_or("", |a| a.address());
        if crate::faults::hit(crate::faults::DELIVERY_PANIC, first) {
            panic!("injected fault: the delivery of {} panics", claim.id);
        }
        match render(&claim.email)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                build_message(&claim.email, &r, &claim.message_id).map_err(|e| e.to_string())
            }) {
            Ok(msg) => self.mailer.send(&msg, claim.id.as_str()).await,
            Err(text) => Outcome::Permanent { code: None, text },
        }
    }

    /// Records a known outcome, retrying from memory while the database refuses (busy, full,
    /// unreachable): the message is never sent again for a failed write. Once the process is
    /// stopping, it tries for [`RECORD_GRACE`] more, then gives up; the email then stays
    /// `sending` and is sent again after a restart (the one duplicate the README admits).
    async fn record(
        &self,
        claim: &Claim,
        rec: &AttemptRecord,
        finish: &Finish,
    ) -> Result<bool, StoreError> {
        let mut pause = Duration::from_millis(50);
        let mut stopping_since: Option<Instant> = None;
        loop {
            match self.store.finish(claim, rec, finish).await {
                Ok(recorded) => return Ok(recorded),
                Err(e) => {
                    self.store.saw(&e);
                    if stopping_since.is_none() && self.shutdown.clone().now_or_never().is_some() {
                        stopping_since = Some(Instant::now());
                    }
                    if stopping_since.is_some_and(|t| t.elapsed() > RECORD_GRACE) {
                        error!(error = %e, "the outcome could not be recorded before shutdown; \
                            the email will be sent again after a restart");
                        return Err(e);
                    }
                    warn!(error = %e, retry_in_ms = pause.as_millis() as u64,
                        "cannot record the outcome yet; retrying (the message is not sent again)");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// The apalis handler. Errors returned here are infrastructure errors (the database); apalis
/// retries those at once, the email row is untouched or consistent either way.
async fn handle(job: Value, deliverer: Data<Arc<Deliverer>>) -> Result<(), BoxDynError> {
    let job: SendJob = match serde_json::from_value::<SendJob>(job.clone()) {
        Ok(j) if j.v == SendJob::VERSION => j,
        Ok(j) => {
            warn!(version = j.v, "job payload version not understood; dropped");
            return Ok(());
        }
        Err(e) => {
            warn!(error = %e, payload = %job, "unreadable job payload; dropped");
            return Ok(());
        }
    };
    deliverer.spawn(job).await.map_err(|e| {
        error!(error = %e, "delivery could not be recorded; the job will run again");
        Box::new(e) as BoxDynError
    })
}

/// Runs the delivery workers and the janitor until `shutdown` fires; then stops fetching, lets
/// in-flight sends finish and returns.
pub async fn run(
    settings: &Settings,
    store: Store,
    deliverer: Arc<Deliverer>,
    wake: Arc<Wake>,
    shutdown: Shutdown,
) {
    let q = settings.queue.clone();
    // This process's liveness, which keeps its claims from being taken over: renewed every
    // heartbeat, valid for three.
    let node = deliverer.node.clone();
    let lease = crate::store::node_lease(&node);
    let heartbeat = Duration::from_secs(q.heartbeat_secs);
    if let Err(e) = store.acquire_lease(&lease, &node, heartbeat * 3).await {
        warn!(error = %e, "cannot record this process's liveness; will try again");
    }
    let liveness = tokio::spawn({
        let (store, lease, node, shutdown) =
            (store.clone(), lease.clone(), node.clone(), shutdown.clone());
        async move {
            loop {
                tokio::select! {
                    _ = shutdown.clone() => return,
                    _ = tokio::time::sleep(heartbeat) => {}
                }
                if let Err(e) = store.acquire_lease(&lease, &node, heartbeat * 3).await {
                    warn!(error = %e, "cannot renew this process's liveness; will try again");
                }
            }
        }
    });
    let janitor = tokio::spawn(janitor_loop(
        settings.clone(),
        store.clone(),
        deliverer.node.clone(),
        shutdown.clone(),
    ));
    if let Db::Pg(pool, _) = store.db() {
        tokio::spawn(listen_for_jobs(
            pool.clone(),
            wake.clone(),
            shutdown.clone(),
        ));
    }
    let mut restarts = 0u32;
    loop {
        let name = format!("postbox-{node}-{restarts}");
        restarts += 1;
        let strategy = || {
            Strategy::new()
                .stream(wake.stream())
                .interval(Duration::from_millis(q.poll_interval_ms))
        };
        let heartbeat = Duration::from_secs(q.heartbeat_secs);
        macro_rules! worker {
            ($backend:expr) => {
                WorkerBuilder::new(name.as_str())
                    .backend($backend.poll_with_strategy(strategy()))
                    .data(deliverer.clone())
                    .concurrency(q.concurrency)
                    .build(handle)
            };
        }
        // apalis is stopped only after our deliveries in flight have finished and recorded
        // (`drain`), not when the process is told to stop. apalis 1.0 stops polling its own
        // futures at once, and one of them can be inside a short write transaction (a
        // heartbeat, a fetch, an ack): SQLite's write lock then stays taken until `run_until`
        // returns, which waits for the in-flight handlers, whose outcomes need that lock.
        // Seen as every outcome of a clean stop failing with "database is locked" (1 stop in
        // ~10 under load) and those emails sent again after the restart.
        let stop = {
            let (sd, d) = (shutdown.clone(), deliverer.clone());
            async move {
                sd.await;
                d.drain().await;
                Ok::<(), std::io::Error>(())
            }
        };
        info!(worker = %name, concurrency = q.concurrency, "delivery worker started");
        let res = match store.db() {
            Db::Sqlite(pool) => {
                let config = apalis_sqlite::Config::default()
                    .queue(&q.name)
                    .batch_size(q.batch_size)
                    .heartbeat_interval(heartbeat);
                worker!(SqliteStorage::<Value>::new(pool).with_config(config))
                    .run_until(stop)
                    .await
                    .map_err(|e| e.to_string())
            }
            Db::Pg(pool, _) => {
                let config = apalis_postgres::Config::default()
                    .queue(&q.name)
                    .batch_size(q.batch_size)
                    .heartbeat_interval(heartbeat);
                worker!(PostgresStorage::<Value>::new(pool).with_config(config))
                    .run_until(stop)
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        if shutdown.clone().now_or_never().is_some() {
            info!(worker = %name, "delivery worker stopped");
            break;
        }
        match res {
            Ok(()) => warn!(worker = %name, "delivery worker ended unexpectedly; restarting"),
            Err(e) => error!(worker = %name, error = %e, "delivery worker died; restarting"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(q.restart_delay_ms)) => {}
            _ = shutdown.clone() => break,
        }
    }
    // Sends started by a worker that died are still running: let them finish and record.
    deliverer.drain().await;
    let _ = janitor.await;
    let _ = liveness.await;
    if let Err(e) = store.release_lease(&lease, &node).await {
        warn!(error = %e, "cannot release this process's liveness lease; it runs out by itself");
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
    settings: &Settings,
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
            Duration::from_secs(settings.api.idempotency_ttl_hours * 3600),
        )
        .await
}

async fn janitor_loop(settings: Settings, store: Store, me: String, shutdown: Shutdown) {
    let pause = Duration::from_secs(settings.queue.janitor_interval_secs);
    let mut failures = 0u32;
    loop {
        match janitor_pass(&settings, &store, &me).await {
            Ok(r) => {
                failures = 0;
                if r != Default::default() {
                    info!(report = ?r, "janitor pass");
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
