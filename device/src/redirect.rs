//! Where a node sends a device: a device address and the name that node's certificate must carry.

use courier_proto::device as wire;

/// Where a redirect (or an activation's owner) sends a device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RedirectTarget {
    /// The node's device address (host:port).
    pub device_addr: String,
    /// The name that node's certificate must carry; empty (from nodes older than the field) keeps the
    /// configured name.
    pub server_name: String,
}

impl From<wire::Redirect> for RedirectTarget {
    fn from(redirect: wire::Redirect) -> Self {
        RedirectTarget { device_addr: redirect.device_addr, server_name: redirect.server_name }
    }
}

impl std::fmt::Display for RedirectTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.server_name.is_empty() {
            f.write_str(&self.device_addr)
        } else {
            write!(f, "{} ({})", self.device_addr, self.server_name)
        }
    }
}
