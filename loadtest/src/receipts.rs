//! `push --webhook`: the provider team's delivery receipts, received in this process. A plain HTTP/1.1
//! receiver on loopback (the spawned nodes are started with `--webhooks-allow-private`) checks every
//! request's Standard Webhooks signature with the secret this process made, and tallies the events by
//! outcome, once per event id.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use courier_core::ids::FastSet;
use courier_core::state::{Command, CommandResponse};
use courier_core::webhook::{self, EventKind, SigningSecret};
use courier_proto::cluster::ProposeRequest;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

/// Event ids the receiver's set has room for from the start (16 bytes each).
const IDS_RESERVED: usize = 1 << 20;

/// What the receiver has seen.
#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    bad_signatures: u64,
    events: u64,
    /// Event ids seen, as the 128 bits their `evt_` and 32 hex digits spell; any id in another form
    /// (none from Courier) in `other_ids`. Hundreds of thousands a run: SipHashing the strings was a
    /// third of what the receiver cost.
    ids: FastSet<u128>,
    other_ids: HashSet<String>,
    by_outcome: BTreeMap<String, u64>,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// Counts at one moment.
#[derive(Debug, Clone, Default)]
pub struct ReceiptCounts {
    pub requests: u64,
    pub bad_signatures: u64,
    /// Events received, repeats included.
    pub events: u64,
    /// Distinct event ids.
    pub unique: u64,
    pub by_outcome: BTreeMap<String, u64>,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

pub struct Receipts {
    pub url: String,
    pub secret: SigningSecret,
    tally: Arc<Mutex<Tally>>,
    /// The receiver's own runtime (one thread), so that its requests are not queued behind the load's tasks
    /// on the loadtest's runtime: an endpoint elsewhere answers at its own pace, not the load generator's.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Receipts {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Receipts {
    /// Starts the receiver on loopback with a fresh secret.
    pub async fn start() -> anyhow::Result<Receipts> {
        let secret = SigningSecret::generate(courier_core::ids::unix_millis());
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr: SocketAddr = listener.local_addr()?;
        let mut tally = Tally::default();
        // Sized for a saturated 20 s run up front: growing a set of half a million ids moves all of them
        // each time it doubles, on the thread that must keep up with the receipts.
        tally.ids.reserve(IDS_RESERVED);
        let tally = Arc::new(Mutex::new(tally));
        let (key, counts) = (Arc::new(secret.key.clone()), tally.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("receipts")
            .enable_all()
            .build()
            .context("starting the receiver's runtime")?;
        runtime.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let _ = tcp.set_nodelay(true);
                let (key, counts) = (key.clone(), counts.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let (key, counts) = (key.clone(), counts.clone());
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let status = take(&parts.headers, &body, &key, &counts);
                            let answer = http::Response::builder().status(status).body(Full::new(Bytes::new()));
                            Ok::<_, std::convert::Infallible>(answer.expect("a valid response"))
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
                });
            }
        });
        Ok(Receipts { url: format!("http://{addr}/receipts"), secret, tally, runtime: Some(runtime) })
    }

    pub fn counts(&self) -> ReceiptCounts {
        let t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        ReceiptCounts {
            requests: t.requests,
            bad_signatures: t.bad_signatures,
            events: t.events,
            unique: (t.ids.len() + t.other_ids.len()) as u64,
            by_outcome: t.by_outcome.clone(),
            first: t.first,
            last: t.last,
        }
    }

    /// Gives `team` a webhook to this receiver, for every kind of event, through the first of `nodes`
    /// (cluster API addresses) that takes the proposal, as the PKI's admin.
    pub async fn set_for(&self, pki_dir: &Path, nodes: &[String], team: &str) -> anyhow::Result<()> {
        let pki = courier_core::pki::PkiDir::new(pki_dir);
        let peers = courier_core::peer::Peers::new(&pki, "admin", None, Duration::from_secs(5))?;
        let command = Command::SetWebhook {
            team_id: team.to_string(),
            url: self.url.clone(),
            events: EventKind::ALL.into_iter().collect(),
            secret: self.secret.clone(),
            now_ms: courier_core::ids::unix_millis(),
        };
        let command_json = serde_json::to_vec(&command)?;
        let mut last = None;
        for node in nodes {
            let answer = async {
                let mut client = peers.client(node)?;
                let answer = client.propose(ProposeRequest { command_json: command_json.clone() }).await?;
                anyhow::Ok(serde_json::from_slice::<CommandResponse>(&answer.into_inner().response_json)?)
            };
            match answer.await {
                Ok(CommandResponse::Applied { .. }) => return Ok(()),
                Ok(other) => anyhow::bail!("setting the webhook was refused: {other:?}"),
                // Not the leader (it says which is), or not answering: the next one.
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no node to ask"))).context("setting the team's webhook")
    }
}

/// The parts of a batch's body the tally reads (the rest is skipped, not built).
#[derive(serde::Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    data: BatchData<'a>,
}

