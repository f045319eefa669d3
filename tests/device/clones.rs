//! Cloned device identities end to end: one real device certificate used by two real device clients at
//! once, from two source addresses (127.0.0.2 and 127.0.0.3), each taking the link back whenever the
//! other replaces it, as two phones sharing a certificate do. The node must report the device id as a
//! suspected clone (Raft state, `courier ctl`, the metric); under `--on-clone=refuse` neither copy keeps a
//! link, the provider's pushes answer 410 `ClonedIdentity`, and after `ctl devices clear-clone` the device
//! works again. One device that merely moves to a new address is never reported.

use crate::common;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TOPIC, TestCluster, eventually, metric_value};
use courier_device::{ClientError, Connector, DeviceCredentials, DeviceEndpoint, DeviceLink, LinkEvent};
use courier_node::edge::clones::ClonePolicy;
use courier_proto::device::GoodbyeReason;
use tokio::task::JoinHandle;

const COPY_A: [u8; 4] = [127, 0, 0, 2];
const COPY_B: [u8; 4] = [127, 0, 0, 3];

/// One copy of a cloned device: what it received, and how it ended.
struct DeviceCopy {
    received: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<Result<(), ClientError>>,
}

impl DeviceCopy {
    /// Connects from `from` and reconnects each time the node says `REPLACED`, until the node says
    /// anything else; notifications it receives are noted.
    fn start(endpoint: &DeviceEndpoint, credentials: &DeviceCredentials, from: [u8; 4]) -> DeviceCopy {
        let received = Arc::new(Mutex::new(Vec::new()));
        let connector = Connector::new(endpoint, Some(credentials)).expect("connector").bind_to(IpAddr::from(from));
        let (addr, device, noted) = (endpoint.addr, credentials.device_id, received.clone());
        let task = tokio::spawn(async move {
            loop {
                let mut link = DeviceLink::connect_via(&connector, addr, device, 0, &[]).await?;
                loop {
                    match link.next_event().await {
                        Ok(LinkEvent::Notification(n)) => noted.lock().unwrap().push(n.apns_id),
                        Ok(_) => {}
                        Err(ClientError::Goodbye { reason: GoodbyeReason::Replaced, .. }) => break,
                        Err(other) => return Err(other),
                    }
                }
            }
        });
        DeviceCopy { received, task }
    }

    /// How the copy ended, within `deadline`.
    async fn ended(self, deadline: Duration) -> (Result<(), ClientError>, Vec<String>) {
        let end = tokio::time::timeout(deadline, self.task).await.expect("the copy ends in time").expect("no panic");
        let received = self.received.lock().unwrap().clone();
        (end, received)
    }
}

/// Activates a device and registers `TOPIC` once; returns its credentials and token.
async fn device_with_token(cluster: &TestCluster) -> (DeviceCredentials, String) {
    let credentials = cluster.activate().await;
    let mut link = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await.expect("connects");
    let token = link.register(TOPIC).await.expect("register");
    link.close().await.expect("close");
    let registry = cluster.node().registry.clone();
    eventually(Duration::from_secs(10), "the first link is gone", || {
        std::future::ready(!registry.is_connected(credentials.device_id))
    })
    .await;
    (credentials, token)
}

/// Runs `courier ctl` against the cluster's node with its admin certificate; returns stdout.
async fn ctl(cluster: &TestCluster, args: &[&str]) -> String {
    let run = common::ctl(cluster.node().cluster_addr, cluster.dir.path(), args).await;
    assert!(run.success, "courier ctl {args:?} failed: {run:?}");
    run.stdout
}

/// The `ctl devices list` row naming `device`, split into words.
async fn listed(cluster: &TestCluster, device: &str) -> Option<Vec<String>> {
    let out = ctl(cluster, &["devices", "list"]).await;
    out.lines().find(|l| l.starts_with(device)).map(|l| l.split_whitespace().map(str::to_string).collect())
}

