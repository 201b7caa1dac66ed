//! The delivery of one email: the [`Handler`] of [`SendJob`]s.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use time::OffsetDateTime;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::Handler;
use crate::Shutdown;
use crate::delivery::{
    Decision, DkimSigner, Limiter, Mailer, Outcome, Outgoing, Pick, RetryPolicy, Sent, Turn,
    build_message_for,
};
use crate::domain::Email;
use crate::domain::address::mask;
use crate::queue::SendJob;
use crate::render::render;
use crate::store::{
    AttemptRecord, Claim, ClaimResult, Completion, Finish, Pause, PauseKind, Recorder, Store,
    StoreError, suppression_key,
};

/// Everything a delivery needs; shared by all concurrent handler calls.
///
/// Each delivery runs as a task of its own ([`Deliverer::spawn`]), not inside the apalis
/// worker's future: when a worker dies (one failed heartbeat ends it), its sends in flight still
/// finish and are recorded. [`Deliverer::drain`] waits for them at shutdown.
#[derive(Debug)]
pub struct Deliverer {
    /// `delivery.return_path` (VERP): the envelope sender, `{id}` filled in.
    return_path: Option<String>,
    /// `api.public_url` and the signing key of one-click unsubscribe links.
    unsubscribe: Option<(String, Vec<u8>)>,
    store: Store,
    /// Writes claims and completions, batched with other deliveries' (and, on SQLite, the
    /// workers' fetches: `queue::backend`).
    pub(super) recorder: Recorder,
    mailer: Mailer,
    policy: RetryPolicy,
    /// Emails being delivered by this process now: a second job for one of them (a repeated or
    /// recovered job) does nothing.
    in_flight: std::sync::Mutex<std::collections::HashSet<String>>,
    tasks: tokio_util::task::TaskTracker,
    /// Fires when the process is stopping: recording retries give up after [`RECORD_GRACE`].
    shutdown: Shutdown,
    /// Set once the process is stopping: jobs handed over from then on are deferred, not run.
    stopping: AtomicBool,
    /// `queue.concurrency`: attempts (render + SMTP transaction) at once. More jobs than this
    /// are in flight (see `worker::window`): they claim together, in batches, and wait here.
    /// An email on its way here (a claims-ahead place taken, see [`Deliverer::spawn`]) holds
    /// back the emails of lower priority already waiting ([`Coming`]).
    sends: Arc<Gate>,
    /// Claims ahead of the send slots (see [`Deliverer::claims_ahead`]).
    claims: Arc<Gate>,
    /// Jobs handed to [`Deliverer::deliver`] so far: their order at the claims gate.
    arrivals: std::sync::atomic::AtomicU64,
    shaping: Shaping,
}

/// What shapes the traffic beyond the send slots: rate limits and throttling, DKIM keys,
/// operator pauses.
#[derive(Debug, Clone)]
pub struct Shaping {
    /// `queue.concurrency`: attempts at once in this process.
    pub concurrency: usize,
    /// `queue.batch_size`: with `concurrency`, the least of the claims made ahead of the send
    /// slots (see [`Deliverer::claims_ahead`]).
    pub batch_size: usize,
    pub limiter: Arc<Limiter>,
    pub dkim: DkimSigner,
    pub pauses: Arc<PauseCache>,
}

/// The pauses as this process's deliveries see them: read from the database at most every
/// [`PAUSES_FRESH`], and at once after a pause or resume made in this process.
#[derive(Debug, Default)]
pub struct PauseCache {
    read: std::sync::Mutex<Option<(Instant, Arc<Vec<Pause>>)>>,
    /// One read of the database at a time.
    refresh: tokio::sync::Mutex<()>,
}

const PAUSES_FRESH: Duration = Duration::from_secs(2);
/// How long a paused email waits before it looks again (resuming releases it at once).
const PAUSE_HOLD: Duration = Duration::from_secs(600);

fn far_hold() -> SystemTime {
    SystemTime::now() + PAUSE_HOLD
}

impl PauseCache {
    fn fresh(&self) -> Option<Arc<Vec<Pause>>> {
        let r = self.read.lock().unwrap_or_else(|p| p.into_inner());
        r.as_ref()
            .filter(|(at, _)| at.elapsed() < PAUSES_FRESH)
            .map(|(_, l)| l.clone())
    }

    /// Forgets what was read: the next delivery reads the pauses again.
    pub fn invalidate(&self) {
        *self.read.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    async fn current(&self, store: &Store) -> Arc<Vec<Pause>> {
        if let Some(l) = self.fresh() {
            return l;
        }
        let _one = self.refresh.lock().await;
        if let Some(l) = self.fresh() {
            return l;
        }
        match store.pauses().await {
            Ok(list) => {
                let list = Arc::new(list);
                *self.read.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), list.clone()));
                list
            }
            Err(e) => {
                warn!(error = %e, "cannot read the pauses; using the last ones read");
                let r = self.read.lock().unwrap_or_else(|p| p.into_inner());
                r.as_ref().map(|(_, l)| l.clone()).unwrap_or_default()
            }
        }
    }
}

