//! `courier`: one binary for every role. This file only parses the command line and dispatches.

mod cmd;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: a push allocates and frees small buffers at every hop (HTTP/2
/// frames, protobuf messages, TLS records), and glibc's malloc was a tenth of a gateway's CPU under load
/// (BENCHMARKS.md, "The push path, round 3").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "courier", version, about = "Self-hostable, APNs-compatible push notification service")]
struct Cli {
    /// Threads of the async runtime (default: one per CPU). Several Courier processes sharing a few cores
    /// (a test or load-test cluster on one machine) run better with 1 each: fewer threads contend for the
    /// same cores. A node or gateway on a machine of its own keeps the default. A node's device TLS
    /// handshakes run on a second runtime with as many threads, unless `--handshake-threads` says otherwise.
    #[arg(long, global = true, env = "COURIER_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole local cluster (node + gateway) on loopback with generated PKI.
    Dev(cmd::dev::DevArgs),
    /// Run a cluster node.
    Node(Box<cmd::serve::NodeArgs>),
    /// Run a provider-facing gateway.
    Gateway(cmd::serve::GatewayArgs),
    /// Create certificate authorities, certificates and keys.
    #[command(subcommand)]
    Pki(cmd::pki::PkiCommand),
    /// Run a demo device: activate once, connect, register a topic, print notifications as JSON lines.
    Device(cmd::device::DeviceArgs),
    /// Send one push through a gateway, as a provider would.
    Send(cmd::send::SendArgs),
    /// Broadcast channels as a provider uses them: create, show, list, delete, and send to a channel.
    Channels(cmd::channels::ChannelsArgs),
    /// Administer a cluster: status, nodes, token keys, providers, devices.
    Ctl(cmd::ctl::CtlArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = cli.worker_threads {
        runtime.worker_threads(usize::from(threads));
    }
    let mut command = cli.command;
    if let Command::Node(args) = &mut command {
        args.handshake_threads_default(cli.worker_threads);
    }
    runtime.build()?.block_on(run(command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    cmd::init_tracing();
    courier_core::tls::install_crypto_provider();
    match command {
        Command::Dev(args) => cmd::dev::run(args).await,
        Command::Node(args) => cmd::serve::node(*args).await,
        Command::Gateway(args) => cmd::serve::gateway(args).await,
        Command::Pki(command) => cmd::pki::run(command),
        Command::Device(args) => cmd::device::run(args).await,
        Command::Send(args) => cmd::send::run(args).await,
        Command::Channels(args) => cmd::channels::run(args).await,
        Command::Ctl(args) => cmd::ctl::run(args).await,
    }
}
