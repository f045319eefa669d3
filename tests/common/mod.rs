//! A real local cluster for integration tests: PKI in a temp dir, a node and a gateway on loopback with
//! OS-chosen ports, a provider client with a real JWT signer, and helpers for raw device links.

#![allow(dead_code)]

pub use courier_loadtest::fabric;
pub mod channels;
pub mod openapi;
pub mod webhooks;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use courier_core::pki::{self, PkiDir, PkiOptions};
use courier_device::codec::FrameCodec;
use courier_device::{DeviceCredentials, DeviceEndpoint, DeviceLink};
use courier_gateway::provider::{JwtSigner, ProviderClient, Push, PushResponse};
use courier_gateway::{GatewayConfig, RunningGateway};
use courier_node::{NodeConfig, RunningNode};
use courier_proto::device::{GoodbyeReason, ServerFrame, server_frame};
use futures_util::StreamExt;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

pub const TOPIC: &str = "com.example.app";

/// Once per test process: the ring crypto provider, and logs when `RUST_LOG` asks for them
/// (`RUST_LOG=courier_node=debug` shows what a failing test's cluster did).
pub fn init_test_process() {
    courier_core::tls::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Waits for `check` to hold, polling, failing the test after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < give_up, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub node: Option<RunningNode>,
    pub node_config: NodeConfig,
    pub gateway: RunningGateway,
    pub signer: JwtSigner,
    pub provider: ProviderClient,
}

impl TestCluster {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a cluster, letting the test adjust the node's configuration first.
    pub async fn start_with(adjust: impl FnOnce(&mut NodeConfig)) -> Self {
        Self::start_configured(adjust, |_| {}).await
    }

    /// Starts a cluster, letting the test adjust the node's and the gateway's configuration first.
    pub async fn start_configured(
        adjust: impl FnOnce(&mut NodeConfig),
        adjust_gateway: impl FnOnce(&mut GatewayConfig),
    ) -> Self {
        init_test_process();
        let dir = tempfile::tempdir().expect("temp dir");
        pki::init(dir.path(), &PkiOptions::default()).expect("PKI");
        let mut node_config = NodeConfig::local(dir.path().to_path_buf(), dir.path().join("node"));
        adjust(&mut node_config);
        ensure_node_certificate(dir.path(), node_config.node_id);
        let node = courier_node::start(node_config.clone()).await.expect("node starts");
        eventually(Duration::from_secs(20), "the node is an active member with a leader", || {
            std::future::ready(node.is_ready())
        })
        .await;
        // Restarts reuse the ports the OS picked, so the gateway and devices find the node again.
        node_config.device_addr = node.device_addr;
        node_config.cluster_addr = node.cluster_addr;
        let mut gateway_config = GatewayConfig::local(dir.path().to_path_buf(), node.cluster_addr);
        adjust_gateway(&mut gateway_config);
        let gateway = courier_gateway::start(gateway_config).await.expect("gateway starts");
        eventually(Duration::from_secs(20), "the gateway has a cluster view", || {
            std::future::ready(gateway.epoch().is_some())
        })
        .await;
        let signer = JwtSigner::from_pki(&PkiDir::new(dir.path())).expect("signer");
        let provider =
            ProviderClient::connect(gateway.provider_addr, "localhost", &PkiDir::new(dir.path()).cluster_ca_cert())
                .await
                .expect("provider connects");
        TestCluster { dir, node: Some(node), node_config, gateway, signer, provider }
    }

    pub fn pki(&self) -> PkiDir {
        PkiDir::new(self.dir.path())
    }

    pub fn node(&self) -> &RunningNode {
        self.node.as_ref().expect("node is running")
    }

    pub fn endpoint(&self) -> DeviceEndpoint {
        DeviceEndpoint {
            addr: self.node_config.device_addr,
            server_name: "localhost".into(),
            ca_path: self.pki().cluster_ca_cert(),
        }
    }

