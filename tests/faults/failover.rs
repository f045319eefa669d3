//! Delivery survives node loss and rolling restarts: real `courier node` processes on loopback, a fleet of
//! 1,000 devices (some connected, some offline), a steady stream of pushes, and a ledger of apns-ids that
//! proves every push answered 200 reached its device's app exactly once.

use crate::ONE_AT_A_TIME;
use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{NodeProcess, TOPIC, eventually, free_port, push_for, spawn_node};
use courier_core::peer::Peers;
use courier_core::pki::{PkiDir, PkiOptions};
use courier_device::{DeviceCredentials, DeviceEndpoint, DeviceLink, LinkEvent, SeenIds};
use courier_gateway::provider::{JwtSigner, ProviderClient};
use courier_proto::cluster::StatusRequest;
use tokio::sync::Semaphore;

const DEVICES: usize = 1000;
const CONNECTED: usize = 300;

/// What was promised and what arrived.
#[derive(Default)]
struct Ledger {
    /// apns-id → device index, for every push the gateway answered 200.
    accepted: HashMap<String, usize>,
    /// apns-id → times the app saw it.
    received: HashMap<String, u32>,
    /// Receipts in arrival order: (when, device, node device address it came through).
    log: Vec<(Instant, usize, std::net::SocketAddr)>,
    refused: HashMap<u16, u32>,
    /// Devices whose app got a link at least once.
    linked: std::collections::HashSet<usize>,
}

struct Device {
    credentials: DeviceCredentials,
    token: String,
}

struct Harness {
    dir: tempfile::TempDir,
    nodes: Vec<NodeProcess>,
    ports: Vec<(u16, u16)>,
    gateway: courier_gateway::RunningGateway,
    provider: ProviderClient,
    signer: JwtSigner,
    peers: Peers,
}

impl Harness {
    /// The cluster, the gateway and the fleet; the provider connects last, since a connection that sends no
    /// request within the gateway's first-request deadline is closed, and building the fleet takes a while.
    async fn start() -> (Harness, Vec<Arc<Device>>) {
        courier_core::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        courier_core::pki::init(dir.path(), &PkiOptions::default()).unwrap();
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let mut nodes = vec![spawn_node(dir.path(), 1, None, Some(ports[0])).await];
        let seed = nodes[0].cluster_addr.clone();
        for (i, port) in ports.iter().enumerate().skip(1) {
            nodes.push(spawn_node(dir.path(), i as u64 + 1, Some(&seed), Some(*port)).await);
        }
        let pki = PkiDir::new(dir.path());
        let peers = Peers::new(&pki, "admin", None, Duration::from_secs(2)).unwrap();
        let mut config =
            courier_gateway::GatewayConfig::local(dir.path().to_path_buf(), "127.0.0.1:1".parse().unwrap());
        config.node_addrs = nodes.iter().map(|n| n.cluster_addr.clone()).collect();
        config.request_timeout_ms = 15_000;
        let gateway = courier_gateway::start(config).await.unwrap();
        let harness_peers = peers;
        eventually(Duration::from_secs(30), "three active members in the gateway's view", || {
            let view = gateway.view.borrow().clone();
            std::future::ready(view.is_some_and(|v| v.ring.members().len() == 3))
        })
        .await;
        let fleet = fleet(endpoints(&dir, &nodes)).await;
        let provider =
            ProviderClient::connect(gateway.provider_addr, "localhost", &pki.cluster_ca_cert()).await.unwrap();
        let signer = JwtSigner::from_pki(&pki).unwrap();
        (Harness { dir, nodes, ports, gateway, provider, signer, peers: harness_peers }, fleet)
    }

    fn endpoints(&self) -> Vec<DeviceEndpoint> {
        endpoints(&self.dir, &self.nodes)
    }
}

fn endpoints(dir: &tempfile::TempDir, nodes: &[NodeProcess]) -> Vec<DeviceEndpoint> {
    nodes
        .iter()
        .map(|n| DeviceEndpoint {
            addr: n.device_addr.parse().unwrap(),
            server_name: "localhost".into(),
            ca_path: PkiDir::new(dir.path()).cluster_ca_cert(),
        })
        .collect()
}

/// Member states as the node at `cluster_addr` sees them.
async fn states(peers: &Peers, cluster_addr: &str) -> Option<Vec<(u64, String)>> {
    {
        let mut client = peers.client(cluster_addr).ok()?;
        let answer = client.status(StatusRequest { devices: vec![] }).await.ok()?.into_inner();
        let doc: serde_json::Value = serde_json::from_slice(&answer.json).ok()?;
        Some(
            doc["members"]
                .as_array()?
                .iter()
                .map(|m| (m["id"].as_u64().unwrap_or(0), m["state"].as_str().unwrap_or("").to_string()))
                .collect(),
        )
    }
}

