//! One device link, from the first frame to the goodbye.
//!
//! A link without a client certificate may only activate: one `Activate` frame in, one `Activated` frame
//! (or a goodbye) out, then close. A link with a verified device certificate says `Hello`, gets `Welcome`
//! with the negotiated keepalive, receives the notifications queued for it, and then exchanges frames until
//! either side closes. Every way a link ends sends a `Goodbye` with a reason when the link can carry one.
//! The device id always comes from the certificate the handshake verified, never from a frame.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use courier_proto::cluster::Notification;
use courier_proto::device::{self as wire, DeviceFrame, GoodbyeReason, ServerFrame, device_frame, server_frame};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_util::codec::Framed;

use super::Edge;
use super::codec::FrameCodec;
use super::registry::LinkEnd;
use crate::ids::{DeviceId, unix_millis};
use crate::pki;
use crate::token::KeyState;
use crate::view::Placement;

pub type Link = Framed<TlsStream<TcpStream>, FrameCodec<DeviceFrame>>;

/// A device link's stream, on the heap: the session's future then holds a pointer, not the TLS state.
pub fn boxed_link(tls: TlsStream<TcpStream>, max_frame: usize) -> Box<Link> {
    Box::new(super::codec::lean(tls, FrameCodec::new(max_frame)))
}

/// Longest topic name accepted, in bytes.
pub const MAX_TOPIC_LEN: usize = 255;
/// Notifications awaiting an ack whose send time is remembered for the latency histogram.
const MAX_TRACKED_INFLIGHT: usize = 4096;

/// Runs one link to completion.
pub async fn run(mut link: Box<Link>, edge: Arc<Edge>, shutdown: watch::Receiver<bool>) {
    let peer_cert = link.get_ref().get_ref().1.peer_certificates().and_then(|chain| chain.first()).cloned();
    match peer_cert {
        None => activate(&mut link, &edge).await,
        Some(cert) => match pki::device_id_from_cert(&cert) {
            Some(device) => serve_device(&mut link, device, &edge, shutdown).await,
            None => goodbye(&mut link, GoodbyeReason::BadCertificate, "certificate names no device id").await,
        },
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), SinkExt::<ServerFrame>::close(&mut link)).await;
}

fn frame(kind: server_frame::Kind) -> ServerFrame {
    ServerFrame { kind: Some(kind) }
}

async fn goodbye(link: &mut Link, reason: GoodbyeReason, detail: &str) {
    metrics::counter!("courier_node_link_goodbyes_total", "reason" => reason.as_str_name()).increment(1);
    let bye = frame(server_frame::Kind::Goodbye(wire::Goodbye { reason: reason as i32, detail: detail.to_string() }));
    let _ = tokio::time::timeout(Duration::from_secs(1), link.send(bye)).await;
}

/// Reads the first frame, or says goodbye and returns `None`.
async fn first_frame(link: &mut Link, edge: &Edge) -> Option<device_frame::Kind> {
    match tokio::time::timeout(edge.settings.handshake_timeout, link.next()).await {
        Err(_) => {
            goodbye(link, GoodbyeReason::IdleTimeout, "no frame after the handshake").await;
            None
        }
        Ok(None) => None,
        Ok(Some(Err(error))) => {
            if let Some(reason) = error.goodbye_reason() {
                goodbye(link, reason, &error.to_string()).await;
            }
            None
        }
        Ok(Some(Ok(DeviceFrame { kind: None }))) => {
            goodbye(link, GoodbyeReason::ProtocolViolation, "empty frame").await;
            None
        }
        Ok(Some(Ok(DeviceFrame { kind: Some(kind) }))) => Some(kind),
    }
}

async fn activate(link: &mut Link, edge: &Edge) {
    let request = match first_frame(link, edge).await {
        Some(device_frame::Kind::Activate(request)) => request,
        Some(_) => {
            return goodbye(link, GoodbyeReason::NotActivated, "no device certificate: only Activate is accepted")
                .await;
        }
        None => return,
    };
    let refused = |why: &'static str| {
        metrics::counter!("courier_node_activations_total", "outcome" => why).increment(1);
    };
    if !edge.settings.enrolment.admits(&request.enrolment_secret) {
        refused("bad_secret");
        return goodbye(link, GoodbyeReason::ActivationRefused, "enrolment secret not accepted").await;
    }
    let device = loop {
        let candidate = DeviceId::random();
        match edge.store.claim_device_id(candidate).await {
            Ok(true) => break candidate,
            Ok(false) => continue,
            Err(error) => {
                refused("store_error");
                tracing::error!(%error, "could not record a new device id");
                return goodbye(link, GoodbyeReason::ActivationRefused, "the node cannot record devices now").await;
            }
        }
    };
    match edge.device_ca.issue(&request.csr_der, device) {
        Ok(cert) => {
            metrics::counter!("courier_node_activations_total", "outcome" => "issued").increment(1);
            tracing::info!(%device, "device activated");
            let activated = wire::Activated { device_id: device.to_string(), certificate_der: cert.to_vec() };
            let _ = link.send(frame(server_frame::Kind::Activated(activated))).await;
        }
        Err(error) => {
            refused("bad_csr");
            goodbye(link, GoodbyeReason::ActivationRefused, &error.to_string()).await;
        }
    }
}

