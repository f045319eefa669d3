//! Fuzz targets for the code that reads bytes an untrusted peer chose: the device-link frame decoder, the
//! APNs request head parser, provider JWTs, device tokens, and Raft commands (their JSON, `validate` and
//! `apply`).
//!
//! Each target is a plain `fn(&[u8])` that must never panic on any input; it also asserts the properties
//! that make a decoder trustworthy (what decodes re-encodes, a forged token never opens, a refused command
//! changes nothing, the state stays within its limits). The same functions are driven two ways: by
//! `harness` (deterministic mutation of the checked-in seeds, used by `cargo test` and by the
//! `courier-fuzz` binary for long runs) and by the cargo-fuzz project in `libfuzzer/` (coverage-guided,
//! for long runs on demand). Nothing here is used by the services themselves.

pub mod harness;
mod raft;

use std::sync::OnceLock;

use base64::Engine as _;
use bytes::BytesMut;
use courier_core::ids::DeviceId;
use courier_core::pki::ProviderCredential;
use courier_core::token::{KeyState, Keyring, TokenKey, TokenKeyId};
use courier_device::codec::{DEFAULT_MAX_FRAME, FrameCodec, FrameError};
use courier_gateway::http::apns::{self, Reason};
use courier_gateway::http::jwt::{JwtVerifier, ProviderCredentials};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use jsonwebtoken::{Algorithm, EncodingKey};
use tokio_util::codec::{Decoder, Encoder};

pub use raft::raft_command;

/// A fuzz target: takes any bytes, panics only when a property it checks is broken.
pub type Target = fn(&[u8]);

/// Every target by name, as the harness, the binary and the seed directories know them.
pub const TARGETS: &[(&str, Target)] = &[
    ("device_frame", device_frame),
    ("apns_head", apns_head),
    ("jwt", jwt),
    ("token", token),
    ("raft_command", raft_command),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// The device-link decoder on a stream of bytes. The first byte chooses how the stream arrives (1–16
/// bytes at a time, so that prefixes and bodies are split anywhere), the frame limit (the default or a
/// tiny one) and which side's frames are decoded (a node decodes `DeviceFrame`, a device `ServerFrame`).
pub fn device_frame(data: &[u8]) {
    let Some((&control, stream)) = data.split_first() else { return };
    let chunk = usize::from(control & 0x0f) + 1;
    let max_frame = if control & 0x10 == 0 { DEFAULT_MAX_FRAME } else { 64 };
    if control & 0x20 == 0 {
        decode_stream::<courier_proto::device::DeviceFrame>(stream, chunk, max_frame);
    } else {
        decode_stream::<courier_proto::device::ServerFrame>(stream, chunk, max_frame);
    }
}

fn decode_stream<M: prost::Message + Default + PartialEq + Clone + std::fmt::Debug>(
    stream: &[u8],
    chunk: usize,
    max_frame: usize,
) {
    let mut codec = FrameCodec::<M>::new(max_frame);
    let mut buffer = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buffer.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(message)) => {
                    // Re-encoding may be longer than what arrived (a 5-byte varint int32 becomes 10 bytes),
                    // so only a re-encoding within the limit is decoded back.
                    let mut again = BytesMut::new();
                    match codec.encode(message.clone(), &mut again) {
                        Ok(()) => {
                            let back = codec.decode(&mut again).expect("a re-encoded frame decodes");
                            assert_eq!(back.as_ref(), Some(&message), "a frame must survive a round trip");
                            assert!(again.is_empty(), "one frame in, one frame out");
                        }
                        Err(FrameError::TooLarge { .. }) => {}
                        Err(other) => panic!("encoding a decoded frame failed: {other}"),
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    assert!(error.goodbye_reason().is_some(), "a decode error must carry a goodbye reason: {error}");
                    return;
                }
            }
        }
    }
}

/// The APNs request head parser. The input reads as a request: a method line, a path line, then
/// `name: value` header lines, then an empty line and the body. Lines that `http` itself would refuse are
/// skipped (the method and path fall back to a valid push), so the fuzzer spends its time in our parser.
pub fn apns_head(data: &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let mut lines = head.split(|b| *b == b'\n');
    let method = lines.next().and_then(|l| Method::from_bytes(l).ok()).unwrap_or(Method::POST);
    let uri = lines.next().and_then(|l| Uri::try_from(l).ok()).unwrap_or_else(|| Uri::from_static("/3/device/00"));
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let value = line[colon + 1..].strip_prefix(b" ").unwrap_or(&line[colon + 1..]);
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }
    let apns_id = apns::response_apns_id(&headers);
    match apns::parse_head(&method, &uri, &headers, &apns_id) {
        Ok(head) => {
            assert!(courier_core::topic::valid_topic(&head.topic), "accepted topic {:?}", head.topic);
            assert!(!head.device_token.is_empty());
            assert!(matches!(head.priority, 1 | 5 | 10), "priority {}", head.priority);
            assert!(apns::PUSH_TYPES.contains(&head.push_type.as_str()));
            assert!(head.collapse_id.as_ref().is_none_or(|c| c.len() <= apns::MAX_COLLAPSE_ID));
            assert!(head.apns_id.generated || apns::is_canonical_uuid(&head.apns_id.value));
            let limit = head.payload_limit();
            assert!(limit == apns::MAX_PAYLOAD || limit == apns::MAX_VOIP_PAYLOAD);
            if body.len() <= limit {
                match apns::check_payload(body) {
                    Ok(()) | Err(Reason::PayloadEmpty | Reason::InvalidPayload) => {}
                    Err(other) => panic!("payload check answered {other}"),
                }
            }
        }
        Err(reason) => {
            assert!(reason.status().is_client_error(), "a bad request is the client's error, not {reason}");
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
        }
    }
}

