//! The cluster under test: spawned here as child processes (`--spawn N`), or an existing one.
//!
//! A spawned cluster is N `courier node` processes and one `courier gateway` on loopback with OS-chosen
//! ports (the gateway's channels port too, unless `--gateway-arg` names one). Its PKI stays in `--spawn-dir`
//! between runs, so cached devices stay valid; node data is wiped at each start so no notification of an
//! earlier run is left in a queue. The gateway's per-device rate limit is turned off
//! (`--device-rate-per-sec 0`): a load test pushes to each device far faster than an app would. Node and
//! gateway logs go to `<spawn-dir>/*.log`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use courier_core::pki::{PkiDir, PkiOptions};
use courier_gateway::provider::JwtSigner;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;

use crate::cli::TargetArgs;
use crate::fabric::Fabric;

pub struct SpawnedNode {
    pub id: u64,
    pub child: Child,
    pub pid: u32,
    pub device_addr: String,
    pub cluster_addr: String,
    pub metrics_addr: String,
    pub killed: bool,
    /// The program and arguments it was started with, to start it again (`Target::restart`).
    program: PathBuf,
    args: Vec<String>,
}

pub struct Target {
    pub device_addrs: Vec<String>,
    pub provider_addr: SocketAddr,
    /// The gateway's channel management port, where broadcast channels are created; unknown for an
    /// existing cluster given without `--channels-addr`.
    pub channels_addr: Option<SocketAddr>,
    pub server_name: String,
    /// The CA that signs node and gateway certificates.
    pub ca: PathBuf,
    pub signer: JwtSigner,
    pub enrolment_secret: String,
    pub node_metrics: Vec<String>,
    pub nodes: Vec<SpawnedNode>,
    pub gateway: Option<Child>,
    /// A spawned gateway's metrics address.
    pub gateway_metrics: Option<String>,
    /// The spawn directory, where restarted nodes log.
    spawn_dir: Option<PathBuf>,
    /// The nodes' network namespaces, when spawned `partitionable`.
    fabric: Option<Fabric>,
}

impl Target {
    /// Each spawned node's device address by its certificate's name (`WorkerSpec::owner_addrs`).
    pub fn owner_addrs(&self) -> std::collections::BTreeMap<String, String> {
        let named = |node: &SpawnedNode| (courier_core::pki::node_device_name(node.id), node.device_addr.clone());
        self.nodes.iter().map(named).collect()
    }

    pub async fn from_args(args: &TargetArgs, quiet: bool) -> anyhow::Result<Target> {
        match args.spawn {
            Some(n) => spawn(args, n, quiet).await,
            None => existing(args).await,
        }
    }

    pub fn spawned(&self) -> bool {
        !self.nodes.is_empty()
    }

    /// Summed resident memory of the nodes: from /proc for spawned ones, else from their metrics.
    pub async fn node_rss(&self) -> Option<u64> {
        if self.spawned() {
            let mut total = 0;
            for node in self.nodes.iter().filter(|n| !n.killed) {
                total += courier_core::telemetry::resident_memory_bytes(Some(node.pid))?;
            }
            return Some(total);
        }
        if self.node_metrics.is_empty() {
            return None;
        }
        let mut total = 0.0;
        for url in &self.node_metrics {
            let text = http_get(url).await.ok()?;
            total += text.lines().find_map(|line| {
                line.strip_prefix("process_resident_memory_bytes")?.split_whitespace().last()?.parse::<f64>().ok()
            })?;
        }
        Some(total as u64)
    }

    /// The processes of a spawned cluster: the nodes still running, and the gateway.
    pub fn pids(&self) -> (Vec<u32>, Option<u32>) {
        let nodes = self.nodes.iter().filter(|n| !n.killed).map(|n| n.pid).collect();
        (nodes, self.gateway.as_ref().and_then(Child::id))
    }

    /// SIGKILLs spawned node `index` (0-based); returns its device address.
    pub fn kill(&mut self, index: usize) -> anyhow::Result<String> {
        let node = self.nodes.get_mut(index).context("no such node")?;
        node.child.start_kill().context("killing the node")?;
        node.killed = true;
        Ok(node.device_addr.clone())
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, SIGTERM) to spawned node `index`.
    pub fn signal(&self, index: usize, signal: libc::c_int) -> anyhow::Result<()> {
        let node = self.nodes.get(index).context("no such node")?;
        // SAFETY: kill(2) with a pid this process spawned and still holds (not yet reaped).
        let sent = unsafe { libc::kill(node.pid as libc::pid_t, signal) };
        anyhow::ensure!(sent == 0, "signal {signal} to node {}: {}", node.id, std::io::Error::last_os_error());
        Ok(())
    }

