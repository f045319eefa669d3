//! The ledger of a run (every sequence number sent, how the gateway answered, how often and where it
//! arrived), latency histograms, the live progress line, the summary table and the JSON result.

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
    fn completion_counts_receipts_that_beat_their_answer() {
        let mut ledger = Ledger::new(1);
        ledger.set_targets(vec![5]);
        ledger.receipt(0, 10, 5);
        ledger.answer(0, Ok(()), 10);
        assert!(ledger.complete());
        assert_eq!(ledger.summary(0).received, 1);
    }
}
