//! Receipts, in the queue's database. Two tables:
//!
//! - the send queue, on the device's owner: (team id, sequence number) → the device and the event as JSON,
//!   with a count per team. A team holds at most `cap`; more are dropped and counted. The sender
//!   (`crate::receipts`) reads it in order and deletes what the endpoint took.
//! - held copies, on the device's other holders: (device id, event id) → the event. A holder keeps the
//!   receipts of the devices whose queues it copies, until the owner says its endpoint took them; if the
//!   holder becomes a device's owner (the owner died), it moves them to its send queue.
//!
//! The writer adds them in the same commit as the change that decided them (a queued notification acked,
//! expired, collapsed or pushed out of a full queue), or on their own for outcomes nothing stored (acks of
//! notifications never committed, refusals).

use courier_core::webhook::Event;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{StoreError, db_err};
use crate::ids::DeviceId;

pub(super) const RECEIPTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("receipts");
pub(super) const RECEIPT_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("receipt_counts");
pub(super) const HELD: TableDefinition<(u128, &str), &[u8]> = TableDefinition::new("held_receipts");
pub(super) const NEXT_RECEIPT_SEQ: &str = "next_receipt_seq";

/// Where the receipts a store change decides go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptRole {
    /// Nowhere: a change that decides no outcome here (queues merged from another holder).
    None,
    /// The send queue: this node owns the device.
    Queue,
    /// Held, for the owner's death: this node holds a copy of the device's queue.
    Hold,
}

/// One receipt as queued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedReceipt {
    #[serde(skip)]
    pub seq: u64,
    /// The device it is about: its other holders keep a copy until the endpoint has it.
    pub device: DeviceId,
    pub event: Event,
}

/// The receipt tables inside one write transaction.
pub(super) struct ReceiptTables<'t> {
    pub rows: redb::Table<'t, (&'static str, u64), &'static [u8]>,
    pub counts: redb::Table<'t, &'static str, u64>,
    pub held: redb::Table<'t, (u128, &'static str), &'static [u8]>,
    pub next_seq: u64,
    /// Most receipts one team may have queued.
    pub cap: u64,
    /// Receipts added in this transaction.
    pub added: usize,
}

impl ReceiptTables<'_> {
    /// Sends `event` (about `device`) to the queue or holds it, as `role` says.
    pub fn keep(&mut self, role: ReceiptRole, device: DeviceId, event: &Event) -> Result<(), StoreError> {
        match role {
            ReceiptRole::None => Ok(()),
            ReceiptRole::Queue => self.push(device, event).map(|_| ()),
            ReceiptRole::Hold => {
                self.held.insert((device.0, event.id.as_str()), event.to_json().as_slice()).map_err(db_err)?;
                Ok(())
            }
        }
    }

    /// Drops held copies the owner's endpoint took.
    pub fn release(&mut self, released: &[(DeviceId, String)]) -> Result<usize, StoreError> {
        let mut count = 0;
        for (device, id) in released {
            count += usize::from(self.held.remove((device.0, id.as_str())).map_err(db_err)?.is_some());
        }
        Ok(count)
    }

    /// Moves the held receipts of `devices` (now owned here) to the send queue; how many.
    pub fn adopt(&mut self, devices: &[DeviceId]) -> Result<usize, StoreError> {
        let mut adopted = 0;
        for device in devices {
            let rows: Vec<(String, Vec<u8>)> = self
                .held
                .range((device.0, "")..=(device.0, "\u{10ffff}"))
                .map_err(db_err)?
                .map(|entry| entry.map(|(k, v)| (k.value().1.to_string(), v.value().to_vec())).map_err(db_err))
                .collect::<Result<_, _>>()?;
            for (id, json) in rows {
                self.held.remove((device.0, id.as_str())).map_err(db_err)?;
                if let Ok(event) = serde_json::from_slice::<Event>(&json) {
                    adopted += usize::from(self.push(*device, &event)?);
                }
            }
        }
        Ok(adopted)
    }

    /// Drops held copies decided before `before_ms` (past the time receipts are retried); how many.
    pub fn prune(&mut self, before_ms: u64) -> Result<usize, StoreError> {
        let doomed: Vec<(u128, String)> = self
            .held
            .iter()
            .map_err(db_err)?
            .filter_map(|entry| {
                let (key, value) = entry.ok()?;
                let old = serde_json::from_slice::<Event>(value.value()).map_or(true, |e| e.at_ms < before_ms);
                old.then(|| (key.value().0, key.value().1.to_string()))
            })
            .collect();
        for (device, id) in &doomed {
            self.held.remove((*device, id.as_str())).map_err(db_err)?;
        }
        Ok(doomed.len())
    }

    /// Queues `event` for its team; `false` (and counted) when the team's queue is full.
    pub fn push(&mut self, device: DeviceId, event: &Event) -> Result<bool, StoreError> {
        let team = event.team_id.as_str();
        let count = self.counts.get(team).map_err(db_err)?.map_or(0, |v| v.value());
        if count >= self.cap {
            metrics::counter!("courier_webhook_events_total", "outcome" => "overflow").increment(1);
            return Ok(false);
        }
        let row = QueuedReceipt { seq: 0, device, event: event.clone() };
        let json = serde_json::to_vec(&row).map_err(db_err)?;
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
        match serde_json::from_slice::<QueuedReceipt>(value.value()) {
            Ok(row) => receipts.push(QueuedReceipt { seq, ..row }),
            Err(_) => unreadable.push(seq),
        }
    }
    Ok((receipts, unreadable))
}

/// Devices with held receipts, in order.
pub(super) fn held_devices(
    held: &impl ReadableTable<(u128, &'static str), &'static [u8]>,
) -> Result<Vec<DeviceId>, StoreError> {
    super::distinct_devices(|from| match held.range((from, "")..).map_err(db_err)?.next() {
        Some(entry) => Ok(Some(entry.map_err(db_err)?.0.value().0)),
        None => Ok(None),
    })
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
