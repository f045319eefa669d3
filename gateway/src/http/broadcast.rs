//! Broadcast sends (APNs broadcast push, iOS 18): `POST /4/broadcasts/apps/{bundle}` on the provider port,
//! one notification to every subscriber of a channel.
//!
//! Headers: `apns-channel-id` (required), `apns-push-type` (required; the channel's own), `apns-priority`
//! (10, 5 or 1; default 10), `apns-expiration` (UNIX seconds; must be 0 on a channel that keeps nothing,
//! `message-storage-policy` 0; on a policy-1 channel it bounds how long the broadcast is kept, at most 8
//! hours, and 0 keeps it not at all), `apns-request-id` (a canonical UUID, echoed). The body is a JSON
//! object of at most 5120 bytes. The answer is 200 with `apns-request-id` and a fresh `apns-unique-id`,
//! which is also the broadcast's `apns_id` on every device; refusals carry `apns-request-id` and the APNs
//! reason.
//!
//! The send is checked against the gateway's copy of the channel book, then handed to every member of
//! its view in their `Forward` streams (`NodeRouter::broadcast`); the provider hears 200 once each has it
//! (kept durably first, on a policy-1 channel).

use std::time::Instant;

use bytes::Bytes;
use courier_core::channel::{ChannelId, ChannelPushType, StoragePolicy};
use courier_proto::cluster::Notification;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::Full;

use super::apns::{self, Reason};
use super::channels;
use super::{ConnectionAuth, PushService, Refused};
use crate::route::Broadcasted;

/// Where broadcasts are addressed; the bundle id follows.
pub const BROADCAST_PATH_PREFIX: &str = "/4/broadcasts/apps/";
/// Largest broadcast payload, as APNs allows.
pub const MAX_BROADCAST_PAYLOAD: usize = 5120;
/// Headers a broadcast may carry once only.
const SINGLE_VALUED: &[&str] =
    &["authorization", "apns-channel-id", "apns-push-type", "apns-priority", "apns-expiration", "apns-request-id"];

/// A broadcast's request line and headers, validated but not yet authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastHead {
    pub app: String,
    pub channel: ChannelId,
    pub push_type: ChannelPushType,
    pub priority: u32,
    /// UNIX seconds, if given.
    pub expiration: Option<u64>,
}

/// Validates path, method and headers.
pub fn parse_head(method: &Method, path: &str, headers: &HeaderMap) -> Result<BroadcastHead, Reason> {
    let app = path.strip_prefix(BROADCAST_PATH_PREFIX).ok_or(Reason::BadPath)?;
    if app.contains('/') {
        return Err(Reason::BadPath);
    }
    if method != Method::POST {
        return Err(Reason::MethodNotAllowed);
    }
    if app.is_empty() || !courier_core::topic::valid_topic(app) {
        return Err(Reason::BadTopic);
    }
    if SINGLE_VALUED.iter().any(|name| headers.get_all(*name).iter().nth(1).is_some()) {
        return Err(Reason::DuplicateHeaders);
    }
    let text = |name: &str, bad: Reason| match headers.get(name) {
        None => Ok(None),
        Some(value) => value.to_str().map(Some).map_err(|_| bad),
    };
    let channel = match text("apns-channel-id", Reason::BadChannelId)? {
        None => return Err(Reason::MissingChannelId),
        Some(value) => ChannelId::parse(value).ok_or(Reason::BadChannelId)?,
    };
    let push_type = match text("apns-push-type", Reason::InvalidPushType)? {
        None => return Err(Reason::MissingPushType),
        Some(value) => ChannelPushType::parse(value).ok_or(Reason::InvalidPushType)?,
    };
    let priority = match text("apns-priority", Reason::BadPriority)? {
        None => 10,
        Some("10") => 10,
        Some("5") => 5,
        Some("1") => 1,
        Some(_) => return Err(Reason::BadPriority),
    };
    let expiration = match text("apns-expiration", Reason::BadExpirationDate)? {
        None => None,
        Some(value) if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
            Some(value.parse().map_err(|_| Reason::BadExpirationDate)?)
        }
        Some(_) => return Err(Reason::BadExpirationDate),
    };
    Ok(BroadcastHead { app: app.to_string(), channel, push_type, priority, expiration })
}

