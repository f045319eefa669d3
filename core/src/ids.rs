//! Domain identifiers shared by every part of the cluster.
//!
//! A `DeviceId` is minted once, at activation, and is carried in the device certificate's subject
//! common name as 32 lowercase hex characters. An `ApnsKey` is an apns-id as a table keys it. Nothing
//! else here has behaviour beyond formatting and parsing, but for the maps that key by them.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

/// The 128-bit identity of one activated device.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u128);

impl DeviceId {
    pub fn random() -> Self {
        DeviceId(rand::random::<u128>())
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// Reads a device id from exactly 16 bytes; `None` for any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let array: [u8; 16] = bytes.try_into().ok()?;
        Some(DeviceId(u128::from_be_bytes(array)))
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a device id is 32 hex characters")]
pub struct BadDeviceId;

impl FromStr for DeviceId {
    type Err = BadDeviceId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadDeviceId);
        }
        u128::from_str_radix(s, 16).map(DeviceId).map_err(|_| BadDeviceId)
    }
}

impl serde::Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Current time in UNIX milliseconds.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// An apns-id as a table keys it: a UUID (the form APNs and Courier give every notification; a gateway
/// refuses others with `BadMessageId`) as its 128 bits, which costs no allocation and hashes in one pass
/// over 16 bytes, so that its two spellings (upper and lower case) are one key; any other text as it came.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ApnsKey {
    Uuid(u128),
    Text(Box<str>),
}

impl ApnsKey {
    pub fn of(apns_id: &str) -> Self {
        uuid_bits(apns_id).map_or_else(|| ApnsKey::Text(apns_id.into()), ApnsKey::Uuid)
    }
}

/// The value of a hyphenated UUID (`8-4-4-4-12` hex digits, either case), or `None`.
pub fn uuid_bits(text: &str) -> Option<u128> {
    let bytes = text.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let mut value = 0u128;
    for (i, &byte) in bytes.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if byte != b'-' {
                return None;
            }
            continue;
        }
        value = value << 4 | u128::from((byte as char).to_digit(16)?);
    }
    Some(value)
}

/// A map looked up for every notification (keyed by device id, apns-id and the like): foldhash, seeded per
/// process, instead of the standard SipHash, which was a percent or two of a node's CPU under push load on
/// its own. Keys a client picks (an apns-id) cannot be aimed at a seed the client never sees.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The set counterpart of `FastMap`.
pub type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_keyed_by_value_in_either_case_and_other_apns_ids_as_text() {
        let id = "4f3c2a1b-0d9e-4c7b-8a6f-5e4d3c2b1a09";
        assert_eq!(uuid_bits(id), Some(0x4f3c2a1b_0d9e_4c7b_8a6f_5e4d3c2b1a09));
        assert_eq!(ApnsKey::of(&id.to_uppercase()), ApnsKey::Uuid(0x4f3c2a1b_0d9e_4c7b_8a6f_5e4d3c2b1a09));
        for other in [
            "4f3c2a1b0d9e4c7b8a6f5e4d3c2b1a09",
            "4f3c2a1b-0d9e-4c7b-8a6f-5e4d3c2b1a0g",
            "4f3c2a1b+0d9e-4c7b-8a6f-5e4d3c2b1a09",
            "x",
            "",
        ] {
            assert_eq!(uuid_bits(other), None, "{other:?}");
            assert_eq!(ApnsKey::of(other), ApnsKey::Text(other.into()));
        }
    }

    #[test]
    fn device_id_round_trips_through_text_and_bytes() {
        let id = DeviceId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let text = id.to_string();
        assert_eq!(text, "0123456789abcdef0011223344556677");
        assert_eq!(text.parse::<DeviceId>().unwrap(), id);
        assert_eq!(DeviceId::from_slice(&id.to_bytes()), Some(id));
    }

    #[test]
    fn device_id_rejects_wrong_lengths_and_signs() {
        assert!("abc".parse::<DeviceId>().is_err());
        assert!("+123456789abcdef0011223344556677".parse::<DeviceId>().is_err());
        assert!(DeviceId::from_slice(&[0u8; 15]).is_none());
    }
}