    pub async fn stop_node(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown().await;
        }
    }

    pub async fn start_node(&mut self) {
        assert!(self.node.is_none());
        let node = courier_node::start(self.node_config.clone()).await.expect("node restarts");
        eventually(Duration::from_secs(20), "the restarted node is ready", || std::future::ready(node.is_ready()))
            .await;
        self.node = Some(node);
    }

    pub async fn activate(&self) -> DeviceCredentials {
        courier_device::activate(&self.endpoint(), "").await.expect("activation")
    }

    /// Activates a device, connects it and registers `TOPIC`; returns the link and its token.
    pub async fn device(&self) -> (DeviceLink, String) {
        let (_, link, token) = registered_device(&self.endpoint()).await;
        (link, token)
    }

    pub fn push(&self, token: &str, payload: &str) -> Push {
        Push {
            token: token.to_string(),
            topic: Some(TOPIC.to_string()),
            authorization: Some(format!("bearer {}", self.signer.sign())),
            payload: payload.as_bytes().to_vec(),
            ..Push::default()
        }
    }

    /// Sends a push; the response is checked against the OpenAPI document.
    pub async fn send(&self, push: &Push) -> PushResponse {
        send_checked(&self.provider, push).await
    }

    /// Sends any request; the response is checked against the OpenAPI document.
    pub async fn request(&self, method: http::Method, path: &str, headers: Vec<(String, String)>) -> PushResponse {
        request_checked(&self.provider, method, path, headers, Vec::new()).await
    }

    pub async fn metrics(&self) -> String {
        http_get(&format!("http://{}/metrics", self.node().metrics_addr)).await
    }

    pub async fn shutdown(mut self) {
        self.stop_node().await;
        self.gateway.shutdown().await;
    }
}

/// The value of an unlabelled sample in Prometheus text. Metrics are per process and tests in one binary
/// share a process, so tests compare against lower bounds, not exact values.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A plain HTTP/1.1 GET over loopback, enough for metrics endpoints.
pub async fn http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut tcp = TcpStream::connect(host).await.expect("metrics port");
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut body = String::new();
    tcp.read_to_string(&mut body).await.expect("read");
    body
}

/// A device link at the byte level, for hostile input.
pub type RawLink = Framed<TlsStream<TcpStream>, FrameCodec<ServerFrame>>;

pub async fn raw_link(
    endpoint: &DeviceEndpoint,
    identity: Option<&DeviceCredentials>,
) -> std::io::Result<TlsStream<TcpStream>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let identity = identity.map(|c| {
        (
            vec![CertificateDer::from(c.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_der.clone())),
        )
    });
    let config = courier_core::tls::client_config(&endpoint.ca_path, identity, &[]).expect("client config");
    let tcp = TcpStream::connect(endpoint.addr).await?;
    let mut tls =
        TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("localhost").expect("name"), tcp).await?;
    // TLS 1.3 reports a rejected client certificate only on the first read after the handshake.
    use tokio::io::AsyncWriteExt;
    tls.flush().await?;
    Ok(tls)
}

