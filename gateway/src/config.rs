//! The gateway's configuration: one struct, read from flags or `COURIER_…` environment variables.
//!
//! Defaults suit a single-host deployment next to a node; `GatewayConfig::local` is the variant tests and
//! `courier dev` use, with every port chosen by the OS.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// Everything a gateway process needs to know before it starts.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayConfig {
    /// Address the APNs-compatible provider API (HTTPS, HTTP/2 only) listens on.
    #[arg(long = "provider-addr", env = "COURIER_PROVIDER_ADDR", default_value = "0.0.0.0:8443")]
    pub provider_addr: SocketAddr,

    /// Address APNs channel management (broadcast channels: create, read, delete, list) listens on; same
    /// TLS and authentication as the provider API. APNs uses 2196 in production (2195 in its sandbox).
    #[arg(long = "channels-addr", env = "COURIER_CHANNELS_ADDR", default_value = "0.0.0.0:2196")]
    pub channels_addr: SocketAddr,

    /// Address the gateway's Prometheus metrics and health endpoints listen on.
    #[arg(long = "gateway-metrics-addr", env = "COURIER_GATEWAY_METRICS_ADDR", default_value = "0.0.0.0:9401")]
    pub metrics_addr: SocketAddr,

    /// Directory holding the cluster CA, the gateway certificate, token keys and provider credentials.
    #[arg(long = "pki-dir", env = "COURIER_PKI_DIR", default_value = "courier-pki")]
    pub pki_dir: PathBuf,

    /// Cluster gRPC addresses (host:port, comma-separated) of nodes to learn the cluster from. Any one
    /// reachable member is enough: the rest are learned from its `WatchCluster` stream.
    #[arg(long = "node-addr", env = "COURIER_NODE_ADDR", value_delimiter = ',', default_value = "127.0.0.1:7400")]
    pub node_addrs: Vec<String>,

    /// Name every node's certificate must carry, if not the host of its address.
    #[arg(long = "node-server-name", env = "COURIER_NODE_SERVER_NAME")]
    pub node_server_name: Option<String>,

    /// How long a forwarded notification may take before the provider gets 503 ServiceUnavailable.
    #[arg(long = "request-timeout-ms", env = "COURIER_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,

    /// Oldest provider JWT `iat` accepted, in seconds (APNs allows one hour).
    #[arg(long = "max-jwt-age-secs", env = "COURIER_MAX_JWT_AGE_SECS", default_value_t = 3600)]
    pub max_jwt_age_secs: u64,

    /// Shortest time between two new provider JWTs of one key id, in seconds; a newer token sooner is
    /// refused with 429 TooManyProviderTokenUpdates (APNs uses 1200). 0, the default, turns this off.
    #[arg(long = "min-jwt-refresh-secs", env = "COURIER_MIN_JWT_REFRESH_SECS", default_value_t = 0)]
    pub min_jwt_refresh_secs: u64,

    /// Sustained pushes per second to one device token before 429 TooManyRequests (0 = no limit).
    #[arg(long = "device-rate-per-sec", env = "COURIER_DEVICE_RATE_PER_SEC", default_value_t = 20.0)]
    pub device_rate_per_sec: f64,

    /// Pushes one device token may receive at once before the sustained rate applies.
    #[arg(long = "device-burst", env = "COURIER_DEVICE_BURST", default_value_t = 100)]
    pub device_burst: u32,

    /// Sustained pushes per second from one provider team before 429 TooManyRequests (0 = no limit, the
    /// default).
    #[arg(long = "team-rate-per-sec", env = "COURIER_TEAM_RATE_PER_SEC", default_value_t = 0.0)]
    pub team_rate_per_sec: f64,

    /// Pushes one team may send at once before its sustained rate applies.
    #[arg(long = "team-burst", env = "COURIER_TEAM_BURST", default_value_t = 10_000)]
    pub team_burst: u32,

    /// A provider connection with no request for this long is closed (GOAWAY), in seconds. APNs keeps
    /// idle connections for at least an hour, and clients count on it.
    #[arg(long = "provider-idle-timeout-secs", env = "COURIER_PROVIDER_IDLE_TIMEOUT_SECS", default_value_t = 3600)]
    pub idle_timeout_secs: u64,

    /// Time a new provider connection has from accept to its first request (TCP accept, any wait for a
    /// handshake slot, the TLS handshake, the HTTP/2 preface and SETTINGS, the first request's HEADERS),
    /// in milliseconds. A connection that misses it is closed and counted.
    #[arg(
        long = "provider-first-request-timeout-ms",
        env = "COURIER_PROVIDER_FIRST_REQUEST_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub first_request_timeout_ms: u64,

    /// Provider connections one gateway holds at once; beyond this, new connections wait to be accepted.
    #[arg(long = "provider-max-connections", env = "COURIER_PROVIDER_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Provider connections one source address (an IPv4 address, an IPv6 /64) may hold at once; a further
    /// one is closed at accept (0 = no limit). Raise it behind a proxy or NAT that hides client addresses.
    #[arg(
        long = "provider-max-connections-per-address",
        env = "COURIER_PROVIDER_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 256
    )]
    pub max_connections_per_address: usize,

    /// Provider TLS handshakes in progress at once; further ones wait their turn (within the first-request
    /// timeout).
    #[arg(long = "provider-max-handshakes", env = "COURIER_PROVIDER_MAX_HANDSHAKES", default_value_t = 128)]
    pub max_handshakes: usize,

    /// Provider TLS handshakes one source address may have in progress at once; further ones wait their turn
    /// (within the first-request timeout), so that one address cannot take every handshake slot (0 = no
    /// limit).
    #[arg(
        long = "provider-max-handshakes-per-address",
        env = "COURIER_PROVIDER_MAX_HANDSHAKES_PER_ADDRESS",
        default_value_t = 16
    )]
    pub max_handshakes_per_address: usize,
}

