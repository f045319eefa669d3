//! A device's first link goes to its owner: real `courier node` processes on loopback, devices activated
//! through one node learn from `Activated.owner` which node owns them, and their first link is welcomed
//! there without a redirect (no node counts one). When a new member takes a device over, the link opened
//! to the owner named at activation is redirected to the new one; when that owner does not answer at all,
//! the device starts at its configured endpoint instead. The real `courier device` keeps the owner in its
//! credentials directory and links there first too. Owners are checked against what each process reports
//! in its status document, and redirects against each process's own metrics.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{NodeProcess, eventually, free_port, http_get, spawn_node};
use courier_core::ids::DeviceId;
use courier_core::peer::Peers;
use courier_core::pki::{self, PkiDir, PkiOptions};
use courier_device::{DeviceCredentials, DeviceEndpoint, DeviceLink, RedirectTarget};
use courier_proto::cluster::StatusRequest;

/// Devices activated through node 1: enough that some are owned by node 1 and some elsewhere, and that
/// some move to a fourth member (each does with about 1/4 chance), few enough to set up fast.
const DEVICES: usize = 40;
/// How long the processes get to form the cluster or take in a new member.
const SETTLE: Duration = Duration::from_secs(30);

struct Cluster {
    dir: tempfile::TempDir,
    nodes: Vec<NodeProcess>,
    peers: Peers,
}

impl Cluster {
    async fn start(count: u64) -> Cluster {
        courier_core::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        pki::init(dir.path(), &PkiOptions::default()).expect("PKI");
        let peers = Peers::new(&PkiDir::new(dir.path()), "admin", None, Duration::from_secs(2)).expect("admin client");
        let mut cluster = Cluster { dir, nodes: Vec::new(), peers };
        for id in 1..=count {
            cluster.add(id).await;
        }
        cluster
    }

    /// Starts node `id` (joining through node 1 unless it is the first) and waits until every process
    /// names all of them active at one epoch.
    async fn add(&mut self, id: u64) {
        let seed = self.nodes.first().map(|first| first.cluster_addr.clone());
        self.nodes.push(spawn_node(self.dir.path(), id, seed.as_deref(), None).await);
        let (cluster, members) = (&*self, self.nodes.len());
        eventually(SETTLE, &format!("every process has {members} active members at one epoch"), || async move {
            let mut epochs = Vec::new();
            for node in &cluster.nodes {
                let Some(doc) = cluster.status(node, &[]).await else { return false };
                let active = doc["members"].as_array().into_iter().flatten().filter(|m| m["state"] == "active");
                if active.count() != members {
                    return false;
                }
                epochs.push(doc["epoch"].as_u64());
            }
            epochs.windows(2).all(|pair| pair[0] == pair[1])
        })
        .await;
    }

    fn node(&self, id: u64) -> &NodeProcess {
        &self.nodes[id as usize - 1]
    }

    async fn status(&self, node: &NodeProcess, devices: &[DeviceId]) -> Option<serde_json::Value> {
        let mut client = self.peers.client(&node.cluster_addr).ok()?;
        let devices = devices.iter().map(|d| d.to_string()).collect();
        let answer = client.status(StatusRequest { devices }).await.ok()?.into_inner();
        serde_json::from_slice(&answer.json).ok()
    }

    /// The owner of each device as node 1 sees it (the processes agree: `add` waited for one epoch).
    async fn owners(&self, devices: &[DeviceId]) -> BTreeMap<DeviceId, u64> {
        let doc = self.status(self.node(1), devices).await.expect("node 1 answers Status");
        devices
            .iter()
            .map(|d| (*d, doc["owners"][d.to_string()].as_u64().unwrap_or_else(|| panic!("an owner for {d}"))))
            .collect()
    }

    /// What `Activated.owner` should say for a device node `id` owns.
    fn target(&self, id: u64) -> RedirectTarget {
        RedirectTarget { device_addr: self.node(id).device_addr.clone(), server_name: pki::node_device_name(id) }
    }

    fn endpoint(&self, id: u64) -> DeviceEndpoint {
        DeviceEndpoint {
            addr: self.node(id).device_addr.parse().expect("a socket address"),
            server_name: "localhost".into(),
            ca_path: PkiDir::new(self.dir.path()).cluster_ca_cert(),
        }
    }

    /// Redirects every process has sent, by node id, from their own metrics.
    async fn redirects(&self) -> BTreeMap<u64, u64> {
        let mut counts = BTreeMap::new();
        for node in &self.nodes {
            let text = http_get(&format!("http://{}/metrics", node.metrics_addr)).await;
            // A counter never incremented is not exported at all.
            let count = text
                .lines()
                .filter(|line| line.starts_with("courier_node_link_redirects_total"))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
            counts.insert(node.id, count as u64);
        }
        counts
    }
}