/// How long a broadcast is kept (UNIX seconds; 0 = not kept) on a channel of `policy`, given the
/// provider's `apns-expiration`; `Err` where the policy forbids it.
pub fn keep_until(policy: StoragePolicy, expiration: Option<u64>, now_secs: u64) -> Result<u64, Reason> {
    let longest = now_secs + MAX_KEPT_SECS;
    match (policy, expiration) {
        (StoragePolicy::NoStorage, None | Some(0)) => Ok(0),
        (StoragePolicy::NoStorage, Some(_)) => Err(Reason::BadExpirationDate),
        (StoragePolicy::MostRecent, None) => Ok(longest),
        (StoragePolicy::MostRecent, Some(at)) if at != 0 && at <= now_secs => Err(Reason::BadExpirationDate),
        (StoragePolicy::MostRecent, Some(at)) => Ok(at.min(longest)),
    }
}

/// The longest a broadcast is kept: 8 hours.
pub const MAX_KEPT_SECS: u64 = 8 * 3600;

impl PushService {
    /// Answers one broadcast request. Never fails: every refusal is an APNs error response.
    pub(crate) async fn handle_broadcast<B>(
        &self,
        parts: http::request::Parts,
        body: B,
        auth: &ConnectionAuth,
    ) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes>,
    {
        let (request_id, request_id_ok) = channels::request_id(&parts.headers);
        let admitted = request_id_ok
            .and_then(|()| parse_head(&parts.method, parts.uri.path(), &parts.headers))
            .and_then(|head| self.admit_broadcast(head, &parts.headers, auth));
        let admitted = admitted.map_err(Refused::from);
        let outcome = match self.admitted_body(&parts.headers, body, MAX_BROADCAST_PAYLOAD, admitted).await {
            Ok((notification, payload)) => match apns::check_payload(&payload) {
                Ok(()) => self.send_broadcast(Notification { payload: payload.to_vec(), ..notification }).await,
                Err(reason) => Err(reason),
            },
            Err((reason, _)) => Err(reason),
        };
        let label = outcome.as_ref().map_or_else(|reason| reason.as_str(), |_| "ok");
        metrics::counter!("courier_gateway_broadcasts_total", "outcome" => label).increment(1);
        match outcome {
            Ok(unique_id) => {
                let mut response = channels::answer(StatusCode::OK, &request_id, None, None);
                if let Ok(value) = http::HeaderValue::from_str(&unique_id) {
                    response.headers_mut().insert("apns-unique-id", value);
                }
                response
            }
            Err(reason) => {
                channels::answer(reason.status(), &request_id, None, Some(apns::error_body(reason.as_str(), None)))
            }
        }
    }

