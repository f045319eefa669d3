//! Receipts waiting for their team's webhook, in the queue's database: (team id, sequence number) → the
//! event as JSON, with a count per team.
//!
//! The writer adds them in the same commit as the change that decided them (a queued notification acked,
//! expired, collapsed or pushed out of a full queue), or on their own for outcomes nothing stored (acks of
//! notifications never committed, refusals). A team holds at most `cap` of them; more are dropped and
//! counted. The sender (`crate::receipts`) reads them in order and deletes what the endpoint took.

use courier_core::webhook::Event;
use redb::{ReadableTable, TableDefinition};

use super::{StoreError, db_err};

pub(super) const RECEIPTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("receipts");
pub(super) const RECEIPT_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("receipt_counts");
pub(super) const NEXT_RECEIPT_SEQ: &str = "next_receipt_seq";

/// One receipt as queued.
#[derive(Debug, Clone)]
pub struct QueuedReceipt {
    pub seq: u64,
    pub event: Event,
}

/// The receipt tables inside one write transaction.
pub(super) struct ReceiptTables<'t> {
    pub rows: redb::Table<'t, (&'static str, u64), &'static [u8]>,
    pub counts: redb::Table<'t, &'static str, u64>,
    pub next_seq: u64,
    /// Most receipts one team may have queued.
    pub cap: u64,
    /// Receipts added in this transaction.
    pub added: usize,
}

impl ReceiptTables<'_> {
    /// Queues `event` for its team; `false` (and counted) when the team's queue is full.
    pub fn push(&mut self, event: &Event) -> Result<bool, StoreError> {
        let team = event.team_id.as_str();
        let count = self.counts.get(team).map_err(db_err)?.map_or(0, |v| v.value());
        if count >= self.cap {
            metrics::counter!("courier_webhook_events_total", "outcome" => "overflow").increment(1);
            return Ok(false);
        }
        let json = serde_json::to_vec(event).map_err(db_err)?;
        self.rows.insert((team, self.next_seq), json.as_slice()).map_err(db_err)?;
        self.counts.insert(team, count + 1).map_err(db_err)?;
        self.next_seq += 1;
        self.added += 1;
        metrics::counter!("courier_webhook_events_total", "outcome" => "queued").increment(1);
        Ok(true)
    }

    /// Deletes the team's receipts with these sequence numbers; how many there were.
    pub fn remove(&mut self, team: &str, seqs: &[u64]) -> Result<usize, StoreError> {
        let mut removed = 0u64;
        for seq in seqs {
            if self.rows.remove((team, *seq)).map_err(db_err)?.is_some() {
                removed += 1;
            }
        }
        let count = self.counts.get(team).map_err(db_err)?.map_or(0, |v| v.value()).saturating_sub(removed);
        if count == 0 {
            self.counts.remove(team).map_err(db_err)?;
        } else {
            self.counts.insert(team, count).map_err(db_err)?;
        }
        Ok(removed as usize)
    }
}

/// Teams with queued receipts, and how many each has.
pub(super) fn teams(counts: &impl ReadableTable<&'static str, u64>) -> Result<Vec<(String, u64)>, StoreError> {
    counts
        .iter()
        .map_err(db_err)?
        .map(|entry| entry.map(|(team, count)| (team.value().to_string(), count.value())).map_err(db_err))
        .collect()
}

/// The team's oldest `limit` receipts, in the order they were queued. A row that does not parse (written
/// by a later version) is returned with its sequence number only, so that it can be deleted.
pub(super) fn oldest(
    rows: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    team: &str,
    limit: usize,
) -> Result<(Vec<QueuedReceipt>, Vec<u64>), StoreError> {
    let mut receipts = Vec::new();
    let mut unreadable = Vec::new();
    for entry in rows.range((team, 0)..=(team, u64::MAX)).map_err(db_err)?.take(limit) {
        let (key, value) = entry.map_err(db_err)?;
        let seq = key.value().1;
        match serde_json::from_slice(value.value()) {
            Ok(event) => receipts.push(QueuedReceipt { seq, event }),
            Err(_) => unreadable.push(seq),
        }
    }
    Ok((receipts, unreadable))
}

/// The receipt of `kind` for `notification`, if its team asked for receipts (the gateway named the team).
pub fn event_for(
    notification: &courier_proto::cluster::Notification,
    kind: courier_core::webhook::EventKind,
    reason: Option<&str>,
    at_ms: u64,
) -> Option<Event> {
    if notification.team_id.is_empty() {
        return None;
    }
    let of = courier_core::webhook::Receipted {
        team_id: &notification.team_id,
        apns_id: &notification.apns_id,
        token: &notification.token,
        topic: &notification.topic,
        accepted_at_ms: notification.accepted_at_ms,
    };
    Some(Event::new(kind, of, reason, at_ms))
}