async fn connect(endpoint: &DeviceEndpoint, credentials: &DeviceCredentials) -> DeviceLink {
    tokio::time::timeout(Duration::from_secs(30), DeviceLink::connect(endpoint, credentials, 0))
        .await
        .expect("the device links in time")
        .expect("the device links")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_link_goes_straight_to_the_owner_and_later_ones_follow_the_ring() {
    let mut cluster = Cluster::start(3).await;
    let node1 = cluster.endpoint(1);

    let mut devices = Vec::with_capacity(DEVICES);
    for _ in 0..DEVICES {
        devices.push(courier_device::activate(&node1, "").await.expect("activation through node 1"));
    }
    let ids: Vec<DeviceId> = devices.iter().map(|d| d.device_id).collect();
    let owners = cluster.owners(&ids).await;
    for device in &devices {
        let owner = owners[&device.device_id];
        assert_eq!(
            device.owner,
            Some(cluster.target(owner)),
            "node 1 names node {owner} as {}'s owner",
            device.device_id
        );
    }
    let elsewhere: Vec<&DeviceCredentials> = devices.iter().filter(|d| owners[&d.device_id] != 1).collect();
    assert!(
        !elsewhere.is_empty() && elsewhere.len() < DEVICES,
        "some of {DEVICES} devices are owned by node 1, some not"
    );

    // Every first link, dialled through node 1, is welcomed by the owner and redirected by no one.
    for device in &devices {
        let link = connect(&node1, device).await;
        let owner = owners[&device.device_id];
        assert_eq!(
            link.node_addr.to_string(),
            cluster.node(owner).device_addr,
            "{} linked to node {owner}",
            link.device_id
        );
        link.close().await.expect("close");
    }
    assert!(cluster.redirects().await.values().all(|n| *n == 0), "redirects: {:?}", cluster.redirects().await);

    // A fourth member takes over about a quarter of the devices; a link to the owner named at activation
    // is sent on to it.
    cluster.add(4).await;
    let after = cluster.owners(&ids).await;
    let moved: Vec<&DeviceCredentials> =
        devices.iter().filter(|d| after[&d.device_id] != owners[&d.device_id]).collect();
    assert!(!moved.is_empty(), "none of {DEVICES} devices moved to node 4");
    for device in &moved {
        assert_eq!(after[&device.device_id], 4, "{} moved, and only to the new member", device.device_id);
        let link = connect(&node1, device).await;
        assert_eq!(link.node_addr.to_string(), cluster.node(4).device_addr, "{} reached node 4", link.device_id);
        link.close().await.expect("close");
    }
    let mut expected: BTreeMap<u64, u64> = (1..=4).map(|id| (id, 0)).collect();
    for device in &moved {
        *expected.entry(owners[&device.device_id]).or_default() += 1;
    }
    assert_eq!(cluster.redirects().await, expected, "each moved device was redirected once, by its old owner");

    // An owner that does not answer (here: nothing listens where it was) leaves the configured endpoint.
    let mut stranded = moved[0].clone();
    stranded.owner = Some(RedirectTarget {
        device_addr: format!("127.0.0.1:{}", free_port()),
        server_name: pki::node_device_name(9),
    });
    let link = connect(&cluster.endpoint(2), &stranded).await;
    assert_eq!(link.node_addr.to_string(), cluster.node(4).device_addr, "through node 2 to the owner, node 4");
    link.close().await.expect("close");

    drop(cluster);
}

/// Runs `courier device` as device `name` through node 1 until it has registered `TOPIC`; returns the
/// owner its credentials directory keeps, and the process (killed when dropped).
async fn courier_device(cluster: &Cluster, name: &str) -> (RedirectTarget, tokio::process::Child) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = common::command(env!("CARGO_BIN_EXE_courier"))
        .arg("device")
        .arg("--dir")
        .arg(cluster.dir.path())
        .args(["--name", name, "--topic", common::TOPIC, "--server-name", "localhost"])
        .args(["--node", &cluster.node(1).device_addr])
        .env_remove("COURIER_ENROLMENT_SECRET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn courier device");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the device registers in time")
        .expect("read stdout")
        .expect("a line");
    let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(event["event"], "registered", "{line}");
    let home = cluster.dir.path().join("devices").join(name);
    let credentials = DeviceCredentials::load(&home).expect("credentials load").expect("credentials saved");
    assert_eq!(event["device_id"], credentials.device_id.to_string());
    (credentials.owner.expect("the activation named an owner"), child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_device_keeps_its_owner_and_links_there_first() {
    let cluster = Cluster::start(2).await;
    let mut devices = Vec::new();
    // Each new device is owned by node 2 about half the time; the first that is shows the saved owner
    // at work (one owned by node 1 would link there whether or not it had one).
    let mut owned_elsewhere = false;
    while !owned_elsewhere {
        assert!(devices.len() < 20, "none of 20 devices activated through node 1 is owned by node 2");
        let (owner, process) = courier_device(&cluster, &format!("d{}", devices.len())).await;
        devices.push(process);
        owned_elsewhere = owner == cluster.target(2);
        assert!(owned_elsewhere || owner == cluster.target(1), "{owner:?} names a node of this cluster");
    }
    assert!(cluster.redirects().await.values().all(|n| *n == 0), "redirects: {:?}", cluster.redirects().await);
    drop(devices);
}
