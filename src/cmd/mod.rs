//! The subcommands of `courier`, one module each.

pub mod channels;
pub mod ctl;
pub mod dev;
pub mod device;
pub mod pki;
pub mod send;
pub mod serve;

use tracing_subscriber::EnvFilter;

/// Logs to stderr (stdout belongs to commands' output), filtered by `RUST_LOG`; by default `info`, with
/// openraft limited to errors: its warnings are routine notes about superseded messages.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
