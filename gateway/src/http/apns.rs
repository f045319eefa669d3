//! The APNs provider wire format: turning a raw HTTP/2 request into a typed `PushRequest`, and the
//! reasons a request can be refused.
//!
//! This is the only code that looks at request bytes (path, header values, body). Everything above it
//! works with `PushHead` and a payload that is already known to be a bounded JSON object. It does not
//! authenticate the provider (see `jwt`) or open device tokens (the keyring does); it only extracts the
//! strings those need.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode, Uri};
use http_body_util::BodyExt;

/// Where pushes are addressed; the device token follows.
pub const DEVICE_PATH_PREFIX: &str = "/3/device/";
/// Where delivery status is asked for (Courier extension): `/v1/status/{token}/{apns-id}`.
pub const STATUS_PATH_PREFIX: &str = "/v1/status/";
/// Every `apns-push-type` APNs defines today.
pub const PUSH_TYPES: &[&str] = &[
    "alert",
    "background",
    "controls",
    "location",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "liveactivity",
    "pushtotalk",
    "widgets",
];
/// Largest payload APNs accepts for ordinary pushes.
pub const MAX_PAYLOAD: usize = 4096;
/// Largest payload for VoIP pushes (topics ending in `.voip`).
pub const MAX_VOIP_PAYLOAD: usize = 5120;
/// How long an absent `apns-expiration` keeps a notification: 30 days, as APNs does.
pub const DEFAULT_STORAGE_SECS: u64 = 30 * 86400;
/// Longest `apns-collapse-id` in bytes.
pub const MAX_COLLAPSE_ID: usize = 64;

/// Why a request was refused, spelled as APNs spells it in the `reason` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    BadCollapseId,
    BadDeviceToken,
    BadExpirationDate,
    BadMessageId,
    BadPriority,
    BadTopic,
    /// 403: the provider's client certificate comes from the provider CA but names no team or topic.
    BadCertificate,
    DeviceTokenNotForTopic,
    DuplicateHeaders,
    IdleTimeout,
    InvalidPushType,
    MissingDeviceToken,
    MissingTopic,
    PayloadEmpty,
    TopicDisallowed,
    ExpiredProviderToken,
    /// 403: an authenticated provider asked for something it may not see (another team's topic's status).
    Forbidden,
    InvalidProviderToken,
    MissingProviderToken,
    BadPath,
    MethodNotAllowed,
    PayloadTooLarge,
    /// 410: the token was minted under a token key that has since retired; the device has a newer one.
    ExpiredToken,
    /// 410: the device unregistered the token's app; the body carries when.
    Unregistered,
    /// 410, Courier extension: the device's certificate is a suspected clone the cluster refuses (until an
    /// operator clears or revokes it); the body carries since when.
    ClonedIdentity,
    /// 429: a new provider JWT sooner than the configured refresh interval after the previous one.
    TooManyProviderTokenUpdates,
    /// 429: too many pushes to one device token, or from one team, in a short time.
    TooManyRequests,
    InternalServerError,
    ServiceUnavailable,
    /// 503: the gateway is shutting down; connect to another one.
    Shutdown,
    /// 404, Courier extension (status API): no record of that apns-id for that device token.
    UnknownNotification,
    /// Courier extension, not an APNs reason: the body is not a JSON object. APNs itself answers such
    /// payloads inconsistently; Courier refuses them up front so that devices only ever see JSON objects.
    InvalidPayload,
    /// Channels: a read, delete or broadcast without `apns-channel-id`.
    MissingChannelId,
    /// Channels: an `apns-channel-id` that is not an id this cluster gives out.
    BadChannelId,
    /// Channels: no such channel for this team and app (never created, or deleted).
    ChannelNotRegistered,
    /// Channels: a create body whose `message-storage-policy` is missing or not 0 or 1.
    BadRequestParams,
    /// Channels: a create body that is not a JSON object.
    BadRequestPayload,
    /// Channels: a create body without `push-type`.
    MissingPushType,
    /// Channels: the team has as many channels for the app as the cluster allows.
    CannotCreateChannelConfig,
    /// 403, channels: the app in the path is not one the provider may use.
    TopicMismatch,
    /// Channels: the provider's team may not use broadcast channels (`courier ctl providers broadcast`).
    FeatureNotEnabled,
}

