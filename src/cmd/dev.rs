//! `courier dev`: a whole local cluster in one process, on loopback, with PKI generated under `--dir`
//! (kept and reused on the next start, so device certificates and tokens stay valid).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use courier_core::pki::{self, PkiDir, PkiOptions};

#[derive(clap::Args)]
pub struct DevArgs {
    /// Directory for the generated PKI, each node's data (`node-N/`) and the demo devices.
    #[arg(long, default_value = "courier-dev")]
    dir: PathBuf,
    /// How many nodes; node N listens on the base ports + N - 1.
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Topic printed in the example commands.
    #[arg(long, default_value = "com.example.app")]
    topic: String,
    #[arg(long, default_value = "127.0.0.1:8443")]
    provider_addr: SocketAddr,
    /// Where channel management (broadcast channels) listens; APNs's port.
    #[arg(long, default_value = "127.0.0.1:2196")]
    channels_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9500")]
    gateway_metrics_addr: SocketAddr,
    /// Device port of node 1.
    #[arg(long, default_value = "127.0.0.1:5223")]
    device_base: SocketAddr,
    /// Cluster API port of node 1.
    #[arg(long, default_value = "127.0.0.1:7400")]
    cluster_base: SocketAddr,
    /// Metrics port of node 1.
    #[arg(long, default_value = "127.0.0.1:9400")]
    metrics_base: SocketAddr,
}

fn nth(base: SocketAddr, n: u16) -> SocketAddr {
    SocketAddr::new(base.ip(), base.port() + n)
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if args.nodes == 0 {
        anyhow::bail!("--nodes must be at least 1");
    }
    let options = PkiOptions { nodes: (1..=u64::from(args.nodes)).collect(), ..PkiOptions::default() };
    let credential =
        pki::init(&args.dir, &options).with_context(|| format!("creating the dev PKI in {}", args.dir.display()))?;
    let paths = PkiDir::new(&args.dir);

    let mut nodes = Vec::new();
    for i in 0..args.nodes {
        let id = u64::from(i) + 1;
        let mut config = courier_node::NodeConfig::local(args.dir.clone(), args.dir.join(format!("node-{id}")));
        config.node_id = id;
        // Receivers on this machine (`http://127.0.0.1:…`) are what a development cluster's webhooks reach.
        config.webhooks_allow_private = true;
        config.device_addr = nth(args.device_base, i);
        config.cluster_addr = nth(args.cluster_base, i);
        config.metrics_addr = nth(args.metrics_base, i);
        if i > 0 {
            config.join = vec![args.cluster_base.to_string()];
        }
        nodes.push(courier_node::start(config).await.with_context(|| format!("starting node {id}"))?);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|n| n.is_ready()) {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the dev cluster did not form within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut gateway_config = courier_gateway::GatewayConfig::local(args.dir.clone(), args.cluster_base);
    gateway_config.node_addrs = nodes.iter().map(|n| n.cluster_addr.to_string()).collect();
    gateway_config.provider_addr = args.provider_addr;
    gateway_config.channels_addr = args.channels_addr;
    gateway_config.metrics_addr = args.gateway_metrics_addr;
    let gateway = courier_gateway::start(gateway_config).await.context("starting the gateway")?;

    let dir = args.dir.display();
    let topic = &args.topic;
    println!(
        "Courier dev cluster is up: {} nodes and a gateway. PKI and data live in {dir}/ and are reused.",
        nodes.len()
    );
    println!();
    println!(
        "  provider API  https://{}  (HTTP/2, APNs wire format; CA {})",
        gateway.provider_addr,
        paths.cluster_ca_cert().display()
    );
    println!("  channels      https://{}  (APNs channel management, same CA and credentials)", gateway.channels_addr);
    for (i, node) in nodes.iter().enumerate() {
        println!(
            "  node {}        devices {}  cluster API {}  metrics http://{}/metrics",
            i + 1,
            node.device_addr,
            node.cluster_addr,
            node.metrics_addr
        );
    }
    println!("  gateway       metrics http://{}/metrics", gateway.metrics_addr);
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
    println!("Broadcast channels: create one, add `--channel <id>` to the device, and send to it:");
    println!("  cargo run --release -- channels create --dir {dir} --policy 1");
    println!(
        "  cargo run --release -- channels send --dir {dir} <id> '{{\"aps\":{{\"event\":\"update\",\"content-state\":{{}}}}}}'"
    );
    println!("See the cluster:");
    println!("  cargo run --release -- ctl --pki-dir {dir} status");
    println!();
    println!("Ctrl-C stops the cluster.");

    super::terminated().await;
    tracing::info!("shutting down");
    gateway.shutdown().await;
    for node in nodes {
        node.shutdown().await;
    }
    Ok(())
}
