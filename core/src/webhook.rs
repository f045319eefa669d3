//! Delivery receipts pushed to providers: a team's webhook endpoint and signing secrets as the Raft state
//! holds them, the events a node sends there, and the Standard Webhooks signature (standardwebhooks.com).
//!
//! A request carries one batch of one team's events as JSON, with the headers `webhook-id` (the batch's
//! id, the same on every retry of it), `webhook-timestamp` (UNIX seconds of this attempt) and
//! `webhook-signature`: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`, once per live secret,
//! separated by spaces, so that a receiver verifying with either the old or the new secret of a rotation
//! succeeds. Secrets are shown to the operator once, as `whsec_` and the base64 key.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

/// Longest endpoint URL.
pub const MAX_URL_LEN: usize = 2048;
/// Bytes of a secret Courier generates.
pub const SECRET_BYTES: usize = 32;
/// Shortest and longest secret the state takes (the spec's bounds).
pub const SECRET_LEN: std::ops::RangeInclusive<usize> = 24..=64;
/// Secrets one endpoint holds: the current one and those of recent rotations still in their grace period.
pub const MAX_SECRETS: usize = 4;
/// How long a rotated-out secret still signs, unless the operator says otherwise.
pub const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Prefix of a secret as shown to operators.
const SECRET_PREFIX: &str = "whsec_";

/// What happened to a notification, as a receipt names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The device acknowledged it.
    Delivered,
    /// Its `apns-expiration` passed before the device took it.
    Expired,
    /// It will never reach the device: `reason` says why (collapsed, queue overflow, discarded).
    Dropped,
    /// The device had unregistered the topic: the push was refused (410 `Unregistered`).
    Unregistered,
}

impl EventKind {
    pub const ALL: [EventKind; 4] =
        [EventKind::Delivered, EventKind::Expired, EventKind::Dropped, EventKind::Unregistered];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Delivered => "delivered",
            EventKind::Expired => "expired",
            EventKind::Dropped => "dropped",
            EventKind::Unregistered => "unregistered",
        }
    }

    /// A comma-separated list of kinds (`delivered,expired`); empty means all of them.
    pub fn parse_list(list: &str) -> Result<BTreeSet<EventKind>, String> {
        let mut kinds = BTreeSet::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let kind = EventKind::ALL
                .into_iter()
                .find(|k| k.as_str() == name)
                .ok_or_else(|| format!("unknown event {name:?}; known: delivered, expired, dropped, unregistered"))?;
            kinds.insert(kind);
        }
        if kinds.is_empty() {
            kinds.extend(EventKind::ALL);
        }
        Ok(kinds)
    }
}

/// One signing secret of an endpoint.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningSecret {
    #[serde(with = "base64_bytes")]
    pub key: Vec<u8>,
    pub created_ms: u64,
    /// When a rotation replaced it, the end of its grace period: it signs until then, then goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retires_ms: Option<u64>,
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningSecret")
            .field("fingerprint", &self.fingerprint())
            .field("created_ms", &self.created_ms)
            .field("retires_ms", &self.retires_ms)
            .finish()
    }
}

impl SigningSecret {
    /// A fresh random secret.
    pub fn generate(now_ms: u64) -> Self {
        SigningSecret { key: rand::random::<[u8; SECRET_BYTES]>().to_vec(), created_ms: now_ms, retires_ms: None }
    }

    /// The secret as an operator configures a receiver with it: `whsec_` and the base64 key.
    pub fn whsec(&self) -> String {
        format!("{SECRET_PREFIX}{}", B64.encode(&self.key))
    }

    /// The key of a `whsec_…` secret (the prefix is optional, as the spec's libraries accept).
    pub fn key_from_whsec(text: &str) -> Result<Vec<u8>, String> {
        let encoded = text.trim().strip_prefix(SECRET_PREFIX).unwrap_or(text.trim());
        B64.decode(encoded).map_err(|e| format!("not a base64 secret: {e}"))
    }

    /// A short digest of the key that identifies it without revealing it.
    pub fn fingerprint(&self) -> String {
        hex::encode(&ring::digest::digest(&ring::digest::SHA256, &self.key).as_ref()[..6])
    }

    /// Whether it still signs at `now_ms`.
    pub fn live_at(&self, now_ms: u64) -> bool {
        self.retires_ms.is_none_or(|end| now_ms < end)
    }
}

/// A team's webhook endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    pub url: String,
    /// The events sent; others are not queued.
    pub events: BTreeSet<EventKind>,
    /// Newest first. Empty only in the view gateways get (`redacted`).
    pub secrets: Vec<SigningSecret>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

