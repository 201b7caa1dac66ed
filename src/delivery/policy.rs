//! The retry policy: pure, table-tested. The backoff it computes becomes the `run_at` of the
//! next job; no worker ever sleeps on it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::ConfigError;

/// Retry knobs, named as task-queue users know them (Cloud Tasks, Sidekiq, Oban).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. Reaching it fails the email.
    pub max_attempts: u32,
    /// No new attempt starts once the email is older than this (counted from `send_at`, or from
    /// submission).
    pub max_age_secs: u64,
    pub min_backoff_secs: u64,
    pub max_backoff_secs: u64,
    /// The backoff doubles this many times, then grows no more (before the `max_backoff` cap).
    pub max_doublings: u32,
    /// Full jitter above the floor: the delay is uniform in [min_backoff, computed backoff].
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            max_age_secs: 2 * 24 * 3600,
            min_backoff_secs: 30,
            max_backoff_secs: 3600,
            max_doublings: 7,
            jitter: true,
        }
    }
}

/// What to do after an attempt that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Stop: the email fails, with this reason.
    GiveUp(String),
}

impl RetryPolicy {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_backoff_secs < self.min_backoff_secs {
            return Err(ConfigError {
                key: "retry.max_backoff_secs".into(),
                message: "must be at least retry.min_backoff_secs".into(),
            });
        }
        Ok(())
    }

    /// The delay before the next attempt, given how many attempts were made (>= 1) and a random
    /// number in [0, 1) for the jitter.
    pub fn backoff(&self, attempts_made: u32, rand01: f64) -> Duration {
        let doublings = attempts_made
            .saturating_sub(1)
            .min(self.max_doublings)
            .min(40);
        let base = self
            .min_backoff_secs
            .saturating_mul(1u64 << doublings)
            .min(self.max_backoff_secs);
        let secs = if self.jitter {
            let span = base.saturating_sub(self.min_backoff_secs) as f64;
            self.min_backoff_secs as f64 + span * rand01.clamp(0.0, 1.0)
        } else {
            base as f64
        };
        Duration::from_secs_f64(secs)
    }

    /// After a temporary failure: retry, or give up because attempts or age are exhausted.
    pub fn after_temporary_failure(
        &self,
        attempts_made: u32,
        age: Duration,
        rand01: f64,
    ) -> Decision {
        if attempts_made >= self.max_attempts {
            return Decision::GiveUp(format!(
                "gave up after {attempts_made} attempts (retry.max_attempts)"
            ));
        }
        let delay = self.backoff(attempts_made, rand01);
        if (age + delay).as_secs() > self.max_age_secs {
            return Decision::GiveUp(format!(
                "gave up: next attempt would be past retry.max_age_secs ({}s)",
                self.max_age_secs
            ));
        }
        Decision::RetryAfter(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            max_age_secs: 3600,
            min_backoff_secs: 10,
            max_backoff_secs: 100,
            max_doublings: 3,
            jitter: false,
        }
    }

    #[test]
    fn backoff_doubles_then_caps() {
        let p = policy();
        let table = [(1, 10), (2, 20), (3, 40), (4, 80), (5, 80), (9, 80)];
        for (attempts, secs) in table {
            assert_eq!(
                p.backoff(attempts, 0.5).as_secs(),
                secs,
                "attempt {attempts}"
            );
        }
        let capped = RetryPolicy {
            max_doublings: 10,
            ..policy()
        };
        assert_eq!(capped.backoff(8, 0.0).as_secs(), 100);
    }

    #[test]
    fn jitter_stays_between_floor_and_backoff() {
        let p = RetryPolicy {
            jitter: true,
            ..policy()
        };
        assert_eq!(p.backoff(3, 0.0).as_secs(), 10);
        assert_eq!(p.backoff(3, 0.999_999).as_secs_f64().round() as u64, 40);
        let mid = p.backoff(3, 0.5).as_secs_f64();
        assert!((24.0..=26.0).contains(&mid), "{mid}");
    }

    #[test]
    fn gives_up_on_attempts_and_on_age() {
        let p = policy();
        assert_eq!(
            p.after_temporary_failure(1, Duration::ZERO, 0.0),
            Decision::RetryAfter(Duration::from_secs(10))
        );
        assert!(
            matches!(p.after_temporary_failure(5, Duration::ZERO, 0.0), Decision::GiveUp(r) if r.contains("5 attempts"))
        );
        assert!(
            matches!(p.after_temporary_failure(2, Duration::from_secs(3590), 0.0), Decision::GiveUp(r) if r.contains("max_age"))
        );
    }
}
