//! Duplicate suppression: delivery on the wire is at-least-once, to the app it is once.

use std::collections::VecDeque;

use courier_core::ids::{ApnsKey, FastSet};

/// Remembers the last `capacity` apns-ids surfaced, to drop redeliveries. An app keeps one for its whole
/// life and moves it from link to link (`DeviceLink::seen`), so a redelivery after a reconnect is dropped
/// too.
pub struct SeenIds {
    order: VecDeque<ApnsKey>,
    /// Hashed with foldhash (seeded per process) rather than SipHash: the check runs for every notification
    /// the device gets, and its ids come from the node the device trusts.
    set: FastSet<ApnsKey>,
    capacity: usize,
}

impl Default for SeenIds {
    fn default() -> Self {
        SeenIds::new(DEFAULT_SEEN)
    }
}

/// How many apns-ids a device remembers by default.
pub const DEFAULT_SEEN: usize = 4096;

impl SeenIds {
    pub fn new(capacity: usize) -> Self {
        SeenIds { order: VecDeque::new(), set: FastSet::default(), capacity: capacity.max(1) }
    }

    /// Makes room for `additional` more ids, up to the capacity, so that the next ones are remembered
    /// without growing the tables (an app that expects a burst, or a simulator that makes many devices at
    /// once and does not want them all to grow at their first notification).
    pub fn reserve(&mut self, additional: usize) {
        let additional = additional.min(self.capacity - self.order.len());
        self.order.reserve(additional);
        self.set.reserve(additional);
    }

    /// `true` if `id` is new (and now remembered). Two spellings of one UUID (upper and lower case) are the
    /// same id.
    pub fn insert(&mut self, id: &str) -> bool {
        let id = ApnsKey::of(id);
        if self.set.contains(&id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        self.order.push_back(id.clone());
        self.set.insert(id);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_forget_the_oldest() {
        let mut recent = SeenIds::new(2);
        assert!(recent.insert("a"));
        assert!(!recent.insert("a"));
        assert!(recent.insert("b"));
        assert!(recent.insert("c"));
        assert!(recent.insert("a"), "a was evicted by c");
        assert!(!recent.insert("c"));
    }

    #[test]
    fn reserved_room_holds_that_many_ids_without_growing() {
        let mut recent = SeenIds::new(4);
        recent.reserve(100);
        let (order, set) = (recent.order.capacity(), recent.set.capacity());
        assert!(order >= 4 && set >= 4, "room for the capacity at most: {order} / {set}");
        assert!(order < 100 && set < 100, "never past the capacity: {order} / {set}");
        for id in ["a", "b", "c", "d", "e", "f"] {
            assert!(recent.insert(id));
        }
        assert_eq!(recent.order.capacity(), order, "the order did not grow");
        assert!(recent.set.capacity() <= set, "the set did not grow");
        assert!(recent.insert("a"), "a was forgotten");
    }

    #[test]
    fn uuids_are_remembered_by_value_and_other_ids_as_strings() {
        let mut recent = SeenIds::new(8);
        let id = "4f3c2a1b-0d9e-4c7b-8a6f-5e4d3c2b1a09";
        assert!(recent.insert(id));
        assert!(!recent.insert(id));
        assert!(!recent.insert(&id.to_uppercase()), "the same UUID in capitals");
        assert!(recent.insert("4f3c2a1b-0d9e-4c7b-8a6f-5e4d3c2b1a0a"), "one digit apart");
        for other in ["4f3c2a1b0d9e4c7b8a6f5e4d3c2b1a09", "4f3c2a1b-0d9e-4c7b-8a6f-5e4d3c2b1a0g", "x", ""] {
            assert!(recent.insert(other), "{other:?}");
            assert!(!recent.insert(other), "{other:?}");
        }
    }
}
