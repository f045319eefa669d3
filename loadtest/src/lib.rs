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
//! one given by its endpoints, CA and provider key. The scenarios are in [`scenario`], the fault
//! schedule in [`chaos`]; the binary (`src/bin/courier-loadtest.rs` in the root package) parses the
//! command line and runs one of them.

pub mod chaos;
pub mod cli;
pub mod cluster;
pub mod devices;
pub mod fabric;
pub mod load;
pub mod msg;
pub mod receipts;
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

/// Starts `command`'s process `steps` nice steps below this one (threads it starts inherit that).
pub fn run_nicer(command: &mut tokio::process::Command, steps: u8) {
    if steps == 0 {
        return;
    }
    // SAFETY: setpriority is a plain system call, safe between fork and exec; raising one's own nice value
    // needs no privilege. A failure leaves the worker at normal priority, which only changes the CPU split.
    unsafe {
        command.pre_exec(move || {
            let now = libc::getpriority(libc::PRIO_PROCESS, 0);
            libc::setpriority(libc::PRIO_PROCESS, 0, (now + i32::from(steps)).min(19));
            Ok(())
        });
    }
}

/// CPU time (user and system) process `pid` has used so far, in seconds, from `/proc/<pid>/stat` (Linux;
/// `None` elsewhere or once the process is gone).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = cpu_ticks(&stat)?;
    (ticks_per_sec > 0).then(|| ticks as f64 / ticks_per_sec as f64)
}

/// utime + stime from a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses and may
/// itself hold spaces and parentheses, so the fields are counted from the last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        let stat = "4242 (courier (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 370 55 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_ticks(stat), Some(425));
        assert_eq!(cpu_ticks("4242 (short) S 1 2"), None, "too few fields");
        assert_eq!(cpu_ticks("no parenthesis at all"), None);
        assert_eq!(cpu_ticks("1 (x) S 1 1 1 0 -1 0 0 0 0 0 -5 1"), None, "not a count");
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let spent = cpu_seconds(std::process::id()).expect("/proc/<pid>/stat of this process");
        assert!(spent >= 0.0);
    }
}
