//! Rate limits and adaptive throttling: how fast mail may go through each relay and to each
//! recipient domain.
//!
//! A limit key (`relay:<name>`, `domain:<domain>`) has a rate in messages per second: the
//! configured limit, lowered while the relay says "slow down" (adaptive throttling, after
//! KumoMTA's traffic shaping). Messages are spaced evenly at that rate by GCRA: each key keeps
//! the time its next message may go (its theoretical arrival time, TAT). A delivery takes one
//! slot from every key of its email before it sends; a slot within [`HOLD`] is waited for in
//! memory (the delivery sleeps until it, holding no send slot), a later one puts the email back
//! in the queue until then (not an attempt: see `Finish::Wait`). Nothing polls: the wait is a
//! timer or the job's run time.
//!
//! Where slots are kept: in this process's memory on SQLite (one process); on PostgreSQL in
//! `postbox_rate_slots`, shared by every worker process, reserved a few at a time (100 ms of
//! the rate, at most `MAX_CHUNK`) so that a limit far above the real rate costs one write per
//! chunk, not per message. A chunk's slots that go unused are lost: a process may send less
//! than the limit, never more.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::settings::{RelaySetup, ThrottleSettings, rate_of};
use crate::store::Store;

/// A slot at most this far ahead is waited for in memory; a later one puts the email back.
pub const HOLD: Duration = Duration::from_secs(2);
/// Slots reserved at once from the shared table, at most.
const MAX_CHUNK: u32 = 256;
/// Reserved slots older than this are not used (they would make a burst).
const STALE_US: i64 = 250_000;

/// Slots are kept in microseconds since the epoch: milliseconds would cap a limit at 1,000/s.
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Where a key's slots come from.
enum Book {
    /// This process alone: the TAT per key in memory.
    Memory,
    /// Every process sharing the PostgreSQL database.
    Shared(Store),
}

/// A key's rate while the relay asks us to slow down.
#[derive(Debug, Clone)]
struct Adaptive {
    rate: f64,
    /// Back at (or above) this rate, the throttle ends.
    ceiling: f64,
    changed: Instant,
    since: SystemTime,
    reason: String,
}

#[derive(Debug, Default)]
struct KeyState {
    /// The configured limit (messages per second).
    base: Option<f64>,
    adaptive: Option<Adaptive>,
    /// Memory book: the TAT (µs since the epoch).
    tat: i64,
    /// Shared book: slots reserved and not used yet (µs since the epoch).
    reserved: VecDeque<i64>,
    /// Messages the relay accepted in the current and the previous whole second (the
    /// observed rate: a "slow down" cuts the rate from what the relay took, not from what
    /// was tried).
    second: i64,
    this_second: u32,
    last_second: u32,
    throttled_total: u64,
    waits_total: u64,
}

impl KeyState {
    fn observed(&mut self, now: i64) -> f64 {
        self.roll(now);
        f64::from(self.last_second.max(self.this_second))
    }

    fn roll(&mut self, now: i64) {
        let sec = now / 1_000_000;
        if sec != self.second {
            self.last_second = if sec == self.second + 1 {
                self.this_second
            } else {
                0
            };
            self.this_second = 0;
            self.second = sec;
        }
    }

    /// The rate now (recovering an adaptive throttle step by step first).
    fn rate(&mut self, t: &ThrottleSettings) -> Option<f64> {
        if let Some(a) = &mut self.adaptive {
            let step = Duration::from_secs(t.step_secs);
            while a.changed.elapsed() >= step {
                a.rate *= t.increase;
                a.changed += step;
                if a.rate >= a.ceiling {
                    self.adaptive = None;
                    break;
                }
            }
        }
        match (self.base, &self.adaptive) {
            (Some(b), Some(a)) => Some(b.min(a.rate)),
            (b, a) => b.or(a.as_ref().map(|a| a.rate)),
        }
    }
}

/// What a delivery may do now, for all its keys.
#[derive(Debug, Clone, PartialEq)]
pub enum Turn {
    /// Go (after waiting, if it had to).
    Go,
    /// Not before this time; the reason names the key and its rate.
    Later { at: SystemTime, reason: String },
}