/// `DEVICES` devices, each activated and its topic registered (through any node; redirects are followed),
/// then offline again.
async fn fleet(endpoints: Vec<DeviceEndpoint>) -> Vec<Arc<Device>> {
    let limit = Arc::new(Semaphore::new(16));
    let tasks: Vec<_> = (0..DEVICES)
        .map(|i| {
            let (endpoint, limit) = (endpoints[i % endpoints.len()].clone(), limit.clone());
            tokio::spawn(async move {
                let _permit = limit.acquire().await.unwrap();
                let credentials = courier_device::activate(&endpoint, "").await.expect("activation");
                let mut link = DeviceLink::connect(&endpoint, &credentials, 30).await.expect("connect");
                let token = link.register(TOPIC).await.expect("register");
                link.close().await.expect("close");
                Arc::new(Device { credentials, token })
            })
        })
        .collect();
    let mut fleet = Vec::new();
    for task in tasks {
        fleet.push(task.await.unwrap());
    }
    fleet
}

/// Keeps one device's app connected until `stop`, reconnecting through any node, recording what the app
/// sees. The seen-set lives for the app's whole life, as a real app's would.
async fn run_device(
    index: usize,
    device: Arc<Device>,
    endpoints: Vec<DeviceEndpoint>,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
) {
    let mut seen = SeenIds::default();
    let mut next = index % endpoints.len();
    while !stop.load(Ordering::Relaxed) {
        let link =
            tokio::time::timeout(Duration::from_secs(5), DeviceLink::connect(&endpoints[next], &device.credentials, 5))
                .await;
        let mut link = match link {
            Ok(Ok(link)) => link,
            _ => {
                next = (next + 1) % endpoints.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        std::mem::swap(&mut link.seen, &mut seen);
        ledger.lock().unwrap().linked.insert(index);
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(500), link.next_app_event()).await {
                Err(_) => continue,
                Ok(Ok(LinkEvent::Notification(n))) => {
                    let mut ledger = ledger.lock().unwrap();
                    *ledger.received.entry(n.apns_id).or_default() += 1;
                    ledger.log.push((Instant::now(), index, link.node_addr));
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) => break,
            }
        }
        std::mem::swap(&mut link.seen, &mut seen);
    }
}

