//! Real `courier node` processes on loopback: they form a cluster, every process computes the same ring
//! owner for the same epoch as a gateway in this process, and a node killed with SIGKILL is marked down
//! and routed around.

use crate::common;

use std::time::Duration;

use common::{eventually, spawn_node};
use courier_core::ids::DeviceId;
use courier_core::peer::Peers;
use courier_core::pki::{PkiDir, PkiOptions};
use courier_proto::cluster::StatusRequest;

async fn status(peers: &Peers, addr: &str, devices: &[String]) -> Option<serde_json::Value> {
    let mut client = peers.client(addr).ok()?;
    let answer = client.status(StatusRequest { devices: devices.to_vec() }).await.ok()?.into_inner();
    serde_json::from_slice(&answer.json).ok()
}

fn member_states(doc: &serde_json::Value) -> Vec<(u64, String)> {
    doc["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| (m["id"].as_u64().unwrap_or(0), m["state"].as_str().unwrap_or("").to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_processes_agree_with_a_gateway_on_every_owner_and_survive_a_kill() {
    courier_core::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    courier_core::pki::init(dir.path(), &PkiOptions::default()).unwrap();
    let pki = PkiDir::new(dir.path());
    let first = spawn_node(dir.path(), 1, None, None).await;
    let second = spawn_node(dir.path(), 2, Some(&first.cluster_addr), None).await;
    let mut third = spawn_node(dir.path(), 3, Some(&first.cluster_addr), None).await;
    let addrs = [first.cluster_addr.clone(), second.cluster_addr.clone(), third.cluster_addr.clone()];
    let peers = Peers::new(&pki, "admin", None, Duration::from_secs(2)).unwrap();

    eventually(Duration::from_secs(30), "three active members", || async {
        match status(&peers, &addrs[0], &[]).await {
            Some(doc) => member_states(&doc).iter().filter(|(_, s)| s == "active").count() == 3,
            None => false,
        }
    })
    .await;

    let mut config = courier_gateway::GatewayConfig::local(dir.path().to_path_buf(), "127.0.0.1:1".parse().unwrap());
    config.node_addrs = addrs.to_vec();
    let gateway = courier_gateway::start(config).await.unwrap();
    let devices: Vec<DeviceId> = (0..300u128).map(|i| DeviceId(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) + 17)).collect();
    let hex: Vec<String> = devices.iter().map(|d| d.to_string()).collect();

    // Every live process and the gateway name the same owner for every device, at the same epoch.
    let agree = |live: Vec<String>, members: usize| {
        let (gateway, peers, devices, hex) = (&gateway, &peers, &devices, &hex);
        async move {
            let Some(view) = gateway.view.borrow().clone() else { return false };
            if view.ring.members().len() != members {
                return false;
            }
            for addr in &live {
                let Some(doc) = status(peers, addr, hex).await else { return false };
                if doc["epoch"].as_u64() != Some(view.epoch.0) {
                    return false;
                }
                for (device, text) in devices.iter().zip(hex) {
                    if doc["owners"][text].as_u64() != view.ring.owner(*device) {
                        return false;
                    }
                }
            }
            true
        }
    };
    eventually(Duration::from_secs(30), "all three processes and the gateway agree", || agree(addrs.to_vec(), 3)).await;

    third.child.kill().await.expect("SIGKILL node 3");
    eventually(Duration::from_secs(15), "node 3 is marked down", || async {
        match status(&peers, &addrs[0], &[]).await {
            Some(doc) => member_states(&doc).contains(&(3, "down".to_string())),
            None => false,
        }
    })
    .await;
    eventually(Duration::from_secs(15), "the survivors and the gateway agree without node 3", || {
        agree(addrs[..2].to_vec(), 2)
    })
    .await;
    gateway.shutdown().await;
    drop((first, second));
}