/// A device token that does not open: 410 `ExpiredToken` when its key was retired (the device has a newer
/// token by now), else 400 `BadDeviceToken`.
impl From<courier_core::token::TokenError> for Reason {
    fn from(error: courier_core::token::TokenError) -> Self {
        match error {
            courier_core::token::TokenError::Retired(_) => Reason::ExpiredToken,
            _ => Reason::BadDeviceToken,
        }
    }
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadCollapseId => "BadCollapseId",
            Reason::BadDeviceToken => "BadDeviceToken",
            Reason::BadExpirationDate => "BadExpirationDate",
            Reason::BadMessageId => "BadMessageId",
            Reason::BadPriority => "BadPriority",
            Reason::BadTopic => "BadTopic",
            Reason::BadCertificate => "BadCertificate",
            Reason::Forbidden => "Forbidden",
            Reason::Unregistered => "Unregistered",
            Reason::ClonedIdentity => "ClonedIdentity",
            Reason::TooManyProviderTokenUpdates => "TooManyProviderTokenUpdates",
            Reason::TooManyRequests => "TooManyRequests",
            Reason::Shutdown => "Shutdown",
            Reason::UnknownNotification => "UnknownNotification",
            Reason::DeviceTokenNotForTopic => "DeviceTokenNotForTopic",
            Reason::DuplicateHeaders => "DuplicateHeaders",
            Reason::IdleTimeout => "IdleTimeout",
            Reason::InvalidPushType => "InvalidPushType",
            Reason::MissingDeviceToken => "MissingDeviceToken",
            Reason::MissingTopic => "MissingTopic",
            Reason::PayloadEmpty => "PayloadEmpty",
            Reason::TopicDisallowed => "TopicDisallowed",
            Reason::ExpiredProviderToken => "ExpiredProviderToken",
            Reason::InvalidProviderToken => "InvalidProviderToken",
            Reason::MissingProviderToken => "MissingProviderToken",
            Reason::BadPath => "BadPath",
            Reason::MethodNotAllowed => "MethodNotAllowed",
            Reason::PayloadTooLarge => "PayloadTooLarge",
            Reason::ExpiredToken => "ExpiredToken",
            Reason::InternalServerError => "InternalServerError",
            Reason::ServiceUnavailable => "ServiceUnavailable",
            Reason::InvalidPayload => "InvalidPayload",
            Reason::MissingChannelId => "MissingChannelId",
            Reason::BadChannelId => "BadChannelId",
            Reason::ChannelNotRegistered => "ChannelNotRegistered",
            Reason::BadRequestParams => "BadRequestParams",
            Reason::BadRequestPayload => "BadRequestPayload",
            Reason::MissingPushType => "MissingPushType",
            Reason::CannotCreateChannelConfig => "CannotCreateChannelConfig",
            Reason::TopicMismatch => "TopicMismatch",
            Reason::FeatureNotEnabled => "FeatureNotEnabled",
        }
    }

    /// The HTTP status APNs pairs with this reason.
    pub fn status(self) -> StatusCode {
        match self {
            Reason::ExpiredProviderToken
            | Reason::InvalidProviderToken
            | Reason::MissingProviderToken
            | Reason::BadCertificate
            | Reason::Forbidden
            | Reason::TopicMismatch => StatusCode::FORBIDDEN,
            Reason::BadPath | Reason::UnknownNotification => StatusCode::NOT_FOUND,
            Reason::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reason::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::ExpiredToken | Reason::Unregistered | Reason::ClonedIdentity => StatusCode::GONE,
            Reason::TooManyProviderTokenUpdates | Reason::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Reason::InternalServerError => StatusCode::INTERNAL_SERVER_ERROR,
            Reason::ServiceUnavailable | Reason::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl Reason {
    /// Every reason, for documentation checks.
    pub const ALL: &'static [Reason] = &[
        Reason::BadCollapseId,
        Reason::BadDeviceToken,
        Reason::BadExpirationDate,
        Reason::BadMessageId,
        Reason::BadPriority,
        Reason::BadTopic,
        Reason::BadCertificate,
        Reason::DeviceTokenNotForTopic,
        Reason::DuplicateHeaders,
        Reason::IdleTimeout,
        Reason::InvalidPushType,
        Reason::MissingDeviceToken,
        Reason::MissingTopic,
        Reason::PayloadEmpty,
        Reason::TopicDisallowed,
        Reason::ExpiredProviderToken,
        Reason::Forbidden,
        Reason::InvalidProviderToken,
        Reason::MissingProviderToken,
        Reason::BadPath,
        Reason::MethodNotAllowed,
        Reason::PayloadTooLarge,
        Reason::ExpiredToken,
        Reason::Unregistered,
        Reason::ClonedIdentity,
        Reason::TooManyProviderTokenUpdates,
        Reason::TooManyRequests,
        Reason::InternalServerError,
        Reason::ServiceUnavailable,
        Reason::Shutdown,
        Reason::UnknownNotification,
        Reason::InvalidPayload,
        Reason::MissingChannelId,
        Reason::BadChannelId,
        Reason::ChannelNotRegistered,
        Reason::BadRequestParams,
        Reason::BadRequestPayload,
        Reason::MissingPushType,
        Reason::CannotCreateChannelConfig,
        Reason::TopicMismatch,
        Reason::FeatureNotEnabled,
    ];

    /// The reason a node's answer names, if it is one of ours.
    pub fn parse(text: &str) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| r.as_str() == text)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Headers that APNs refuses to see twice.
const SINGLE_VALUED: &[&str] = &[
    "authorization",
    "apns-id",
    "apns-topic",
    "apns-expiration",
    "apns-priority",
    "apns-collapse-id",
    "apns-push-type",
];

/// Everything about a push except its payload, validated but not yet authenticated or routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushHead {
    /// The hex device token from the path, not yet opened.
    pub device_token: String,
    /// The `authorization` header value, if any; `jwt` decides what it means.
    pub authorization: Option<String>,
    pub topic: String,
    pub apns_id: ApnsId,
    /// UNIX seconds; 0 = only if the device is connected now.
    pub expiration: u64,
    pub priority: u32,
    pub collapse_id: Option<String>,
    pub push_type: String,
}

