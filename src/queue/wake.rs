//! Wake-ups of this process's idle workers: a submit here, PostgreSQL's NOTIFY, the due timer,
//! the janitor's hand-backs. Coalescing (a thousand submits make one wake-up), and counted, so
//! a fetch can tell whether one came while it ran (see `backend::QueuePersistence::fetch_now`).
//!
//! Why both: apalis 1.0's `PollWith` polls the strategy's stream (this one's [`Wake::stream`])
//! at every poll of the backend and ignores what it yields; the stream only makes apalis poll
//! again, and a poll fetches only when no fetch is running. So a wake-up that arrives while a
//! fetch runs is consumed by a poll that starts no fetch, and the fetch it raced answers from
//! before the submit: that email waited for `queue.poll_interval_ms` (seen once in CI on
//! PostgreSQL: the first fetch at start ran while a test submitted, 20 s without a send).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

#[derive(Debug, Default)]
pub struct Wake {
    pending: AtomicBool,
    /// Wake-ups so far: a fetch compares it before and after itself.
    seq: AtomicU64,
    waker: AtomicWaker,
}

impl Wake {
    pub fn notify(&self) {
        self.seq.fetch_add(1, Ordering::AcqRel);
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// The wake-ups so far (see [`Wake`]).
    pub(crate) fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// The stream apalis's poll strategy waits on: one item per burst of wake-ups.
    pub(crate) fn stream(self: &Arc<Self>) -> WakeStream {
        WakeStream(self.clone())
    }
}

pub(crate) struct WakeStream(Arc<Wake>);

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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{FutureExt, StreamExt};

    #[test]
    fn each_wake_up_is_counted_and_a_burst_is_one_item() {
        let wake = Arc::new(Wake::default());
        let mut s = wake.stream();
        let before = wake.seq();
        wake.notify();
        wake.notify();
        assert_eq!(wake.seq(), before + 2);
        assert_eq!(s.next().now_or_never(), Some(Some(())));
        assert_eq!(s.next().now_or_never(), None, "one item for the burst");
    }
}
