//! Roles in the cluster PKI, end to end with real TLS: each cluster certificate names its role, the nodes
//! refuse every RPC the role may not call (the real `courier ctl` binary with a gateway's or a node's
//! certificate in place of `admin.pem`; raw gRPC calls with a gateway's), and a device redirected to node 2
//! refuses a server that presents node 1's certificate on the address the redirect names.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Nodes, eventually};
use courier_core::peer::Peers;
use courier_core::pki::PkiDir;
use courier_device::{ClientError, Connector, DeviceLink};
use courier_proto::cluster::{
    FetchQueueRequest, FetchQueuesRequest, ForwardBatch, JoinRequest, ProposeRequest, RaftPayload, RemoveNodeRequest,
    ReplicateRequest, StatusRequest, WatchRequest,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A PKI directory holding the cluster CA and `member`'s certificate and key renamed to `admin.*`: what a
/// thief of that key would hand `courier ctl`.
fn as_admin(pki: &PkiDir, member: &str, into: &Path) -> PkiDir {
    std::fs::copy(pki.cluster_ca_cert(), into.join("cluster-ca.pem")).expect("copy CA");
    std::fs::copy(pki.member_cert(member), into.join("admin.pem")).expect("copy certificate");
    std::fs::copy(pki.member_key(member), into.join("admin.key")).expect("copy key");
    PkiDir::new(into)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_admin_certificate_runs_admin_commands() {
    let nodes = Nodes::start(2, |_| {}).await;
    let pki = nodes.pki();
    let node1 = nodes.configs[0].cluster_addr;
    let key_before = nodes.node(1).control.current().active_key().expect("an active key").key.id;

    for member in ["gateway", "node-2"] {
        let stolen = tempfile::tempdir().unwrap();
        as_admin(&pki, member, stolen.path());
        let run = common::ctl(node1, stolen.path(), &["keys", "rotate"]).await;
        assert!(!run.success, "ctl keys rotate with {member}'s certificate as admin.pem succeeded");
        assert!(
            run.stderr.to_lowercase().contains("permission") && run.stderr.contains("may not call Status"),
            "{member}: refused as permission denied, with the reason: {}",
            run.stderr
        );
    }
    // A gateway's and a node's certificate straight on Propose and RemoveNode, past the Status that
    // `keys rotate` asks first. (A node may propose only what nodes propose themselves: its own membership,
    // failure detection, suspected clones.)
    for member in ["gateway", "node-2"] {
        let stolen = tempfile::tempdir().unwrap();
        let peers = Peers::new(&as_admin(&pki, member, stolen.path()), "admin", None, Duration::from_secs(2)).unwrap();
        let mut client = peers.client(&node1.to_string()).unwrap();
        let command_json = br#"{"type":"retire_token_key","id":1,"now_ms":0}"#.to_vec();
        let refused = client.propose(ProposeRequest { command_json }).await.expect_err("propose");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{member}: {refused:?}");
        let refused = client.remove_node(RemoveNodeRequest { node_id: 2 }).await.expect_err("remove");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{member}: {refused:?}");
    }
    assert_eq!(nodes.node(1).control.current().active_key().map(|k| k.key.id), Some(key_before), "no key rotated");
    assert_eq!(nodes.node(1).control.current().members.len(), 2, "no member removed");

    // The admin's change, sent to whichever node is not the leader: it names the leader, and ctl asks there.
    let leader = nodes.node(1).control.leader().expect("a leader");
    let follower = nodes.configs[if leader == 1 { 1 } else { 0 }].cluster_addr;
    let run = common::ctl(follower, nodes.dir.path(), &["keys", "rotate"]).await;
    assert!(run.success, "ctl keys rotate with the admin certificate, through a follower: {}", run.stderr);
    eventually(Duration::from_secs(10), "the admin's rotation is applied", || {
        std::future::ready(nodes.node(1).control.current().active_key().is_some_and(|k| k.key.id != key_before))
    })
    .await;

    let metrics = common::http_get(&format!("http://{}/metrics", nodes.node(1).metrics_addr)).await;
    assert!(
        metrics.lines().any(|l| l.starts_with("courier_node_rpc_denied_total{") && l.contains("role=\"gateway\"")),
        "refusals are counted by role:\n{metrics}"
    );
    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_certificate_is_refused_on_raft_replication_and_admin_rpcs() {
    let nodes = Nodes::start(2, |_| {}).await;
    let pki = nodes.pki();
    let node1 = nodes.configs[0].cluster_addr.to_string();
    let gateway = Peers::new(&pki, "gateway", None, Duration::from_secs(2)).unwrap();
    let mut client = gateway.client(&node1).unwrap();
    let denied = |what: &str, result: Result<tonic::Code, tonic::Status>| match result {
        Err(status) => assert_eq!(status.code(), tonic::Code::PermissionDenied, "{what}: {status:?}"),
        Ok(_) => panic!("{what} was answered for a gateway"),
    };
    let payload = || RaftPayload { json: b"{}".to_vec() };
    denied("RaftAppend", client.raft_append(payload()).await.map(|_| tonic::Code::Ok));
    denied("RaftVote", client.raft_vote(payload()).await.map(|_| tonic::Code::Ok));
    denied("RaftSnapshot", client.raft_snapshot(payload()).await.map(|_| tonic::Code::Ok));
    denied("Replicate", client.replicate(ReplicateRequest::default()).await.map(|_| tonic::Code::Ok));
    let batches = futures_util::stream::iter([ReplicateRequest::default()]);
    denied("ReplicateStream", client.replicate_stream(batches).await.map(|_| tonic::Code::Ok));
    let device_id = vec![7u8; 16];
    denied("FetchQueue", client.fetch_queue(FetchQueueRequest { device_id, epoch: 0 }).await.map(|_| tonic::Code::Ok));
    let many = || FetchQueuesRequest { device_ids: vec![vec![7u8; 16]], epoch: 0 };
    denied("FetchQueues", client.fetch_queues(many()).await.map(|_| tonic::Code::Ok));
    denied("Status", client.status(StatusRequest { devices: vec![] }).await.map(|_| tonic::Code::Ok));
    let join = JoinRequest { node_id: 9, cluster_addr: "127.0.0.1:1".into(), device_addr: "127.0.0.1:2".into() };
    denied("Join", client.join(join).await.map(|_| tonic::Code::Ok));
    // What a gateway is for still works.
    let batches = futures_util::stream::iter([ForwardBatch::default()]);
    let mut forwarded = client.forward(batches).await.expect("a gateway opens a Forward stream").into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(10), forwarded.message()).await.expect("the stream ends");
    assert!(matches!(ended, Ok(None)), "an empty batch is answered by nothing, and the stream ends cleanly: {ended:?}");
    client.watch_cluster(WatchRequest { watcher: "test".into() }).await.expect("a gateway watches");

    // The admin certificate may not touch Raft, replication or forwarding either.
    let admin = Peers::new(&pki, "admin", None, Duration::from_secs(2)).unwrap();
    let mut client = admin.client(&node1).unwrap();
    denied("RaftAppend as admin", client.raft_append(payload()).await.map(|_| tonic::Code::Ok));
    let batches = futures_util::stream::iter([ForwardBatch::default()]);
    denied("Forward as admin", client.forward(batches).await.map(|_| tonic::Code::Ok));
    denied("WatchCluster as admin", client.watch_cluster(WatchRequest::default()).await.map(|_| tonic::Code::Ok));

    // A node answers a node, but not one that speaks for another in a Raft message.
    let node2 = Peers::new(&pki, "node-2", None, Duration::from_secs(2)).unwrap();
    let mut client = node2.client(&node1).unwrap();
    let device_id = vec![7u8; 16];
    client.fetch_queue(FetchQueueRequest { device_id, epoch: 0 }).await.expect("a node fetches a queue");
    client.fetch_queues(many()).await.expect("a node fetches queues");
    let batches = futures_util::stream::iter([ForwardBatch::default()]);
    denied("Forward as node 2", client.forward(batches).await.map(|_| tonic::Code::Ok));
    let as_node1 = serde_json::json!({
        "vote": {"leader_id": {"term": 1_000_000, "node_id": 1}, "committed": false},
        "last_log_id": null,
    });
    let vote = RaftPayload { json: serde_json::to_vec(&as_node1).unwrap() };
    denied("RaftVote from node 2 as node 1", client.raft_vote(vote).await.map(|_| tonic::Code::Ok));
    nodes.shutdown().await;
}

/// What the listener on node 2's advertised device address does with a connection.
#[derive(Clone, Copy, PartialEq)]
enum Stand {
    /// Passes the bytes on to node 2's real device port: TLS is end to end with node 2.
    Relay,
    /// Terminates TLS itself with node 1's certificate and key.
    Impostor,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_redirected_to_node_2_refuses_node_1s_certificate() {
    common::init_test_process();
    // Node 2 advertises this listener as its device address, so node 1's redirects name it.
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let mut nodes = Nodes::start(1, |_| {}).await;
    nodes
        .add_node_with(2, move |config| {
            config.advertise_device_addr = Some(front_addr.to_string());
        })
        .await;
    nodes.wait_all_ready().await;
    let pki = nodes.pki();
    let node2_device = nodes.configs[1].device_addr;
    let impostor_tls = courier_core::tls::device_server_config(&pki, "node-1").unwrap();
    let impostor = tokio_rustls::TlsAcceptor::from(Arc::new(impostor_tls));
    let stand = Arc::new(std::sync::Mutex::new(Stand::Relay));
    let stop = CancellationToken::new();
    let serving = {
        let (stand, stop) = (stand.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    accepted = front.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    _ = stop.cancelled() => return,
                };
                let mode = *stand.lock().unwrap();
                let impostor = impostor.clone();
                tokio::spawn(async move {
                    match mode {
                        Stand::Relay => {
                            let Ok(mut upstream) = tokio::net::TcpStream::connect(node2_device).await else { return };
                            let mut tcp = tcp;
                            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
                        }
                        Stand::Impostor => {
                            // The device aborts the handshake; nothing else to do.
                            let _ = impostor.accept(tcp).await;
                        }
                    }
                });
            }
        })
    };

    // A device node 2 owns, dialling node 1 by the name it was configured with.
    let entry = nodes.endpoint(1);
    let credentials = loop {
        let credentials = courier_device::activate(&entry, "").await.expect("activation");
        if nodes.node(1).view.get().ring.owner(credentials.device_id) == Some(2) {
            break credentials;
        }
    };
    let connector = Connector::new(&entry, Some(&credentials)).unwrap();

    let first = DeviceLink::connect_once(&connector, entry.addr, credentials.device_id, 0, &[]).await;
    let to = match first {
        Err(ClientError::Redirected(to)) => to,
        Err(error) => panic!("node 1 redirects node 2's device, not: {error}"),
        Ok(_) => panic!("node 1 linked node 2's device instead of redirecting it"),
    };
    assert_eq!(to.device_addr, front_addr.to_string());
    assert_eq!(to.server_name, courier_core::pki::node_device_name(2), "the redirect names node 2's own name");

    // Node 2 itself behind that address: the device follows the redirect and links.
    let link = DeviceLink::connect_via(&connector, entry.addr, credentials.device_id, 0, &[])
        .await
        .expect("the device links to node 2 through the redirect");
    assert_eq!(link.node_addr, front_addr);
    link.close().await.expect("close");

    // Node 1's certificate on that address: the device refuses it, by name.
    *stand.lock().unwrap() = Stand::Impostor;
    let refused = DeviceLink::connect_via(&connector, entry.addr, credentials.device_id, 0, &[]).await;
    let error = match refused {
        Ok(link) => panic!("the device linked to node 1's certificate at node 2's address ({})", link.node_addr),
        Err(error) => error,
    };
    let text = format!("{error:?} {error}");
    assert!(
        matches!(error, ClientError::Connect { addr, .. } if addr == front_addr) && text.contains("NotValidForName"),
        "a certificate-name error at node 2's address: {text}"
    );

    stop.cancel();
    let _ = serving.await;
    nodes.shutdown().await;
}
