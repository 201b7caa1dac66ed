//! The stop signal every long-running loop awaits (the API, the workers, the watchers, the
//! janitor): one future, cloneable, fired once by the caller (an OS signal in `postbox serve`).

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

/// A shutdown signal every loop can await (cloneable).
pub type Shutdown = Shared<BoxFuture<'static, ()>>;

/// Turns any future into a [`Shutdown`].
pub fn shutdown_signal(f: impl Future<Output = ()> + Send + 'static) -> Shutdown {
    f.boxed().shared()
}
