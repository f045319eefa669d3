//! The provider API: what happens to one HTTP/2 request, from raw headers to the node's answer.
//!
//! `apns` reads the request, `jwt` authenticates the provider, the keyring opens the device token, and
//! `route` forwards. `server` owns sockets, TLS and HTTP/2 connections; this module sees one request at a
//! time and always answers it with a well-formed APNs response.

pub mod apns;
pub mod jwt;
pub mod server;

use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_node::token::{Keyring, TokenError};
use courier_proto::cluster::Notification;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;

use crate::route::{Delivery, NodeRouter};
use apns::{ApnsId, PushHead, Reason};
use jwt::JwtVerifier;

/// What a request handler needs; shared by every connection.
pub struct PushService {
    /// Decides who the provider is; remembers tokens it has verified.
    pub(crate) verifier: JwtVerifier,
    /// Opens device tokens locally, so routing needs no database read.
    pub(crate) keyring: Keyring,
    /// The shared gRPC channel to the node.
    pub(crate) router: NodeRouter,
    /// A provider that starts a body and never finishes it must not hold a stream forever.
    pub(crate) body_timeout: Duration,
}

impl PushService {
    /// Answers one provider request. Never fails: every refusal is an APNs error response.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes>,
    {
        let (parts, body) = request.into_parts();
        let apns_id = apns::response_apns_id(&parts.headers);
        let outcome = async {
            let head = apns::parse_head(&parts.method, &parts.uri, &parts.headers, &apns_id)?;
            let now = (courier_node::ids::unix_millis() / 1000) as i64;
            let provider = self.verifier.authenticate(head.authorization.as_deref(), now)?;
            if !provider.may_push_to(&head.topic) {
                return Err(Reason::TopicDisallowed);
            }
            let token = self.keyring.open(&head.device_token).map_err(|error| match error {
                TokenError::Retired(_) => Reason::ExpiredToken,
                _ => Reason::BadDeviceToken,
            })?;
            if !token.is_for_topic(&head.topic) {
                return Err(Reason::DeviceTokenNotForTopic);
            }
            let read = apns::read_payload(&parts.headers, body, head.payload_limit());
            let payload = tokio::time::timeout(self.body_timeout, read).await.map_err(|_| Reason::IdleTimeout)??;
            apns::check_payload(&payload)?;
            Ok(self.forward(&head, token.device_id.to_bytes().to_vec(), payload).await)
        }
        .await;
        match outcome {
            Ok(Ok(())) => {
                metrics::counter!("courier_gateway_notifications_accepted_total").increment(1);
                respond(StatusCode::OK, &apns_id, None)
            }
            Ok(Err(reason)) => refuse_with(reason.status(), &reason.to_string(), &apns_id),
            Err(reason) => refuse_with(reason.status(), reason.as_str(), &apns_id),
        }
    }

    /// Forwards an accepted push; `Err` carries the reason the node gave, or ServiceUnavailable.
    async fn forward(&self, head: &PushHead, device_id: Vec<u8>, payload: Bytes) -> Result<(), ForwardRefusal> {
        let notification = Notification {
            device_id,
            topic: head.topic.clone(),
            apns_id: head.apns_id.value.clone(),
            payload: payload.to_vec(),
            priority: head.priority,
            expiration: head.expiration,
            collapse_id: head.collapse_id.clone().unwrap_or_default(),
            push_type: head.push_type.clone(),
            accepted_at_ms: courier_node::ids::unix_millis(),
        };
        let started = Instant::now();
        let delivery = self.router.deliver(notification).await;
        metrics::histogram!("courier_gateway_forward_latency_seconds").record(started.elapsed().as_secs_f64());
        match delivery {
            Delivery::Accepted(_) => Ok(()),
            Delivery::Rejected(reason) => Err(ForwardRefusal::Node(reason)),
            Delivery::Unavailable(detail) => {
                tracing::warn!(apns_id = %head.apns_id.value, %detail, "forwarding to the node failed");
                Err(ForwardRefusal::Unavailable)
            }
        }
    }
}

/// Why a push that passed every local check still was not accepted.
#[derive(Debug)]
enum ForwardRefusal {
    /// The node refused it with an APNs reason string.
    Node(String),
    Unavailable,
}

impl ForwardRefusal {
    fn status(&self) -> StatusCode {
        match self {
            // The node only speaks for the device (e.g. Unregistered is 410); all its refusals but that
            // one are request errors.
            ForwardRefusal::Node(reason) if reason == "Unregistered" || reason == "ExpiredToken" => StatusCode::GONE,
            ForwardRefusal::Node(_) => StatusCode::BAD_REQUEST,
            ForwardRefusal::Unavailable => Reason::ServiceUnavailable.status(),
        }
    }
}

impl std::fmt::Display for ForwardRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardRefusal::Node(reason) => f.write_str(reason),
            ForwardRefusal::Unavailable => f.write_str(Reason::ServiceUnavailable.as_str()),
        }
    }
}

fn refuse_with(status: StatusCode, reason: &str, apns_id: &ApnsId) -> Response<Full<Bytes>> {
    // The node's reasons are free text from our point of view; keep the label set bounded.
    let label = if reason.len() <= 40 && reason.bytes().all(|b| b.is_ascii_alphanumeric()) { reason } else { "Other" };
    metrics::counter!("courier_gateway_notifications_rejected_total", "reason" => label.to_string()).increment(1);
    let timestamp = (status == StatusCode::GONE).then(courier_node::ids::unix_millis);
    respond(status, apns_id, Some(apns::error_body(reason, timestamp)))
}

fn respond(status: StatusCode, apns_id: &ApnsId, body: Option<Vec<u8>>) -> Response<Full<Bytes>> {
    let has_body = body.is_some();
    let mut response = Response::new(Full::new(body.map(Bytes::from).unwrap_or_default()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&apns_id.value) {
        headers.insert("apns-id", value);
    }
    if has_body {
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    response
}
