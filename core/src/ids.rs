//! Domain identifiers shared by every part of the cluster.
//!
//! A `DeviceId` is minted once, at activation, and is carried in the device certificate's subject
//! common name as 32 lowercase hex characters. Nothing else here has behaviour beyond formatting.

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

#[cfg(test)]
mod tests {
    use super::*;

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
