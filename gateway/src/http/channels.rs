//! APNs channel management (broadcast push, iOS 18), served on the gateway's channels port: creating,
//! reading, deleting and listing a provider's channels for one app.
//!
//! - `POST /1/apps/{bundle}/channels`, body `{"message-storage-policy": 0|1, "push-type": "LiveActivity"}`
//!   → 201 with `apns-channel-id`, no body;
//! - `GET /1/apps/{bundle}/channels` with `apns-channel-id` → 200 and the channel's body;
//! - `DELETE /1/apps/{bundle}/channels` with `apns-channel-id` → 204;
//! - `GET /1/apps/{bundle}/all-channels` → 200, `{"channels": [...]}`.
//!
//! Authentication is the provider API's (JWT or provider certificate), and the bundle must be one the
//! provider may push to (else 403 `TopicMismatch`). Every answer carries `apns-request-id`: the request's
//! own (a canonical UUID, else 400 `BadMessageId`), or a generated one. Reads and lists are answered from
//! the gateway's copy of the channel book; creates and deletes go through Raft (`ManageChannel`) and are
//! answered once the gateway's copy has them, so a read after a write on the same gateway sees it.
//! Channels belong to the team that created them: another team's channel is `ChannelNotRegistered`.

use std::time::Instant;

use bytes::Bytes;
use courier_core::channel::{ChannelId, ChannelPushType, ChannelRecord, StoragePolicy};
use courier_proto::cluster::manage_channel_request::Action;
use courier_proto::cluster::{ChannelOutcome, CreateChannel, ManageChannelRequest};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use super::apns::{self, Reason};
use super::{ConnectionAuth, PushService, Refused};
use crate::route::ChannelAnswer;

/// Where channel management is addressed: `/1/apps/{bundle}/channels` and `/1/apps/{bundle}/all-channels`.
pub const CHANNELS_PATH_PREFIX: &str = "/1/apps/";
/// Largest body a channel request may have (a create's is under 100 bytes).
const MAX_BODY: usize = 4096;
/// The header naming a channel, on requests and on answers.
pub const CHANNEL_ID_HEADER: &str = "apns-channel-id";
/// The header echoed on every answer.
pub const REQUEST_ID_HEADER: &str = "apns-request-id";

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Create,
    Read,
    Delete,
    List,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Create => "create",
            Call::Read => "read",
            Call::Delete => "delete",
            Call::List => "list",
        }
    }
}

/// The call and the bundle id a path and method name; 404 `BadPath` for any other path, 405 for a method
/// the path does not have.
pub fn parse_call<'a>(method: &Method, path: &'a str) -> Result<(Call, &'a str), Reason> {
    let rest = path.strip_prefix(CHANNELS_PATH_PREFIX).ok_or(Reason::BadPath)?;
    let (bundle, tail) = rest.split_once('/').ok_or(Reason::BadPath)?;
    let call = match (tail, method) {
        ("channels", &Method::POST) => Call::Create,
        ("channels", &Method::GET) => Call::Read,
        ("channels", &Method::DELETE) => Call::Delete,
        ("all-channels", &Method::GET) => Call::List,
        ("channels" | "all-channels", _) => return Err(Reason::MethodNotAllowed),
        _ => return Err(Reason::BadPath),
    };
    if bundle.is_empty() || !courier_core::topic::valid_topic(bundle) {
        return Err(Reason::BadTopic);
    }
    Ok((call, bundle))
}

/// The `apns-request-id` to echo: the request's own value if it is text, else a generated one.
pub(crate) fn request_id(headers: &HeaderMap) -> (String, Result<(), Reason>) {
    match headers.get(REQUEST_ID_HEADER).map(|value| value.to_str()) {
        None => (uuid::Uuid::new_v4().hyphenated().to_string(), Ok(())),
        Some(Ok(value)) if apns::is_canonical_uuid(value) => (value.to_string(), Ok(())),
        Some(Ok(value)) => (value.to_string(), Err(Reason::BadMessageId)),
        Some(Err(_)) => (uuid::Uuid::new_v4().hyphenated().to_string(), Err(Reason::BadMessageId)),
    }
}

/// The channel a request's `apns-channel-id` names.
fn channel_id(headers: &HeaderMap) -> Result<ChannelId, Reason> {
    let mut values = headers.get_all(CHANNEL_ID_HEADER).iter();
    let value = values.next().ok_or(Reason::MissingChannelId)?;
    if values.next().is_some() {
        return Err(Reason::DuplicateHeaders);
    }
    value.to_str().ok().and_then(ChannelId::parse).ok_or(Reason::BadChannelId)
}