impl GatewayConfig {
    /// A gateway on loopback with OS-chosen ports, forwarding to `node_addr`; for tests and dev clusters.
    pub fn local(pki_dir: PathBuf, node_addr: SocketAddr) -> Self {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        GatewayConfig {
            provider_addr: loopback,
            channels_addr: loopback,
            metrics_addr: loopback,
            pki_dir,
            node_addrs: vec![node_addr.to_string()],
            node_server_name: None,
            request_timeout_ms: 10_000,
            max_jwt_age_secs: 3600,
            min_jwt_refresh_secs: 0,
            device_rate_per_sec: 20.0,
            device_burst: 100,
            team_rate_per_sec: 0.0,
            team_burst: 10_000,
            idle_timeout_secs: 3600,
            first_request_timeout_ms: 10_000,
            max_connections: 10_000,
            max_connections_per_address: 256,
            max_handshakes: 128,
            max_handshakes_per_address: 16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        gateway: GatewayConfig,
    }

    #[test]
    fn defaults_match_the_documented_ports() {
        let cli = Cli::try_parse_from(["courier"]).unwrap();
        assert_eq!(cli.gateway.provider_addr.port(), 8443);
        assert_eq!(cli.gateway.metrics_addr.port(), 9401);
        assert_eq!(cli.gateway.channels_addr.port(), 2196);
        assert_eq!(cli.gateway.node_addrs, ["127.0.0.1:7400"]);
        assert_eq!(cli.gateway.request_timeout_ms, 10_000);
        assert_eq!(cli.gateway.max_jwt_age_secs, 3600);
        assert_eq!(cli.gateway.min_jwt_refresh_secs, 0, "the token refresh limit is off by default");
        assert_eq!(cli.gateway.idle_timeout_secs, 3600);
        assert_eq!(cli.gateway.team_rate_per_sec, 0.0);
        assert!(cli.gateway.device_rate_per_sec > 0.0);
        let local = GatewayConfig::local(PathBuf::new(), SocketAddr::from((Ipv4Addr::LOCALHOST, 1)));
        assert_eq!(cli.gateway.first_request_timeout_ms, local.first_request_timeout_ms);
        assert_eq!(cli.gateway.max_connections, local.max_connections);
        assert_eq!(cli.gateway.max_connections_per_address, local.max_connections_per_address);
        assert_eq!(cli.gateway.max_handshakes, local.max_handshakes);
        assert_eq!(cli.gateway.max_handshakes_per_address, local.max_handshakes_per_address);
    }

    #[test]
    fn flags_override_defaults() {
        let cli =
            Cli::try_parse_from(["courier", "--node-addr", "node-0:7400,node-1:7400", "--max-jwt-age-secs", "60"])
                .unwrap();
        assert_eq!(cli.gateway.node_addrs, ["node-0:7400", "node-1:7400"]);
        assert_eq!(cli.gateway.max_jwt_age_secs, 60);
    }
}
