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

pub async fn node(args: NodeArgs) -> anyhow::Result<()> {
    let node = courier_node::start(args.config).await.context("starting the node")?;
    super::terminated().await;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let gateway = courier_gateway::start(args.config).await.context("starting the gateway")?;
    super::terminated().await;
    tracing::info!("shutting down");
    gateway.shutdown().await;
    Ok(())
}
