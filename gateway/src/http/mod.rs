//! The provider API: what happens to one HTTP/2 request, from raw headers to the node's answer.
//!
//! `apns` reads the request, `jwt` authenticates the provider (or the connection's client certificate
//! already has), `ratelimit` bounds pushes per device token and per team, the keyring opens the device
//! token, and `route` forwards. `status` answers the delivery-status extension. `server` owns sockets,
//! TLS and HTTP/2 connections; this module sees one request at a time and always answers it with a
//! well-formed APNs response, after reading the request's body to its end (up to the payload limit), so
//! that the answer ends the stream instead of a reset.

pub mod apns;
pub mod broadcast;
pub mod channels;
pub mod jwt;
pub mod ratelimit;
pub mod server;
pub mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_core::ids::DeviceId;
use courier_core::token::{Keyring, OpenedToken};
use courier_proto::cluster::{DeliverOutcome, Notification};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;

use crate::route::{Forwarded, NodeRouter};
use apns::{ApnsId, PushHead, Reason};
use jwt::{AuthorizedProvider, JwtVerifier};
use ratelimit::RateLimiter;

/// Who the TLS handshake says is on a connection, decided once per connection.
#[derive(Debug, Clone)]
pub enum ConnectionAuth {
    /// No client certificate: every request must carry a provider JWT.
    Token,
    /// A client certificate from the provider CA naming a team and its topics: no JWT needed.
    Certificate(AuthorizedProvider),
    /// A client certificate from the provider CA that names no team or topic: every request is 403.
    BadCertificate,
}

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
    /// Pushes per device and app: what a token names once opened, however its hex is spelled and whichever
    /// token key minted it.
    pub(crate) device_limit: RateLimiter<DeviceLimitKey>,
    /// Pushes (and channel requests) per provider team.
    pub(crate) team_limit: RateLimiter<std::sync::Arc<str>>,
    /// The cluster's broadcast channels as this gateway last heard them.
    pub(crate) channels: std::sync::Arc<crate::channels::ChannelView>,
}

/// The device rate limit's key: the device id and the app-topic digest inside an opened token.
pub(crate) type DeviceLimitKey = (DeviceId, [u8; 8]);

/// A refusal, with the 410 timestamp when there is one.
type Refused = (Reason, Option<u64>);

impl From<Reason> for (Reason, Option<u64>) {
    fn from(reason: Reason) -> Self {
        (reason, None)
    }
}

impl PushService {
    /// Answers one provider request. Never fails: every refusal is an APNs error response.
    pub async fn handle<B>(&self, request: Request<B>, auth: &ConnectionAuth) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes>,
    {
        let (parts, body) = request.into_parts();
        if parts.uri.path().starts_with(broadcast::BROADCAST_PATH_PREFIX) {
            return self.handle_broadcast(parts, body, auth).await;
        }
        if parts.uri.path().starts_with(apns::STATUS_PATH_PREFIX) {
            // A status request has no body; one sent anyway is read first all the same.
            if let Err((reason, _)) = self.drain(&parts.headers, body, apns::MAX_PAYLOAD, Ok(())).await {
                return refuse(reason, None, &apns::response_apns_id(&parts.headers));
            }
            return status::answer(self, &parts, auth).await;
        }
        let apns_id = apns::response_apns_id(&parts.headers);
        let head = apns::parse_head(&parts.method, &parts.uri, &parts.headers, &apns_id);
        // Before the head is known, the largest limit any push may have.
        let limit = head.as_ref().map_or(apns::MAX_VOIP_PAYLOAD, PushHead::payload_limit);
        let admitted = head.map_err(Refused::from).and_then(|head| self.admit(head, auth));
        let outcome = match self.admitted_body(&parts.headers, body, limit, admitted).await {
            Ok(((head, token, receipts), payload)) => match apns::check_payload(&payload) {
                Ok(()) => self.forward(&head, token.device_id.to_bytes().to_vec(), payload, receipts).await,
                Err(reason) => Err(reason.into()),
            },
            Err(refused) => Err(refused),
        };
        match outcome {
            Ok(()) => respond(StatusCode::OK, &apns_id.value, None),
            Err((reason, timestamp)) => refuse(reason, timestamp, &apns_id),
        }
    }