impl PushHead {
    /// The payload cap for this push's topic.
    pub fn payload_limit(&self) -> usize {
        if self.topic.ends_with(".voip") || self.push_type == "voip" { MAX_VOIP_PAYLOAD } else { MAX_PAYLOAD }
    }
}

/// The `apns-id` a response must carry: the provider's own value, byte for byte, or one we generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApnsId {
    pub value: String,
    pub generated: bool,
}

impl ApnsId {
    fn generate() -> Self {
        ApnsId { value: uuid::Uuid::new_v4().hyphenated().to_string(), generated: true }
    }
}

/// Chooses the `apns-id` to echo on a response to this request, before anything else is validated, so
/// that even refusals carry it. A value that is not text is replaced by a generated one.
pub fn response_apns_id(headers: &HeaderMap) -> ApnsId {
    match headers.get("apns-id").map(|v| v.to_str()) {
        Some(Ok(value)) => ApnsId { value: value.to_string(), generated: false },
        _ => ApnsId::generate(),
    }
}

/// True for the canonical 8-4-4-4-12 hexadecimal UUID form (either case), the only one APNs accepts.
pub fn is_canonical_uuid(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn text<'a>(headers: &'a HeaderMap, name: &str, bad: Reason) -> Result<Option<&'a str>, Reason> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value.to_str().map(Some).map_err(|_| bad),
    }
}