/// One key's state, for `GET /v1/relays`, the dashboard and metrics.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LimitView {
    /// `relay:<name>` or `domain:<domain>`.
    pub key: String,
    /// The configured limit, messages per second (None: none).
    pub configured_per_second: Option<f64>,
    /// The rate in force now (None: unlimited).
    pub effective_per_second: Option<f64>,
    /// Messages accepted through this key in the last whole second (this process).
    pub observed_per_second: f64,
    /// Why the rate is lowered (the relay's reply), while it is.
    pub throttled_reason: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub throttled_since: Option<time::OffsetDateTime>,
    /// "Slow down" replies seen (this process).
    pub throttle_replies: u64,
    /// Emails put back to wait for a slot (this process).
    pub waits: u64,
}

/// The rate limits of one process (and, on PostgreSQL, its share of the cluster's).
pub struct Limiter {
    book: Book,
    tuning: ThrottleSettings,
    patterns: Vec<regex::Regex>,
    keys: Mutex<HashMap<String, KeyState>>,
    /// One reservation at a time per key from the shared book.
    reserving: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").finish_non_exhaustive()
    }
}

impl Limiter {
    /// The limits of `setup`; `shared`: the store whose table every process shares
    /// (PostgreSQL), None: this process's memory.
    pub fn new(setup: &RelaySetup, shared: Option<Store>) -> Limiter {
        let mut keys: HashMap<String, KeyState> = HashMap::new();
        for r in &setup.relays {
            keys.entry(format!("relay:{}", r.name)).or_default().base = r.rate();
        }
        for d in &setup.domain_limits {
            keys.entry(format!("domain:{}", d.domain)).or_default().base =
                rate_of(d.per_second, d.per_minute, d.per_hour);
        }
        Limiter {
            book: shared.map_or(Book::Memory, Book::Shared),
            patterns: setup.throttle.compile().unwrap_or_default(),
            tuning: setup.throttle.clone(),
            keys: Mutex::new(keys),
            reserving: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyState>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The domain keys with a limit among these recipient domains.
    pub fn domain_keys<'a>(&self, domains: impl Iterator<Item = &'a str>) -> Vec<String> {
        let keys = self.lock();
        let mut out: Vec<String> = Vec::new();
        for d in domains {
            let k = format!("domain:{}", d.to_ascii_lowercase());
            if keys.get(&k).is_some_and(|s| s.base.is_some()) && !out.contains(&k) {
                out.push(k);
            }
        }
        out
    }

    /// Takes one slot of every key, waiting for it when it is within [`HOLD`]; calls `waiting`
    /// once it knows it will wait (before the wait).
    pub async fn take(
        &self,
        keys: &[String],
        waiting: impl FnOnce(),
    ) -> Result<Turn, crate::store::StoreError> {
        let mut latest = 0i64;
        for key in keys {
            let rate = {
                let mut map = self.lock();
                map.entry(key.clone()).or_default().rate(&self.tuning)
            };
            let Some(rate) = rate else { continue };
            // At most one a day apart (a lower configured rate counts as one a day).
            let interval = (1e6 / rate).round().clamp(1.0, 86_400e6) as i64;
            let slot = match &self.book {
                Book::Memory => {
                    let mut map = self.lock();
                    let st = map.entry(key.clone()).or_default();
                    let now = now_us();
                    let start = st.tat.max(now);
                    if start - now > HOLD.as_micros() as i64 {
                        st.waits_total += 1;
                        return Ok(later(key, rate, start));
                    }
                    st.tat = start.saturating_add(interval);
                    start
                }
                Book::Shared(store) => match self.shared_slot(store, key, rate, interval).await? {
                    Ok(s) => s,
                    Err(at) => {
                        self.lock().entry(key.clone()).or_default().waits_total += 1;
                        return Ok(later(key, rate, at));
                    }
                },
            };
            latest = latest.max(slot);
        }
        let wait = latest - now_us();
        if wait > 0 {
            waiting();
            tokio::time::sleep(Duration::from_micros(wait as u64)).await;
        }
        Ok(Turn::Go)
    }

    /// One slot from the shared table: a reserved one, or a new chunk.
    async fn shared_slot(
        &self,
        store: &Store,
        key: &str,
        rate: f64,
        interval: i64,
    ) -> Result<Result<i64, i64>, crate::store::StoreError> {
        let pop = |this: &Self| {
            let mut map = this.lock();
            let st = map.entry(key.to_string()).or_default();
            let now = now_us();
            while let Some(s) = st.reserved.pop_front() {
                if s >= now - STALE_US {
                    return Some(s);
                }
            }
            None
        };
        if let Some(s) = pop(self) {
            return Ok(Ok(s));
        }
        let lock = self
            .reserving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone();
        let _one = lock.lock().await;
        if let Some(s) = pop(self) {
            return Ok(Ok(s));
        }
        let n = ((rate / 10.0).ceil() as u32).clamp(1, MAX_CHUNK);
        let first = match store
            .reserve_slots(key, interval, n, HOLD.as_micros() as i64)
            .await?
        {
            Ok(first) => first,
            Err(at) => return Ok(Err(at)),
        };
        let mut map = self.lock();
        let st = map.entry(key.to_string()).or_default();
        st.reserved = (1..i64::from(n)).map(|i| first + i * interval).collect();
        Ok(Ok(first))
    }

    /// Counts a message `key`'s relay accepted (the observed rate).
    pub fn accepted(&self, key: &str) {
        let mut map = self.lock();
        let st = map.entry(key.to_string()).or_default();
        st.roll(now_us());
        st.this_second += 1;
    }

    /// Whether an SMTP reply means "slow down".
    pub fn is_slow_down(&self, code: Option<u16>, text: &str) -> bool {
        let Some(code) = code else { return false };
        let line = format!("{code} {text}");
        self.patterns.iter().any(|p| p.is_match(&line))
    }

    /// The relay said "slow down": lower `key`'s rate (at most once per second). Returns the
    /// new rate.
    pub fn slow_down(&self, key: &str, reason: &str) -> f64 {
        let t = &self.tuning;
        let mut map = self.lock();
        let st = map.entry(key.to_string()).or_default();
        st.throttled_total += 1;
        let now = now_us();
        let observed = st.observed(now).max(t.min_per_second);
        let current = st.rate(t);
        if let Some(a) = &mut st.adaptive
            && a.changed.elapsed() < Duration::from_secs(1)
        {
            a.reason = reason.to_string();
            return a.rate;
        }
        let from = current.map_or(observed, |c| c.min(observed));
        let rate = (from * t.decrease).max(t.min_per_second);
        // Back at the configured limit, the throttle ends; a relay without one keeps its
        // adaptive rate until it has grown to 4x the rate it was first cut from (ending it
        // at 1x would let the next burst hit the relay's limit at full speed).
        let ceiling = st
            .adaptive
            .as_ref()
            .map(|a| a.ceiling)
            .or(st.base)
            .unwrap_or(from * 4.0);
        let since = st
            .adaptive
            .as_ref()
            .map_or_else(SystemTime::now, |a| a.since);
        st.adaptive = Some(Adaptive {
            rate,
            ceiling,
            changed: Instant::now(),
            since,
            reason: reason.to_string(),
        });
        metrics::gauge!("postbox_rate_limit_per_second", "key" => key.to_string()).set(rate);
        rate
    }

    /// Every key's state (keys with a limit, a throttle or traffic), sorted by key.
    pub fn views(&self) -> Vec<LimitView> {
        let mut map = self.lock();
        let now = now_us();
        let mut out: Vec<LimitView> = map
            .iter_mut()
            .map(|(k, st)| {
                let effective = st.rate(&self.tuning);
                LimitView {
                    key: k.clone(),
                    configured_per_second: st.base,
                    effective_per_second: effective,
                    observed_per_second: st.observed(now),
                    throttled_reason: st.adaptive.as_ref().map(|a| a.reason.clone()),
                    throttled_since: st.adaptive.as_ref().map(|a| a.since.into()),
                    throttle_replies: st.throttled_total,
                    waits: st.waits_total,
                }
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        for v in &out {
            metrics::gauge!("postbox_rate_limit_per_second", "key" => v.key.clone())
                .set(v.effective_per_second.unwrap_or(0.0));
        }
        out
    }
}

fn later(key: &str, rate: f64, at_us: i64) -> Turn {
    Turn::Later {
        at: SystemTime::UNIX_EPOCH + Duration::from_micros(at_us.max(0) as u64),
        reason: format!("waiting for {key} (limited to {rate:.2}/s)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{DeliverySettings, SmtpSettings};

    fn limiter(per_second: Option<f64>) -> Limiter {
        let smtp = SmtpSettings {
            host: "127.0.0.1".into(),
            per_second,
            ..Default::default()
        };
        let setup = RelaySetup::build(
            &DeliverySettings::default(),
            &smtp,
            &[],
            &[],
            &[],
            &ThrottleSettings::default(),
            true,
        )
        .unwrap();
        Limiter::new(&setup, None)
    }

    #[tokio::test]
    async fn slots_are_spaced_and_far_ones_put_back() {
        let l = limiter(Some(10.0));
        let key = vec!["relay:default".to_string()];
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(l.take(&key, || {}).await.unwrap(), Turn::Go);
        }
        // 5 slots 100 ms apart: the fifth at +400 ms.
        assert!(
            t0.elapsed() >= Duration::from_millis(390),
            "{:?}",
            t0.elapsed()
        );
        // Reserve past HOLD without waiting: a later slot is refused, not slept on.
        {
            let mut map = l.lock();
            map.get_mut("relay:default").unwrap().tat = now_us() + 5_000_000;
        }
        match l.take(&key, || {}).await.unwrap() {
            Turn::Later { reason, .. } => assert!(reason.contains("relay:default"), "{reason}"),
            Turn::Go => panic!("a slot 5 s away must put the email back"),
        }
    }

    #[tokio::test]
    async fn the_caller_hears_of_a_wait_before_it_and_only_then() {
        let l = limiter(Some(10.0));
        let key = vec!["relay:default".to_string()];
        let mut heard = Vec::new();
        for _ in 0..2 {
            let mut waited = false;
            assert_eq!(l.take(&key, || waited = true).await.unwrap(), Turn::Go);
            heard.push(waited);
        }
        // The first slot is now; the second 100 ms later.
        assert_eq!(heard, [false, true]);
    }

    #[test]
    fn slow_down_lowers_then_recovers_step_by_step() {
        let mut t = ThrottleSettings {
            step_secs: 1,
            ..Default::default()
        };
        let l = limiter(Some(40.0));
        assert!(l.is_slow_down(
            Some(454),
            "4.7.0 Throttling failure: Maximum sending rate exceeded"
        ));
        assert!(l.is_slow_down(Some(421), "4.7.0 try again later"));
        assert!(l.is_slow_down(Some(451), "4.7.1 rate limited"));
        assert!(!l.is_slow_down(Some(451), "4.3.0 mailbox busy"));
        assert!(!l.is_slow_down(Some(550), "5.7.1 rate limit policy"));
        // 40 sent this second and the last: the rate is cut from what is really sent (set
        // directly: counted by `sent`, a second boundary could split them).
        {
            let mut map = l.lock();
            let st = map.get_mut("relay:default").unwrap();
            (st.second, st.this_second, st.last_second) = (now_us() / 1_000_000, 40, 40);
        }
        let r = l.slow_down("relay:default", "454 Throttling failure");
        assert_eq!(r, 20.0);
        // A second reply within the second does not lower it again.
        assert_eq!(l.slow_down("relay:default", "454 again"), 20.0);
        let mut map = l.lock();
        let st = map.get_mut("relay:default").unwrap();
        t.increase = 2.0;
        st.adaptive.as_mut().unwrap().changed -= Duration::from_millis(1500);
        assert_eq!(
            st.rate(&t),
            Some(40.0),
            "one step doubles it back to the limit"
        );
        assert!(
            st.adaptive.is_none(),
            "the throttle ends at the configured rate"
        );
    }
}