    /// SIGTERM to spawned node `index`, then waits (up to `deadline`) for it to drain and exit.
    pub async fn terminate(&mut self, index: usize, deadline: Duration) -> anyhow::Result<()> {
        self.signal(index, libc::SIGTERM)?;
        let node = &mut self.nodes[index];
        let status = tokio::time::timeout(deadline, node.child.wait())
            .await
            .with_context(|| format!("node {} did not exit within {deadline:?} of SIGTERM", node.id))??;
        node.killed = true;
        anyhow::ensure!(status.success(), "node {} exited with {status} after SIGTERM", node.id);
        Ok(())
    }

    /// Starts spawned node `index` again, after a kill or a terminate, on its data and its addresses (the
    /// cluster must have been spawned `restartable`).
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        let dir = self.spawn_dir.clone().context("only a spawned node can be restarted")?;
        let node = self.nodes.get_mut(index).context("no such node")?;
        let _ = node.child.wait().await;
        let restarted = start_node(&node.program.clone(), &dir, node.id, node.args.clone(), true).await?;
        self.node_metrics[index] = format!("http://{}/metrics", restarted.metrics_addr);
        *node = restarted;
        Ok(())
    }

    /// Cuts spawned node `index` off from the other nodes (the cluster must have been spawned
    /// `partitionable`); the gateway and the devices still reach it.
    pub fn isolate(&mut self, index: usize) -> anyhow::Result<()> {
        let id = self.nodes.get(index).context("no such node")?.id;
        self.fabric.as_mut().context("the nodes were not spawned in network namespaces")?.isolate(id)
    }

    /// Undoes every cut.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        self.fabric.as_mut().map_or(Ok(()), Fabric::heal)
    }

    /// Whether every spawned node that is not down is ready, and so is the gateway.
    pub async fn healthy(&self) -> bool {
        for node in self.nodes.iter().filter(|n| !n.killed) {
            if !ready(&node.metrics_addr).await {
                return false;
            }
        }
        match &self.gateway_metrics {
            Some(addr) => ready(addr).await,
            None => true,
        }
    }

    /// The epoch of the spawned gateway's view, from its metrics.
    pub async fn gateway_epoch(&self) -> Option<u64> {
        let text = http_get(&format!("http://{}/metrics", self.gateway_metrics.as_ref()?)).await.ok()?;
        text.lines().find_map(|line| {
            line.strip_prefix("courier_gateway_cluster_epoch ")?.trim().parse::<f64>().ok().map(|e| e as u64)
        })
    }

    /// Stops spawned processes (SIGKILL; their data is wiped at the next start anyway).
    pub async fn stop(mut self) {
        if let Some(mut gateway) = self.gateway.take() {
            let _ = gateway.kill().await;
        }
        for node in &mut self.nodes {
            let _ = node.child.kill().await;
        }
        // The namespaces go once their processes have exited.
        drop(self.fabric.take());
    }
}

async fn existing(args: &TargetArgs) -> anyhow::Result<Target> {
    anyhow::ensure!(
        !args.device_addr.is_empty() && args.provider_addr.is_some(),
        "give either --spawn N, or an existing cluster's --device-addr and --provider-addr (with --pki-dir, or \
         --ca and --provider-key/--team-id/--key-id)"
    );
    let (ca, signer) = match (&args.pki_dir, &args.ca, &args.provider_key) {
        (Some(dir), ca, None) => {
            let pki = PkiDir::new(dir);
            let signer = JwtSigner::from_pki(&pki).context("reading the provider credential from --pki-dir")?;
            (ca.clone().unwrap_or_else(|| pki.cluster_ca_cert()), signer)
        }
        (_, Some(ca), Some(key)) => {
            let (Some(team), Some(kid)) = (&args.team_id, &args.key_id) else {
                anyhow::bail!("--provider-key needs --team-id and --key-id");
            };
            let pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
            (ca.clone(), JwtSigner::new(team, kid, &pem)?)
        }
        _ => anyhow::bail!("an existing cluster needs --pki-dir, or --ca with --provider-key, --team-id and --key-id"),
    };
    let provider = args.provider_addr.clone().unwrap_or_default();
    let channels_addr = match &args.channels_addr {
        Some(addr) => Some(courier_device::resolve(addr).await?),
        None => None,
    };
    Ok(Target {
        device_addrs: args.device_addr.clone(),
        provider_addr: courier_device::resolve(&provider).await?,
        channels_addr,
        server_name: args.server_name.clone(),
        ca,
        signer,
        enrolment_secret: args.enrolment_secret.clone(),
        node_metrics: args.node_metrics.clone(),
        nodes: Vec::new(),
        gateway: None,
        gateway_metrics: None,
        spawn_dir: None,
        fabric: None,
    })
}

