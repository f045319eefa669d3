//! `courier node` and `courier gateway`: run one role until SIGTERM or Ctrl-C, then shut down cleanly.

use anyhow::Context;

#[derive(clap::Args)]
pub struct NodeArgs {
    #[command(flatten)]
    config: courier_node::NodeConfig,
}

#[derive(clap::Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    config: courier_gateway::GatewayConfig,
}

impl NodeArgs {
    /// The handshake runtime gets `threads` (`courier --worker-threads`) unless `--handshake-threads` is set.
    pub fn handshake_threads_default(&mut self, threads: Option<u16>) {
        self.config.handshake_threads = self.config.handshake_threads.or(threads);
    }
}

pub async fn node(args: NodeArgs) -> anyhow::Result<()> {
    let drain_deadline = std::time::Duration::from_secs(args.config.drain_deadline_secs);
    let node = courier_node::start(args.config).await.context("starting the node")?;
    let node_id = node.control.id;
    // One machine-readable line, so scripts and tests can bind port 0 and still find the node.
    println!(
        "{}",
        serde_json::json!({
            "event": "listening",
            "node_id": node_id,
            "device_addr": node.device_addr.to_string(),
            "cluster_addr": node.cluster_addr.to_string(),
            "metrics_addr": node.metrics_addr.to_string(),
        })
    );
    super::terminated().await;
    tracing::info!("draining before exit");
    node.drain(drain_deadline).await;
    Ok(())
}

pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let gateway = courier_gateway::start(args.config).await.context("starting the gateway")?;
    println!(
        "{}",
        serde_json::json!({
            "event": "listening",
            "provider_addr": gateway.provider_addr.to_string(),
            "channels_addr": gateway.channels_addr.to_string(),
            "metrics_addr": gateway.metrics_addr.to_string(),
        })
    );
    super::terminated().await;
    tracing::info!("shutting down");
    gateway.shutdown().await;
    Ok(())
}