#[derive(serde::Deserialize)]
struct BatchData<'a> {
    #[serde(borrow)]
    events: Vec<Seen<'a>>,
}

#[derive(serde::Deserialize)]
struct Seen<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    outcome: std::borrow::Cow<'a, str>,
}

/// Checks and tallies one request; the status to answer.
fn take(headers: &http::HeaderMap, body: &[u8], key: &[u8], tally: &Mutex<Tally>) -> u16 {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    let timestamp = header("webhook-timestamp").parse().unwrap_or(0);
    let signed = webhook::verify(key, header("webhook-id"), timestamp, body, header("webhook-signature"));
    let events = serde_json::from_slice::<Batch>(body).map(|b| b.data.events).unwrap_or_default();
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    t.requests += 1;
    if !signed {
        t.bad_signatures += 1;
        return 401;
    }
    let now = Instant::now();
    t.first.get_or_insert(now);
    t.last = Some(now);
    for event in events {
        t.events += 1;
        let new = match event_bits(&event.id) {
            Some(bits) => t.ids.insert(bits),
            None => t.other_ids.insert(event.id.into_owned()),
        };
        if new {
            match t.by_outcome.get_mut(event.outcome.as_ref()) {
                Some(n) => *n += 1,
                None => {
                    t.by_outcome.insert(event.outcome.into_owned(), 1);
                }
            }
        }
    }
    204
}

/// The 128 bits of an event id of the form `evt_` and 32 lowercase hex digits (`from_str_radix` alone
/// would also take a sign and capitals, so that two distinct ids could give the same bits).
fn event_bits(id: &str) -> Option<u128> {
    let hex = id.strip_prefix("evt_")?;
    let lower_hex = hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !lower_hex {
        return None;
    }
    u128::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_courier_shaped_ids_are_kept_as_bits_and_distinct_ids_stay_distinct() {
        let id = format!("evt_{}", "0123456789abcdef".repeat(2));
        assert_eq!(event_bits(&id), Some(0x0123456789abcdef0123456789abcdef));
        for other in [&id.to_uppercase()[..], "evt_+123456789abcdef0123456789abcdef", "msg_0", &id[..35], "evt_"] {
            assert_eq!(event_bits(other), None, "{other}");
        }
        let t = Mutex::new(Tally::default());
        let body = |ids: &[&str]| {
            let events: Vec<_> = ids.iter().map(|id| serde_json::json!({"id": id, "outcome": "delivered"})).collect();
            serde_json::to_vec(&serde_json::json!({"data": {"events": events}})).expect("json")
        };
        let key = b"k".to_vec();
        let upper = id.to_uppercase();
        let sent = body(&[&id, &id, &upper]);
        let signature = webhook::signature_header(&[&key[..]], "msg_1", 5, &sent);
        let mut headers = http::HeaderMap::new();
        headers.insert("webhook-id", "msg_1".parse().expect("header"));
        headers.insert("webhook-timestamp", "5".parse().expect("header"));
        headers.insert("webhook-signature", signature.parse().expect("header"));
        assert_eq!(take(&headers, &sent, &key, &t), 204);
        let t = t.lock().expect("lock");
        assert_eq!((t.events, t.ids.len() + t.other_ids.len()), (3, 2), "a repeat counted once, the other id apart");
        assert_eq!(t.by_outcome.get("delivered"), Some(&2));
    }
}