    /// Everything decided before the body: the provider, its team's rate, the topic, the device token and
    /// its rate, in that order; and the team, if it has a webhook for receipts.
    fn admit(
        &self,
        head: PushHead,
        auth: &ConnectionAuth,
    ) -> Result<(PushHead, OpenedToken, Option<Arc<str>>), Refused> {
        let provider = self.authenticate(auth, head.authorization.as_deref())?;
        if !self.team_limit.admit(&provider.team_id, Instant::now()) {
            return Err(Reason::TooManyRequests.into());
        }
        if !provider.may_push_to(&head.topic) {
            return Err(Reason::TopicDisallowed.into());
        }
        let token = self.open_token(&head.device_token, &head.topic)?;
        let receipts = {
            let view = self.router.view.borrow();
            if let Some(since_ms) = view.as_ref().and_then(|v| v.refused_clone(token.device_id)) {
                return Err((Reason::ClonedIdentity, Some(since_ms)));
            }
            view.as_ref().is_some_and(|v| v.receipt_teams.contains(&*provider.team_id)).then_some(provider.team_id)
        };
        if !self.device_limit.admit(&(token.device_id, token.topic.0), Instant::now()) {
            return Err(Reason::TooManyRequests.into());
        }
        Ok((head, token, receipts))
    }

    /// The body of a request admitted as `admitted` (read within the body timeout, at most `limit` bytes),
    /// or, for a refused one, the refusal once its body has been drained (`PayloadTooLarge` past `limit`).
    /// Pushes, channel requests and broadcasts all read their bodies here.
    async fn admitted_body<B, T>(
        &self,
        headers: &http::HeaderMap,
        body: B,
        limit: usize,
        admitted: Result<T, Refused>,
    ) -> Result<(T, Bytes), Refused>
    where
        B: hyper::body::Body<Data = Bytes>,
    {
        match admitted {
            Err(refused) => match self.drain(headers, body, limit, Err(refused)).await {
                Err(answer) => Err(answer),
                Ok(()) => Err(refused),
            },
            Ok(admitted) => {
                let read = apns::read_payload(headers, body, limit);
                let payload =
                    tokio::time::timeout(self.body_timeout, read).await.map_err(|_| Reason::IdleTimeout)??;
                Ok((admitted, payload))
            }
        }
    }

    /// Reads a body to its end before `decided` is answered, so that the answer ends the stream rather than
    /// a reset. A body past `limit` turns the answer into 413 `PayloadTooLarge` (the stream is then closed
    /// with RST_STREAM NO_ERROR after the whole answer, as RFC 9113 §8.1 allows); one that does not end
    /// within the body timeout gets `decided` anyway.
    async fn drain<B>(
        &self,
        headers: &http::HeaderMap,
        body: B,
        limit: usize,
        decided: Result<(), Refused>,
    ) -> Result<(), Refused>
    where
        B: hyper::body::Body<Data = Bytes>,
    {
        match tokio::time::timeout(self.body_timeout, apns::drain_payload(headers, body, limit)).await {
            Ok(Err(Reason::PayloadTooLarge)) => Err(Reason::PayloadTooLarge.into()),
            _ => decided,
        }
    }

    /// `FeatureNotEnabled` unless the cluster lets `team` use broadcast channels.
    fn check_broadcast_allowed(&self, team: &str) -> Result<(), Reason> {
        let view = self.router.view.borrow();
        match view.as_ref() {
            Some(view) if view.broadcast_disabled.contains(team) => Err(Reason::FeatureNotEnabled),
            _ => Ok(()),
        }
    }