/// How long the email has been due (its retry age: `[retry] max_age_secs` ends it, throttled
/// or not).
fn age_of(claim: &Claim) -> Duration {
    (OffsetDateTime::now_utc() - claim.age_from)
        .try_into()
        .unwrap_or(Duration::ZERO)
}

/// The note of the first pause (by recipient domain or tag) that holds `email`.
fn held_by(pauses: &[Pause], email: &Email) -> Option<String> {
    pauses.iter().find_map(|p| {
        let hit = match p.kind {
            PauseKind::Relay => false,
            PauseKind::Tag => email.tags.contains(&p.value),
            PauseKind::Domain => email.recipients().any(|a| {
                a.address()
                    .rsplit_once('@')
                    .is_some_and(|(_, d)| d.eq_ignore_ascii_case(&p.value))
            }),
        };
        hit.then(|| Pause::hold_note(p.kind, &p.value))
    })
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

/// How emails are addressed beyond their own fields: the VERP return path
/// (`delivery.return_path`, `{id}` not yet filled in) and where one-click unsubscribe links
/// point with the key that signs them (`api.public_url`).
#[derive(Debug, Clone, Default)]
pub struct Addressing {
    pub return_path: Option<String>,
    pub unsubscribe: Option<(String, Vec<u8>)>,
}

impl Deliverer {
    pub fn new(
        store: Store,
        recorder: Recorder,
        mailer: Mailer,
        policy: RetryPolicy,
        addressing: Addressing,
        shaping: Shaping,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            return_path: addressing.return_path,
            unsubscribe: addressing.unsubscribe,
            recorder,
            store,
            mailer,
            policy,
            in_flight: Default::default(),
            tasks: tokio_util::task::TaskTracker::new(),
            shutdown,
            stopping: AtomicBool::new(false),
            sends: Arc::new(Gate::new(shaping.concurrency)),
            claims: Arc::new(Gate::new(shaping.concurrency + shaping.batch_size)),
            arrivals: Default::default(),
            shaping,
        }
    }

    /// Runs [`Deliverer::deliver`] as a task of its own and waits for it (its outcome
    /// recorded). Once the process is stopping, the job is deferred instead (its email gets a
    /// new job for the next process).
    pub async fn spawn(
        self: &Arc<Self>,
        job: SendJob,
        task: String,
        priority: usize,
    ) -> Result<(), StoreError> {
        if self.stopping.load(Ordering::Acquire) {
            return self.defer_on_stop(&job, &task).await;
        }
        // A place among the claims ahead of the send slots, held until this email has a send
        // slot (or its delivery ends): the job of the highest priority first, then in the
        // order the jobs arrived. Taken here, before the delivery's own task starts: apalis
        // runs this future in the order it hands the jobs out (the fetch's: priority first),
        // so the first jobs of a batch to take free places are its most urgent ones.
        self.claims.set_limit(self.claims_ahead());
        let arrival = self.arrivals.fetch_add(1, Ordering::Relaxed);
        let ahead = self
            .claims
            .acquire_owned(priority, &format!("{arrival:020}"))
            .await;
        // The process may have begun to stop while this job waited for its place.
        if self.stopping.load(Ordering::Acquire) {
            drop(ahead);
            return self.defer_on_stop(&job, &task).await;
        }
        // From here on this email is on its way to a send slot: until it is there (or its
        // delivery ends), no email of lower priority takes one. Its claim is committed in
        // whichever of the writer's transactions the delivery tasks reach first (tokio runs
        // them in any order), so a less urgent email claimed sooner would otherwise find a
        // free slot before it.
        let coming = self.sends.coming(priority);
        let me = self.clone();
        match self
            .tasks
            .spawn(async move { me.deliver(job, task, ahead, coming).await })
            .await
        {
            Ok(r) => r,
            // deliver() catches panics around the attempt; one elsewhere is a bug, reported
            // as an error (the job, not acked, is handed back once this worker is gone; a
            // claim that went through is safe).
            Err(e) => Err(StoreError::Queue(format!("a delivery task failed: {e}"))),
        }
    }

    /// Gives a job handed over while the process stops a new run time ([`DEFER_ON_STOP`]).
    ///
    /// Boxed: up to [`super::window`] jobs wait in [`Deliverer::spawn`] at once, and a future is
    /// as large as its largest await. Inline, this transaction's future (14.8 KB in the release
    /// build) was in each of them; boxed, a waiting job's handler future is 400 bytes (both
    /// printed by a build that measured them). Peak RSS, `postbox serve` at the peer harness's
    /// settings (5,000 emails in batches of 500), twice each: 41.7 / 42.3 -> 37.8 / 38.0 MB.
    fn defer_on_stop<'a>(
        &'a self,
        job: &'a SendJob,
        task: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<(), StoreError>> {
        let later = OffsetDateTime::now_utc() + DEFER_ON_STOP;
        Box::pin(self.store.defer(&job.email_id, job.seq, later, task))
    }

    /// How many emails may be claimed ahead of the send slots (claimed or being claimed, not
    /// yet sending): `queue.concurrency + queue.batch_size`, or [`CLAIMS_PER_OUTCOME`] times
    /// the outcomes the writer committed in its recent transactions when that is more.
    ///
    /// Claims and outcomes are committed in batches (`store::Recorder`), one transaction at a
    /// time, so what the sends can take during one transaction must already be claimed when
    /// it starts. When the relay is fast and the writer is the bound, each transaction's
    /// outcomes grow, so does this, and with it the next transaction's claims: batches grow
    /// until the writer keeps up (at the peer harness's settings, from 8 emails per
    /// transaction to ~55). When the relay is the bound, the outcomes per transaction are
    /// few, and claims wait here instead of piling up `sending` (each one a resend, marked
    /// `interrupted`, after a crash).
    fn claims_ahead(&self) -> usize {
        (self.shaping.concurrency + self.shaping.batch_size)
            .max(CLAIMS_PER_OUTCOME * self.recorder.recent_completions())
    }

    /// Stops starting deliveries and waits until every delivery task has ended.
    pub async fn drain(&self) {
        self.stopping.store(true, Ordering::Release);
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Runs one job (apalis task `task`): claim, render, send, record, each write acking the
    /// job when it ends it. Idempotent: a stale or repeated job does nothing.
    ///
    /// `ahead` is its place among the claims ahead of the send slots (see [`Deliverer::spawn`]),
    /// given up once it has a send slot; `coming` holds back less urgent emails from the send
    /// slots until this one waits for one (or its delivery ends).
    async fn deliver(
        &self,
        job: SendJob,
        task: String,
        ahead: GatePass<Arc<Gate>>,
        coming: Coming,
    ) -> Result<(), StoreError> {
        if !self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.email_id.clone())
        {
            debug!(email_id = %job.email_id, seq = job.seq, "already being delivered by this process");
            self.discard(task).await;
            return Ok(());
        }
        let _in_flight = InFlight {
            set: &self.in_flight,
            id: job.email_id.clone(),
        };
        // After a full disk, SQLite's WAL must be given back before deliveries write again.
        self.store.wal_reclaimed(self.shutdown.clone()).await;
        let mut ahead = Some(ahead);
        let mut coming = Some(coming);
        let Some(claimed) = self.claim(&job, &task, &mut coming).await else {
            return Ok(());
        };
        let claim = match claimed {
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
                metrics::counter!("postbox_interrupted_sends_total").increment(1);
                warn!("previous attempt was interrupted; sending again with the same Message-ID");
            }
            // The suppression list, as read by the claim: such recipients are left out of the
            // envelope; if none is left the email is not sent at all.
            let (skip, note) = suppression_plan(&claim);
            if !skip.is_empty()
                && claim
                    .email
                    .recipients()
                    .all(|a| skip.contains(&suppression_key(a.address())))
            {
                // Not sent: it holds back nothing while its outcome is recorded.
                coming.take();
                let rec = AttemptRecord::untried();
                let finish = Finish::Suppressed {
                    reason: format!(
                        "not sent: every recipient is on the suppression list ({})",
                        skip.join(", ")
                    ),
                };
                if self.record(&claim, &rec, &finish, &task).await? {
                    let [(_, priority), (_, template)] = crate::metrics::email_labels(&claim.email);
                    metrics::counter!("postbox_emails_suppressed_total",
                        "priority" => priority, "template" => template)
                    .increment(1);
                    info!("every recipient is suppressed; not sent");
                }
                return Ok(());
            }
            // Pauses (by recipient domain or tag) hold the email until they end. Before an
            // email is held, the pauses are read again: a resume in another process since the
            // last read must not hold it (resuming releases only the emails held before it).
            let mut pauses = self.shaping.pauses.current(&self.store).await;
            if held_by(&pauses, &claim.email).is_some() {
                self.shaping.pauses.invalidate();
                pauses = self.shaping.pauses.current(&self.store).await;
            }
            if let Some(note) = held_by(&pauses, &claim.email) {
                coming.take();
                return self.hold(&claim, far_hold(), note, &task).await;
            }
            let relays = self.mailer.relays().cloned();
            let route = relays.as_ref().map(|r| r.route(&claim.email)).unwrap_or_default();
            // A paused relay is skipped; the route's next one is used. When all are paused,
            // the pauses are read again before the email is held (as above).
            let paused_relays = |pauses: &[Pause]| -> Vec<usize> {
                route
                    .iter()
                    .copied()
                    .filter(|&i| {
                        let name = relays.as_ref().map_or("", |r| r.name(i));
                        pauses
                            .iter()
                            .any(|p| p.kind == PauseKind::Relay && p.value == name)
                    })
                    .collect()
            };
            let mut tried = paused_relays(&pauses);
            if !route.is_empty() && tried.len() == route.len() {
                self.shaping.pauses.invalidate();
                pauses = self.shaping.pauses.current(&self.store).await;
                tried = paused_relays(&pauses);
            }
            let limiter = &self.shaping.limiter;
            let domain_keys = limiter.domain_keys(
                claim
                    .email
                    .recipients()
                    .filter_map(|a| a.address().rsplit_once('@').map(|(_, d)| d)),
            );
            let started_at = OffsetDateTime::now_utc();
            // Time spent in attempts (render + SMTP transaction, every relay tried), not waiting
            // for a send slot or a rate limit: the attempt's `duration_ms` and
            // `postbox_smtp_transaction_seconds`.
            let mut busy = Duration::ZERO;
            let mut path: Vec<String> = Vec::new();
            let mut last: Option<(Outcome, Option<usize>)> = None;
            let (outcome, used) = loop {
                let relay = match &relays {
                    None => None,
                    Some(r) => match r.pick(&route, &tried) {
                        Pick::Use(i) => Some(i),
                        Pick::Exhausted => {
                            if let Some(done) = last.take() {
                                break done;
                            }
                            // Every relay of the route is paused.
                            let note = route
                                .first()
                                .map(|&i| Pause::hold_note(PauseKind::Relay, r.name(i)))
                                .unwrap_or_else(|| "no relay for this email".into());
                            coming.take();
                            return self.hold(&claim, far_hold(), note, &task).await;
                        }
                    },
                };
                let mut keys = domain_keys.clone();
                if let (Some(r), Some(i)) = (&relays, relay) {
                    keys.push(format!("relay:{}", r.name(i)));
                }
                if !keys.is_empty() {
                    // A rate limit may keep this email waiting here (up to 2 s) or put it back
                    // in the queue: meanwhile it does not hold back less urgent emails from
                    // free send slots.
                    let turn = limiter.take(&keys, || drop(coming.take())).await;
                    if !matches!(turn, Ok(Turn::Go)) {
                        coming.take();
                    }
                    match turn {
                        Ok(Turn::Go) => {}
                        Ok(Turn::Later { at, reason }) => {
                            if let Some(done) = last.take() {
                                break done;
                            }
                            // Back half a hold before the free slot: claimed again by then, it
                            // takes that slot in memory. Back AT the slot, the claim's latency
                            // would leave the slot unused (GCRA does not save it).
                            let at = at
                                .checked_sub(crate::delivery::throttle::HOLD / 2)
                                .unwrap_or(at);
                            return self.hold(&claim, at, reason, &task).await;
                        }
                        Err(e) => {
                            // The shared slots cannot be read: wait a little, not an attempt.
                            warn!(error = %e, "cannot reserve a rate limit slot; waiting");
                            if let Some(done) = last.take() {
                                break done;
                            }
                            let at = SystemTime::now() + Duration::from_secs(1);
                            return self
                                .hold(&claim, at, "waiting: rate limits unreadable".into(), &task)
                                .await;
                        }
                    }
                }
                let permit = self
                    .sends
                    .acquire(
                        claim.priority.job_priority(),
                        claim.id.as_str(),
                        coming.take(),
                    )
                    .await;
                ahead.take();
                let t0 = Instant::now();
                // A panic (a bug in rendering, MIME building or a transport) fails this email
                // with the reason; nothing else stops.
                let sent = match AssertUnwindSafe(self.attempt(&claim, &skip, relay))
                    .catch_unwind()
                    .await
                {
                    Ok(o) => o,
                    Err(panic) => {
                        let what = crate::telemetry::panic_message(&*panic, "a panic");
                        error!(panic = %what, "the delivery panicked; failing this email");
                        Sent {
                            outcome: Outcome::Permanent {
                                code: None,
                                text: format!("internal error: the delivery panicked ({what})"),
                            },
                            reached: true,
                        }
                    }
                };
                busy += t0.elapsed();
                drop(permit);
                let (Some(r), Some(i)) = (&relays, relay) else {
                    break (sent.outcome, None);
                };
                if matches!(sent.outcome, Outcome::Sent { .. }) {
                    limiter.accepted(&format!("relay:{}", r.name(i)));
                }
                let failover = match &sent.outcome {
                    Outcome::Sent { .. } => false,
                    _ if !sent.reached => {
                        r.cool(i, sent.outcome.text());
                        true
                    }
                    Outcome::Temporary { code, text } => {
                        r.failover_on_temporary && !limiter.is_slow_down(*code, text)
                    }
                    Outcome::Permanent { .. } => false,
                };
                if !failover {
                    break (sent.outcome, Some(i));
                }
                path.push(format!(
                    "relay \"{}\": {}",
                    r.name(i),
                    sent.outcome.text().chars().take(200).collect::<String>()
                ));
                tried.push(i);
                last = Some((sent.outcome, Some(i)));
            };
            let relay_name = used.and_then(|i| relays.as_ref().map(|r| r.name(i).to_string()));
            if let Some(name) = &relay_name {
                path.push(format!("via relay \"{name}\""));
            }
            let note = match (note, path.is_empty()) {
                (n, true) => n,
                (None, false) => Some(path.join("; ")),
                (Some(n), false) => Some(format!("{n}; {}", path.join("; "))),
            };
            let rec = AttemptRecord {
                started_at,
                duration_ms: busy.as_millis() as i64,
                smtp_code: outcome.code(),
                smtp_text: outcome.text().to_string(),
                note,
            };
            let finish = match &outcome {
                Outcome::Sent { .. } => Finish::Sent,
                Outcome::Permanent { text, .. } => Finish::Failed {
                    reason: format!("permanent failure: {text}"),
                },
                Outcome::Temporary { code, text }
                    if relay_name.is_some()
                        && limiter.is_slow_down(*code, text)
                        && age_of(&claim) < Duration::from_secs(self.policy.max_age_secs) =>
                {
                    let name = relay_name.clone().unwrap_or_default();
                    let rate = limiter.slow_down(&format!("relay:{name}"), &format!(
                        "{} {}",
                        code.map_or_else(String::new, |c| c.to_string()),
                        text.chars().take(200).collect::<String>()
                    ));
                    metrics::counter!("postbox_throttle_replies_total", "relay" => name.clone())
                        .increment(1);
                    let wait = Duration::from_secs_f64((1.0 / rate).clamp(1.0, 60.0));
                    Finish::Throttled {
                        at: OffsetDateTime::now_utc() + wait,
                        reason: format!(
                            "relay \"{name}\" asked to slow down; its rate is now {rate:.2}/s \
                             (not counted against the retry budget)"
                        ),
                    }
                }
                Outcome::Temporary { text, .. } => {
                    match self.policy.after_temporary_failure(
                        claim.attempt,
                        age_of(&claim),
                        rand::random::<f64>(),
                    )
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
            let recorded = self.record(&claim, &rec, &finish, &task).await?;
            // The measured time, not the timeline's whole milliseconds: an attempt on a
            // nearby relay takes well under one.
            metrics::histogram!("postbox_smtp_transaction_seconds").record(busy.as_secs_f64());
            metrics::counter!("postbox_smtp_replies_total",
                "code" => rec.smtp_code.map_or_else(|| "none".to_string(), |c| c.to_string()))
            .increment(1);
            if recorded {
                let [(_, priority), (_, template)] = crate::metrics::email_labels(&claim.email);
                let name = match finish {
                    Finish::Sent => "postbox_emails_sent_total",
                    Finish::Retry { .. } => "postbox_emails_retried_total",
                    Finish::Failed { .. } => "postbox_emails_failed_total",
                    Finish::Suppressed { .. } => "postbox_emails_suppressed_total",
                    Finish::Throttled { .. } => "postbox_emails_throttled_total",
                    Finish::Wait { .. } => "postbox_emails_held_total",
                };
                metrics::counter!(name, "priority" => priority, "template" => template).increment(1);
            }
            let rcpts: Vec<String> = claim.email.recipients().map(|a| mask(a.address())).collect();
            match (&finish, recorded) {
                (_, false) => warn!("attempt superseded while in flight; not recorded"),
                (Finish::Sent, _) => info!(code = ?rec.smtp_code, ms = rec.duration_ms, to = ?rcpts, "sent"),
                (Finish::Retry { at }, _) => warn!(code = ?rec.smtp_code, reply = %rec.smtp_text, retry_at = %at, "temporary failure; will retry"),
                (Finish::Failed { reason }, _) => warn!(code = ?rec.smtp_code, %reason, to = ?rcpts, "failed; moved to dead letters"),
                (Finish::Suppressed { .. }, _) => info!("suppressed; not sent"),
                (Finish::Throttled { reason, .. }, _) => warn!(code = ?rec.smtp_code, reply = %rec.smtp_text, %reason, "throttled"),
                (Finish::Wait { .. }, _) => {}
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Claims the job's email, retrying from memory while the database refuses (busy, full,
    /// unreachable). None once the process is stopping: the job, not acked, is handed back by
    /// the janitor when this worker is gone. While it retries, the email no longer holds back
    /// less urgent ones (`coming` is dropped): those claimed already go on sending.
    async fn claim(
        &self,
        job: &SendJob,
        task: &str,
        coming: &mut Option<Coming>,
    ) -> Option<ClaimResult> {
        let mut pause = Duration::from_millis(50);
        loop {
            match self.recorder.claim(&job.email_id, job.seq, task).await {
                Ok(c) => return Some(c),
                Err(e) => {
                    coming.take();
                    if self.shutdown.clone().now_or_never().is_some() {
                        warn!(error = %e, email_id = %job.email_id,
                            "cannot claim before shutdown; the job is handed back later");
                        return None;
                    }
                    warn!(error = %e, email_id = %job.email_id,
                        retry_in_ms = pause.as_millis() as u64, "cannot claim yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Takes this process's share of each relay's `max_connections`, from the live worker
    /// processes (called every heartbeat).
    pub(super) async fn share_connections(&self) {
        let Some(relays) = self.mailer.relays().filter(|r| r.shares_connections()) else {
            return;
        };
        match self.store.live_nodes().await {
            Ok(n) => relays.share_connections(n as usize),
            Err(e) => warn!(error = %e, "cannot count the worker processes; shares unchanged"),
        }
    }

    /// Puts a claimed email back to wait until `at` (a rate limit, a pause):
    /// not an attempt, no timeline entry; `reason` is its `last_error` meanwhile.
    async fn hold(
        &self,
        claim: &Claim,
        at: SystemTime,
        reason: String,
        task: &str,
    ) -> Result<(), StoreError> {
        debug!(%reason, "waiting; not an attempt");
        metrics::counter!("postbox_emails_held_total").increment(1);
        let rec = AttemptRecord::untried();
        let finish = Finish::Wait {
            at: at.into(),
            reason,
        };
        self.record(claim, &rec, &finish, task).await.map(|_| ())
    }

    /// Acks a job that has nothing to do (one try: a job left taken is handed back by the
    /// janitor once this worker is gone, and then does nothing again).
    async fn discard(&self, task: String) {
        if let Err(e) = self.store.ack_jobs(&[task.as_str()]).await {
            warn!(error = %e, "cannot ack a job that had nothing to do");
        }
    }

    /// Render, build the MIME message, sign it, send it (to every recipient but those in
    /// `skip`; over SMTP through relay `relay`).
    async fn attempt(&self, claim: &Claim, skip: &[String], relay: Option<usize>) -> Sent {
        let first = claim.email.to.first().map_or("", |a| a.address());
        if crate::faults::hit(crate::faults::DELIVERY_PANIC, first) {
            panic!("injected fault: the delivery of {} panics", claim.id);
        }
        match render(&claim.email)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                let out = Outgoing {
                    id: claim.id.as_str(),
                    except: skip,
                    return_path: self
                        .return_path
                        .as_ref()
                        .map(|rp| rp.replace("{id}", claim.id.as_str())),
                    unsubscribe_url: self
                        .unsubscribe
                        .as_ref()
                        .filter(|_| claim.email.one_click_unsubscribe)
                        .and_then(|(base, key)| {
                            let to = claim.email.recipients().next()?;
                            let t = crate::domain::unsubscribe::token(
                                key,
                                claim.id.as_str(),
                                to.address(),
                            );
                            Some(format!("{base}/u/{t}"))
                        }),
                };
                build_message_for(&claim.email, &r, &claim.message_id, &out)
                    .map_err(|e| e.to_string())
            }) {
            Ok(mut msg) => {
                if let Some((_, domain)) = claim.email.from.address().rsplit_once('@') {
                    self.shaping.dkim.sign(&mut msg, domain);
                }
                self.mailer.send(&msg, claim.id.as_str(), relay).await
            }
            Err(text) => Sent {
                outcome: Outcome::Permanent { code: None, text },
                reached: true,
            },
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
        task: &str,
    ) -> Result<bool, StoreError> {
        let mut pause = Duration::from_millis(50);
        let mut stopping_since: Option<Instant> = None;
        let done = Completion {
            id: claim.id.clone(),
            seq: claim.seq,
            attempt: claim.attempt,
            priority: claim.priority,
            rec: rec.clone(),
            finish: finish.clone(),
            task: task.to_string(),
        };
        loop {
            match self.recorder.complete(done.clone()).await {
                Ok(recorded) => {
                    // The claims ahead follow the writer's batches as they change, not only
                    // when apalis hands out a job: with every job of the worker's window
                    // waiting at the gate, none is handed out to raise its limit.
                    self.claims.set_limit(self.claims_ahead());
                    return Ok(recorded);
                }
                Err(e) => {
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

impl Handler<SendJob> for Deliverer {
    async fn handle(
        self: &Arc<Self>,
        job: SendJob,
        task: String,
        priority: usize,
    ) -> Result<(), StoreError> {
        self.spawn(job, task, priority).await
    }

    async fn discard(self: &Arc<Self>, task: String) {
        Deliverer::discard(self, task).await
    }

    async fn drain(&self) {
        Deliverer::drain(self).await
    }
}

/// The recipients to leave out (suppressed, unless the email says to ignore the list) and what
/// the timeline says about it.
fn suppression_plan(claim: &Claim) -> (Vec<String>, Option<String>) {
    if claim.suppressed.is_empty() {
        return (Vec::new(), None);
    }
    let list = claim.suppressed.join(", ");
    if claim.email.ignore_suppression {
        return (
            Vec::new(),
            Some(format!(
                "suppression list ignored (ignore_suppression) for {list}"
            )),
        );
    }
    (
        claim.suppressed.clone(),
        Some(format!("not sent to {list}: on the suppression list")),
    )
}

/// Claims ahead of the send slots per outcome of the writer's recent transactions (see
/// [`Deliverer::claims_ahead`]). Every transaction costs a few milliseconds whatever it
/// carries (its round trips to SQLite's thread, the fsync), so the more each one claims and
/// records, the fewer there are. Measured at the peer harness's settings (5,000 emails in
/// batches of 500, concurrency 8), alternated in one sitting: with 2, 114 transactions and
/// 3,891-4,240 delivered/s; with 4, 91 transactions and 4,428-4,706 (the jobs a worker holds,
/// `worker::window`, bound how far batches grow: with twice that window, 44-52 MB peak RSS
/// for no more speed). What a crash can leave claimed stays within that window, unchanged.
const CLAIMS_PER_OUTCOME: usize = 4;

/// A priority gate: at most `limit` holders at once; a freed place goes to the waiter of the
/// highest priority, the smallest id first, whatever order their tasks reach the gate in. (A
/// plain semaphore serves whoever asked first, and emails claimed in one batch ask in any
/// order.)
///
/// Those announced as coming ([`Gate::coming`]) hold back the waiters of lower priority: a
/// free place waits for the more urgent one on its way rather than go to a less urgent one
/// that got there first.
///
/// Two are used: the send slots (`queue.concurrency`, fixed; ids are email ids, time-ordered:
/// the order the queue fetched them in; the emails with a claims-ahead place are announced)
/// and the claims ahead of them (ids are arrival numbers; the limit follows the writer's
/// batches, [`Deliverer::claims_ahead`], and is set again at every job handed out).
#[derive(Debug)]
struct Gate {
    state: std::sync::Mutex<GateState>,
}

#[derive(Debug)]
struct GateState {
    limit: usize,
    held: usize,
    /// (priority, Reverse(id)) -> who waits: the greatest key is served first.
    waiting: std::collections::BTreeMap<
        (usize, std::cmp::Reverse<String>),
        tokio::sync::oneshot::Sender<()>,
    >,
    /// How many are coming ([`Coming`]), by priority (index); grown as needed, never shrunk
    /// (no allocation per email).
    coming: Vec<usize>,
}

impl GateState {
    /// Hands free places to the waiters, best first, while none more urgent is coming.
    fn admit(&mut self) {
        while self.held < self.limit {
            let Some((&(priority, _), _)) = self.waiting.last_key_value() else {
                return;
            };
            if self.outranked(priority) {
                return;
            }
            let (_, tx) = self.waiting.pop_last().expect("seen above");
            if tx.send(()).is_ok() {
                self.held += 1;
            }
        }
    }

    /// Whether one of a higher priority than `priority` is coming.
    fn outranked(&self, priority: usize) -> bool {
        self.coming
            .get(priority + 1..)
            .is_some_and(|above| above.iter().any(|&n| n > 0))
    }

    /// One fewer coming at `priority`.
    fn arrived(&mut self, priority: usize) {
        if let Some(n) = self.coming.get_mut(priority) {
            *n = n.saturating_sub(1);
        }
    }
}

/// One on its way to a [`Gate`] at `priority` (see [`Gate::coming`]): until it waits there
/// ([`Gate::acquire`]) or is dropped, no waiter of lower priority is let in.
struct Coming {
    gate: Option<Arc<Gate>>,
    priority: usize,
}

impl Drop for Coming {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            let mut s = gate.state.lock().unwrap_or_else(|p| p.into_inner());
            s.arrived(self.priority);
            s.admit();
        }
    }
}

/// A place in a [`Gate`] (borrowed, or shared by a task of its own); given to the next waiter
/// when dropped.
struct GatePass<G: std::ops::Deref<Target = Gate>>(G);

impl Gate {
    fn new(limit: usize) -> Gate {
        Gate {
            state: std::sync::Mutex::new(GateState {
                limit: limit.max(1),
                held: 0,
                waiting: Default::default(),
                coming: Default::default(),
            }),
        }
    }

    /// Moves the limit (at least 1); a higher one admits waiters at once.
    fn set_limit(&self, limit: usize) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.limit = limit.max(1);
        s.admit();
    }

    /// [`Gate::acquire`] (none announced), for a holder that outlives the borrow (a task of its
    /// own).
    async fn acquire_owned(self: &Arc<Self>, priority: usize, id: &str) -> GatePass<Arc<Gate>> {
        self.enter(priority, id, None).await;
        GatePass(self.clone())
    }

    /// Announces one coming at `priority`: until the [`Coming`] is handed to
    /// [`Gate::acquire`] or dropped, waiters of lower priority are held back.
    fn coming(self: &Arc<Self>, priority: usize) -> Coming {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.coming.len() <= priority {
            s.coming.resize(priority + 1, 0);
        }
        s.coming[priority] += 1;
        Coming {
            gate: Some(self.clone()),
            priority,
        }
    }

    /// Waits for a place and takes it. One announced as `coming` (if still announced) stops
    /// holding back the less urgent in the same step as it starts to wait, so none slips in
    /// between.
    async fn acquire(&self, priority: usize, id: &str, coming: Option<Coming>) -> GatePass<&Gate> {
        self.enter(priority, id, coming).await;
        GatePass(self)
    }

    /// Waits for a place and takes it (see [`Gate::release`]); `coming`, its announcement,
    /// ends once it waits.
    async fn enter(&self, priority: usize, id: &str, coming: Option<Coming>) {
        let rx = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(mut c) = coming
                && c.gate.take().is_some()
            {
                s.arrived(c.priority);
            }
            if s.held < s.limit && s.waiting.is_empty() && !s.outranked(priority) {
                s.held += 1;
                return;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            s.waiting
                .insert((priority, std::cmp::Reverse(id.to_string())), tx);
            // Its arrival may free the less urgent ones, or itself.
            s.admit();
            rx
        };
        // Dropped while waiting (the delivery cancelled): the sender fails and the place goes
        // on to the next waiter (see `admit`); dropped just after it was handed the place:
        // the guard gives it back.
        struct Waiting<'a> {
            gate: &'a Gate,
            rx: Option<tokio::sync::oneshot::Receiver<()>>,
        }
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                if let Some(mut rx) = self.rx.take() {
                    rx.close();
                    if rx.try_recv().is_ok() {
                        self.gate.release();
                    }
                }
            }
        }
        let mut w = Waiting {
            gate: self,
            rx: Some(rx),
        };
        let rx = w.rx.as_mut().expect("set above");
        let _ = rx.await;
        w.rx = None;
    }

    fn release(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.held -= 1;
        s.admit();
    }
}

impl<G: std::ops::Deref<Target = Gate>> Drop for GatePass<G> {
    fn drop(&mut self) {
        self.0.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `fut` has finished after a few polls of the runtime.
    async fn done<F: Future + Unpin>(fut: &mut F) -> bool {
        tokio::time::timeout(Duration::from_millis(20), fut)
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_gate_admits_the_highest_priority_then_the_oldest() {
        let gate = Gate::new(1);
        let first = gate.acquire(0, "01", None).await;
        let mut low = Box::pin(gate.acquire(0, "02", None));
        let mut high_new = Box::pin(gate.acquire(2, "04", None));
        let mut high_old = Box::pin(gate.acquire(2, "03", None));
        assert!(!done(&mut low).await && !done(&mut high_old).await);
        drop(first);
        let pass = high_old.as_mut().await;
        assert!(!done(&mut high_new).await, "one place: one holder");
        drop(pass);
        let pass = high_new.as_mut().await;
        assert!(!done(&mut low).await);
        drop(pass);
        drop(low.as_mut().await);
    }

    #[tokio::test]
    async fn a_free_place_waits_for_a_more_urgent_one_on_its_way() {
        let gate = Arc::new(Gate::new(1));
        let high = gate.coming(2);
        let mut low = Box::pin(gate.acquire(1, "01", None));
        assert!(
            !done(&mut low).await,
            "a free place, but one more urgent is coming"
        );
        let pass = gate.acquire(2, "02", Some(high)).await;
        assert!(!done(&mut low).await, "one place: one holder");
        drop(pass);
        drop(low.as_mut().await);
        // One that drops out on its way lets in those it held back.
        let other = gate.coming(3);
        let mut low = Box::pin(gate.acquire(1, "03", None));
        assert!(!done(&mut low).await);
        drop(other);
        drop(low.as_mut().await);
        // Only the less urgent are held back.
        let same = gate.coming(1);
        drop(gate.acquire(1, "04", None).await);
        drop(gate.acquire(2, "05", None).await);
        drop(same);
        let s = gate.state.lock().unwrap();
        assert_eq!(s.held, 0);
        assert!(s.coming.iter().all(|&n| n == 0), "{:?}", s.coming);
    }

    #[tokio::test]
    async fn a_raised_limit_admits_waiters_at_once_and_a_lowered_one_holds_new_ones() {
        let gate = Gate::new(1);
        let a = gate.acquire(1, "a", None).await;
        let mut b = Box::pin(gate.acquire(1, "b", None));
        let mut c = Box::pin(gate.acquire(1, "c", None));
        assert!(!done(&mut b).await);
        gate.set_limit(3);
        let (b, c) = (b.as_mut().await, c.as_mut().await);
        gate.set_limit(1);
        drop(a);
        drop(b);
        let mut d = Box::pin(gate.acquire(1, "d", None));
        assert!(!done(&mut d).await, "2 held: still over the limit of 1");
        drop(c);
        drop(d.as_mut().await);
        assert_eq!(gate.state.lock().unwrap().held, 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_passes_its_place_on() {
        let gate = Gate::new(1);
        let a = gate.acquire(1, "a", None).await;
        let mut b = Box::pin(gate.acquire(2, "b", None));
        let mut c = Box::pin(gate.acquire(1, "c", None));
        assert!(!done(&mut b).await);
        drop(b);
        drop(a);
        drop(c.as_mut().await);
        assert_eq!(gate.state.lock().unwrap().held, 0);
    }
}
