//! A network for partitions: every node process in a network namespace of its own, each attached by a veth
//! pair to one bridge in the caller's namespace, where the gateway, the provider and the devices run. Used
//! by `chaos` (the `partition` fault) and by the partition tests.
//! Faults are routes: `cut(a, b)` adds a blackhole route to b inside a's namespace and one to a inside b's,
//! so packets between the two vanish in both directions (connections hang, as across a real partition)
//! while both still reach, and are reached from, the test's namespace. `heal` removes them.
//!
//! Needs root and iproute2 (`ip netns`), as CI has. Names and the /24 are derived from the process id and
//! a count of the fabrics it made, and everything is removed when the fabric is dropped (the namespaces go
//! once their processes exit).

use std::process::Command;

pub struct Fabric {
    tag: String,
    /// The first three octets of the /24: the bridge is `.1`, node `i` is `.(10 + i)`.
    net: String,
    nodes: Vec<u64>,
    /// Blackhole routes in place: inside node `.0`'s namespace, to address `.1`.
    blackholes: Vec<(u64, String)>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| anyhow::anyhow!("running ip (iproute2): {e}; partitions need root and iproute2"))?;
    anyhow::ensure!(status.success(), "ip {} failed; partitions need root and iproute2", args.join(" "));
    Ok(())
}

impl Fabric {
    /// A bridge and one namespace for each node id in `nodes`.
    pub fn new(nodes: &[u64]) -> anyhow::Result<Fabric> {
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let (pid, made) = (std::process::id(), MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        // 56 × 256 /24s in 10.200.0.0–10.255.255.0; fabrics of one process differ in the low bits.
        let net = (pid.wrapping_mul(8).wrapping_add(made)) % (56 * 256);
        let fabric = Fabric {
            tag: format!("cf{}x{}", pid % 100_000, made % 100),
            net: format!("10.{}.{}", 200 + net / 256, net % 256),
            nodes: nodes.to_vec(),
            blackholes: Vec::new(),
        };
        let bridge = fabric.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}.1/24", fabric.net), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for &id in nodes {
            let (ns, host_end, ns_end) =
                (fabric.namespace(id), format!("{}h{id}", fabric.tag), format!("{}n{id}", fabric.tag));
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &ns_end])?;
            ip(&["link", "set", &ns_end, "netns", &ns])?;
            ip(&["link", "set", &host_end, "master", &bridge, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", fabric.host(id)), "dev", &ns_end])?;
            ip(&["-n", &ns, "link", "set", &ns_end, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(fabric)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.tag)
    }

    /// The namespace node `id` runs in.
    pub fn namespace(&self, id: u64) -> String {
        format!("{}ns{id}", self.tag)
    }

    /// Node `id`'s address, the one it binds every listener to.
    pub fn host(&self, id: u64) -> String {
        format!("{}.{}", self.net, 10 + id)
    }

    /// Packets from inside node `id`'s namespace to `addr` vanish from now on.
    fn blackhole(&mut self, id: u64, addr: String) -> anyhow::Result<()> {
        ip(&["-n", &self.namespace(id), "route", "add", "blackhole", &format!("{addr}/32")])?;
        self.blackholes.push((id, addr));
        Ok(())
    }

    /// Packets between nodes `a` and `b` are dropped from now on, both ways.
    pub fn cut(&mut self, a: u64, b: u64) -> anyhow::Result<()> {
        self.blackhole(a, self.host(b))?;
        self.blackhole(b, self.host(a))
    }

    /// Node `id` is cut off from every other node; the caller's namespace still reaches it.
    pub fn isolate(&mut self, id: u64) -> anyhow::Result<()> {
        for other in self.nodes.clone() {
            if other != id {
                self.cut(id, other)?;
            }
        }
        Ok(())
    }

    /// Node `id` is cut off from everything: the other nodes and the caller's namespace (its answers to
    /// the gateway and the devices vanish too), as a machine on the far side of a partition.
    pub fn cut_off(&mut self, id: u64) -> anyhow::Result<()> {
        self.isolate(id)?;
        self.blackhole(id, format!("{}.1", self.net))
    }

    /// Every cut is undone; an error if any blackhole route is left.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        for (id, addr) in std::mem::take(&mut self.blackholes) {
            ip(&["-n", &self.namespace(id), "route", "del", "blackhole", &format!("{addr}/32")])?;
        }
        Ok(())
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        // Best effort: a failure here must not hide the test's own.
        for &id in &self.nodes {
            let _ = Command::new("ip").args(["netns", "del", &self.namespace(id)]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge()]).status();
    }
}
