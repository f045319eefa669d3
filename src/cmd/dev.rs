//! `courier dev`: a whole local cluster in one process, on loopback, with PKI generated under `--dir`
//! (kept and reused on the next start, so device certificates and tokens stay valid).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use courier_node::pki::{self, PkiDir, PkiOptions};

#[derive(clap::Args)]
pub struct DevArgs {
    /// Directory for the generated PKI, the node's data and the demo devices.
    #[arg(long, default_value = "courier-dev")]
    dir: PathBuf,
    /// Topic printed in the example commands.
    #[arg(long, default_value = "com.example.app")]
    topic: String,
    #[arg(long, default_value = "127.0.0.1:8443")]
    provider_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:5223")]
    device_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:7400")]
    cluster_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9400")]
    node_metrics_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9401")]
    gateway_metrics_addr: SocketAddr,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let credential = pki::init(&args.dir, &PkiOptions::default())
        .with_context(|| format!("creating the dev PKI in {}", args.dir.display()))?;
    let paths = PkiDir::new(&args.dir);

    let mut node_config = courier_node::NodeConfig::local(args.dir.clone(), args.dir.join("node-1"));
    node_config.device_addr = args.device_addr;
    node_config.cluster_addr = args.cluster_addr;
    node_config.metrics_addr = args.node_metrics_addr;
    let node = courier_node::start(node_config).await.context("starting the node")?;

    let mut gateway_config = courier_gateway::GatewayConfig::local(args.dir.clone(), node.cluster_addr);
    gateway_config.provider_addr = args.provider_addr;
    gateway_config.metrics_addr = args.gateway_metrics_addr;
    let gateway = courier_gateway::start(gateway_config).await.context("starting the gateway")?;

    let dir = args.dir.display();
    let topic = &args.topic;
    println!("Courier dev cluster is up; PKI and data live in {dir}/ and are reused next time.");
    println!();
    println!(
        "  provider API  https://{}  (HTTP/2, APNs wire format; CA {})",
        gateway.provider_addr,
        paths.cluster_ca_cert().display()
    );
    println!("  device port   {}  (mutual TLS)", node.device_addr);
    println!(
        "  metrics       http://{}/metrics (node), http://{}/metrics (gateway)",
        node.metrics_addr, gateway.metrics_addr
    );
    println!("  team id       {}", credential.team_id);
    println!("  key id        {}", credential.key_id);
    println!("  signing key   {}", paths.provider_signing_key(&credential.key_id).display());
    println!("  topic         {topic}");
    println!();
    println!("In a second terminal, start a demo device (it prints its token, then each notification):");
    println!("  cargo run --release -- device --dir {dir} --topic {topic}");
    println!("In a third, send it a push (the token defaults to the demo device's):");
    println!(
        "  cargo run --release -- send --dir {dir} --topic {topic} '{{\"aps\":{{\"alert\":\"Hello from Courier\"}}}}'"
    );
    println!();
    println!("Ctrl-C stops the cluster.");

    super::terminated().await;
    tracing::info!("shutting down");
    gateway.shutdown().await;
    node.shutdown().await;
    Ok(())
}
