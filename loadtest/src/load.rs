//! Provider load: HTTP/2 connections to the gateway, each carrying up to `streams` concurrent pushes signed
//! with an ES256 provider JWT, exactly as an app server using an APNs library would send them.
//!
//! At a fixed rate the load is open-loop: push `s` is due at `start + s / rate` and is sent then however
//! slowly earlier ones are answered, and its latency counts from when it was due, so a slow cluster shows
//! up as latency instead of as a quietly lower offered rate. At `max`, `connections × streams` senders
//! each send their next push as soon as the previous one is answered.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_gateway::provider::{JwtSigner, ProviderClient, Push};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::cli::Rate;
use crate::report::Ledger;

/// Pushes due but not yet answered beyond which the open-loop sender counts new ones as `client_backlog`
/// errors instead of holding them (the cluster is far behind; memory would grow without bound).
const MAX_OUTSTANDING: u64 = 200_000;

pub struct LoadPlan {
    pub provider_addr: SocketAddr,
    pub server_name: String,
    pub ca: PathBuf,
    pub signer: JwtSigner,
    pub topic: String,
    pub connections: usize,
    pub streams: usize,
    pub rate: Rate,
    pub duration: Duration,
    pub run_id: u32,
    /// (device index, token) in the order pushes go round them.
    pub targets: Vec<(u64, String)>,
    /// Stop early once this many pushes were sent (for a fixed number, as the offline scenario needs).
    pub limit: Option<u64>,
}

pub struct LoadOutcome {
    /// Pushes sent (and answered, or failed).
    pub sent: u64,
    /// From the first send to the last answer.
    pub elapsed: Duration,
}

struct Sender {
    clients: Vec<(ProviderClient, Semaphore)>,
    authorization: String,
    topic: String,
    run_id: u32,
    targets: Vec<(u64, String)>,
    start: Instant,
    start_us: u64,
    ledger: Arc<Mutex<Ledger>>,
    outstanding: AtomicU64,
}

impl Sender {
    async fn send(&self, seq: u64, due: Instant) {
        let (client, streams) = &self.clients[(seq % self.clients.len() as u64) as usize];
        let (device, token) = &self.targets[(seq % self.targets.len() as u64) as usize];
        let sent_us = self.start_us + due.saturating_duration_since(self.start).as_micros() as u64;
        let push = Push {
            token: token.clone(),
            topic: Some(self.topic.clone()),
            apns_id: Some(crate::msg::apns_id(self.run_id, seq)),
            authorization: Some(self.authorization.clone()),
            payload: crate::msg::payload(self.run_id, seq, *device, sent_us),
            ..Push::default()
        };
        let result = match streams.acquire().await {
            Ok(_permit) => client.push(&push).await,
            Err(_) => return,
        };
        let latency = due.elapsed().as_micros() as u64;
        let outcome = match result {
            Ok(response) if response.status == 200 => Ok(()),
            Ok(response) => Err(response.reason.unwrap_or_else(|| format!("HTTP {}", response.status))),
            Err(error) => Err(format!("transport: {}", short(&error.to_string()))),
        };
        self.ledger.lock().unwrap_or_else(|e| e.into_inner()).answer(seq, outcome, latency);
    }
}

/// The pacer wakes at most this often: at most 2,000 times a second, each push's own due time below that
/// rate. Waking for every push at 8,000/s cost the loaded machine enough to triple the p99 it measured.
const PACER_QUANTUM: Duration = Duration::from_micros(500);

/// How many pushes are due, from `start` at `rate` a second until `end` (at most `limit`), published by a
/// thread of its own at each due time (or every `PACER_QUANTUM` at higher rates). A thread's sleep wakes
/// within tens of microseconds of its deadline; tokio's timer wheel has a resolution of one millisecond and
/// wakes up to that much after a push was due, lateness the open-loop sender would count as the cluster's
/// latency. The channel closes at `end`.
fn pacer(start: Instant, end: Instant, rate: f64, limit: u64) -> anyhow::Result<tokio::sync::watch::Receiver<u64>> {
    let (publish, due) = tokio::sync::watch::channel(0u64);
    let (start, end) = (start.into_std(), end.into_std());
    std::thread::Builder::new().name("pacer".into()).spawn(move || {
        loop {
            let now = std::time::Instant::now();
            if now >= end {
                // Every push due before the end, however late this wake-up came.
                let due_count = (((end - start).as_secs_f64() * rate).ceil() as u64).min(limit);
                publish.send_if_modified(|count| {
                    let grows = *count < due_count;
                    if grows {
                        *count = due_count;
                    }
                    grows
                });
                break;
            }
            let due_count = (((now - start).as_secs_f64() * rate) as u64 + 1).min(limit);
            if publish.send(due_count).is_err() || due_count >= limit {
                break;
            }
            let next_due = start + Duration::from_secs_f64(due_count as f64 / rate);
            let wake = next_due.max(now + PACER_QUANTUM).min(end);
            std::thread::sleep(wake.saturating_duration_since(std::time::Instant::now()));
        }
    })?;
    Ok(due)
}