async fn suspected_clones_metric(cluster: &TestCluster) -> f64 {
    metric_value(&cluster.metrics().await, "courier_node_suspected_clones_total").unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_one_certificate_are_reported_as_a_suspected_clone() {
    let cluster = TestCluster::start().await;
    let (credentials, _) = device_with_token(&cluster).await;
    let device = credentials.device_id;
    let metric_before = suspected_clones_metric(&cluster).await;

    let a = DeviceCopy::start(&cluster.endpoint(), &credentials, COPY_A);
    let b = DeviceCopy::start(&cluster.endpoint(), &credentials, COPY_B);
    let control = cluster.node().control.clone();
    eventually(Duration::from_secs(30), "the device id is recorded as a suspected clone", || {
        std::future::ready(control.current().suspected_clones.contains_key(&device))
    })
    .await;
    let record = control.current().suspected_clones[&device].clone();
    assert!(!record.refuse, "the default policy only alerts: {record:?}");
    assert_eq!(record.node, control.id);
    let mut addrs = record.addrs.clone();
    addrs.sort();
    assert_eq!(addrs, ["127.0.0.2", "127.0.0.3"], "{record:?}");
    assert!(cluster.node().registry.clone_suspicions() >= 1);
    assert!(suspected_clones_metric(&cluster).await > metric_before);

    // Alert keeps today's behaviour: the copies go on taking the link from each other.
    assert!(!a.task.is_finished() && !b.task.is_finished(), "alert refuses nobody");
    a.task.abort();
    b.task.abort();

    let row = listed(&cluster, &device.to_string()).await.expect("ctl devices list shows the id");
    assert_eq!(row[1], "alert", "{row:?}");
    assert!(row.last().is_some_and(|addrs| addrs.contains("127.0.0.2") && addrs.contains("127.0.0.3")), "{row:?}");
    assert!(ctl(&cluster, &["status"]).await.contains("suspected clones: 1"));

    ctl(&cluster, &["devices", "clear-clone", "--device", &device.to_string()]).await;
    assert!(control.current().suspected_clones.is_empty());
    assert!(listed(&cluster, &device.to_string()).await.is_none());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_refuse_neither_copy_receives_pushes_until_the_clone_is_cleared() {
    let cluster = TestCluster::start_with(|node| node.on_clone = ClonePolicy::Refuse).await;
    let (credentials, token) = device_with_token(&cluster).await;
    let device = credentials.device_id;
    let metric_before = suspected_clones_metric(&cluster).await;

    let a = DeviceCopy::start(&cluster.endpoint(), &credentials, COPY_A);
    let b = DeviceCopy::start(&cluster.endpoint(), &credentials, COPY_B);
    for (name, copy) in [("a", a), ("b", b)] {
        let (end, received) = copy.ended(Duration::from_secs(30)).await;
        assert!(
            matches!(end, Err(ClientError::Goodbye { reason: GoodbyeReason::ClonedIdentity, .. })),
            "copy {name} is told CLONED_IDENTITY, got {end:?}"
        );
        assert!(received.is_empty(), "copy {name} received {received:?}");
    }
    assert!(suspected_clones_metric(&cluster).await > metric_before);
    let control = cluster.node().control.clone();
    eventually(Duration::from_secs(10), "the cluster refuses the device as a clone", || {
        std::future::ready(control.current().refuses_clone(device))
    })
    .await;
    let row = listed(&cluster, &device.to_string()).await.expect("ctl devices list shows the id");
    assert_eq!(row[1], "refused", "{row:?}");

    // A new link from either address is refused too, now by the cluster's record.
    let again = DeviceLink::connect(&cluster.endpoint(), &credentials, 0).await;
    assert!(
        matches!(again, Err(ClientError::Goodbye { reason: GoodbyeReason::ClonedIdentity, .. })),
        "a new link is refused, got {:?}",
        again.map(|l| l.device_id)
    );

    // The provider hears 410 ClonedIdentity, with the time the clone was recorded.
    let since_ms = control.current().suspected_clones[&device].since_ms;
    let refused_id = uuid::Uuid::new_v4().to_string();
    let push = courier_gateway::provider::Push { apns_id: Some(refused_id.clone()), ..cluster.push(&token, "{}") };
    eventually(Duration::from_secs(20), "the gateway answers 410 ClonedIdentity", || async {
        let response = cluster.send(&push).await;
        assert!(response.status == 200 || response.status == 410, "{response:?}");
        response.status == 410
    })
    .await;
    let response = cluster.send(&push).await;
    assert_eq!((response.status, response.reason.as_deref()), (410, Some("ClonedIdentity")), "{response:?}");
    assert_eq!(response.timestamp, Some(since_ms));
    // The node refuses it too, for a gateway whose view is a moment behind.
    let gateway =
        courier_core::peer::Peers::new(&cluster.pki(), "gateway", None, Duration::from_secs(2)).expect("peers");
    let notification = courier_proto::cluster::Notification {
        apns_id: uuid::Uuid::new_v4().to_string(),
        device_id: device.to_bytes().to_vec(),
        expiration: u64::MAX / 2,
        ..Default::default()
    };
    let batch = courier_proto::cluster::ForwardBatch {
        epoch: control.current().epoch.0,
        items: vec![courier_proto::cluster::ForwardItem { id: 1, notification: Some(notification), receipt: None }],
        holds_receipts: false,
    };
    let answer = gateway
        .client(&cluster.node().cluster_addr.to_string())
        .expect("client")
        .forward(futures_util::stream::iter([batch]))
        .await
        .expect("forward")
        .into_inner()
        .message()
        .await
        .expect("an answer")
        .expect("a message before the stream ends");
    assert_eq!(answer.results.len(), 1, "{answer:?}");
    assert_eq!(answer.results[0].id, 1);
    let result = answer.results[0].result.as_ref().expect("a result");
    assert_eq!(
        (result.outcome, result.reason, result.timestamp_ms),
        (
            courier_proto::cluster::DeliverOutcome::Rejected as i32,
            courier_proto::cluster::RefusalReason::ClonedIdentity as i32,
            since_ms
        ),
        "{result:?}"
    );

    ctl(&cluster, &["devices", "clear-clone", "--device", &device.to_string()]).await;
    assert!(!control.current().refuses_clone(device));
    let mut link = DeviceLink::connect_via(
        &Connector::new(&cluster.endpoint(), Some(&credentials)).expect("connector").bind_to(IpAddr::from(COPY_B)),
        cluster.endpoint().addr,
        device,
        0,
        &[],
    )
    .await
    .expect("after clear-clone the device connects");
    let cleared_id = uuid::Uuid::new_v4().to_string();
    let push = courier_gateway::provider::Push { apns_id: Some(cleared_id.clone()), ..cluster.push(&token, "{}") };
    eventually(Duration::from_secs(20), "the gateway accepts pushes for the device again", || async {
        cluster.send(&push).await.status == 200
    })
    .await;
    let first = tokio::time::timeout(Duration::from_secs(10), link.next_notification())
        .await
        .expect("a notification within 10s")
        .expect("the link stays healthy");
    assert_eq!(first.apns_id, cleared_id, "the push refused with 410 was never stored");
    link.close().await.expect("close");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_moves_to_a_new_address_is_not_suspected() {
    let cluster = TestCluster::start_with(|node| node.on_clone = ClonePolicy::Refuse).await;
    let (credentials, token) = device_with_token(&cluster).await;
    let (device, endpoint, registry) = (credentials.device_id, cluster.endpoint(), cluster.node().registry.clone());
    let from =
        |ip: [u8; 4]| Connector::new(&endpoint, Some(&credentials)).expect("connector").bind_to(IpAddr::from(ip));

    // The old link closes, then the device connects from another address: nothing to replace.
    let old = DeviceLink::connect_via(&from(COPY_A), endpoint.addr, device, 0, &[]).await.expect("connects");
    old.close().await.expect("close");
    eventually(Duration::from_secs(10), "the old link is gone", || std::future::ready(!registry.is_connected(device)))
        .await;
    let mut dying = DeviceLink::connect_via(&from(COPY_B), endpoint.addr, device, 0, &[]).await.expect("connects");

    // The device changes networks while its old link is still open: one replacement from a new address.
    let mut link = DeviceLink::connect_via(&from(COPY_A), endpoint.addr, device, 0, &[]).await.expect("connects");
    let end = tokio::time::timeout(Duration::from_secs(10), dying.next_event()).await.expect("the old link ends");
    assert!(matches!(end, Err(ClientError::Goodbye { reason: GoodbyeReason::Replaced, .. })), "{end:?}");

    // The registry decides as it attaches, before the node says Welcome: no suspicion was raised.
    assert_eq!(registry.clone_suspicions(), 0);
    assert!(cluster.node().control.current().suspected_clones.is_empty());
    let response = cluster.send(&cluster.push(&token, r#"{"moved":true}"#)).await;
    assert_eq!(response.status, 200, "{response:?}");
    let n = tokio::time::timeout(Duration::from_secs(10), link.next_notification())
        .await
        .expect("a notification within 10s")
        .expect("the link stays healthy");
    assert_eq!(n.payload, br#"{"moved":true}"#);
    link.close().await.expect("close");
    cluster.shutdown().await;
}