fn courier_bin(args: &TargetArgs) -> anyhow::Result<PathBuf> {
    if let Some(bin) = &args.courier_bin {
        return Ok(bin.clone());
    }
    let exe = std::env::current_exe()?;
    let beside = exe.with_file_name("courier");
    anyhow::ensure!(
        beside.exists(),
        "--spawn runs the `courier` binary, expected at {} (build it with `cargo build --release`, or pass \
         --courier-bin)",
        beside.display()
    );
    Ok(beside)
}

/// Reads the child's first stdout line (`{"event":"listening",...}`) and keeps draining the rest.
async fn listening(child: &mut Child, what: &str) -> anyhow::Result<serde_json::Value> {
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .with_context(|| format!("{what} did not start within 60 s"))??
        .with_context(|| format!("{what} exited at start (see its log)"))?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let value: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("{what} printed {line:?}"))?;
    anyhow::ensure!(value["event"] == "listening", "{what} printed {line:?}");
    Ok(value)
}

/// `<dir>/<name>.log`, new, or appended to for a restarted process.
fn log_file(dir: &Path, name: &str, append: bool) -> anyhow::Result<std::fs::File> {
    let path = dir.join(format!("{name}.log"));
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))
}

/// A loopback port free right now, for a process that must come back on the same address after a restart.
///
/// The port is taken from below the kernel's ephemeral range: a port from that range (what binding port 0
/// gives) can meanwhile become the local end of any outgoing connection on the machine, and the process
/// then fails to bind it when it starts or restarts. Below the range only other listeners compete. A port
/// is handed out at most once per process.
pub fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let floor = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768)
        .clamp(12_000, 49_152);
    let mut given = GIVEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..2_000 {
        let port = rand::random_range(10_000..floor);
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port below {floor}")
}