const JWT_TEAM: &str = "TEAM123456";
const JWT_KEY_ID: &str = "KEY1234567";
/// The UNIX time every JWT check runs at, so that results do not depend on the clock.
const JWT_NOW: i64 = 1_800_000_000;

struct JwtFixture {
    verifier: JwtVerifier,
    signing: EncodingKey,
}

fn jwt_fixture() -> &'static JwtFixture {
    static FIXTURE: OnceLock<JwtFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let credential = ProviderCredential {
            team_id: JWT_TEAM.into(),
            key_id: JWT_KEY_ID.into(),
            public_key_pem: key.public_key_pem(),
            topics: vec![],
        };
        let credentials = ProviderCredentials::new(vec![credential]).expect("a fresh P-256 key loads");
        JwtFixture {
            verifier: JwtVerifier::new(credentials, 3600),
            signing: EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("PKCS#8 P-256 key"),
        }
    })
}

/// Provider JWT checking, twice per input: the input as the whole `authorization` header, and the input
/// as the token's header and claims (split at the first NUL byte), properly signed with the provider's
/// key, so that claim parsing behind a valid signature is reached too.
pub fn jwt(data: &[u8]) {
    let fixture = jwt_fixture();
    let header = String::from_utf8_lossy(data);
    check_authentication(fixture, &header);

    let (protected, claims) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&br#"{"alg":"ES256","kid":"KEY1234567"}"#[..], data),
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let message = format!("{}.{}", b64.encode(protected), b64.encode(claims));
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &fixture.signing, Algorithm::ES256).expect("ES256 signing");
    check_authentication(fixture, &format!("Bearer {message}.{signature}"));
}

fn check_authentication(fixture: &JwtFixture, header: &str) {
    match fixture.verifier.authenticate(Some(header), JWT_NOW) {
        Ok(provider) => {
            assert_eq!(&*provider.team_id, JWT_TEAM);
            let token = header.trim().split_once(' ').map(|(_, t)| t.trim_start()).expect("a bearer token");
            let decoded = jsonwebtoken::decode_header(token).expect("an accepted token has a header");
            assert_eq!(decoded.alg, Algorithm::ES256);
            assert_eq!(decoded.kid.as_deref(), Some(JWT_KEY_ID));
        }
        Err(Reason::InvalidProviderToken | Reason::ExpiredProviderToken) => {}
        Err(other) => panic!("authentication answered {other}"),
    }
}

struct TokenFixture {
    keyring: Keyring,
    /// Minting keys by state: retired, accepting, active.
    keys: [(TokenKey, KeyState); 3],
}

fn token_fixture() -> &'static TokenFixture {
    static FIXTURE: OnceLock<TokenFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let keys = [
            (TokenKey::from_secret(TokenKeyId(1), [0x11; 32]), KeyState::Retired),
            (TokenKey::from_secret(TokenKeyId(2), [0x22; 32]), KeyState::Accepting),
            (TokenKey::from_secret(TokenKeyId(3), [0x33; 32]), KeyState::Active),
        ];
        let keyring = Keyring::with_active(keys[2].0.clone());
        keyring.replace_with_states(keys.iter().cloned());
        TokenFixture { keyring, keys }
    })
}

/// Device-token opening. The input is tried as token text and, hex-encoded, as token bytes (so that every
/// length and key id reaches the cipher); with 18 bytes or more it also chooses a key, device and topic
/// for a real token, which must open to exactly those, and one altered digit of it, which must not open.
pub fn token(data: &[u8]) {
    let fixture = token_fixture();
    if let Ok(text) = std::str::from_utf8(data) {
        check_open(fixture, text);
    }
    check_open(fixture, &hex::encode(data));

    if data.len() < 18 {
        return;
    }
    let (key, state) = &fixture.keys[usize::from(data[0]) % fixture.keys.len()];
    let device = DeviceId::from_slice(&data[2..18]).expect("16 bytes");
    let topic = String::from_utf8_lossy(&data[18..]);
    let minted = key.mint(device, &topic);
    let (opened, opened_state) = fixture.keyring.open_any(&minted).expect("a minted token opens");
    assert_eq!((opened.key_id, opened.device_id, opened_state), (key.id, device, *state));
    assert!(opened.is_for_topic(&topic));
    assert_eq!(fixture.keyring.open(&minted).is_ok(), *state != KeyState::Retired);

    let mut altered = minted.into_bytes();
    let at = usize::from(data[1]) % altered.len();
    let digit = char::from(altered[at]).to_digit(16).expect("tokens are hex");
    // An offset of 1 to 15 always gives a different digit.
    altered[at] = b"0123456789abcdef"[((digit + 1 + u32::from(data[1] >> 4) % 15) % 16) as usize];
    let altered = String::from_utf8(altered).expect("hex is ASCII");
    assert!(fixture.keyring.open_any(&altered).is_err(), "an altered token opened: {altered}");
}

fn check_open(fixture: &TokenFixture, text: &str) {
    let any = fixture.keyring.open_any(text);
    let strict = fixture.keyring.open(text);
    match (&any, &strict) {
        (Ok((opened, KeyState::Retired)), Err(_)) | (Ok((opened, _)), Ok(_)) => {
            let (_, state) = fixture.keys.iter().find(|(k, _)| k.id == opened.key_id).expect("a known key");
            assert_eq!(any.as_ref().map(|(_, s)| *s).ok(), Some(*state));
        }
        (Err(_), Err(_)) => {}
        _ => panic!("open and open_any disagree on {text:?}: {any:?} / {strict:?}"),
    }
}
