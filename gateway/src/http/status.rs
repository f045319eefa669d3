//! `GET /v1/status/{token}/{apns-id}`: where a notification is (Courier extension; APNs has no such call).
//!
//! Same authentication as pushes (JWT or provider certificate). The gateway opens the token itself, asks
//! the ring owner of its device (gRPC `NotificationStatus`) and shows the record only to a provider that
//! could push to it: the record's topic must be the token's app, or the answer is 404 as if unknown, and
//! the provider must be allowed on that topic, or the answer is 403 `Forbidden`. The `apns-id` response
//! header is the one in the path.

use bytes::Bytes;
use courier_proto::cluster::NotificationState;
use http::StatusCode;
use http::request::Parts;
use http_body_util::Full;
use hyper::Response;

use super::apns::{self, ApnsId, Reason};
use super::{ConnectionAuth, PushService, refuse, respond};

/// The state names of the status document, as the OpenAPI document spells them.
fn state_name(state: NotificationState) -> &'static str {
    match state {
        NotificationState::Accepted => "accepted",
        NotificationState::Stored => "stored",
        NotificationState::Delivered => "delivered",
        NotificationState::Expired => "expired",
        NotificationState::Dropped => "dropped",
        NotificationState::Unspecified => "unknown",
    }
}

/// Answers one status request; never fails.
pub(super) async fn answer(service: &PushService, parts: &Parts, auth: &ConnectionAuth) -> Response<Full<Bytes>> {
    let rest = parts.uri.path().strip_prefix(apns::STATUS_PATH_PREFIX).unwrap_or_default();
    let (token, apns_id) = rest.split_once('/').unwrap_or((rest, ""));
    let echo = if apns_id.is_empty() {
        apns::response_apns_id(&parts.headers)
    } else {
        ApnsId { value: apns_id.to_string(), generated: false }
    };
    match lookup(service, parts, auth, token, apns_id).await {
        Ok(body) => respond(StatusCode::OK, &echo.value, Some(body)),
        Err(reason) => refuse(reason, None, &echo),
    }
}

async fn lookup(
    service: &PushService,
    parts: &Parts,
    auth: &ConnectionAuth,
    token: &str,
    apns_id: &str,
) -> Result<Vec<u8>, Reason> {
    if parts.method != http::Method::GET {
        return Err(Reason::MethodNotAllowed);
    }
    if token.is_empty() {
        return Err(Reason::MissingDeviceToken);
    }
    if !apns::is_canonical_uuid(apns_id) {
        return Err(Reason::BadMessageId);
    }
    let authorization = parts.headers.get(http::header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
    let provider = service.authenticate(auth, authorization)?;
    let opened = service.keyring.open(token).map_err(Reason::from)?;
    let record = service.router.status(opened.device_id, apns_id).await.map_err(|detail| {
        tracing::warn!(%detail, "asking the owner for a status failed");
        Reason::ServiceUnavailable
    })?;
    if !record.found || !opened.is_for_topic(courier_core::topic::app_topic(&record.topic)) {
        return Err(Reason::UnknownNotification);
    }
    if !provider.may_push_to(&record.topic) {
        return Err(Reason::Forbidden);
    }
    let state = NotificationState::try_from(record.state).unwrap_or(NotificationState::Unspecified);
    let mut body = serde_json::Map::new();
    body.insert("apnsId".into(), apns_id.into());
    body.insert("state".into(), state_name(state).into());
    body.insert("topic".into(), record.topic.into());
    body.insert("acceptedAt".into(), record.accepted_at_ms.into());
    body.insert("updatedAt".into(), record.updated_at_ms.into());
    body.insert("expiration".into(), record.expiration.into());
    if state == NotificationState::Delivered {
        body.insert("deliveredAt".into(), record.delivered_at_ms.into());
    }
    if state == NotificationState::Dropped {
        body.insert("reason".into(), record.reason.into());
    }
    Ok(serde_json::Value::Object(body).to_string().into_bytes())
}