/// Starts `program <args>` (`courier node …`, or `ip netns exec … courier node …`) as node `id`, logging
/// to `<dir>/node-<id>.log`, and waits for its addresses.
async fn start_node(
    program: &Path,
    dir: &Path,
    id: u64,
    args: Vec<String>,
    append_log: bool,
) -> anyhow::Result<SpawnedNode> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(&args)
        .env("RUST_LOG", std::env::var("COURIER_LOADTEST_NODE_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .stderr(log_file(dir, &format!("node-{id}"), append_log)?)
        .kill_on_drop(true);
    crate::die_with_parent(&mut command);
    let mut child = command.spawn().with_context(|| format!("starting {}", program.display()))?;
    let value = listening(&mut child, &format!("node {id}")).await?;
    let field = |name: &str| value[name].as_str().unwrap_or_default().to_string();
    Ok(SpawnedNode {
        id,
        pid: child.id().unwrap_or(0),
        child,
        device_addr: field("device_addr"),
        cluster_addr: field("cluster_addr"),
        metrics_addr: field("metrics_addr"),
        killed: false,
        program: program.to_path_buf(),
        args,
    })
}

async fn spawn(args: &TargetArgs, n: usize, quiet: bool) -> anyhow::Result<Target> {
    anyhow::ensure!(n >= 1, "--spawn needs at least one node");
    let bin = courier_bin(args)?;
    let dir = &args.spawn_dir;
    let options = PkiOptions { nodes: (1..=n as u64).collect(), ..PkiOptions::default() };
    courier_core::pki::init(dir, &options).with_context(|| format!("creating the PKI in {}", dir.display()))?;
    let pki = PkiDir::new(dir);
    let fabric = if args.partitionable {
        let fabric = Fabric::new(&options.nodes)?;
        // Peers, the gateway and devices check a node's certificate against the address they dial.
        for &id in &options.nodes {
            courier_core::pki::issue(&pki, courier_core::pki::ClusterRole::Node(id), &[fabric.host(id)])
                .with_context(|| format!("a certificate for node {id} at {}", fabric.host(id)))?;
        }
        Some(fabric)
    } else {
        None
    };
    let mut nodes: Vec<SpawnedNode> = Vec::new();
    let threads = args.spawn_threads.map(|t| t.to_string());
    for id in 1..=n as u64 {
        let data = dir.join(format!("node-{id}"));
        if data.exists() {
            std::fs::remove_dir_all(&data).with_context(|| format!("wiping {}", data.display()))?;
        }
        let (device, cluster) = if args.restartable { (free_port()?, free_port()?) } else { (0, 0) };
        let host = fabric.as_ref().map_or_else(|| "127.0.0.1".to_string(), |f| f.host(id));
        // In a namespace of its own, through `ip netns exec` (which execs, so the pid is the node's).
        let (program, mut node_args): (PathBuf, Vec<String>) = match &fabric {
            Some(f) => ("ip".into(), vec!["netns".into(), "exec".into(), f.namespace(id), bin.display().to_string()]),
            None => (bin.clone(), Vec::new()),
        };
        node_args.extend(["node".into(), "--node-id".into(), id.to_string()]);
        node_args.extend(threads.iter().flat_map(|t| ["--worker-threads".to_string(), t.clone()]));
        node_args.extend(["--data-dir".into(), data.display().to_string()]);
        node_args.extend(["--pki-dir".into(), dir.display().to_string()]);
        node_args.extend(["--device-addr".into(), format!("{host}:{device}")]);
        node_args.extend(["--cluster-addr".into(), format!("{host}:{cluster}")]);
        node_args.extend(["--node-metrics-addr".into(), format!("{host}:0"), "--open-enrolment".into()]);
        node_args.extend(args.node_args.iter().cloned());
        if let Some(seed) = nodes.first() {
            node_args.extend(["--join".into(), seed.cluster_addr.clone()]);
        }
        nodes.push(start_node(&program, dir, id, node_args, false).await?);
    }
    // Every node ready (an active member with a leader), so devices are not moved by a late join.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for node in &nodes {
        while !ready(&node.metrics_addr).await {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "node {} did not become ready in 60 s", node.id);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let node_addrs: Vec<_> = nodes.iter().map(|n| n.cluster_addr.clone()).collect();
    // The gateway's default channels port is a fixed one on every interface, which a second cluster on the
    // machine (another run, `courier dev`) would already hold.
    let channels_arg = (!args.gateway_args.iter().any(|arg| arg.starts_with("--channels-addr")))
        .then_some(["--channels-addr", "127.0.0.1:0"]);
    let mut gateway_command = tokio::process::Command::new(&bin);
    crate::die_with_parent(&mut gateway_command);
    let mut gateway = gateway_command
        .arg("gateway")
        .args(threads.iter().flat_map(|t| ["--worker-threads", t.as_str()]))
        .arg("--pki-dir")
        .arg(dir)
        .args(["--node-addr", &node_addrs.join(",")])
        .args(["--provider-addr", "127.0.0.1:0", "--gateway-metrics-addr", "127.0.0.1:0"])
        .args(channels_arg.iter().flatten())
        .args(["--device-rate-per-sec", "0"])
        .args(&args.gateway_args)
        .env("RUST_LOG", std::env::var("COURIER_LOADTEST_NODE_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .stderr(log_file(dir, "gateway", false)?)
        .kill_on_drop(true)
        .spawn()
        .context("starting the gateway")?;
    let value = listening(&mut gateway, "the gateway").await?;
    let provider_addr: SocketAddr = value["provider_addr"].as_str().unwrap_or_default().parse()?;
    let channels_addr = value["channels_addr"].as_str().and_then(|addr| addr.parse::<SocketAddr>().ok());
    let gateway_metrics = value["metrics_addr"].as_str().unwrap_or_default().to_string();
    while !ready(&gateway_metrics).await {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the gateway did not become ready in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !quiet {
        eprintln!(
            "spawned {n} node(s) and a gateway (provider API {provider_addr}); PKI and logs in {}",
            dir.display()
        );
    }
    Ok(Target {
        device_addrs: nodes.iter().map(|n| n.device_addr.clone()).collect(),
        provider_addr,
        channels_addr,
        server_name: "localhost".into(),
        ca: pki.cluster_ca_cert(),
        signer: JwtSigner::from_pki(&pki)?,
        enrolment_secret: String::new(),
        node_metrics: nodes.iter().map(|n| format!("http://{}/metrics", n.metrics_addr)).collect(),
        nodes,
        gateway: Some(gateway),
        gateway_metrics: Some(gateway_metrics),
        spawn_dir: Some(dir.clone()),
        fabric,
    })
}

async fn ready(metrics_addr: &str) -> bool {
    http_get(&format!("http://{metrics_addr}/readyz")).await.is_ok_and(|body| body.starts_with("HTTP/1.1 200"))
}

/// A plain HTTP/1.1 GET (metrics and health endpoints); returns the whole response, status line included.
pub async fn http_get(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(host)).await??;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut body)).await??;
    Ok(body)
}
