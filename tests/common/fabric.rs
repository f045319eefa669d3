//! A network for partition tests: every node process in a network namespace of its own, each attached by
//! a veth pair to one bridge in the test's namespace, where the gateway, the provider and the devices run.
//! Faults are routes: `cut(a, b)` adds a blackhole route to b inside a's namespace and one to a inside b's,
//! so packets between the two vanish in both directions (connections hang, as across a real partition)
//! while both still reach, and are reached from, the test's namespace. `heal` removes them.
//!
//! Needs root and iproute2 (`ip netns`), as CI has. Names and the /24 are derived from the test process
//! id, and everything is removed when the fabric is dropped (the namespaces go once their processes exit).

use std::process::Command;

pub struct Fabric {
    tag: String,
    /// The first three octets of the /24: the bridge is `.1`, node `i` is `.(10 + i)`.
    net: String,
    nodes: Vec<u64>,
    cuts: Vec<(u64, u64)>,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("running ip (iproute2)");
    assert!(status.success(), "ip {} failed (partition tests need root and iproute2)", args.join(" "));
}

impl Fabric {
    /// A bridge and one namespace for each node id in `nodes`.
    pub fn new(nodes: &[u64]) -> Fabric {
        let pid = std::process::id();
        let fabric = Fabric {
            tag: format!("cf{}", pid % 100_000),
            net: format!("10.{}.{}", 200 + (pid / 250) % 50, pid % 250),
            nodes: nodes.to_vec(),
            cuts: Vec::new(),
        };
        let bridge = fabric.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}.1/24", fabric.net), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for &id in nodes {
            let (ns, host_end, ns_end) =
                (fabric.namespace(id), format!("{}h{id}", fabric.tag), format!("{}n{id}", fabric.tag));
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &ns_end]);
            ip(&["link", "set", &ns_end, "netns", &ns]);
            ip(&["link", "set", &host_end, "master", &bridge, "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", fabric.host(id)), "dev", &ns_end]);
            ip(&["-n", &ns, "link", "set", &ns_end, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        fabric
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

    /// Packets between nodes `a` and `b` are dropped from now on, both ways.
    pub fn cut(&mut self, a: u64, b: u64) {
        ip(&["-n", &self.namespace(a), "route", "add", "blackhole", &format!("{}/32", self.host(b))]);
        ip(&["-n", &self.namespace(b), "route", "add", "blackhole", &format!("{}/32", self.host(a))]);
        self.cuts.push((a, b));
    }

    /// Node `id` is cut off from every other node; the test's namespace still reaches it.
    pub fn isolate(&mut self, id: u64) {
        for other in self.nodes.clone() {
            if other != id {
                self.cut(id, other);
            }
        }
    }

    /// Every cut is undone.
    pub fn heal(&mut self) {
        for (a, b) in std::mem::take(&mut self.cuts) {
            ip(&["-n", &self.namespace(a), "route", "del", "blackhole", &format!("{}/32", self.host(b))]);
            ip(&["-n", &self.namespace(b), "route", "del", "blackhole", &format!("{}/32", self.host(a))]);
        }
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