/// A create's body: the storage policy and the push type, both required.
pub fn parse_create(body: &[u8]) -> Result<(StoragePolicy, ChannelPushType), Reason> {
    let body: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|_| Reason::BadRequestPayload)?;
    let push_type = match body.get("push-type") {
        None => return Err(Reason::MissingPushType),
        Some(value) => value.as_str().and_then(ChannelPushType::parse).ok_or(Reason::InvalidPushType)?,
    };
    // A number, or its decimal text: `@parse/node-apn`'s documented example sends `"1"`.
    let policy = match body.get("message-storage-policy") {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(text)) if text.len() == 1 => text.parse().ok(),
        _ => None,
    };
    let policy = policy
        .and_then(|n| u8::try_from(n).ok())
        .and_then(|n| StoragePolicy::try_from(n).ok())
        .ok_or(Reason::BadRequestParams)?;
    Ok((policy, push_type))
}

/// A channel's body as a read answers it.
pub fn channel_body(record: &ChannelRecord) -> Vec<u8> {
    serde_json::json!({
        "message-storage-policy": u8::from(record.policy),
        "push-type": record.push_type.body_name(),
    })
    .to_string()
    .into_bytes()
}

/// What a call that succeeded answers.
enum Done {
    Created(ChannelId),
    Read(ChannelRecord),
    Deleted,
    Listed(Vec<ChannelId>),
}

/// An admitted request: who asks, for which app, and what.
struct ChannelHead {
    call: Call,
    team_id: String,
    app: String,
}

impl PushService {
    /// Answers one channel management request. Never fails: every refusal is an APNs error response.
    pub async fn handle_channels<B>(&self, request: Request<B>, auth: &ConnectionAuth) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes>,
    {
        let (parts, body) = request.into_parts();
        let (request_id, request_id_ok) = request_id(&parts.headers);
        let head =
            request_id_ok.and_then(|()| self.admit_channel_call(&parts.method, parts.uri.path(), &parts.headers, auth));
        let call = head.as_ref().map_or("refused", |head| head.call.name());
        let outcome = match self.admitted_body(&parts.headers, body, MAX_BODY, head.map_err(Refused::from)).await {
            Ok((head, payload)) => self.channel_call(head, &parts.headers, &payload).await,
            Err((reason, _)) => Err(reason),
        };
        let outcome_label = outcome.as_ref().map_or_else(|reason| reason.as_str(), |_| "ok");
        metrics::counter!("courier_gateway_channel_requests_total", "call" => call, "outcome" => outcome_label)
            .increment(1);
        match outcome {
            Ok(Done::Created(id)) => answer(StatusCode::CREATED, &request_id, Some(id), None),
            Ok(Done::Read(record)) => answer(StatusCode::OK, &request_id, Some(record.id), Some(channel_body(&record))),
            Ok(Done::Deleted) => answer(StatusCode::NO_CONTENT, &request_id, None, None),
            Ok(Done::Listed(ids)) => {
                let ids: Vec<String> = ids.iter().map(ChannelId::to_string).collect();
                let body = serde_json::json!({ "channels": ids }).to_string().into_bytes();
                answer(StatusCode::OK, &request_id, None, Some(body))
            }
            Err(reason) => answer(reason.status(), &request_id, None, Some(apns::error_body(reason.as_str(), None))),
        }
    }