impl Webhook {
    pub fn wants(&self, kind: EventKind) -> bool {
        self.events.contains(&kind)
    }

    /// The keys that sign a request sent at `now_ms`, newest first.
    pub fn signing_keys(&self, now_ms: u64) -> Vec<&[u8]> {
        self.secrets.iter().filter(|s| s.live_at(now_ms)).map(|s| s.key.as_slice()).collect()
    }

    /// The endpoint without its secrets: what a process that only needs to know it exists may hold.
    pub fn redacted(&self) -> Webhook {
        Webhook { secrets: Vec::new(), ..self.clone() }
    }
}

/// `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body` under `key`.
pub fn sign(key: &[u8], id: &str, timestamp_secs: u64, body: &[u8]) -> String {
    format!("v1,{}", B64.encode(tag(key, id, timestamp_secs, body).as_ref()))
}

/// The HMAC-SHA256 of `id.timestamp.body` under `key`, fed in parts rather than copied into one message.
fn tag(key: &[u8], id: &str, timestamp_secs: u64, body: &[u8]) -> ring::hmac::Tag {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(format!("{id}.{timestamp_secs}.").as_bytes());
    context.update(body);
    context.sign()
}

/// The `webhook-signature` header: one signature per key, separated by spaces.
pub fn signature_header(keys: &[&[u8]], id: &str, timestamp_secs: u64, body: &[u8]) -> String {
    keys.iter().map(|key| sign(key, id, timestamp_secs, body)).collect::<Vec<_>>().join(" ")
}

/// Whether one of the `v1` signatures in `header` is `key`'s, compared in constant time.
/// The HMAC is computed once, whatever the number of signatures in the header.
pub fn verify(key: &[u8], id: &str, timestamp_secs: u64, body: &[u8], header: &str) -> bool {
    let expected = tag(key, id, timestamp_secs, body);
    let expected = expected.as_ref();
    header.split(' ').filter_map(|s| s.strip_prefix("v1,")).filter_map(|s| B64.decode(s).ok()).any(|given| {
        // Every byte is looked at (`black_box` keeps the compiler from stopping at the first difference), so
        // the time taken does not tell how much of a guess was right.
        given.len() == expected.len()
            && given.iter().zip(expected).fold(0u8, |diff, (a, b)| std::hint::black_box(diff | (a ^ b))) == 0
    })
}

/// Where an endpoint URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    /// Host name or IP address, without brackets.
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

/// Parses an endpoint URL and checks it against the cluster's policy: `https` only, and no loopback,
/// private, link-local or otherwise non-public address written into it, unless `allow_private` (a
/// `courier dev` cluster, or one whose operator allowed it), which also allows `http`. Names are checked
/// again when they resolve, at each connection (`is_public`).
pub fn check_url(url: &str, allow_private: bool) -> Result<Endpoint, String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!("the URL is {} bytes; at most {MAX_URL_LEN} are allowed", url.len()));
    }
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") if allow_private => false,
        Some("http") => {
            return Err(
                "the URL must be https: this cluster allows http only with private endpoints, and it does not \
                        allow those"
                    .into(),
            );
        }
        _ => return Err("the URL must start with https://".into()),
    };
    let authority = uri.authority().ok_or("the URL has no host")?;
    if authority.as_str().contains('@') {
        return Err("the URL must not carry a user name or password".into());
    }
    if url.contains('#') {
        return Err("the URL must not have a fragment".into());
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    if host.is_empty() {
        return Err("the URL has no host".into());
    }
    if !allow_private {
        let local_name = host == "localhost" || host.ends_with(".localhost") || !host.contains('.');
        let private_ip = host.parse::<IpAddr>().is_ok_and(|ip| !is_public(ip));
        if local_name || private_ip {
            return Err(format!("{host} is not a public address, and this cluster does not allow private endpoints"));
        }
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri.path_and_query().map(|p| p.as_str()).filter(|p| !p.is_empty()).unwrap_or("/").to_string();
    Ok(Endpoint { https, host, port, path })
}

/// Whether `ip` is a public unicast address: not loopback, private, link-local, shared (CGNAT),
/// unspecified, multicast, broadcast, documentation or unique-local.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

/// One receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Stable for the same outcome of the same notification, whichever node sends it: receivers drop
    /// repeats by it.
    pub id: String,
    pub outcome: EventKind,
    pub team_id: String,
    pub apns_id: String,
    /// The device token the provider pushed to.
    pub token: String,
    pub topic: String,
    /// Why, for `dropped` (`collapsed`, `queue_overflow`, `discarded`) and `unregistered`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the gateway accepted the push, UNIX milliseconds.
    pub accepted_at_ms: u64,
    /// When the device acknowledged it, for `delivered`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at_ms: Option<u64>,
    /// When the outcome was decided, UNIX milliseconds.
    pub at_ms: u64,
}