/// Validates path, method and headers. `apns_id` is the value chosen by `response_apns_id`.
pub fn parse_head(method: &Method, uri: &Uri, headers: &HeaderMap, apns_id: &ApnsId) -> Result<PushHead, Reason> {
    let device_token = uri.path().strip_prefix(DEVICE_PATH_PREFIX).ok_or(Reason::BadPath)?;
    if method != Method::POST {
        return Err(Reason::MethodNotAllowed);
    }
    if device_token.is_empty() {
        return Err(Reason::MissingDeviceToken);
    }
    if SINGLE_VALUED.iter().any(|name| headers.get_all(*name).iter().nth(1).is_some()) {
        return Err(Reason::DuplicateHeaders);
    }
    // A non-text authorization value is as good as a wrong one; `jwt` will refuse the empty string.
    let authorization = headers.get(http::header::AUTHORIZATION).map(|v| v.to_str().unwrap_or("").to_string());

    let topic = match text(headers, "apns-topic", Reason::BadTopic)? {
        None => return Err(Reason::MissingTopic),
        Some("") => return Err(Reason::MissingTopic),
        Some(topic) if !courier_core::topic::valid_topic(topic) => return Err(Reason::BadTopic),
        Some(topic) => topic.to_string(),
    };
    if !apns_id.generated && !is_canonical_uuid(&apns_id.value) {
        return Err(Reason::BadMessageId);
    }
    if headers.contains_key("apns-id") && apns_id.generated {
        // The provider sent an apns-id that is not even text.
        return Err(Reason::BadMessageId);
    }
    let expiration = match text(headers, "apns-expiration", Reason::BadExpirationDate)? {
        None => courier_core::ids::unix_millis() / 1000 + DEFAULT_STORAGE_SECS,
        Some(value) => parse_decimal(value).ok_or(Reason::BadExpirationDate)?,
    };
    let push_type = match text(headers, "apns-push-type", Reason::InvalidPushType)? {
        // APNs still accepts pushes without it; the channel suffix (if any) says what they are.
        None => courier_core::topic::channel(&topic).map_or("alert", |(_, required)| required).to_string(),
        Some(value) if PUSH_TYPES.contains(&value) => value.to_string(),
        Some(_) => return Err(Reason::InvalidPushType),
    };
    // A channel suffix and its push type go together, both ways.
    let required = courier_core::topic::channel(&topic).map(|(_, push_type)| push_type);
    let needs_suffix = courier_core::topic::CHANNEL_SUFFIXES.iter().any(|(_, t)| *t == push_type);
    if required.is_some_and(|t| t != push_type) || (required.is_none() && needs_suffix) {
        return Err(Reason::BadTopic);
    }
    let background = push_type == "background";
    let priority = match text(headers, "apns-priority", Reason::BadPriority)? {
        // Background pushes may only use 5, so that is their default.
        None if background => 5,
        None => 10,
        Some("10") => 10,
        Some("5") => 5,
        Some("1") => 1,
        Some(_) => return Err(Reason::BadPriority),
    };
    if background && priority != 5 {
        return Err(Reason::BadPriority);
    }
    let collapse_id = match headers.get("apns-collapse-id") {
        None => None,
        Some(value) if value.len() > MAX_COLLAPSE_ID => return Err(Reason::BadCollapseId),
        Some(value) => Some(value.to_str().map_err(|_| Reason::BadCollapseId)?.to_string()),
    };
    Ok(PushHead {
        device_token: device_token.to_string(),
        authorization,
        topic,
        apns_id: apns_id.clone(),
        expiration,
        priority,
        collapse_id,
        push_type,
    })
}

