//! Duplicate suppression: delivery on the wire is at-least-once, to the app it is once.

use std::collections::{HashSet, VecDeque};

/// Remembers the last `capacity` apns-ids surfaced, to drop redeliveries. An app keeps one for its whole
/// life and moves it from link to link (`DeviceLink::seen`), so a redelivery after a reconnect is dropped
/// too.
pub struct SeenIds {
    order: VecDeque<String>,
    set: HashSet<String>,
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
        SeenIds { order: VecDeque::new(), set: HashSet::new(), capacity: capacity.max(1) }
    }

    /// `true` if `id` is new (and now remembered).
    pub fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        self.order.push_back(id.to_string());
        self.set.insert(id.to_string());
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
}