/// A receipt's strings kept in memory in one allocation (a gateway's copy of one, a node's note of the
/// team and token it needs for one later): one allocation where each string took its own, for something
/// kept per push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed<const N: usize> {
    text: Box<str>,
    /// Where each string ends in `text`.
    ends: [usize; N],
}

impl<const N: usize> Packed<N> {
    pub fn new(parts: [&str; N]) -> Self {
        let mut text = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        let mut ends = [0; N];
        for (end, part) in ends.iter_mut().zip(parts) {
            text.push_str(part);
            *end = text.len();
        }
        Packed { text: text.into_boxed_str(), ends }
    }

    /// The strings, as given.
    pub fn parts(&self) -> [&str; N] {
        let mut start = 0;
        // Each end was the end of a str pushed whole: always a char boundary.
        self.ends.map(|end| {
            let part = &self.text[start..end];
            start = end;
            part
        })
    }
}

/// What a node knows of a notification when its outcome is decided.
#[derive(Debug, Clone, Copy)]
pub struct Receipted<'a> {
    pub team_id: &'a str,
    pub apns_id: &'a str,
    pub token: &'a str,
    pub topic: &'a str,
    pub accepted_at_ms: u64,
}

impl Event {
    pub fn new(outcome: EventKind, of: Receipted<'_>, reason: Option<&str>, at_ms: u64) -> Self {
        // SHA-256 of `outcome \n team \n token \n apns-id`, fed in parts rather than formatted first.
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(outcome.as_str().as_bytes());
        for part in [of.team_id, of.token, of.apns_id] {
            context.update(b"\n");
            context.update(part.as_bytes());
        }
        let digest = context.finish();
        let mut hex_id = [0u8; 32];
        // 16 bytes always fit 32 hex digits.
        let _ = hex::encode_to_slice(&digest.as_ref()[..16], &mut hex_id);
        let mut id = String::with_capacity(4 + hex_id.len());
        id.push_str("evt_");
        id.push_str(std::str::from_utf8(&hex_id).unwrap_or_default());
        Event {
            id,
            outcome,
            team_id: of.team_id.to_string(),
            apns_id: of.apns_id.to_string(),
            token: of.token.to_string(),
            topic: of.topic.to_string(),
            reason: reason.map(str::to_string),
            accepted_at_ms: of.accepted_at_ms,
            delivered_at_ms: (outcome == EventKind::Delivered).then_some(at_ms),
            at_ms,
        }
    }
}

impl Event {
    /// The event as JSON (what `serde_json` makes of it), written into a buffer sized for it: one
    /// allocation, where growing from empty took several, each copying what was written so far.
    pub fn to_json(&self) -> Vec<u8> {
        let reason = self.reason.as_ref().map_or(0, String::len);
        let strings = self.id.len() + self.team_id.len() + self.apns_id.len() + self.token.len() + self.topic.len();
        // Field names, punctuation, the outcome and three times come to under 200 bytes.
        let mut json = Vec::with_capacity(strings + reason + 200);
        self.write_json(&mut json);
        json
    }