/// Reads frames until a goodbye (returning its reason) or the end of the link (`None`).
pub async fn read_goodbye(link: &mut RawLink) -> Option<GoodbyeReason> {
    let deadline = Duration::from_secs(15);
    loop {
        match tokio::time::timeout(deadline, link.next()).await.expect("link neither said goodbye nor closed") {
            Some(Ok(ServerFrame { kind: Some(server_frame::Kind::Goodbye(bye)) })) => {
                return Some(GoodbyeReason::try_from(bye.reason).unwrap_or(GoodbyeReason::Unspecified));
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// Issues node `id`'s own certificate (`node-<id>.pem`) in the PKI at `dir` unless it is there, as an
/// operator would with `courier pki issue node --id <id>` before starting that node.
pub fn ensure_node_certificate(dir: &Path, id: u64) {
    let pki = PkiDir::new(dir);
    if !pki.node_cert(id).exists() {
        pki::issue(&pki, pki::ClusterRole::Node(id), &[]).expect("node certificate");
    }
}

/// Device credentials signed by a device CA the cluster does not know.
pub fn foreign_credentials(dir: &Path) -> DeviceCredentials {
    pki::init(dir, &PkiOptions::default()).expect("foreign PKI");
    let ca = pki::DeviceCa::load(&PkiDir::new(dir)).expect("foreign CA");
    let (key, csr) = pki::new_device_key_and_csr().expect("csr");
    let device_id = courier_core::ids::DeviceId::random();
    let cert = ca.issue(&csr, device_id).expect("issue");
    DeviceCredentials { device_id, cert_der: cert.to_vec(), key_der: key.serialize_der(), owner: None }
}

/// Several in-process nodes on real sockets forming one Raft cluster, with fast timings so failure
/// detection and elections take about a second.
pub struct Nodes {
    pub dir: tempfile::TempDir,
    pub configs: Vec<NodeConfig>,
    pub running: Vec<Option<RunningNode>>,
}

impl Nodes {
    pub async fn start(count: usize, adjust: impl Fn(&mut NodeConfig)) -> Nodes {
        init_test_process();
        let dir = tempfile::tempdir().expect("temp dir");
        pki::init(dir.path(), &PkiOptions::default()).expect("PKI");
        let mut nodes = Nodes { dir, configs: Vec::new(), running: Vec::new() };
        for i in 0..count {
            nodes.add_node_with(i as u64 + 1, &adjust).await;
        }
        nodes.wait_all_ready().await;
        nodes
    }

    /// Starts node `id` (joining through node 1 unless it is the first) with fast test timings, and
    /// keeps it so that `shutdown` stops it. Does not wait for it to be ready.
    pub async fn add_node_with(&mut self, id: u64, adjust: impl Fn(&mut NodeConfig)) {
        ensure_node_certificate(self.dir.path(), id);
        let mut config = NodeConfig::local(self.dir.path().to_path_buf(), self.dir.path().join(format!("node-{id}")));
        config.node_id = id;
        config.raft_heartbeat_ms = 100;
        config.raft_election_timeout_ms = 500;
        config.probe_interval_ms = 200;
        config.failure_timeout_ms = 1000;
        if let Some(first) = self.configs.first() {
            config.join = vec![first.cluster_addr.to_string()];
        }
        adjust(&mut config);
        let node = courier_node::start(config.clone()).await.expect("node starts");
        config.device_addr = node.device_addr;
        config.cluster_addr = node.cluster_addr;
        config.metrics_addr = ([127, 0, 0, 1], 0).into();
        self.configs.push(config);
        self.running.push(Some(node));
    }

    /// Adds node `id` with the default test timings and waits until every node is ready.
    pub async fn add_node(&mut self, id: u64) {
        self.add_node_with(id, |_| {}).await;
        self.wait_all_ready().await;
    }

    pub fn pki(&self) -> PkiDir {
        PkiDir::new(self.dir.path())
    }

    /// Node with id `id` (1-based).
    pub fn node(&self, id: u64) -> &RunningNode {
        self.running[id as usize - 1].as_ref().expect("node is running")
    }

    pub fn running(&self) -> impl Iterator<Item = &RunningNode> {
        self.running.iter().flatten()
    }

    pub async fn wait_all_ready(&self) {
        eventually(Duration::from_secs(30), "every running node is an active member with a leader", || {
            std::future::ready(self.running().all(|n| n.is_ready()))
        })
        .await;
    }

    /// The first epoch (as node 1 applied it) in which node `id` is an active member.
    pub async fn epoch_active(&self, id: u64) -> courier_core::state::Epoch {
        let mut active_at = None;
        eventually(Duration::from_secs(30), &format!("node {id} is an active member"), || {
            let state = self.node(1).control.current();
            let active = state.members.get(&id).is_some_and(|m| m.state == courier_core::state::MemberState::Active);
            if active {
                active_at = Some(state.epoch);
            }
            std::future::ready(active)
        })
        .await;
        active_at.expect("an epoch")
    }

    /// The leader as the running nodes agree on it.
    pub async fn leader(&self) -> u64 {
        let mut agreed = None;
        eventually(Duration::from_secs(30), "the running nodes agree on a leader", || {
            let leaders: Vec<_> = self.running().map(|n| n.control.leader()).collect();
            let first = leaders.first().copied().flatten();
            let running_ids: Vec<u64> = self.running().map(|n| n.control.id).collect();
            let ok = first.is_some_and(|l| running_ids.contains(&l)) && leaders.iter().all(|l| *l == first);
            if ok {
                agreed = first;
            }
            std::future::ready(ok)
        })
        .await;
        agreed.expect("a leader")
    }

    pub async fn stop(&mut self, id: u64) {
        if let Some(node) = self.running[id as usize - 1].take() {
            node.shutdown().await;
        }
    }

    pub async fn restart(&mut self, id: u64) {
        let config = self.configs[id as usize - 1].clone();
        let node = courier_node::start(config).await.expect("node restarts");
        self.running[id as usize - 1] = Some(node);
    }

    /// A gateway that knows only node 1's address, as a deployment's seed list would.
    pub async fn gateway(&self) -> (RunningGateway, ProviderClient, JwtSigner) {
        self.gateway_with(|_| {}).await
    }

    /// A gateway seeded with every node's address, its configuration adjusted first.
    pub async fn gateway_with(
        &self,
        adjust: impl FnOnce(&mut GatewayConfig),
    ) -> (RunningGateway, ProviderClient, JwtSigner) {
        let mut config = GatewayConfig::local(self.dir.path().to_path_buf(), self.configs[0].cluster_addr);
        config.node_addrs = self.configs.iter().map(|c| c.cluster_addr.to_string()).collect();
        adjust(&mut config);
        let gateway = courier_gateway::start(config).await.expect("gateway starts");
        eventually(Duration::from_secs(20), "the gateway has a cluster view", || {
            std::future::ready(gateway.epoch().is_some())
        })
        .await;
        let provider = ProviderClient::connect(gateway.provider_addr, "localhost", &self.pki().cluster_ca_cert())
            .await
            .expect("provider connects");
        let signer = JwtSigner::from_pki(&self.pki()).expect("signer");
        (gateway, provider, signer)
    }

    /// Device port of a running node, for devices to dial (they are redirected to the owner).
    pub fn endpoint(&self, id: u64) -> DeviceEndpoint {
        DeviceEndpoint {
            addr: self.configs[id as usize - 1].device_addr,
            server_name: "localhost".into(),
            ca_path: self.pki().cluster_ca_cert(),
        }
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.running.len() {
            self.stop(i as u64 + 1).await;
        }
    }
}

/// A push as a provider would send it.
/// A new device activated through `endpoint`, linked (following redirects) and registered for `TOPIC`.
pub async fn registered_device(endpoint: &DeviceEndpoint) -> (DeviceCredentials, DeviceLink, String) {
    let credentials = courier_device::activate(endpoint, "").await.expect("activation");
    let mut link = DeviceLink::connect(endpoint, &credentials, 0).await.expect("device connects");
    let token = link.register(TOPIC).await.expect("register");
    (credentials, link, token)
}

/// Links `credentials` through `endpoint` (following redirects), trying every 100 ms up to `attempts`
/// times while no node takes the link (one restarting, or a ring still settling).
pub async fn link_again(endpoint: &DeviceEndpoint, credentials: &DeviceCredentials, attempts: usize) -> DeviceLink {
    for _ in 1..attempts {
        match DeviceLink::connect(endpoint, credentials, 0).await {
            Ok(link) => return link,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    DeviceLink::connect(endpoint, credentials, 0).await.expect("the device links again")
}

pub fn push_for(signer: &JwtSigner, token: &str, payload: &str) -> Push {
    Push {
        token: token.to_string(),
        topic: Some(TOPIC.to_string()),
        authorization: Some(format!("bearer {}", signer.sign())),
        payload: payload.as_bytes().to_vec(),
        ..Push::default()
    }
}

/// A `courier node` child process; killed when dropped.
pub struct NodeProcess {
    pub child: tokio::process::Child,
    pub id: u64,
    pub device_addr: String,
    pub cluster_addr: String,
    pub metrics_addr: String,
}

/// The `COURIER_*` variables of the shell running the tests, which no process a test starts may inherit:
/// a developer's `COURIER_DEGRADED_WRITES=false` would otherwise change what a test sees.
pub fn shell_courier_vars() -> Vec<String> {
    std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()).filter(|n| n.starts_with("COURIER_")).collect()
}

/// A blocking command for `program` that inherits none of `shell_courier_vars`.
pub fn std_command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let mut command = std::process::Command::new(program);
    for name in shell_courier_vars() {
        command.env_remove(name);
    }
    command
}

/// `std_command`, for tokio.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    std_command(program).into()
}

/// A port free right now on loopback and outside the ephemeral range, for processes that must come back
/// on the same address (see `courier_loadtest::cluster::free_port`).
pub fn free_port() -> u16 {
    courier_loadtest::cluster::free_port().expect("free port")
}

/// Starts `courier node` with fast test timings. `ports` = (device, cluster) ports to bind, else any.
pub async fn spawn_node(dir: &Path, id: u64, join: Option<&str>, ports: Option<(u16, u16)>) -> NodeProcess {
    spawn_node_with(dir, id, join, ports, &[]).await
}

/// `spawn_node` with extra command-line flags for the node.
pub async fn spawn_node_with(
    dir: &Path,
    id: u64,
    join: Option<&str>,
    ports: Option<(u16, u16)>,
    extra: &[&str],
) -> NodeProcess {
    spawn_node_in(dir, id, join, None, ports, extra).await
}

/// `spawn_node_with`, run inside network namespace `netns.0` with every listener on address `netns.1`
/// when given (see `fabric`), else on loopback.
pub async fn spawn_node_in(
    dir: &Path,
    id: u64,
    join: Option<&str>,
    netns: Option<(&str, &str)>,
    ports: Option<(u16, u16)>,
    extra: &[&str],
) -> NodeProcess {
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, BufReader};
    ensure_node_certificate(dir, id);
    let (device_port, cluster_port) = ports.unwrap_or((0, 0));
    let host = netns.map_or("127.0.0.1", |(_, host)| host);
    let mut command = match netns {
        Some((namespace, _)) => {
            let mut command = command("ip");
            command.args(["netns", "exec", namespace, env!("CARGO_BIN_EXE_courier")]);
            command
        }
        None => command(env!("CARGO_BIN_EXE_courier")),
    };
    command
        .args(["node", "--node-id", &id.to_string()])
        .arg("--data-dir")
        .arg(dir.join(format!("node-{id}")))
        .arg("--pki-dir")
        .arg(dir)
        .args(["--device-addr", &format!("{host}:{device_port}")])
        .args(["--cluster-addr", &format!("{host}:{cluster_port}")])
        .args(["--node-metrics-addr", &format!("{host}:0"), "--open-enrolment"])
        .args(["--raft-heartbeat-ms", "100", "--raft-election-timeout-ms", "500"])
        .args(["--probe-interval-ms", "200", "--drain-deadline-secs", "20"])
        .env("RUST_LOG", std::env::var("COURIER_TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(seed) = join {
        command.args(["--join", seed]);
    }
    // Fast failure detection unless the test asks for its own (a flag may be given once).
    if !extra.iter().any(|arg| arg.starts_with("--failure-timeout-ms")) {
        command.args(["--failure-timeout-ms", "1000"]);
    }
    command.args(extra);
    let mut child = command.spawn().expect("spawn courier node");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("node prints its addresses in time")
        .expect("read stdout")
        .expect("a line");
    let listening: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    assert_eq!(listening["event"], "listening");
    let field = |name: &str| listening[name].as_str().expect("address").to_string();
    NodeProcess {
        child,
        id,
        device_addr: field("device_addr"),
        cluster_addr: field("cluster_addr"),
        metrics_addr: field("metrics_addr"),
    }
}

impl NodeProcess {
    /// SIGTERM, then waits for the process to exit by itself (after its drain).
    pub async fn terminate(&mut self, deadline: Duration) {
        let pid = self.child.id().expect("running").to_string();
        let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        assert!(sent.success());
        let status = tokio::time::timeout(deadline, self.child.wait()).await.expect("node exits after SIGTERM");
        assert!(status.expect("wait").success(), "a drained node exits cleanly");
    }
}

/// A push through `client`, its response checked against the OpenAPI document.
pub async fn send_checked(client: &ProviderClient, push: &Push) -> PushResponse {
    let response = client.push(push).await.expect("request reaches the gateway");
    let path = format!("/3/device/{}", push.token);
    openapi::check_response("POST", &path, response.status, response.apns_id.as_deref(), &response.body);
    response
}

/// Any request through `client`, its response checked against the OpenAPI document.
pub async fn request_checked(
    client: &ProviderClient,
    method: http::Method,
    path: &str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> PushResponse {
    let response = client.request(method.clone(), path, headers, body).await.expect("request reaches the gateway");
    openapi::check_response(method.as_str(), path, response.status, response.apns_id.as_deref(), &response.body);
    response
}

/// Writes a provider certificate with `courier ctl providers issue-cert`, as an operator would.
pub fn issue_cert_with_ctl(pki: &PkiDir, team: &str, topics: &[&str], out: &Path) -> (PathBuf, PathBuf) {
    let mut command = std_command(env!("CARGO_BIN_EXE_courier"));
    command.args(["ctl", "--pki-dir"]).arg(&pki.dir).args(["providers", "issue-cert", "--team-id", team]);
    for topic in topics {
        command.args(["--topic", topic]);
    }
    let output = command.arg("--out").arg(out).output().expect("courier ctl runs");
    assert!(output.status.success(), "issue-cert failed: {}", String::from_utf8_lossy(&output.stderr));
    (out.join(format!("provider-{team}.pem")), out.join(format!("provider-{team}.key")))
}

/// What one `courier ctl` run left behind.
pub struct CtlRun {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for CtlRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "success: {}\n--- stdout\n{}--- stderr\n{}", self.success, self.stdout, self.stderr)
    }
}

/// Runs the real `courier ctl --node <node> --pki-dir <pki> <args…>` (nothing taken from the shell's
/// `COURIER_*` variables) within 30 s.
pub async fn ctl(node: std::net::SocketAddr, pki: &Path, args: &[&str]) -> CtlRun {
    let output = command(env!("CARGO_BIN_EXE_courier"))
        .arg("ctl")
        .arg("--node")
        .arg(node.to_string())
        .arg("--pki-dir")
        .arg(pki)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .unwrap_or_else(|_| panic!("courier ctl {args:?} finished within 30 s"))
        .expect("courier ctl runs");
    CtlRun {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Three `courier node` processes (with `node_flags`) and an in-process gateway with `request_timeout_ms`,
/// with a provider client, the provider JWT signer and each node's device endpoint.
pub struct ProcessCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeProcess>,
    pub gateway: courier_gateway::RunningGateway,
    pub provider: ProviderClient,
    pub signer: JwtSigner,
    pub endpoints: Vec<DeviceEndpoint>,
}

impl ProcessCluster {
    pub async fn start(node_flags: &[&str], request_timeout_ms: u64) -> ProcessCluster {
        ProcessCluster::start_with(node_flags, |config| config.request_timeout_ms = request_timeout_ms).await
    }

    /// `start`, with the gateway's configuration adjusted (its seeds are every node's cluster address).
    pub async fn start_with(node_flags: &[&str], adjust: impl FnOnce(&mut courier_gateway::GatewayConfig)) -> Self {
        ProcessCluster::start_on(None, node_flags, adjust).await
    }

    /// `start_with`, node `i` (1–3) in `fabric`'s namespace `i` when given.
    pub async fn start_on(
        fabric: Option<&fabric::Fabric>,
        node_flags: &[&str],
        adjust: impl FnOnce(&mut courier_gateway::GatewayConfig),
    ) -> Self {
        courier_core::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        courier_core::pki::init(dir.path(), &PkiOptions::default()).expect("PKI");
        let pki = PkiDir::new(dir.path());
        if let Some(fabric) = fabric {
            // Peers and the gateway check a node's certificate against the address they dial.
            for id in 1..=3 {
                pki::issue(&pki, pki::ClusterRole::Node(id), &[fabric.host(id)]).expect("node certificate");
            }
        }
        let names: Vec<(String, String)> =
            (1..=3).map(|id| fabric.map(|f| (f.namespace(id), f.host(id))).unwrap_or_default()).collect();
        let place = |id: u64| fabric.map(|_| (names[id as usize - 1].0.as_str(), names[id as usize - 1].1.as_str()));
        let mut nodes = vec![spawn_node_in(dir.path(), 1, None, place(1), None, node_flags).await];
        let seed = nodes[0].cluster_addr.clone();
        for id in 2..=3 {
            nodes.push(spawn_node_in(dir.path(), id, Some(&seed), place(id), None, node_flags).await);
        }
        let mut config =
            courier_gateway::GatewayConfig::local(dir.path().to_path_buf(), "127.0.0.1:1".parse().unwrap());
        config.node_addrs = nodes.iter().map(|n| n.cluster_addr.clone()).collect();
        adjust(&mut config);
        let gateway = courier_gateway::start(config).await.expect("gateway starts");
        eventually(Duration::from_secs(30), "three active members in the gateway's view", || {
            let view = gateway.view.borrow().clone();
            std::future::ready(view.is_some_and(|v| v.ring.members().len() == 3))
        })
        .await;
        let provider = ProviderClient::connect(gateway.provider_addr, "localhost", &pki.cluster_ca_cert())
            .await
            .expect("provider connects");
        let signer = JwtSigner::from_pki(&pki).expect("signer");
        let endpoints = nodes
            .iter()
            .map(|n| DeviceEndpoint {
                addr: n.device_addr.parse().expect("address"),
                server_name: "localhost".into(),
                ca_path: pki.cluster_ca_cert(),
            })
            .collect();
        ProcessCluster { dir, nodes, gateway, provider, signer, endpoints }
    }
}

impl ProcessCluster {
    /// Runs the real `courier ctl` against node 1, requiring it to succeed.
    pub async fn ctl_ok(&self, args: &[&str]) -> CtlRun {
        let node = self.nodes[0].cluster_addr.parse().expect("address");
        let run = ctl(node, self.dir.path(), args).await;
        assert!(run.success, "courier ctl {args:?} failed: {run:?}");
        run
    }
}

/// Sends SIGSTOP or SIGCONT to a node process.
pub fn signal(node: &NodeProcess, which: &str) {
    let pid = node.child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args([which, &pid]).status().expect("kill").success());
}
