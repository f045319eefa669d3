//! The runtime that accepts device connections and does their TLS handshakes.
//!
//! A node's Raft heartbeats, member probes, cluster API and device sessions share its main runtime; the
//! handshakes, which are most of a link's CPU, get a runtime of their own. A runtime runs its ready tasks in
//! turn, so thousands of devices handshaking at once (a fleet linking up, or relinking after a failover)
//! used to queue seconds of work ahead of the heartbeats on a busy machine, and every node's lease lapsed
//! (BENCHMARKS.md, "The 100,000-link ramp"). With the handshakes on threads of their own, which also run at a
//! lower priority (`--handshake-nice`), the kernel runs the control plane first and the handshakes take
//! the CPU it leaves. A link whose handshake is done moves to the main runtime (`socket::Socket::move_to`),
//! so that a session's notifications and acks never cross between runtimes.

use tokio::net::TcpListener;
use tokio::runtime::{Handle, Runtime};

pub struct HandshakeRuntime(Option<Runtime>);

impl HandshakeRuntime {
    /// `threads` worker threads (or one per CPU), each `nice` steps nicer than the thread making it.
    pub fn new(threads: Option<u16>, nice: u8) -> std::io::Result<Self> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all().thread_name("courier-handshakes");
        if let Some(threads) = threads {
            builder.worker_threads(usize::from(threads));
        }
        if nice > 0 {
            let priority = nicer_than_this_thread(nice);
            // Absolute, not relative: the runtime's threads start threads of their own (its blocking pool),
            // which inherit their starter's value.
            builder.on_thread_start(move || set_this_thread_priority(priority));
        }
        Ok(HandshakeRuntime(Some(builder.build()?)))
    }

    pub fn handle(&self) -> &Handle {
        self.0.as_ref().expect("the handshake runtime is only taken when dropped").handle()
    }

    /// `listener`, registered with this runtime's I/O driver instead of the current one's, so that the
    /// accept loop run here (`super::serve`) is woken here.
    pub fn adopt(&self, listener: TcpListener) -> std::io::Result<TcpListener> {
        let listener = listener.into_std()?;
        let _entered = self.handle().enter();
        TcpListener::from_std(listener)
    }
}

/// The nice value `steps` above the calling thread's (at most 19, the lowest priority).
fn nicer_than_this_thread(steps: u8) -> i32 {
    // SAFETY: getpriority only reads the calling thread's scheduling value (on Linux a nice value is per
    // thread, and `who` 0 is the calling one).
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    (now + i32::from(steps)).min(19)
}

/// Gives the calling thread nice value `priority`. Raising one's own nice value needs no privilege, so this
/// fails only where priorities are not supported, and then the threads run at the node's priority.
fn set_this_thread_priority(priority: i32) {
    // SAFETY: setpriority changes only the calling thread's nice value.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, priority) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower a handshake thread's priority");
    }
}

impl Drop for HandshakeRuntime {
    /// Dropping a runtime waits for its threads, which must not happen on another runtime's thread (a
    /// node is usually dropped on one). Its handshakes have ended by now when the node was shut down
    /// (`RunningNode::shutdown`); whatever is left is dropped on the runtime's own threads.
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
