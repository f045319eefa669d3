//! `courier-loadtest`: points a device swarm and provider load at a Courier cluster (or one it spawns).
//! The scenarios live in the `courier-loadtest` library; this parses the command line, sets up the process
//! (file limit, logging, runtime) and runs one. See `courier-loadtest --help`.

use std::process::ExitCode;

use clap::Parser;
use courier_loadtest::cli::{Cli, Command};
use courier_loadtest::{chaos, scenario, worker};

/// The same allocator as `courier` (see src/main.rs), so that the load generator spends as little of the
/// shared cores as it can.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    courier_core::tls::install_crypto_provider();
    courier_loadtest::raise_fd_limit();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("courier-loadtest: starting the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async move {
        let run = async move {
            match cli.command {
                Command::Worker => worker::run().await.map(|()| true),
                Command::Connect(args) => scenario::connect(args).await,
                Command::Push(args) => scenario::push(args).await,
                Command::Offline(args) => scenario::offline(args).await,
                Command::Failover(args) => scenario::failover(args).await,
                Command::Broadcast(args) => scenario::broadcast(args).await,
                Command::Chaos(args) => chaos::chaos(args).await,
            }
        };
        // Ctrl-C drops the run, and with it every child process (spawned nodes, the gateway, workers).
        tokio::select! {
            outcome = run => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; the spawned cluster and workers are stopped")),
        }
    });
    // Device tasks may still be closing; the process is done either way.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("courier-loadtest: {error:#}");
            ExitCode::from(2)
        }
    }
}