fn short(text: &str) -> String {
    text.chars().take(80).collect()
}

/// Runs the load to its end and waits for every answer.
pub async fn run(plan: LoadPlan, ledger: Arc<Mutex<Ledger>>) -> anyhow::Result<LoadOutcome> {
    anyhow::ensure!(!plan.targets.is_empty(), "no device tokens to push to");
    let mut clients = Vec::with_capacity(plan.connections.max(1));
    for _ in 0..plan.connections.max(1) {
        let client = ProviderClient::connect(plan.provider_addr, &plan.server_name, &plan.ca)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to the provider API at {}: {e}", plan.provider_addr))?;
        clients.push((client, Semaphore::new(plan.streams.max(1))));
    }
    ledger.lock().unwrap_or_else(|e| e.into_inner()).set_targets(plan.targets.iter().map(|(d, _)| *d).collect());
    let authorization = format!("bearer {}", plan.signer.sign());
    // The two clocks are read together: a push's send time in its payload is `start_us` plus its offset
    // from `start`, and anything between the two reads (a JWT signature) would shift every latency.
    let (start, start_us) = (Instant::now(), crate::clock_micros());
    let sender = Arc::new(Sender {
        clients,
        authorization,
        topic: plan.topic.clone(),
        run_id: plan.run_id,
        targets: plan.targets,
        start,
        start_us,
        ledger: ledger.clone(),
        outstanding: AtomicU64::new(0),
    });
    let end = start + plan.duration;
    let limit = plan.limit.unwrap_or(u64::MAX);
    let next = Arc::new(AtomicU64::new(0));
    match plan.rate {
        Rate::Max => {
            let senders: Vec<_> = (0..plan.connections.max(1) * plan.streams.max(1))
                .map(|_| {
                    let (sender, next) = (sender.clone(), next.clone());
                    tokio::spawn(async move {
                        while Instant::now() < end {
                            let seq = next.fetch_add(1, Ordering::Relaxed);
                            if seq >= limit {
                                break;
                            }
                            sender.send(seq, Instant::now()).await;
                        }
                    })
                })
                .collect();
            for task in senders {
                task.await?;
            }
        }
        Rate::PerSecond(rate) => {
            let mut due_counts = pacer(start, end, rate, limit)?;
            let mut seq = 0u64;
            let tasks = courier_core::shutdown::TaskTracker::new();
            loop {
                let closed = due_counts.changed().await.is_err();
                let due_count = *due_counts.borrow_and_update();
                while seq < due_count {
                    let due = start + Duration::from_secs_f64(seq as f64 / rate);
                    if sender.outstanding.load(Ordering::Relaxed) >= MAX_OUTSTANDING {
                        ledger.lock().unwrap_or_else(|e| e.into_inner()).answer(
                            seq,
                            Err("client_backlog".into()),
                            due.elapsed().as_micros() as u64,
                        );
                    } else {
                        sender.outstanding.fetch_add(1, Ordering::Relaxed);
                        let sender = sender.clone();
                        tasks.spawn(async move {
                            sender.send(seq, due).await;
                            sender.outstanding.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                    seq += 1;
                }
                if closed {
                    break;
                }
            }
            tasks.close();
            tasks.wait().await;
        }
    }
    let sent = ledger.lock().unwrap_or_else(|e| e.into_inner()).sent;
    Ok(LoadOutcome { sent, elapsed: start.elapsed() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pacer never announces a push before it is due, announces every push due by the end, and stops
    /// at the limit.
    #[tokio::test]
    async fn the_pacer_announces_pushes_when_due_never_before() {
        let rate = 2_000.0;
        let start = Instant::now();
        let mut due = pacer(start, start + Duration::from_millis(200), rate, u64::MAX).unwrap();
        let mut last = 0;
        while due.changed().await.is_ok() {
            let count = *due.borrow_and_update();
            let seen_at = Instant::now();
            assert!(count > last, "counts only grow: {last} then {count}");
            // Push `count - 1` is the latest announced; it must be due by now.
            let latest_due = start + Duration::from_secs_f64((count - 1) as f64 / rate);
            assert!(latest_due <= seen_at, "push {} announced before it was due", count - 1);
            last = count;
        }
        assert!((399..=401).contains(&last), "every push due within the 200 ms was announced: {last}");

        let start = Instant::now();
        let mut due = pacer(start, start + Duration::from_secs(10), rate, 7).unwrap();
        while due.changed().await.is_ok() {}
        assert_eq!(*due.borrow(), 7, "the limit stops the pacer");
    }
}