/// Sends the device to the node that owns it; the link closes after.
async fn redirect(link: &mut Link, to: wire::Redirect) {
    metrics::counter!("courier_node_link_redirects_total").increment(1);
    let redirect = frame(server_frame::Kind::Redirect(to));
    let _ = tokio::time::timeout(Duration::from_secs(1), link.send(redirect)).await;
}

/// A fresh token for a held one minted under a key that no longer mints, if the held token is this
/// device's and for that topic.
fn replacement_token(edge: &Edge, device: DeviceId, held: &wire::HeldToken) -> Option<wire::TokenUpdated> {
    let (opened, key_state) = edge.keyring.open_any(&held.token).ok()?;
    if opened.device_id != device || !opened.is_for_topic(&held.topic) || key_state == KeyState::Active {
        return None;
    }
    let token = edge.keyring.mint(device, &held.topic)?;
    metrics::counter!("courier_node_tokens_updated_total").increment(1);
    Some(wire::TokenUpdated { topic: held.topic.clone(), token })
}

fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && topic.bytes().all(|b| b.is_ascii_graphic())
}

fn notification_frame(n: &Notification) -> ServerFrame {
    frame(server_frame::Kind::Notification(wire::Notification {
        apns_id: n.apns_id.clone(),
        topic: n.topic.clone(),
        payload: n.payload.clone(),
        priority: n.priority,
        expiration: n.expiration,
        collapse_id: n.collapse_id.clone(),
        push_type: n.push_type.clone(),
        accepted_at_ms: n.accepted_at_ms,
    }))
}

/// The state of an authenticated link between frames.
struct DeviceLink<'a> {
    device: DeviceId,
    edge: &'a Edge,
    /// apns-id → when the gateway accepted it, for the delivery-latency histogram on ack.
    inflight: HashMap<String, u64>,
}

enum Next {
    Continue,
    Close,
}

impl DeviceLink<'_> {
    async fn send_notification(&mut self, link: &mut Link, n: &Notification) -> bool {
        if self.inflight.len() < MAX_TRACKED_INFLIGHT {
            self.inflight.insert(n.apns_id.clone(), n.accepted_at_ms);
        }
        link.send(notification_frame(n)).await.is_ok()
    }

    async fn handle(&mut self, link: &mut Link, kind: Option<device_frame::Kind>) -> Next {
        use device_frame::Kind;
        match kind {
            Some(Kind::RegisterTopic(request)) => {
                if !valid_topic(&request.topic) {
                    goodbye(link, GoodbyeReason::BadTopic, "topic must be 1-255 printable ASCII characters").await;
                    return Next::Close;
                }
                let Some(token) = self.edge.keyring.mint(self.device, &request.topic) else {
                    tracing::error!("no active token key; cannot register topics");
                    goodbye(link, GoodbyeReason::Shutdown, "the node has no token key").await;
                    return Next::Close;
                };
                // Provider API hook: registering again ends an earlier unregistration.
                if let Err(error) = self.edge.registrations.register(self.device, &request.topic).await {
                    tracing::error!(%error, "clearing an unregistration failed");
                }
                let issued = wire::TokenIssued { topic: request.topic, token };
                if link.send(frame(server_frame::Kind::TokenIssued(issued))).await.is_err() {
                    return Next::Close;
                }
            }
            Some(Kind::UnregisterTopic(request)) => {
                // Provider API hook: later pushes to this topic answer 410 Unregistered (durable first).
                let at_ms = unix_millis();
                if let Err(error) = self.edge.registrations.unregister(self.device, &request.topic, at_ms).await {
                    tracing::error!(%error, "recording an unregistration failed");
                }
                let done = wire::TopicUnregistered { topic: request.topic };
                if link.send(frame(server_frame::Kind::TopicUnregistered(done))).await.is_err() {
                    return Next::Close;
                }
            }
            Some(Kind::Ack(ack)) => {
                metrics::counter!("courier_node_notifications_delivered_total").increment(1);
                if let Some(accepted_at_ms) = self.inflight.remove(&ack.apns_id) {
                    let latency = unix_millis().saturating_sub(accepted_at_ms) as f64 / 1000.0;
                    metrics::histogram!("courier_node_delivery_latency_seconds").record(latency);
                }
                self.edge.store.remove_later(self.device, &ack.apns_id);
                self.edge.replicator.remove(self.device, &ack.apns_id);
                self.edge.status.delivered(self.device, &ack.apns_id, unix_millis()); // provider API hook
            }
            Some(Kind::Ping(ping)) => {
                let pong = frame(server_frame::Kind::Pong(wire::Pong { nonce: ping.nonce }));
                if link.send(pong).await.is_err() {
                    return Next::Close;
                }
            }
            Some(Kind::Pong(_)) => {}
            Some(Kind::Goodbye(_)) => return Next::Close,
            Some(Kind::Hello(_)) | Some(Kind::Activate(_)) => {
                goodbye(link, GoodbyeReason::ProtocolViolation, "Hello and Activate are only valid first").await;
                return Next::Close;
            }
            None => {
                goodbye(link, GoodbyeReason::ProtocolViolation, "empty frame").await;
                return Next::Close;
            }
        }
        Next::Continue
    }
}

