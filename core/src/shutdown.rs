//! Shutdown, one way in every process (tokio-util's primitives, as its documentation on graceful
//! shutdown describes): a `CancellationToken` that the owner of a set of tasks cancels once and that each
//! task waits on (`token.cancelled()`, cloned into every task), and a `TaskTracker` the owner waits on
//! until every task it spawned has finished. An owner that may be dropped without shutting down holds a
//! `DropGuard`, so its tasks are still told to stop.

pub use tokio_util::sync::{CancellationToken, DropGuard};
pub use tokio_util::task::TaskTracker;