/// Plain decimal digits only: `u64::from_str` would also take a leading `+`.
fn parse_decimal(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Reads a request body into memory, refusing it as soon as it exceeds `limit` bytes so that no
/// request can make the gateway buffer more than that.
pub async fn read_payload<B>(headers: &HeaderMap, body: B, limit: usize) -> Result<Bytes, Reason>
where
    B: hyper::body::Body<Data = Bytes>,
{
    consume(headers, body, limit, true).await
}

/// Reads a refused request's body to its end without keeping it, stopping with `PayloadTooLarge` past
/// `limit` bytes. An HTTP/2 server that answers before the request body has ended must reset the stream
/// (hyper/h2 send RST_STREAM after the response), and many clients then report the stream as failed
/// instead of showing the answer; reading the body first lets the answer end the stream normally.
pub async fn drain_payload<B>(headers: &HeaderMap, body: B, limit: usize) -> Result<(), Reason>
where
    B: hyper::body::Body<Data = Bytes>,
{
    consume(headers, body, limit, false).await.map(|_| ())
}

/// Reads a body to its end, at most `limit` bytes of it, keeping them only when `keep` is set.
async fn consume<B>(headers: &HeaderMap, body: B, limit: usize, keep: bool) -> Result<Bytes, Reason>
where
    B: hyper::body::Body<Data = Bytes>,
{
    let declared =
        headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(Reason::PayloadTooLarge);
    }
    let mut body = std::pin::pin!(body);
    let mut payload = BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        // A body the client aborted mid-way is treated like one that never finished arriving.
        let frame = frame.map_err(|_| Reason::IdleTimeout)?;
        if let Ok(data) = frame.into_data() {
            seen = seen.saturating_add(data.len());
            if seen > limit {
                return Err(Reason::PayloadTooLarge);
            }
            if keep {
                payload.extend_from_slice(&data);
            }
        }
    }
    Ok(payload.freeze())
}

/// Checks that a payload (already within its size limit) is a non-empty JSON object.
pub fn check_payload(payload: &[u8]) -> Result<(), Reason> {
    if payload.is_empty() {
        return Err(Reason::PayloadEmpty);
    }
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(payload)
        .map(|_| ())
        .map_err(|_| Reason::InvalidPayload)
}

