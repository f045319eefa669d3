//! `courier-loadtest`: the load generator for Courier clusters.
//!
//! Placeholder for now: the device swarm, provider load and scenarios arrive with the loadtest issue.
//! It exits non-zero so that nobody mistakes it for a measurement.

fn main() {
    eprintln!("courier-loadtest: no scenarios yet; see the loadtest issue (device swarm, push, offline, failover)");
    std::process::exit(2);
}