    /// Appends the event as JSON, byte for byte what `serde_json` makes of it (fields in declaration
    /// order, the optional ones left out when absent), written field by field: serde's string escaping,
    /// a table lookup per byte, was a twentieth of what receipts cost a node, and its strings (hex ids,
    /// a UUID, a topic) almost never hold a byte to escape.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"id":"#);
        json_str(out, &self.id);
        out.extend_from_slice(br#","outcome":""#);
        out.extend_from_slice(self.outcome.as_str().as_bytes());
        out.extend_from_slice(br#"","team_id":"#);
        json_str(out, &self.team_id);
        out.extend_from_slice(br#","apns_id":"#);
        json_str(out, &self.apns_id);
        out.extend_from_slice(br#","token":"#);
        json_str(out, &self.token);
        out.extend_from_slice(br#","topic":"#);
        json_str(out, &self.topic);
        if let Some(reason) = &self.reason {
            out.extend_from_slice(br#","reason":"#);
            json_str(out, reason);
        }
        out.extend_from_slice(br#","accepted_at_ms":"#);
        out.extend_from_slice(itoa::Buffer::new().format(self.accepted_at_ms).as_bytes());
        if let Some(delivered_at_ms) = self.delivered_at_ms {
            out.extend_from_slice(br#","delivered_at_ms":"#);
            out.extend_from_slice(itoa::Buffer::new().format(delivered_at_ms).as_bytes());
        }
        out.extend_from_slice(br#","at_ms":"#);
        out.extend_from_slice(itoa::Buffer::new().format(self.at_ms).as_bytes());
        out.push(b'}');
    }
}

/// Appends `text` as a JSON string: as it is when no byte needs escaping (checked without stopping
/// early, a loop the compiler vectorizes), else escaped by `serde_json`.
fn json_str(out: &mut Vec<u8>, text: &str) {
    let escapes = text.bytes().fold(false, |any, b| any | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if escapes {
        // A string always serializes: writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
        return;
    }
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// The `webhook-id` of a batch: derived from its events' ids, so the same events sent again (a retry, or
/// another node sending its copies after the owner died) carry the same id.
pub fn batch_id(events: &[&Event]) -> String {
    if let [one] = events {
        return one.id.replacen("evt_", "msg_", 1);
    }
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for event in events {
        context.update(event.id.as_bytes());
        context.update(b"\n");
    }
    format!("msg_{}", hex::encode(&context.finish().as_ref()[..16]))
}

/// The JSON body of a batch, in the spec's `type` / `timestamp` / `data` shape, from its events, each
/// given with its JSON where it was serialized already (`serde_json` of the same `Event`, as a receipt's
/// copy for other nodes is), which goes in as it is; the rest are serialized here. Written field by field,
/// with no `serde_json::Value` tree.
pub fn batch_body<'e>(
    team_id: &str,
    events: impl ExactSizeIterator<Item = (&'e Event, Option<&'e [u8]>)>,
    now_ms: u64,
) -> Vec<u8> {
    let timestamp = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default();
    let mut body = Vec::with_capacity(128 + events.len() * 320);
    // Strings and events always serialize: writing to a Vec cannot fail.
    body.extend_from_slice(br#"{"type":"courier.receipts","timestamp":"#);
    let _ = serde_json::to_writer(&mut body, &timestamp);
    body.extend_from_slice(br#","data":{"team_id":"#);
    let _ = serde_json::to_writer(&mut body, team_id);
    body.extend_from_slice(br#","events":["#);
    for (i, (event, json)) in events.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        match json {
            Some(json) => body.extend_from_slice(json),
            None => event.write_json(&mut body),
        }
    }
    body.extend_from_slice(b"]}}");
    body
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        B64.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_standard_webhooks_libraries_do() {
        // The example secret, id, timestamp and payload of the Standard Webhooks libraries' own tests.
        let key = SigningSecret::key_from_whsec("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(verify(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, &signature));
        assert!(!verify(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body, &signature));
        assert!(!verify(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b"{}", &signature));
    }

    #[test]
    fn a_header_with_two_secrets_verifies_with_either() {
        let old = SigningSecret::generate(1);
        let new = SigningSecret::generate(2);
        let other = SigningSecret::generate(3);
        let header = signature_header(&[&new.key, &old.key], "msg_1", 10, b"body");
        assert_eq!(header.split(' ').count(), 2);
        assert!(verify(&old.key, "msg_1", 10, b"body", &header));
        assert!(verify(&new.key, "msg_1", 10, b"body", &header));
        assert!(!verify(&other.key, "msg_1", 10, b"body", &header));
        let shown = new.whsec();
        assert!(shown.starts_with("whsec_"));
        assert_eq!(SigningSecret::key_from_whsec(&shown).unwrap(), new.key);
        assert!(!format!("{new:?}").contains(&shown[6..]), "Debug must not show the key");
    }

    #[test]
    fn endpoint_urls_are_https_and_public_unless_the_cluster_allows_private_ones() {
        let ok = check_url("https://hooks.example.com:8443/courier?x=1", false).unwrap();
        assert_eq!(
            ok,
            Endpoint { https: true, host: "hooks.example.com".into(), port: 8443, path: "/courier?x=1".into() }
        );
        assert_eq!(check_url("https://hooks.example.com", false).unwrap().path, "/");
        for refused in [
            "http://hooks.example.com/",
            "https://127.0.0.1/",
            "https://10.1.2.3/",
            "https://[::1]/",
            "https://[fd00::1]/",
            "https://169.254.169.254/latest",
            "https://localhost/",
            "https://metadata/",
            "https://user:pw@hooks.example.com/",
            "https://hooks.example.com/#frag",
            "ftp://hooks.example.com/",
            "hooks.example.com",
        ] {
            assert!(check_url(refused, false).is_err(), "{refused} should be refused");
        }
        let local = check_url("http://127.0.0.1:9000/hook", true).unwrap();
        assert_eq!((local.https, local.port, local.host.as_str()), (false, 9000, "127.0.0.1"));
        assert!(check_url(&format!("https://a.example.com/{}", "x".repeat(MAX_URL_LEN)), true).is_err());
    }

    #[test]
    fn public_addresses() {
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        for private in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
    }

    #[test]
    fn event_and_batch_ids_are_stable_and_distinct() {
        let of = Receipted { team_id: "T", apns_id: "A", token: "tok", topic: "com.example", accepted_at_ms: 5 };
        let a = Event::new(EventKind::Delivered, of, None, 9);
        let again = Event::new(EventKind::Delivered, of, None, 11);
        let expired = Event::new(EventKind::Expired, of, None, 9);
        assert_eq!(a.id, again.id);
        assert_ne!(a.id, expired.id);
        assert_eq!(a.delivered_at_ms, Some(9));
        assert_eq!(expired.delivered_at_ms, None);
        assert_eq!(batch_id(&[&a]), a.id.replacen("evt_", "msg_", 1));
        let two = [a.clone(), expired.clone()];
        let both = [&two[0], &two[1]];
        assert_eq!(batch_id(&both), batch_id(&[&a, &expired]));
        assert_ne!(batch_id(&both), batch_id(&[&a]));
        let serialized_here = batch_body("T", both.iter().map(|e| (*e, None)), 1_700_000_000_123);
        let body: serde_json::Value = serde_json::from_slice(&serialized_here).unwrap();
        assert_eq!(body["type"], "courier.receipts");
        assert_eq!(body["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(body["data"]["events"][1]["outcome"], "expired");
        assert_eq!(body["data"]["team_id"], "T");
        // An event given as its JSON goes in as it is: the same body as serializing it here.
        let json = serde_json::to_vec(&a).unwrap();
        let mixed = batch_body("T", [(&a, Some(json.as_slice())), (&expired, None)].into_iter(), 1_700_000_000_123);
        assert_eq!(mixed, serialized_here);
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&mixed).unwrap(), body);
        // The id is the SHA-256 of the outcome, team, token and apns-id, one per line (ids already sent
        // must not change).
        let digest = ring::digest::digest(&ring::digest::SHA256, b"delivered\nT\ntok\nA");
        assert_eq!(two[0].id, format!("evt_{}", hex::encode(&digest.as_ref()[..16])));
    }

    #[test]
    fn events_are_written_as_serde_json_writes_them() {
        let plain =
            Receipted { team_id: "TEAM1", apns_id: "A", token: "0a1b", topic: "com.example", accepted_at_ms: 5 };
        let awkward = Receipted {
            team_id: "T\"1\\",
            apns_id: "line\nbreak\u{1}",
            token: "tök",
            topic: "com.例え.\t",
            accepted_at_ms: u64::MAX,
        };
        for of in [plain, awkward] {
            for (kind, reason) in [
                (EventKind::Delivered, None),
                (EventKind::Expired, None),
                (EventKind::Dropped, Some("queue_overflow")),
                (EventKind::Unregistered, Some("Unre\"gistered")),
            ] {
                let event = Event::new(kind, of, reason, 1_700_000_000_123);
                assert_eq!(event.to_json(), serde_json::to_vec(&event).unwrap(), "{event:?}");
                assert_eq!(serde_json::from_slice::<Event>(&event.to_json()).unwrap(), event);
            }
        }
    }

    #[test]
    fn packed_strings_come_back_as_given() {
        let parts = ["TEAM1", "", "tök€n", "com.例え"];
        assert_eq!(Packed::new(parts).parts(), parts);
        assert_eq!(Packed::new(["", ""]).parts(), ["", ""]);
        assert_ne!(Packed::new(["ab", "c"]), Packed::new(["a", "bc"]), "where each ends is kept");
    }

    #[test]
    fn event_lists() {
        assert_eq!(EventKind::parse_list("").unwrap().len(), 4);
        let two = EventKind::parse_list("delivered, dropped").unwrap();
        assert_eq!(two.into_iter().collect::<Vec<_>>(), [EventKind::Delivered, EventKind::Dropped]);
        assert!(EventKind::parse_list("delivered,bounced").is_err());
    }
}