/// The JSON body of an error response: `{"reason":"…"}`, plus `timestamp` for 410 answers.
pub fn error_body(reason: &str, timestamp_ms: Option<u64>) -> Vec<u8> {
    let mut body = serde_json::Map::new();
    body.insert("reason".into(), reason.into());
    if let Some(ts) = timestamp_ms {
        body.insert("timestamp".into(), ts.into());
    }
    serde_json::Value::Object(body).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::{Full, StreamBody};

    const TOKEN: &str = "00000001aabbccddeeff00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff0011";

    fn uri(path: &str) -> Uri {
        path.parse().unwrap()
    }

    fn base_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("bearer x.y.z"));
        headers.insert("apns-topic", HeaderValue::from_static("com.example.app"));
        headers
    }

    fn parse(method: Method, path: &str, headers: &HeaderMap) -> Result<PushHead, Reason> {
        let id = response_apns_id(headers);
        parse_head(&method, &uri(path), headers, &id)
    }

    fn with(name: &'static str, value: &'static [u8]) -> HeaderMap {
        let mut headers = base_headers();
        headers.insert(name, HeaderValue::from_bytes(value).unwrap());
        headers
    }

    fn post(headers: &HeaderMap) -> Result<PushHead, Reason> {
        parse(Method::POST, &format!("/3/device/{TOKEN}"), headers)
    }

    #[test]
    fn a_minimal_request_gets_apns_defaults() {
        let head = post(&base_headers()).unwrap();
        assert_eq!(head.device_token, TOKEN);
        assert_eq!(head.topic, "com.example.app");
        assert_eq!(head.priority, 10);
        assert_eq!(head.push_type, "alert");
        assert_eq!(head.collapse_id, None);
        assert!(head.apns_id.generated);
        assert!(is_canonical_uuid(&head.apns_id.value));
        assert_eq!(head.apns_id.value, head.apns_id.value.to_lowercase());
        let now = courier_core::ids::unix_millis() / 1000;
        assert!(head.expiration >= now + DEFAULT_STORAGE_SECS - 5 && head.expiration <= now + DEFAULT_STORAGE_SECS + 5);
        assert_eq!(head.authorization.as_deref(), Some("bearer x.y.z"));
        assert_eq!(head.payload_limit(), MAX_PAYLOAD);
    }

    #[test]
    fn every_header_is_carried_through() {
        let mut headers = base_headers();
        headers.insert("apns-topic", HeaderValue::from_static("com.example.app.voip"));
        headers.insert("apns-id", HeaderValue::from_static("123E4567-e89b-12d3-a456-426614174000"));
        headers.insert("apns-expiration", HeaderValue::from_static("0"));
        headers.insert("apns-priority", HeaderValue::from_static("5"));
        headers.insert("apns-collapse-id", HeaderValue::from_bytes(&[b'c'; 64]).unwrap());
        headers.insert("apns-push-type", HeaderValue::from_static("voip"));
        let head = post(&headers).unwrap();
        assert_eq!(head.apns_id.value, "123E4567-e89b-12d3-a456-426614174000");
        assert!(!head.apns_id.generated);
        assert_eq!(head.expiration, 0);
        assert_eq!(head.priority, 5);
        assert_eq!(head.collapse_id.as_deref(), Some("c".repeat(64).as_str()));
        assert_eq!(head.push_type, "voip");
        assert_eq!(head.payload_limit(), MAX_VOIP_PAYLOAD);
        assert_eq!(post(&with("apns-priority", b"1")).unwrap().priority, 1);
    }

    #[test]
    fn paths_and_methods() {
        let headers = base_headers();
        assert_eq!(parse(Method::POST, "/", &headers), Err(Reason::BadPath));
        assert_eq!(parse(Method::POST, "/3/device", &headers), Err(Reason::BadPath));
        assert_eq!(parse(Method::POST, "/3/devices/abc", &headers), Err(Reason::BadPath));
        assert_eq!(parse(Method::POST, "/2/device/abc", &headers), Err(Reason::BadPath));
        assert_eq!(parse(Method::GET, &format!("/3/device/{TOKEN}"), &headers), Err(Reason::MethodNotAllowed));
        assert_eq!(parse(Method::PUT, "/3/device/", &headers), Err(Reason::MethodNotAllowed));
        assert_eq!(parse(Method::POST, "/3/device/", &headers), Err(Reason::MissingDeviceToken));
        // The token is not judged here; the keyring refuses it later.
        assert_eq!(parse(Method::POST, "/3/device/not/hex", &headers).unwrap().device_token, "not/hex");
    }

    #[test]
    fn missing_and_bad_topics() {
        let mut headers = base_headers();
        headers.remove("apns-topic");
        assert_eq!(post(&headers), Err(Reason::MissingTopic));
        assert_eq!(post(&with("apns-topic", b"")), Err(Reason::MissingTopic));
        assert_eq!(post(&with("apns-topic", b"com.\xffexample")), Err(Reason::BadTopic));
    }

    #[test]
    fn message_ids() {
        for bad in [
            &b"123e4567e89b12d3a456426614174000"[..],
            b"123e4567-e89b-12d3-a456-42661417400",
            b"123e4567-e89b-12d3-a456-4266141740000",
            b"123e4567-e89b-12d3-a456_426614174000",
            b"{123e4567-e89b-12d3-a456-426614174000}",
            b"123e4567-e89b-12d3-a456-42661417400g",
            b"",
            b"\xff23e4567-e89b-12d3-a456-426614174000",
        ] {
            assert_eq!(post(&with("apns-id", bad)), Err(Reason::BadMessageId), "{bad:?}");
        }
    }

    #[test]
    fn the_echoed_apns_id_is_the_providers_bytes() {
        let headers = with("apns-id", b"not-a-uuid");
        assert_eq!(response_apns_id(&headers).value, "not-a-uuid");
        let headers = with("apns-id", b"\xff");
        assert!(response_apns_id(&headers).generated);
    }

    #[test]
    fn expirations() {
        for bad in [&b"-1"[..], b"+5", b"1.5", b"soon", b"", b"18446744073709551616", b" 5"] {
            assert_eq!(post(&with("apns-expiration", bad)), Err(Reason::BadExpirationDate), "{bad:?}");
        }
        assert_eq!(post(&with("apns-expiration", b"18446744073709551615")).unwrap().expiration, u64::MAX);
    }

    #[test]
    fn priorities() {
        for bad in [&b"0"[..], b"2", b"11", b"010", b"high", b"", b"5 "] {
            assert_eq!(post(&with("apns-priority", bad)), Err(Reason::BadPriority), "{bad:?}");
        }
    }

    #[test]
    fn collapse_ids() {
        assert_eq!(post(&with("apns-collapse-id", &[b'x'; 65])), Err(Reason::BadCollapseId));
        assert_eq!(post(&with("apns-collapse-id", b"caf\xc3\xa9")), Err(Reason::BadCollapseId));
    }

    #[test]
    fn push_types() {
        assert_eq!(post(&with("apns-push-type", b"")), Err(Reason::InvalidPushType));
        assert_eq!(post(&with("apns-push-type", b"other")), Err(Reason::InvalidPushType));
        let background = post(&with("apns-push-type", b"background")).unwrap();
        assert_eq!((background.push_type.as_str(), background.priority), ("background", 5));
        for push_type in ["alert", "background", "location", "mdm", "pushtotalk", "widgets", "controls"] {
            let mut headers = with("apns-priority", b"5");
            headers.insert("apns-push-type", HeaderValue::from_str(push_type).unwrap());
            let topic = match courier_core::topic::CHANNEL_SUFFIXES.iter().find(|(_, t)| *t == push_type) {
                Some((suffix, _)) => format!("com.example.app{suffix}"),
                None => "com.example.app".into(),
            };
            headers.insert("apns-topic", HeaderValue::from_str(&topic).unwrap());
            assert_eq!(post(&headers).unwrap().push_type, push_type);
        }
        // Background pushes must use priority 5.
        for priority in [&b"10"[..], b"1"] {
            let mut headers = with("apns-push-type", b"background");
            headers.insert("apns-priority", HeaderValue::from_bytes(priority).unwrap());
            assert_eq!(post(&headers), Err(Reason::BadPriority));
        }
    }

    #[test]
    fn channel_suffixes_and_push_types_go_together() {
        for (topic, push_type) in [
            ("com.example.app.voip", "voip"),
            ("com.example.app.complication", "complication"),
            ("com.example.app.pushkit.fileprovider", "fileprovider"),
            ("com.example.app.push-type.liveactivity", "liveactivity"),
        ] {
            let mut headers = base_headers();
            headers.insert("apns-topic", HeaderValue::from_static(topic));
            // Without apns-push-type, the suffix says what the push is.
            assert_eq!(post(&headers).unwrap().push_type, push_type, "{topic}");
            headers.insert("apns-push-type", HeaderValue::from_static("alert"));
            assert_eq!(post(&headers), Err(Reason::BadTopic), "{topic} as alert");
            let mut plain = with("apns-push-type", b"alert");
            plain.insert("apns-push-type", HeaderValue::from_static(push_type));
            assert_eq!(post(&plain), Err(Reason::BadTopic), "{push_type} without its suffix");
        }
        assert_eq!(post(&with("apns-topic", b"com.example app")), Err(Reason::BadTopic));
        assert_eq!(post(&with("apns-topic", &[b'a'; 256])), Err(Reason::BadTopic));
    }

    #[test]
    fn repeated_headers() {
        for name in SINGLE_VALUED {
            let mut headers = base_headers();
            headers.append(*name, HeaderValue::from_static("10"));
            headers.append(*name, HeaderValue::from_static("10"));
            assert_eq!(post(&headers), Err(Reason::DuplicateHeaders), "{name}");
        }
    }

    #[test]
    fn payload_contents() {
        assert_eq!(check_payload(b""), Err(Reason::PayloadEmpty));
        assert_eq!(check_payload(br#"{"aps":{"alert":"hi"}}"#), Ok(()));
        for bad in [&b"[]"[..], b"\"text\"", b"42", b"null", b"{", b"{\"a\":1}x", b"\xff\xfe", b" "] {
            assert_eq!(check_payload(bad), Err(Reason::InvalidPayload), "{bad:?}");
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(check_payload(deep.as_bytes()), Err(Reason::InvalidPayload));
    }

    #[tokio::test]
    async fn payload_reading_is_capped() {
        let headers = HeaderMap::new();
        let ok = read_payload(&headers, Full::new(Bytes::from(vec![b' '; MAX_PAYLOAD])), MAX_PAYLOAD).await;
        assert_eq!(ok.unwrap().len(), MAX_PAYLOAD);
        let big = read_payload(&headers, Full::new(Bytes::from(vec![b' '; MAX_PAYLOAD + 1])), MAX_PAYLOAD).await;
        assert_eq!(big, Err(Reason::PayloadTooLarge));

        // Many small frames add up, and reading stops at the cap rather than at the end.
        let endless = futures_util::stream::repeat_with(|| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(b"0123456789")))
        });
        let result = read_payload(&headers, StreamBody::new(endless), MAX_PAYLOAD).await;
        assert_eq!(result, Err(Reason::PayloadTooLarge));

        let mut declared = HeaderMap::new();
        declared.insert("content-length", HeaderValue::from_static("1000000"));
        let result = read_payload(&declared, Full::new(Bytes::from_static(b"{}")), MAX_PAYLOAD).await;
        assert_eq!(result, Err(Reason::PayloadTooLarge));
    }

    #[tokio::test]
    async fn draining_reads_to_the_end_and_stops_at_the_cap() {
        let headers = HeaderMap::new();
        let full = drain_payload(&headers, Full::new(Bytes::from(vec![b' '; MAX_PAYLOAD])), MAX_PAYLOAD).await;
        assert_eq!(full, Ok(()));
        let endless = futures_util::stream::repeat_with(|| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(b"0123456789")))
        });
        let result = drain_payload(&headers, StreamBody::new(endless), MAX_PAYLOAD).await;
        assert_eq!(result, Err(Reason::PayloadTooLarge));
    }

    #[test]
    fn reasons_map_to_apns_statuses() {
        assert_eq!(Reason::MissingProviderToken.status(), StatusCode::FORBIDDEN);
        assert_eq!(Reason::ExpiredProviderToken.status(), StatusCode::FORBIDDEN);
        assert_eq!(Reason::BadPath.status(), StatusCode::NOT_FOUND);
        assert_eq!(Reason::MethodNotAllowed.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(Reason::PayloadTooLarge.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(Reason::ServiceUnavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(Reason::TopicDisallowed.status(), StatusCode::BAD_REQUEST);
        assert_eq!(Reason::Unregistered.status(), StatusCode::GONE);
        assert_eq!(Reason::ClonedIdentity.status(), StatusCode::GONE);
        assert_eq!(Reason::TooManyRequests.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(Reason::TooManyProviderTokenUpdates.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(Reason::Shutdown.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(Reason::BadCertificate.status(), StatusCode::FORBIDDEN);
        for reason in Reason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), Some(*reason));
        }
        assert_eq!(error_body("BadPath", None), br#"{"reason":"BadPath"}"#);
        assert_eq!(error_body("Unregistered", Some(5)), br#"{"reason":"Unregistered","timestamp":5}"#);
    }
}
