//! Shutdown as every process sends it: a `watch` channel whose value turns `true` once, and tasks that wait
//! for that.

use tokio::sync::watch;

/// Completes when `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