async fn serve_device(link: &mut Link, device: DeviceId, edge: &Edge, mut shutdown: watch::Receiver<bool>) {
    let hello = match first_frame(link, edge).await {
        Some(device_frame::Kind::Hello(hello)) => hello,
        Some(_) => {
            return goodbye(link, GoodbyeReason::ProtocolViolation, "the first frame must be Hello").await;
        }
        None => return,
    };
    if edge.view.is_revoked(device) {
        return goodbye(link, GoodbyeReason::Revoked, "this device was revoked").await;
    }
    match edge.view.placement(device) {
        Placement::Here => {}
        Placement::Elsewhere { device_addr, device_name, .. } => {
            return redirect(link, wire::Redirect { device_addr, server_name: device_name }).await;
        }
        Placement::Nowhere => return goodbye(link, GoodbyeReason::Unavailable, "the cluster is not ready").await,
    }
    let keepalive = edge.settings.negotiate_keepalive(hello.keepalive_secs);
    let idle_limit = keepalive.mul_f64(2.5);
    // Attach before reading the queue: a notification stored after this point is also handed to the link,
    // one stored before it is in the queue, so none falls between (a few may arrive twice; devices dedupe).
    let mut attachment = edge.registry.attach(device);
    let mut state = DeviceLink { device, edge, inflight: HashMap::new() };
    let welcome = wire::Welcome {
        device_id: device.to_string(),
        keepalive_secs: keepalive.as_secs() as u32,
        server_time_ms: unix_millis(),
    };
    tracing::debug!(%device, client = %hello.client, ?keepalive, "device link up");
    'link: {
        if link.send(frame(server_frame::Kind::Welcome(welcome))).await.is_err() {
            break 'link;
        }
        for held in &hello.held_tokens {
            if let Some(fresh) = replacement_token(edge, device, held)
                && link.send(frame(server_frame::Kind::TokenUpdated(fresh))).await.is_err()
            {
                break 'link;
            }
        }
        edge.replicator.gather(&edge.store, device).await;
        match edge.store.pending(device).await {
            Ok(queued) => {
                for n in &queued {
                    if !state.send_notification(link, n).await {
                        break 'link;
                    }
                }
            }
            Err(error) => tracing::error!(%device, %error, "reading the device's queue failed"),
        }
        let mut last_heard = Instant::now();
        loop {
            super::codec::release_idle_buffers(link);
            tokio::select! {
                _ = super::stopped(&mut shutdown) => {
                    goodbye(link, GoodbyeReason::Shutdown, "node shutting down").await;
                    break;
                }
                end = &mut attachment.close => {
                    match end.unwrap_or(LinkEnd::Goodbye(GoodbyeReason::Shutdown)) {
                        LinkEnd::Goodbye(reason) => goodbye(link, reason, "closed by the node").await,
                        LinkEnd::Redirect(to) => redirect(link, to).await,
                    }
                    break;
                }
                incoming = link.next() => match incoming {
                    None => break,
                    Some(Err(error)) => {
                        if let Some(reason) = error.goodbye_reason() {
                            tracing::debug!(%device, %error, "closing link");
                            goodbye(link, reason, &error.to_string()).await;
                        }
                        break;
                    }
                    Some(Ok(DeviceFrame { kind })) => {
                        last_heard = Instant::now();
                        if let Next::Close = state.handle(link, kind).await {
                            break;
                        }
                    }
                },
                Some(n) = attachment.notifications.recv() => {
                    if !state.send_notification(link, &n).await {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(last_heard + idle_limit) => {
                    goodbye(link, GoodbyeReason::IdleTimeout, "nothing received for 2.5 keepalive intervals").await;
                    break;
                }
            }
        }
    }
    edge.registry.detach(device, attachment.serial);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_checked() {
        assert!(valid_topic("com.example.app"));
        assert!(valid_topic("com.example.app.voip"));
        assert!(!valid_topic(""));
        assert!(!valid_topic("has space"));
        assert!(!valid_topic("naïve"));
        assert!(!valid_topic(&"a".repeat(MAX_TOPIC_LEN + 1)));
    }
}
