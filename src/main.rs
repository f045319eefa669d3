//! `courier`: one binary for every role. This file only parses the command line and dispatches.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "courier", version, about = "Self-hostable, APNs-compatible push notification service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole local cluster (node + gateway) on loopback with generated PKI.
    Dev(cmd::dev::DevArgs),
    /// Run a cluster node.
    Node(cmd::serve::NodeArgs),
    /// Run a provider-facing gateway.
    Gateway(cmd::serve::GatewayArgs),
    /// Create certificate authorities, certificates and keys.
    #[command(subcommand)]
    Pki(cmd::pki::PkiCommand),
    /// Run a demo device: activate once, connect, register a topic, print notifications as JSON lines.
    Device(cmd::device::DeviceArgs),
    /// Send one push through a gateway, as a provider would.
    Send(cmd::send::SendArgs),
    /// Administer a cluster: status, nodes, token keys, providers, devices.
    Ctl(cmd::ctl::CtlArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cmd::init_tracing();
    courier_node::tls::install_crypto_provider();
    match Cli::parse().command {
        Command::Dev(args) => cmd::dev::run(args).await,
        Command::Node(args) => cmd::serve::node(args).await,
        Command::Gateway(args) => cmd::serve::gateway(args).await,
        Command::Pki(command) => cmd::pki::run(command),
        Command::Device(args) => cmd::device::run(args).await,
        Command::Send(args) => cmd::send::run(args).await,
        Command::Ctl(args) => cmd::ctl::run(args).await,
    }
}