    /// The provider behind a request: the connection's certificate, else the request's JWT.
    fn authenticate(&self, auth: &ConnectionAuth, authorization: Option<&str>) -> Result<AuthorizedProvider, Reason> {
        match auth {
            ConnectionAuth::Certificate(provider) => Ok(provider.clone()),
            ConnectionAuth::BadCertificate => Err(Reason::BadCertificate),
            ConnectionAuth::Token => {
                let now = (courier_core::ids::unix_millis() / 1000) as i64;
                self.verifier.authenticate(authorization, now)
            }
        }
    }

    /// Opens a device token and checks it is for `topic`'s app.
    fn open_token(&self, device_token: &str, topic: &str) -> Result<OpenedToken, Reason> {
        let token = self.keyring.open(device_token).map_err(Reason::from)?;
        if !token.is_for_topic(courier_core::topic::app_topic(topic)) {
            return Err(Reason::DeviceTokenNotForTopic);
        }
        Ok(token)
    }

    /// Forwards an accepted push, naming the team and token when `receipts` (the team has a webhook);
    /// `Err` carries the reason the node gave, or ServiceUnavailable.
    async fn forward(
        &self,
        head: &PushHead,
        device_id: Vec<u8>,
        payload: Bytes,
        receipts: Option<Arc<str>>,
    ) -> Result<(), Refused> {
        let notification = Notification {
            device_id,
            topic: head.topic.clone(),
            apns_id: head.apns_id.value.clone(),
            payload: payload.to_vec(),
            priority: head.priority,
            expiration: head.expiration,
            collapse_id: head.collapse_id.clone().unwrap_or_default(),
            push_type: head.push_type.clone(),
            accepted_at_ms: courier_core::ids::unix_millis(),
            channel_id: Vec::new(),
            token: if receipts.is_some() { head.device_token.clone() } else { String::new() },
            team_id: receipts.map(|team| team.to_string()).unwrap_or_default(),
        };
        let started = Instant::now();
        let delivery = self.router.deliver(notification).await;
        metrics::histogram!("courier_gateway_forward_latency_seconds").record(started.elapsed().as_secs_f64());
        match delivery {
            Forwarded::Accepted(outcome) => {
                let outcome = match outcome {
                    DeliverOutcome::Delivered => "delivered",
                    DeliverOutcome::Stored => "stored",
                    DeliverOutcome::Sent => "sent",
                    _ => "discarded",
                };
                metrics::counter!("courier_gateway_notifications_accepted_total", "outcome" => outcome).increment(1);
                Ok(())
            }
            Forwarded::Rejected(refusal, timestamp_ms) => {
                let reason = crate::route::apns_reason(refusal);
                if reason == Reason::InternalServerError {
                    tracing::error!(apns_id = %head.apns_id.value, ?refusal, "the node refused a notification");
                }
                Err((reason, (timestamp_ms != 0).then_some(timestamp_ms)))
            }
            Forwarded::Unavailable(detail) => {
                tracing::warn!(apns_id = %head.apns_id.value, %detail, "forwarding to the node failed");
                Err(Reason::ServiceUnavailable.into())
            }
            Forwarded::ShuttingDown => Err(Reason::Shutdown.into()),
        }
    }
}

/// An APNs error response; 410s carry `timestamp` (the node's time for `Unregistered`, else now).
fn refuse(reason: Reason, timestamp: Option<u64>, apns_id: &ApnsId) -> Response<Full<Bytes>> {
    metrics::counter!("courier_gateway_notifications_rejected_total", "reason" => reason.as_str()).increment(1);
    let status = reason.status();
    let timestamp = (status == StatusCode::GONE).then(|| timestamp.unwrap_or_else(courier_core::ids::unix_millis));
    respond(status, &apns_id.value, Some(apns::error_body(reason.as_str(), timestamp)))
}

/// A response with `apns-id`; a 200 without body is one HEADERS frame, an error one more DATA frame.
fn respond(status: StatusCode, apns_id: &str, body: Option<Vec<u8>>) -> Response<Full<Bytes>> {
    let has_body = body.is_some();
    let mut response = Response::new(Full::new(body.map(Bytes::from).unwrap_or_default()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(apns_id) {
        headers.insert("apns-id", value);
    }
    if has_body {
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    response
}
