//! Fault injection for tests: a point in the code asks [`hit`] whether to fail now. Nothing is
//! armed unless a test calls [`arm`]; an unarmed check costs one atomic load.
//!
//! Points are armed for a key (a mailbox name, a recipient address) so that tests running in
//! parallel in one process never trip each other's faults. Used where no real part can be made
//! to fail on cue: a panic inside the watcher or inside a delivery.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

static ARMED: AtomicBool = AtomicBool::new(false);
/// (point, key, times left).
static POINTS: Mutex<Vec<(&'static str, String, usize)>> = Mutex::new(Vec::new());

/// Makes `point` fire the next `times` times it is reached for `key`.
pub fn arm(point: &'static str, key: &str, times: usize) {
    POINTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((point, key.to_string(), times));
    ARMED.store(true, Ordering::Release);
}

/// Does `point` fire now for `key`? (Counts one firing.)
pub fn hit(point: &'static str, key: &str) -> bool {
    if !ARMED.load(Ordering::Acquire) {
        return false;
    }
    let mut points = POINTS.lock().unwrap_or_else(|p| p.into_inner());
    for p in points.iter_mut() {
        if p.0 == point && p.1 == key && p.2 > 0 {
            p.2 -= 1;
            return true;
        }
    }
    false
}

/// Stops `point` firing for `key` (its firings left are dropped).
pub fn disarm(point: &'static str, key: &str) {
    for p in POINTS.lock().unwrap_or_else(|p| p.into_inner()).iter_mut() {
        if p.0 == point && p.1 == key {
            p.2 = 0;
        }
    }
}

/// The firings left for `point` and `key` (0 once they have all happened).
pub fn left(point: &'static str, key: &str) -> usize {
    POINTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|p| p.0 == point && p.1 == key)
        .map(|p| p.2)
        .sum()
}

/// The watcher panics while scanning a message (key: the mailbox name).
pub const WATCHER_PANIC: &str = "watcher.scan.panic";
/// A delivery panics after its claim (key: the email's first recipient).
pub const DELIVERY_PANIC: &str = "delivery.panic";
/// A group commit holding this submission fails (key: the submission's request id).
pub const GROUP_COMMIT_FAIL: &str = "store.group_commit.fail";
/// The commit of a batch of claims and completions holding this email's outcome fails, the
/// transaction rolled back (key: the email's id).
pub const RECORD_COMMIT_FAIL: &str = "store.record.commit_fail";
/// The commit of a batch holding this email's claim fails, the transaction rolled back (key:
/// the email's id).
pub const CLAIM_COMMIT_FAIL: &str = "store.claim.commit_fail";
/// The commit of a batch holding a worker's fetch fails, the transaction rolled back (key: the
/// queue's job type, e.g. `default`).
pub const FETCH_COMMIT_FAIL: &str = "store.fetch.commit_fail";
/// A worker's fetch answers [`FETCH_SLOW_FOR`] after its statement ran, as if the database
/// were slow (key: the queue's job type).
pub const FETCH_SLOW: &str = "queue.fetch.slow";
pub const FETCH_SLOW_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// The webhook dispatchers' own thread cannot be started; they run on the workers' runtime
/// (key: the name of the first configured webhook).
pub const WEBHOOK_THREAD_FAIL: &str = "webhooks.thread.fail";
