//! `courier-loadtest`: what a Courier cluster holds, measured with real parts.
//!
//! A run has three pieces, all talking to the cluster the way production clients do:
//! - a **device swarm** ([`swarm`], [`worker`]): real mutual-TLS device links, spread over worker processes
//!   (each under the per-process file limit) and several loopback source addresses;
//! - **provider load** ([`load`]): HTTP/2 with ES256 JWTs, open-loop at a fixed rate or as fast as answered;
//! - a **ledger** ([`report`]) of every apns-id sent, answered and received, which yields latency
//!   histograms, errors by APNs reason, losses and duplicates.
//!
//! The target is a local cluster it spawns as child processes (`--spawn N`, see [`cluster`]) or an existing
//! one given by its endpoints, CA and provider key. The four scenarios are in [`scenario`].

pub mod chaos;
pub mod cli;
pub mod cluster;
pub mod devices;
pub mod fabric;
pub mod load;
pub mod msg;
pub mod report;
pub mod scenario;
pub mod swarm;
pub mod worker;

use std::process::ExitCode;

use clap::Parser;

/// The entry point of the `courier-loadtest` binary.
pub fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    courier_core::tls::install_crypto_provider();
    raise_fd_limit();
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
                cli::Command::Worker => worker::run().await.map(|()| true),
                cli::Command::Connect(args) => scenario::connect(args).await,
                cli::Command::Push(args) => scenario::push(args).await,
                cli::Command::Offline(args) => scenario::offline(args).await,
                cli::Command::Failover(args) => scenario::failover(args).await,
                cli::Command::Chaos(args) => chaos::chaos(args).await,
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

/// Raises the soft open-file limit to the hard one; child processes (workers, spawned nodes) inherit it.
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Makes `command`'s process receive SIGKILL when this one dies, however it dies (Linux), so that a
/// killed coordinator leaves no cluster or worker behind.
pub fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe, as code between fork and exec must be.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Microseconds since the UNIX epoch: the clock every receipt and send time is taken from (the swarm and
/// the provider run on one machine, so they share it).
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}
