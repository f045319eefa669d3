//! `courier-loadtest`: what a Courier cluster holds, measured with real parts.
//!
//! A run has three pieces, all talking to the cluster the way production clients do:
//! - a **device swarm** ([`swarm`], [`worker`]): real mutual-TLS device links, spread over worker processes
//!   (each under the per-process file limit) and several loopback source addresses;
//! - **provider load** ([`load`]): HTTP/2 with ES256 JWTs, open-loop at a fixed rate or as fast as answered;
//! - a **ledger** ([`report`]) of every apns-id sent, answered and received, which yields latency
//!   histograms, errors by APNs reason, losses and duplicates.
//!
//! The target is a local cluster it spawns as child processes (`--spawn N`, see [`cluster`]) or an existing
//! one given by its endpoints, CA and provider key. The four scenarios are in [`scenario`], the fault
//! schedule in [`chaos`]; the binary (`src/bin/courier-loadtest.rs` in the root package) parses the
//! command line and runs one of them.

pub mod chaos;
pub mod cli;
pub mod cluster;
pub mod devices;
pub mod fabric;
pub mod load;
pub mod msg;
pub mod report;
pub mod scenario;
pub mod swarm;
pub mod worker;

/// Raises the soft open-file limit to the hard one; child processes (workers, spawned nodes) inherit it.
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Makes `command`'s process receive SIGKILL when this one dies, however it dies (Linux), so that a
/// killed coordinator leaves no cluster or worker behind.
pub fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe, as code between fork and exec must be.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Microseconds on the machine's monotonic clock (`CLOCK_MONOTONIC`, shared by every process on the
/// machine): the clock every receipt and send time is taken from, since the swarm and the provider run on
/// one machine. Unlike the wall clock, it is never stepped or slewed back while a run measures latencies
/// across processes.
pub fn clock_micros() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    if result != 0 {
        return 0;
    }
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}