    /// Everything decided before the body: the provider, its team's rate, its right to the app, the
    /// channel (its own team's), the push type and the expiration the channel allows. Returns the
    /// broadcast to send, without its payload.
    fn admit_broadcast(
        &self,
        head: BroadcastHead,
        headers: &HeaderMap,
        auth: &ConnectionAuth,
    ) -> Result<Notification, Reason> {
        let authorization = headers.get(http::header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
        let provider = self.authenticate(auth, authorization)?;
        if !self.team_limit.admit(&provider.team_id, Instant::now()) {
            return Err(Reason::TooManyRequests);
        }
        self.check_broadcast_allowed(&provider.team_id)?;
        if !provider.may_push_to(&head.app) {
            return Err(Reason::TopicMismatch);
        }
        let (policy, push_type) = {
            let book = self.channels.read();
            let record = book.get(&provider.team_id, &head.app, head.channel).ok_or(Reason::ChannelNotRegistered)?;
            (record.policy, record.push_type)
        };
        if push_type != head.push_type {
            return Err(Reason::InvalidPushType);
        }
        let now_ms = courier_core::ids::unix_millis();
        let expiration = keep_until(policy, head.expiration, now_ms / 1000)?;
        Ok(Notification {
            device_id: Vec::new(),
            topic: head.app,
            apns_id: uuid::Uuid::new_v4().hyphenated().to_string(),
            payload: Vec::new(),
            priority: head.priority,
            expiration,
            collapse_id: String::new(),
            push_type: head.push_type.header_name().to_string(),
            accepted_at_ms: now_ms,
            team_id: String::new(),
            token: String::new(),
            channel_id: head.channel.0.to_vec(),
        })
    }

    /// Hands the broadcast to the cluster; its `apns-unique-id` once every member has it.
    async fn send_broadcast(&self, notification: Notification) -> Result<String, Reason> {
        let unique_id = notification.apns_id.clone();
        match self.router.broadcast(notification).await {
            Broadcasted::Done { subscribers } => {
                metrics::counter!("courier_gateway_broadcast_subscribers_total").increment(subscribers);
                Ok(unique_id)
            }
            Broadcasted::Refused(refusal, detail) => {
                let reason = crate::route::apns_reason(refusal);
                if reason == Reason::InternalServerError {
                    tracing::error!(?refusal, %detail, "a node refused a broadcast");
                }
                Err(reason)
            }
            Broadcasted::Unavailable(detail) => {
                tracing::warn!(%detail, "a broadcast did not reach every member");
                Err(Reason::ServiceUnavailable)
            }
            Broadcasted::ShuttingDown => Err(Reason::Shutdown),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    const PATH: &str = "/4/broadcasts/apps/com.example.app";
    const ID: &str = "AAECAwQFBgcICQoLDA0ODw==";

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn heads() {
        let ok = headers(&[("apns-channel-id", ID), ("apns-push-type", "liveactivity")]);
        let head = parse_head(&Method::POST, PATH, &ok).expect("a minimal broadcast");
        assert_eq!((head.app.as_str(), head.priority, head.expiration), ("com.example.app", 10, None));
        assert_eq!(head.push_type, ChannelPushType::LiveActivity);
        assert_eq!(parse_head(&Method::GET, PATH, &ok), Err(Reason::MethodNotAllowed));
        assert_eq!(parse_head(&Method::POST, "/4/broadcasts/apps/a/b", &ok), Err(Reason::BadPath));
        assert_eq!(parse_head(&Method::POST, "/4/broadcasts/apps/", &ok), Err(Reason::BadTopic));
        let check = |pairs: &[(&'static str, &'static str)]| parse_head(&Method::POST, PATH, &headers(pairs));
        assert_eq!(check(&[("apns-push-type", "liveactivity")]), Err(Reason::MissingChannelId));
        assert_eq!(check(&[("apns-channel-id", "x"), ("apns-push-type", "liveactivity")]), Err(Reason::BadChannelId));
        assert_eq!(check(&[("apns-channel-id", ID)]), Err(Reason::MissingPushType));
        assert_eq!(check(&[("apns-channel-id", ID), ("apns-push-type", "voip")]), Err(Reason::InvalidPushType));
        let base = [("apns-channel-id", ID), ("apns-push-type", "liveactivity")];
        let with = |extra: (&'static str, &'static str)| {
            let mut pairs = base.to_vec();
            pairs.push(extra);
            parse_head(&Method::POST, PATH, &headers(&pairs))
        };
        assert_eq!(with(("apns-priority", "7")), Err(Reason::BadPriority));
        assert_eq!(with(("apns-priority", "5")).map(|h| h.priority), Ok(5));
        assert_eq!(with(("apns-expiration", "+5")), Err(Reason::BadExpirationDate));
        assert_eq!(with(("apns-expiration", "17")).map(|h| h.expiration), Ok(Some(17)));
        assert_eq!(with(("apns-channel-id", ID)), Err(Reason::DuplicateHeaders));
    }

    #[test]
    fn how_long_a_broadcast_is_kept() {
        let now = 1_000_000;
        assert_eq!(keep_until(StoragePolicy::NoStorage, None, now), Ok(0));
        assert_eq!(keep_until(StoragePolicy::NoStorage, Some(0), now), Ok(0));
        assert_eq!(keep_until(StoragePolicy::NoStorage, Some(now + 60), now), Err(Reason::BadExpirationDate));
        assert_eq!(keep_until(StoragePolicy::MostRecent, None, now), Ok(now + MAX_KEPT_SECS));
        assert_eq!(keep_until(StoragePolicy::MostRecent, Some(0), now), Ok(0), "0: not kept");
        assert_eq!(keep_until(StoragePolicy::MostRecent, Some(now + 60), now), Ok(now + 60));
        assert_eq!(keep_until(StoragePolicy::MostRecent, Some(now + 86_400), now), Ok(now + MAX_KEPT_SECS));
        assert_eq!(keep_until(StoragePolicy::MostRecent, Some(now - 1), now), Err(Reason::BadExpirationDate));
    }
}