/// Sends `count` pushes over `duration` to devices in turn; records the answers.
async fn push_stream(
    provider: &ProviderClient,
    signer: &JwtSigner,
    fleet: &[Arc<Device>],
    ledger: Arc<Mutex<Ledger>>,
    count: usize,
    duration: Duration,
) {
    let limit = Arc::new(Semaphore::new(64));
    let pace = duration / count as u32;
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for k in 0..count {
        tokio::time::sleep_until(started + pace * k as u32).await;
        let index = (k * 7919) % fleet.len();
        let mut push = push_for(signer, &fleet[index].token, &format!(r#"{{"k":{k}}}"#));
        let apns_id = uuid::Uuid::new_v4().to_string();
        push.apns_id = Some(apns_id.clone());
        let (provider, ledger, permit) = (provider.clone(), ledger.clone(), limit.clone().acquire_owned().await);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let response = provider.push(&push).await.expect("the gateway answers");
            let mut ledger = ledger.lock().unwrap();
            if response.status == 200 {
                ledger.accepted.insert(apns_id, index);
            } else {
                *ledger.refused.entry(response.status).or_default() += 1;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Connects the offline devices and waits until every accepted push was seen, then checks exactly-once.
async fn settle(
    harness: &Harness,
    fleet: &[Arc<Device>],
    ledger: &Arc<Mutex<Ledger>>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let endpoints = harness.endpoints();
    let mut tasks = Vec::new();
    for (index, device) in fleet.iter().enumerate().skip(CONNECTED) {
        tasks.push(tokio::spawn(run_device(index, device.clone(), endpoints.clone(), ledger.clone(), stop.clone())));
    }
    let give_up = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let missing: Vec<(String, usize)> = {
            let ledger = ledger.lock().unwrap();
            ledger
                .accepted
                .iter()
                .filter(|(id, _)| !ledger.received.contains_key(*id))
                .map(|(id, device)| (id.clone(), *device))
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > give_up {
            let view = harness.gateway.view.borrow().clone().expect("view");
            let sample: Vec<String> = missing
                .iter()
                .take(10)
                .map(|(id, device)| {
                    let owner = view.ring.owner(fleet[*device].credentials.device_id);
                    format!("{id} device {device} (connected: {}) owner now {owner:?}", *device < CONNECTED)
                })
                .collect();
            let linked = ledger.lock().unwrap().linked.len();
            panic!(
                "{} accepted pushes never arrived ({linked} of {DEVICES} apps ever linked), e.g. {sample:#?}",
                missing.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ledger = ledger.lock().unwrap();
    for (apns_id, times) in &ledger.received {
        assert!(ledger.accepted.contains_key(apns_id), "a notification nobody accepted arrived: {apns_id}");
        assert_eq!(*times, 1, "{apns_id} reached the app {times} times");
    }
    assert!(ledger.refused.keys().all(|status| *status == 503), "only retryable refusals: {:?}", ledger.refused);
    tasks
}

type Apps = Vec<tokio::task::JoinHandle<()>>;

/// A cluster, an activated fleet, an empty ledger, and the first `CONNECTED` apps online.
async fn start_scenario() -> (Harness, Vec<Arc<Device>>, Arc<Mutex<Ledger>>, Arc<AtomicBool>, Apps) {
    let (harness, fleet) = Harness::start().await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let endpoints = harness.endpoints();
    let mut devices = Vec::new();
    for (index, device) in fleet.iter().enumerate().take(CONNECTED) {
        devices.push(tokio::spawn(run_device(index, device.clone(), endpoints.clone(), ledger.clone(), stop.clone())));
    }
    (harness, fleet, ledger, stop, devices)
}

fn owner_before(harness: &Harness, device: &Device) -> Option<u64> {
    harness.gateway.view.borrow().as_ref().and_then(|v| v.ring.owner(device.credentials.device_id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_node_loses_no_accepted_push() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (mut harness, fleet, ledger, stop, devices) = start_scenario().await;

    let victim = 2usize; // node 3
    let victim_device_addr: std::net::SocketAddr = harness.nodes[victim].device_addr.parse().unwrap();
    let owned_by_victim: Vec<usize> =
        (0..fleet.len()).filter(|i| owner_before(&harness, &fleet[*i]) == Some(victim as u64 + 1)).collect();
    assert!(!owned_by_victim.is_empty());

    let stream = push_stream(&harness.provider, &harness.signer, &fleet, ledger.clone(), 1500, Duration::from_secs(6));
    let nodes = &mut harness.nodes;
    let killer = async {
        // Once the stream is well under way (a third of its pushes answered 200), not after a fixed time.
        eventually(Duration::from_secs(30), "pushes are being accepted", || {
            std::future::ready(ledger.lock().unwrap().accepted.len() >= 500)
        })
        .await;
        nodes[victim].child.start_kill().expect("SIGKILL");
        Instant::now()
    };
    let ((), killed_at) = tokio::join!(stream, killer);
    let _ = harness.nodes[victim].child.wait().await;

    let tasks = settle(&harness, &fleet, &ledger, &stop).await;
    let accepted = ledger.lock().unwrap().accepted.len();
    let recovery = {
        let ledger = ledger.lock().unwrap();
        ledger
            .log
            .iter()
            .filter(|(at, device, via)| {
                *at > killed_at && owned_by_victim.contains(device) && *via != victim_device_addr
            })
            .map(|(at, _, _)| at.duration_since(killed_at))
            .min()
    };
    println!(
        "SIGKILL failover: {accepted} pushes accepted, all delivered exactly once; first delivery through a new owner {:?} after the kill",
        recovery
    );
    assert!(recovery.is_some(), "devices of the killed node got their notifications through another node");
    stop.store(true, Ordering::Relaxed);
    for task in devices.into_iter().chain(tasks) {
        let _ = task.await;
    }
    harness.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_and_duplicates_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (mut harness, fleet, ledger, stop, devices) = start_scenario().await;

    let stream = push_stream(&harness.provider, &harness.signer, &fleet, ledger.clone(), 2400, Duration::from_secs(12));
    let (nodes, dir, ports, peers) = (&mut harness.nodes, &harness.dir, &harness.ports, &harness.peers);
    let roll = async {
        for i in 0..3 {
            nodes[i].terminate(Duration::from_secs(30)).await;
            let seed = nodes[(i + 1) % 3].cluster_addr.clone();
            nodes[i] = spawn_node(dir.path(), i as u64 + 1, Some(&seed), Some(ports[i])).await;
            let via = nodes[(i + 1) % 3].cluster_addr.clone();
            eventually(Duration::from_secs(30), "the restarted node is active again", || async {
                states(peers, &via).await.is_some_and(|s| s.iter().all(|(_, state)| state == "active") && s.len() == 3)
            })
            .await;
        }
    };
    tokio::join!(stream, roll);

    let tasks = settle(&harness, &fleet, &ledger, &stop).await;
    let accepted = ledger.lock().unwrap().accepted.len();
    println!("rolling restart: {accepted} pushes accepted, all delivered exactly once");
    // A roll that refused the pushes would pass the ledger trivially: most must have been accepted.
    assert!(accepted * 2 >= 2400, "only {accepted} of 2400 pushes were accepted during the roll");
    stop.store(true, Ordering::Relaxed);
    for task in devices.into_iter().chain(tasks) {
        let _ = task.await;
    }
    harness.gateway.shutdown().await;
}
