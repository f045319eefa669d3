//! The ledger of a run (every sequence number sent, how the gateway answered, how often and where it
//! arrived), its counterpart for broadcasts (every broadcast and when each subscriber received it), latency
//! histograms, the live progress line, the summary table and the JSON result.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use hdrhistogram::Histogram;
use serde::Serialize;

const NOT_RECEIVED: &str = "NotReceived";

/// Per sequence number: what the gateway said.
const PENDING: u8 = 0;
const ACCEPTED: u8 = 1;
const REFUSED: u8 = 2;

fn histogram() -> Histogram<u64> {
    // 1 µs to one hour, three significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

pub struct Ledger {
    pub run_id: u32,
    /// Sequence number `s` goes to device `targets[s % len]`.
    targets: Vec<u64>,
    state: Vec<u8>,
    received: Vec<u8>,
    /// Answers per sequence number (saturating): each push must get exactly one.
    answers: Vec<u8>,
    /// Answers received (any status, or a transport error).
    pub sent: u64,
    pub accepted: u64,
    /// Accepted sequence numbers received at least once.
    accepted_received: u64,
    /// Refusals by APNs reason (or `transport: ...`).
    pub errors: BTreeMap<String, u64>,
    /// Receipts at a device other than the one addressed.
    pub misdelivered: u64,
    pub receipts: u64,
    pub last_receipt_us: Option<u64>,
    /// Provider send (scheduled time) to device receipt.
    pub end_to_end: Histogram<u64>,
    /// The same, since the last progress line.
    pub interval: Histogram<u64>,
    /// Provider send (scheduled time) to the gateway's answer.
    pub response: Histogram<u64>,
}

impl Ledger {
    pub fn new(run_id: u32) -> Self {
        Ledger {
            run_id,
            targets: Vec::new(),
            state: Vec::new(),
            received: Vec::new(),
            answers: Vec::new(),
            sent: 0,
            accepted: 0,
            accepted_received: 0,
            errors: BTreeMap::new(),
            misdelivered: 0,
            receipts: 0,
            last_receipt_us: None,
            end_to_end: histogram(),
            interval: histogram(),
            response: histogram(),
        }
    }

    /// The devices pushes go to, in turn.
    pub fn set_targets(&mut self, targets: Vec<u64>) {
        self.targets = targets;
    }

    pub fn target(&self, seq: u64) -> Option<u64> {
        if self.targets.is_empty() { None } else { Some(self.targets[(seq % self.targets.len() as u64) as usize]) }
    }

    fn grow(&mut self, seq: u64) -> usize {
        let i = seq as usize;
        if self.state.len() <= i {
            self.state.resize(i + 1, PENDING);
            self.received.resize(i + 1, 0);
            self.answers.resize(i + 1, 0);
        }
        i
    }

    /// The gateway's answer to `seq`: `Ok(())` for 200, else the reason.
    pub fn answer(&mut self, seq: u64, outcome: Result<(), String>, latency_us: u64) {
        let i = self.grow(seq);
        self.sent += 1;
        self.answers[i] = self.answers[i].saturating_add(1);
        let _ = self.response.record(latency_us.max(1));
        match outcome {
            Ok(()) => {
                self.state[i] = ACCEPTED;
                self.accepted += 1;
                if self.received[i] > 0 {
                    self.accepted_received += 1;
                }
            }
            Err(reason) => {
                self.state[i] = REFUSED;
                *self.errors.entry(reason).or_default() += 1;
            }
        }
    }

    /// Device `device` received `seq` (its app saw it; redeliveries the client dropped are not reported).
    pub fn receipt(&mut self, seq: u64, latency_us: u64, device: u64) {
        if self.target(seq) != Some(device) {
            self.misdelivered += 1;
            return;
        }
        let i = self.grow(seq);
        self.receipts += 1;
        self.received[i] = self.received[i].saturating_add(1);
        if self.received[i] == 1 && self.state[i] == ACCEPTED {
            self.accepted_received += 1;
        }
        let now = crate::clock_micros();
        self.last_receipt_us = Some(now);
        let _ = self.end_to_end.record(latency_us.max(1));
        let _ = self.interval.record(latency_us.max(1));
    }

    /// Every accepted notification has arrived somewhere.
    pub fn complete(&self) -> bool {
        self.accepted_received == self.accepted
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The final accounting. `consistent` is checked per sequence number, not from the running counters:
    /// the load issues numbers 0, 1, 2, … and every one up to the last answered must have exactly one
    /// answer (none missing, none answered twice), and their count must be what the counters say was sent.
    /// Errors include accepted notifications that never arrived (`NotReceived`).
    pub fn summary(&self, stale: u64) -> PushSummary {
        let mut errors = self.errors.clone();
        let (mut received, mut duplicates, mut despite_error, mut lost) = (0u64, 0u64, 0u64, Vec::new());
        for (i, (&state, &count)) in self.state.iter().zip(&self.received).enumerate() {
            match state {
                ACCEPTED if count == 0 => {
                    *errors.entry(NOT_RECEIVED.into()).or_default() += 1;
                    if lost.len() < 10 {
                        lost.push(crate::msg::apns_id(self.run_id, i as u64));
                    }
                }
                ACCEPTED => {
                    received += 1;
                    duplicates += u64::from(count - 1);
                }
                REFUSED if count > 0 => despite_error += 1,
                _ => {}
            }
        }
        let answered = self.answers.iter().rposition(|&n| n > 0).map_or(0, |last| last + 1);
        let exactly_once = self.answers[..answered].iter().all(|&n| n == 1);
        PushSummary {
            sent: self.sent,
            accepted: self.accepted,
            received,
            errors,
            consistent: exactly_once && self.sent == answered as u64,
            duplicates,
            misdelivered: self.misdelivered,
            delivered_despite_error: despite_error,
            stale,
            lost_sample: lost,
        }
    }

    /// p99 of receipts since the last call, in ms.
    pub fn take_interval_p99_ms(&mut self) -> Option<f64> {
        let p99 = (!self.interval.is_empty()).then(|| self.interval.value_at_quantile(0.99) as f64 / 1000.0);
        self.interval.reset();
        p99
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PushSummary {
    pub sent: u64,
    pub accepted: u64,
    /// Accepted and received at least once.
    pub received: u64,
    /// Errors by APNs reason, `transport: ...`, and `NotReceived` for accepted notifications that never came.
    pub errors: BTreeMap<String, u64>,
    /// Every push issued, up to the last one answered, has exactly one answer (checked per apns-id).
    pub consistent: bool,
    /// Extra arrivals at the app of an accepted notification (exactly-once means zero).
    pub duplicates: u64,
    pub misdelivered: u64,
    /// Refused (e.g. 503 after a timeout) yet delivered: allowed by APNs semantics, counted apart.
    pub delivered_despite_error: u64,
    /// Notifications from an earlier run still queued for these devices.
    pub stale: u64,
    /// Up to ten apns-ids accepted but not received.
    pub lost_sample: Vec<String>,
}

impl PushSummary {
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn lost(&self) -> u64 {
        self.errors.get(NOT_RECEIVED).copied().unwrap_or(0)
    }
}

/// The ledger of a broadcast run: every broadcast sent, how the gateway answered, and when each of its
/// subscribers received it. Device `i` subscribes to channel `i % channels`; every time is `clock_micros`,
/// the monotonic clock the coordinator and the swarm's workers share.
pub struct BroadcastLedger {
    devices: usize,
    channels: usize,
    /// By sequence number.
    sends: Vec<Fanout>,
    /// Receipts at a device that does not subscribe to the broadcast's channel.
    pub misdelivered: u64,
    /// Receipts naming a sequence number this run never sent.
    pub unknown: u64,
}

/// One broadcast.
struct Fanout {
    channel: usize,
    /// Taken just before the request left.
    sent_us: u64,
    /// When the gateway answered 200, or why it did not; `None` while unanswered.
    answer: Option<Result<u64, String>>,
    /// Each subscriber's first receipt (0: none yet), by its place in the channel: device
    /// `channel + k * channels` is at `k`.
    receipts: Vec<u64>,
    /// Subscribers with a receipt, however late.
    received: usize,
    /// Receipts after a subscriber's first.
    duplicates: u64,
}

impl BroadcastLedger {
    pub fn new(devices: usize, channels: usize) -> Self {
        BroadcastLedger { devices, channels: channels.max(1), sends: Vec::new(), misdelivered: 0, unknown: 0 }
    }

    /// How many of the devices subscribe to `channel`.
    pub fn subscribers(&self, channel: usize) -> usize {
        if channel >= self.channels || channel >= self.devices {
            return 0;
        }
        (self.devices - channel).div_ceil(self.channels)
    }

    /// The sequence number the next broadcast gets.
    pub fn next_seq(&self) -> u64 {
        self.sends.len() as u64
    }

    /// Records a broadcast on `channel` sent at `sent_us`; returns its sequence number.
    pub fn sent(&mut self, channel: usize, sent_us: u64) -> u64 {
        let subscribers = self.subscribers(channel);
        self.sends.push(Fanout {
            channel,
            sent_us,
            answer: None,
            receipts: vec![0; subscribers],
            received: 0,
            duplicates: 0,
        });
        (self.sends.len() - 1) as u64
    }

    /// The gateway's answer to broadcast `seq`: `Ok(answered_us)` for 200, else the reason.
    pub fn answered(&mut self, seq: u64, answer: Result<u64, String>) {
        if let Some(fanout) = self.sends.get_mut(seq as usize) {
            fanout.answer = Some(answer);
        }
    }

    /// Device `device` received broadcast `seq` at `at_us`.
    pub fn receipt(&mut self, seq: u64, device: u64, at_us: u64) {
        let Some(fanout) = self.sends.get_mut(seq as usize) else {
            self.unknown += 1;
            return;
        };
        let device = device as usize;
        if device >= self.devices || device % self.channels != fanout.channel {
            self.misdelivered += 1;
            return;
        }
        match fanout.receipts.get_mut(device / self.channels) {
            Some(slot) if *slot == 0 => {
                // 0 marks "none yet"; a receipt at the clock's origin is a microsecond later.
                *slot = at_us.max(1);
                fanout.received += 1;
            }
            Some(_) => fanout.duplicates += 1,
            None => self.misdelivered += 1,
        }
    }

    /// Subscribers that have received broadcast `seq`, however late.
    pub fn received(&self, seq: u64) -> usize {
        self.sends.get(seq as usize).map_or(0, |fanout| fanout.received)
    }

    /// Broadcast `seq` as it stands, counting a receipt later than `settle_us` after the send as missed.
    pub fn summary(&self, seq: u64, settle_us: u64) -> Option<FanoutSummary> {
        let fanout = self.sends.get(seq as usize)?;
        let (latency, received, last_us) = fanout.latency(settle_us);
        let subscribers = fanout.receipts.len();
        let last_receipt_ms = last_us.map(|us| us as f64 / 1000.0);
        let deliveries_per_sec = match last_us {
            Some(us) if us > 0 => received as f64 / (us as f64 / 1e6),
            _ => 0.0,
        };
        let (answer_ms, error) = match &fanout.answer {
            Some(Ok(at)) => (Some(at.saturating_sub(fanout.sent_us) as f64 / 1000.0), None),
            Some(Err(reason)) => (None, Some(reason.clone())),
            None => (None, Some("unanswered".to_string())),
        };
        Some(FanoutSummary {
            seq,
            channel: fanout.channel,
            subscribers,
            received,
            missed: subscribers - received,
            late: fanout.received - received,
            duplicates: fanout.duplicates,
            answer_ms,
            error,
            last_receipt_ms,
            deliveries_per_sec,
            latency: (!latency.is_empty()).then(|| Percentiles::of(&latency)),
        })
    }

    /// Every broadcast's summary, in the order they were sent.
    pub fn summaries(&self, settle_us: u64) -> Vec<FanoutSummary> {
        (0..self.sends.len() as u64).filter_map(|seq| self.summary(seq, settle_us)).collect()
    }

    /// The run's figures. Deliveries (due, received, missed) count accepted broadcasts only; a refused one
    /// counts as refused. The spreads of time to the last receipt and of deliveries per second are over
    /// complete broadcasts (every subscriber in time) only: an incomplete one's last receipt is not its
    /// last subscriber's.
    pub fn totals(&self, settle_us: u64) -> BroadcastTotals {
        let summaries = self.summaries(settle_us);
        let mut latency = histogram();
        for fanout in self.sends.iter().filter(|fanout| matches!(fanout.answer, Some(Ok(_)))) {
            let _ = latency.add(fanout.latency(settle_us).0);
        }
        let accepted: Vec<&FanoutSummary> = summaries.iter().filter(|s| s.error.is_none()).collect();
        let complete: Vec<&FanoutSummary> = accepted.iter().copied().filter(|s| s.missed == 0).collect();
        let sum = |count: fn(&FanoutSummary) -> u64| accepted.iter().map(|s| count(s)).sum::<u64>();
        BroadcastTotals {
            sends: summaries.len(),
            refused: summaries.len() - accepted.len(),
            complete: complete.len(),
            deliveries_due: sum(|s| s.subscribers as u64),
            received: sum(|s| s.received as u64),
            missed: sum(|s| s.missed as u64),
            late: sum(|s| s.late as u64),
            duplicates: sum(|s| s.duplicates),
            misdelivered: self.misdelivered,
            unknown: self.unknown,
            last_receipt_ms: Spread::of(complete.iter().filter_map(|s| s.last_receipt_ms)),
            deliveries_per_sec: Spread::of(complete.iter().map(|s| s.deliveries_per_sec)),
            answer_ms: Spread::of(accepted.iter().filter_map(|s| s.answer_ms)),
            latency: (!latency.is_empty()).then(|| Percentiles::of(&latency)),
        }
    }
}

impl Fanout {
    /// The in-time receipts' latencies from the send, how many there are, and the latest.
    fn latency(&self, settle_us: u64) -> (Histogram<u64>, usize, Option<u64>) {
        let mut latency = histogram();
        let (mut received, mut last) = (0, None);
        for &at in self.receipts.iter().filter(|&&at| at != 0) {
            let us = at.saturating_sub(self.sent_us);
            if us > settle_us {
                continue;
            }
            received += 1;
            let _ = latency.record(us.max(1));
            last = last.max(Some(us));
        }
        (latency, received, last)
    }
}

/// One broadcast's figures.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutSummary {
    pub seq: u64,
    pub channel: usize,
    pub subscribers: usize,
    /// Subscribers that received it within the settle timeout.
    pub received: usize,
    /// Subscribers that did not (`late` of them did afterwards).
    pub missed: usize,
    pub late: usize,
    /// Second receipts at one subscriber (the device drops redeliveries by apns-id, so none are expected).
    pub duplicates: u64,
    /// From the send to the gateway's 200.
    pub answer_ms: Option<f64>,
    /// Why it was not answered 200.
    pub error: Option<String>,
    /// From the send to the last in-time receipt.
    pub last_receipt_ms: Option<f64>,
    /// In-time receipts over the time from the send to the last of them.
    pub deliveries_per_sec: f64,
    /// Each subscriber's time from the send to its receipt.
    pub latency: Option<Percentiles>,
}

/// A broadcast run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct BroadcastTotals {
    pub sends: usize,
    /// Broadcasts the gateway did not answer 200.
    pub refused: usize,
    /// Accepted broadcasts every subscriber received in time.
    pub complete: usize,
    /// Subscribers summed over accepted broadcasts: the deliveries a perfect run makes.
    pub deliveries_due: u64,
    pub received: u64,
    pub missed: u64,
    pub late: u64,
    pub duplicates: u64,
    pub misdelivered: u64,
    pub unknown: u64,
    /// Over complete broadcasts.
    pub last_receipt_ms: Option<Spread>,
    pub deliveries_per_sec: Option<Spread>,
    pub answer_ms: Option<Spread>,
    /// Every in-time receipt's time from its send.
    pub latency: Option<Percentiles>,
}

/// The smallest, middle (the lower of two) and largest of a few figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        values.sort_by(f64::total_cmp);
        Some(Spread { min: *values.first()?, median: values[(values.len() - 1) / 2], max: *values.last()? })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }

    pub fn row(&self) -> String {
        format!(
            "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} ms  (n={})",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}

/// The live progress line on stderr: rewritten in place on a terminal, one line per second otherwise.
pub struct ProgressLine {
    tty: bool,
    quiet: bool,
    dirty: bool,
}

impl ProgressLine {
    pub fn new(quiet: bool) -> Self {
        ProgressLine { tty: std::io::stderr().is_terminal(), quiet, dirty: false }
    }

    pub fn show(&mut self, text: &str) {
        if self.quiet {
            return;
        }
        if self.tty {
            eprint!("\r\x1b[2K{text}");
            self.dirty = true;
        } else {
            eprintln!("{text}");
        }
    }

    /// Ends an in-place line so that what follows starts on its own.
    pub fn finish(&mut self) {
        if self.dirty {
            eprintln!();
            self.dirty = false;
        }
    }
}

/// Prints a two-column table to stdout.
pub fn print_table(title: &str, rows: &[(String, String)]) {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!();
    println!("{title}");
    println!("{}", "-".repeat(title.len().max(20)));
    for (key, value) in rows {
        println!("{key:<width$}  {value}");
    }
}

/// Writes the JSON result file.
pub fn write_json(path: &std::path::Path, value: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_balances_and_finds_loss_duplicates_and_misdelivery() {
        let mut ledger = Ledger::new(1);
        ledger.set_targets(vec![10, 11]);
        ledger.answer(0, Ok(()), 100); // to 10, received once
        ledger.answer(1, Ok(()), 100); // to 11, never received
        ledger.answer(2, Err("BadDeviceToken".into()), 100);
        ledger.answer(3, Err("ServiceUnavailable".into()), 100); // to 11, delivered anyway
        ledger.answer(4, Ok(()), 100); // to 10, twice
        ledger.receipt(0, 500, 10);
        ledger.receipt(3, 500, 11);
        ledger.receipt(4, 500, 10);
        ledger.receipt(4, 500, 10);
        ledger.receipt(0, 500, 11); // wrong device
        assert!(!ledger.complete(), "seq 1 is still missing");
        let summary = ledger.summary(0);
        assert_eq!((summary.sent, summary.accepted, summary.received), (5, 3, 2));
        assert_eq!(summary.lost(), 1);
        assert_eq!(summary.error_total(), 3);
        assert!(summary.consistent);
        assert_eq!(summary.sent, summary.received + summary.error_total());
        assert_eq!((summary.duplicates, summary.misdelivered, summary.delivered_despite_error), (1, 1, 1));
        assert_eq!(summary.lost_sample, vec![crate::msg::apns_id(1, 1)]);
    }

    #[test]
    fn a_push_answered_twice_or_never_breaks_the_ledger() {
        let mut twice = Ledger::new(1);
        twice.set_targets(vec![1]);
        twice.answer(0, Ok(()), 10);
        twice.answer(0, Err("ServiceUnavailable".into()), 10);
        twice.answer(1, Ok(()), 10);
        assert!(!twice.summary(0).consistent, "seq 0 has two answers");

        let mut gap = Ledger::new(1);
        gap.set_targets(vec![1]);
        gap.answer(0, Ok(()), 10);
        gap.answer(2, Ok(()), 10);
        assert!(!gap.summary(0).consistent, "seq 1 was issued and never answered");

        let mut whole = Ledger::new(1);
        whole.set_targets(vec![1]);
        (0..3).for_each(|seq| whole.answer(seq, Ok(()), 10));
        whole.receipt(5, 10, 1); // a receipt beyond the last answer does not make an answer missing
        assert!(whole.summary(0).consistent);
    }

    #[test]
    fn a_broadcast_ledger_times_each_subscriber_from_the_send() {
        // Five devices over two channels: channel 0 has devices 0, 2, 4; channel 1 has 1, 3.
        let mut ledger = BroadcastLedger::new(5, 2);
        assert_eq!((ledger.subscribers(0), ledger.subscribers(1), ledger.subscribers(2)), (3, 2, 0));
        let seq = ledger.sent(0, 1_000_000);
        ledger.answered(seq, Ok(1_050_000));
        ledger.receipt(seq, 0, 1_100_000);
        ledger.receipt(seq, 4, 1_400_000);
        ledger.receipt(seq, 2, 1_200_000);
        ledger.receipt(seq, 2, 1_300_000); // a second copy
        ledger.receipt(seq, 1, 1_100_000); // channel 1's subscriber
        ledger.receipt(seq, 9, 1_100_000); // no such device
        ledger.receipt(7, 0, 1_100_000); // never sent
        assert_eq!(ledger.received(seq), 3);
        let s = ledger.summary(seq, 10_000_000).unwrap();
        assert_eq!((s.subscribers, s.received, s.missed, s.late, s.duplicates), (3, 3, 0, 0, 1));
        assert_eq!(s.answer_ms, Some(50.0));
        assert_eq!(s.last_receipt_ms, Some(400.0), "the last subscriber's receipt, from the send");
        assert!((s.deliveries_per_sec - 3.0 / 0.4).abs() < 1e-9);
        let latency = s.latency.unwrap();
        assert_eq!(latency.count, 3);
        assert!((latency.p50_ms - 200.0).abs() < 0.5 && (latency.max_ms - 400.0).abs() < 0.5, "{latency:?}");
        assert_eq!((ledger.misdelivered, ledger.unknown), (2, 1));
    }

    #[test]
    fn a_broadcast_ledger_counts_the_late_and_the_absent_as_missed() {
        let mut ledger = BroadcastLedger::new(4, 1);
        let first = ledger.sent(0, 0);
        ledger.answered(first, Ok(10));
        for device in 0..4 {
            ledger.receipt(first, device, 1_000 * (device + 1));
        }
        let second = ledger.sent(0, 5_000_000);
        ledger.answered(second, Ok(5_000_100));
        ledger.receipt(second, 0, 5_200_000);
        ledger.receipt(second, 1, 5_000_000 + 3_000_000); // after the 2 s settle timeout
        let refused = ledger.sent(0, 9_000_000);
        ledger.answered(refused, Err("ServiceUnavailable".into()));

        let s = ledger.summary(second, 2_000_000).unwrap();
        assert_eq!((s.received, s.missed, s.late), (1, 3, 1), "one late and two absent are missed");
        assert_eq!(s.last_receipt_ms, Some(200.0), "the late receipt is not the last in time");
        let totals = ledger.totals(2_000_000);
        assert_eq!((totals.sends, totals.refused, totals.complete), (3, 1, 1));
        assert_eq!((totals.deliveries_due, totals.received, totals.missed, totals.late), (8, 5, 3, 1));
        let last = totals.last_receipt_ms.unwrap();
        assert_eq!((last.min, last.max), (4.0, 4.0), "only the complete broadcast counts: {last:?}");
        assert_eq!(totals.latency.unwrap().count, 5);
        assert_eq!(ledger.summary(refused, 2_000_000).unwrap().error.as_deref(), Some("ServiceUnavailable"));
    }

    #[test]
    fn a_spread_is_the_lowest_middle_and_highest() {
        assert_eq!(Spread::of([]), None);
        assert_eq!(Spread::of([3.0, 1.0, 2.0]), Some(Spread { min: 1.0, median: 2.0, max: 3.0 }));
        assert_eq!(Spread::of([4.0, 1.0, 3.0, 2.0]).unwrap().median, 2.0, "the lower of the middle two");
        assert_eq!(Spread::of([f64::NAN, 5.0]).unwrap().median, 5.0);
    }

    #[test]
    fn completion_counts_receipts_that_beat_their_answer() {
        let mut ledger = Ledger::new(1);
        ledger.set_targets(vec![5]);
        ledger.receipt(0, 10, 5);
        ledger.answer(0, Ok(()), 10);
        assert!(ledger.complete());
        assert_eq!(ledger.summary(0).received, 1);
    }
}