    /// Everything decided before the body: the call, the provider, its team's rate and its right to the app.
    fn admit_channel_call(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        auth: &ConnectionAuth,
    ) -> Result<ChannelHead, Reason> {
        let (call, app) = parse_call(method, path)?;
        if headers.get_all(http::header::AUTHORIZATION).iter().nth(1).is_some() {
            return Err(Reason::DuplicateHeaders);
        }
        let authorization = headers.get(http::header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
        let provider = self.authenticate(auth, authorization)?;
        if !self.team_limit.admit(&provider.team_id, Instant::now()) {
            return Err(Reason::TooManyRequests);
        }
        self.check_broadcast_allowed(&provider.team_id)?;
        if !provider.may_push_to(app) {
            return Err(Reason::TopicMismatch);
        }
        Ok(ChannelHead { call, team_id: provider.team_id.to_string(), app: app.to_string() })
    }

    async fn channel_call(&self, head: ChannelHead, headers: &HeaderMap, body: &[u8]) -> Result<Done, Reason> {
        let ChannelHead { call, team_id, app } = head;
        match call {
            Call::List => {
                let book = self.channels.read();
                Ok(Done::Listed(book.list(&team_id, &app).iter().map(|record| record.id).collect()))
            }
            Call::Read => {
                let id = channel_id(headers)?;
                let book = self.channels.read();
                book.get(&team_id, &app, id).cloned().map(Done::Read).ok_or(Reason::ChannelNotRegistered)
            }
            Call::Create => {
                let (policy, push_type) = parse_create(body)?;
                let id = ChannelId::random();
                let create = CreateChannel {
                    id: id.0.to_vec(),
                    message_storage_policy: u32::from(u8::from(policy)),
                    push_type: push_type.header_name().to_string(),
                };
                let request = ManageChannelRequest { team_id, app, action: Some(Action::Create(create)) };
                match self.change_channel(request).await? {
                    (ChannelOutcome::Done, _) => Ok(Done::Created(id)),
                    (ChannelOutcome::TooMany, _) => Err(Reason::CannotCreateChannelConfig),
                    // An earlier attempt was applied, its answer lost.
                    (ChannelOutcome::Exists, true) => Ok(Done::Created(id)),
                    (outcome, _) => {
                        tracing::error!(?outcome, "a channel create was answered unexpectedly");
                        Err(Reason::InternalServerError)
                    }
                }
            }
            Call::Delete => {
                let id = channel_id(headers)?;
                let request = ManageChannelRequest { team_id, app, action: Some(Action::Delete(id.0.to_vec())) };
                match self.change_channel(request).await? {
                    (ChannelOutcome::Done, _) | (ChannelOutcome::UnknownChannel, true) => Ok(Done::Deleted),
                    (ChannelOutcome::UnknownChannel, false) => Err(Reason::ChannelNotRegistered),
                    (outcome, _) => {
                        tracing::error!(?outcome, "a channel delete was answered unexpectedly");
                        Err(Reason::InternalServerError)
                    }
                }
            }
        }
    }

    /// Asks the cluster for a change and, once it is applied, waits (within the request timeout) for this
    /// gateway's copy of the book to have it. Returns the outcome and whether an earlier attempt may have
    /// been applied unanswered.
    async fn change_channel(&self, request: ManageChannelRequest) -> Result<(ChannelOutcome, bool), Reason> {
        match self.router.manage_channel(request).await {
            ChannelAnswer::Answered(response, retried) => {
                let outcome = response.outcome();
                if outcome == ChannelOutcome::Done
                    && !self.channels.caught_up(response.version, self.body_timeout).await
                {
                    // Applied all the same; only a read on this gateway right after may miss it.
                    tracing::warn!(version = response.version, "the channel book did not reach a change in time");
                }
                Ok((outcome, retried))
            }
            ChannelAnswer::Invalid(why) => {
                tracing::error!(%why, "a node refused a channel request as malformed");
                Err(Reason::InternalServerError)
            }
            ChannelAnswer::Unavailable(why) => {
                tracing::warn!(%why, "no node took a channel request");
                Err(Reason::ServiceUnavailable)
            }
            ChannelAnswer::ShuttingDown => Err(Reason::Shutdown),
        }
    }
}

/// An answer with `apns-request-id`, and `apns-channel-id` when it names a channel.
pub(crate) fn answer(
    status: StatusCode,
    request_id: &str,
    channel: Option<ChannelId>,
    body: Option<Vec<u8>>,
) -> Response<Full<Bytes>> {
    let has_body = body.is_some();
    let mut response = Response::new(Full::new(body.map(Bytes::from).unwrap_or_default()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID_HEADER, value);
    }
    if let Some(id) = channel
        && let Ok(value) = HeaderValue::from_str(&id.to_string())
    {
        headers.insert(CHANNEL_ID_HEADER, value);
    }
    if has_body {
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_methods_name_the_call() {
        fn call(method: Method, path: &str) -> Result<(Call, &str), Reason> {
            parse_call(&method, path)
        }
        assert_eq!(call(Method::POST, "/1/apps/com.example.app/channels"), Ok((Call::Create, "com.example.app")));
        assert_eq!(call(Method::GET, "/1/apps/com.example.app/channels"), Ok((Call::Read, "com.example.app")));
        assert_eq!(call(Method::DELETE, "/1/apps/com.example.app/channels"), Ok((Call::Delete, "com.example.app")));
        assert_eq!(call(Method::GET, "/1/apps/com.example.app/all-channels"), Ok((Call::List, "com.example.app")));
        assert_eq!(call(Method::PUT, "/1/apps/com.example.app/channels"), Err(Reason::MethodNotAllowed));
        assert_eq!(call(Method::POST, "/1/apps/com.example.app/all-channels"), Err(Reason::MethodNotAllowed));
        assert_eq!(call(Method::GET, "/1/apps/com.example.app/channel"), Err(Reason::BadPath));
        assert_eq!(call(Method::GET, "/3/device/00"), Err(Reason::BadPath));
        assert_eq!(call(Method::GET, "/1/apps//channels"), Err(Reason::BadTopic));
        assert_eq!(call(Method::GET, "/1/apps/a/b/channels"), Err(Reason::BadPath), "a bundle id has no slash");
    }

    #[test]
    fn create_bodies() {
        let parse = |body: &str| parse_create(body.as_bytes());
        assert_eq!(
            parse(r#"{"message-storage-policy": 1, "push-type": "LiveActivity"}"#),
            Ok((StoragePolicy::MostRecent, ChannelPushType::LiveActivity))
        );
        assert_eq!(
            parse(r#"{"message-storage-policy": 0, "push-type": "alert", "other": true}"#),
            Ok((StoragePolicy::NoStorage, ChannelPushType::Alert))
        );
        assert_eq!(parse(""), Err(Reason::BadRequestPayload));
        assert_eq!(parse("[1]"), Err(Reason::BadRequestPayload));
        assert_eq!(parse(r#"{"message-storage-policy": 0}"#), Err(Reason::MissingPushType));
        assert_eq!(parse(r#"{"message-storage-policy": 0, "push-type": "voip"}"#), Err(Reason::InvalidPushType));
        assert_eq!(parse(r#"{"message-storage-policy": 0, "push-type": 3}"#), Err(Reason::InvalidPushType));
        assert_eq!(parse(r#"{"push-type": "LiveActivity"}"#), Err(Reason::BadRequestParams));
        assert_eq!(
            parse(r#"{"message-storage-policy": 2, "push-type": "LiveActivity"}"#),
            Err(Reason::BadRequestParams)
        );
        assert_eq!(
            parse(r#"{"message-storage-policy": "1", "push-type": "liveactivity"}"#),
            Ok((StoragePolicy::MostRecent, ChannelPushType::LiveActivity)),
            "as node-apn sends it"
        );
        for bad in [r#""one""#, "-1", r#""11""#, "1.5"] {
            let body = format!(r#"{{"message-storage-policy": {bad}, "push-type": "LiveActivity"}}"#);
            assert_eq!(parse(&body), Err(Reason::BadRequestParams), "{bad}");
        }
    }

    #[test]
    fn channel_ids_and_request_ids() {
        let mut headers = HeaderMap::new();
        assert_eq!(channel_id(&headers), Err(Reason::MissingChannelId));
        headers.insert(CHANNEL_ID_HEADER, HeaderValue::from_static("not-an-id"));
        assert_eq!(channel_id(&headers), Err(Reason::BadChannelId));
        headers.insert(CHANNEL_ID_HEADER, HeaderValue::from_static("AAECAwQFBgcICQoLDA0ODw=="));
        assert_eq!(channel_id(&headers), Ok(ChannelId(std::array::from_fn(|i| i as u8))));
        headers.append(CHANNEL_ID_HEADER, HeaderValue::from_static("AAECAwQFBgcICQoLDA0ODw=="));
        assert_eq!(channel_id(&headers), Err(Reason::DuplicateHeaders));

        let (generated, ok) = request_id(&HeaderMap::new());
        assert!(apns::is_canonical_uuid(&generated) && ok.is_ok());
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("0C9A1B8E-4D56-4F0A-9E4E-1B2C3D4E5F60"));
        assert_eq!(request_id(&headers), ("0C9A1B8E-4D56-4F0A-9E4E-1B2C3D4E5F60".to_string(), Ok(())));
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("abc"));
        assert_eq!(request_id(&headers), ("abc".to_string(), Err(Reason::BadMessageId)));
    }
}
