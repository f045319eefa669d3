//! Provider authentication: checking the ES256 JWT in a push's `authorization` header.
//!
//! APNs provider tokens carry `kid` (which signing key) in the header and `iss` (team id) and `iat` (when
//! it was made) in the claims, and no `exp`: a token is good for an hour after `iat`. Providers are told to
//! reuse one token for many pushes, so a verified token string is remembered and its signature is not
//! checked again; its age still is, on every push. The set of credentials is replaceable at run time (it
//! is the Raft state's provider teams, `ctl providers add/remove`, the first seeded at bootstrap from the
//! PKI directory), and replacing it forgets every remembered token.
//!
//! APNs answers 429 `TooManyProviderTokenUpdates` to a team that switches to a new token more often than
//! every 20 minutes. Courier can do the same (`min_refresh_secs`, per key id, checked only after the new
//! token's signature verified), but does not by default: many real deployments run several app servers
//! that each sign their own tokens, and refusing them buys a self-hosted service nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use courier_core::pki::ProviderCredential;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::apns::Reason;

/// Longest token we will try to parse; real ones are around 200 bytes.
const MAX_JWT_LEN: usize = 2048;
/// How far in the future an `iat` may lie, to forgive provider clock skew.
const MAX_CLOCK_SKEW_SECS: i64 = 300;
/// Verified tokens remembered at once. Each provider normally holds a handful, so this only overflows
/// when something is wrong, and then clearing the whole cache is good enough.
const CACHE_CAPACITY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("provider key {key_id} has an unusable public key: {source}")]
    BadPublicKey { key_id: String, source: jsonwebtoken::errors::Error },
}

/// A provider the gateway has authenticated: who it is and where it may push.
#[derive(Debug, Clone)]
pub struct AuthorizedProvider {
    pub team_id: Arc<str>,
    /// Topics this team may push to; empty means any.
    topics: Arc<[String]>,
}

impl AuthorizedProvider {
    /// Whether the provider may push to `topic`; its channels (`.voip`, …) go with the app's topic.
    pub fn may_push_to(&self, topic: &str) -> bool {
        let app = courier_core::topic::app_topic(topic);
        self.topics.is_empty() || self.topics.iter().any(|t| t == topic || t == app)
    }

    /// The provider a verified client certificate from the provider CA speaks for.
    pub fn from_certificate(identity: courier_core::pki::ProviderIdentity) -> Self {
        AuthorizedProvider { team_id: identity.team_id.into(), topics: identity.topics.into() }
    }
}

struct VerifyingKey {
    provider: AuthorizedProvider,
    key: DecodingKey,
}

#[derive(Default)]
struct CredentialSet {
    /// Bumped by every replacement so that tokens verified under an older set are checked again.
    generation: u64,
    by_key_id: HashMap<String, Arc<VerifyingKey>>,
}

/// The provider credentials a gateway accepts. Cheap to clone; every clone sees replacements.
#[derive(Clone, Default)]
pub struct ProviderCredentials {
    current: Arc<RwLock<Arc<CredentialSet>>>,
}

impl std::fmt::Debug for ProviderCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.snapshot();
        f.debug_struct("ProviderCredentials").field("key_ids", &set.by_key_id.keys().collect::<Vec<_>>()).finish()
    }
}

impl ProviderCredentials {
    pub fn new(credentials: Vec<ProviderCredential>) -> Result<Self, CredentialError> {
        let this = ProviderCredentials::default();
        this.replace(credentials)?;
        Ok(this)
    }

    /// Swaps in a whole new credential set; on error the old one stays.
    pub fn replace(&self, credentials: Vec<ProviderCredential>) -> Result<(), CredentialError> {
        let mut by_key_id = HashMap::new();
        for credential in credentials {
            let key = DecodingKey::from_ec_pem(credential.public_key_pem.as_bytes())
                .map_err(|source| CredentialError::BadPublicKey { key_id: credential.key_id.clone(), source })?;
            Self::admit(&mut by_key_id, credential, key);
        }
        self.install(by_key_id);
        Ok(())
    }

    /// Swaps in a new credential set, leaving out (and returning) any key that does not load: one bad key
    /// must not keep a removed key valid by freezing the whole set.
    pub fn replace_lenient(&self, credentials: Vec<ProviderCredential>) -> Vec<CredentialError> {
        let mut by_key_id = HashMap::new();
        let mut rejected = Vec::new();
        for credential in credentials {
            match DecodingKey::from_ec_pem(credential.public_key_pem.as_bytes()) {
                Ok(key) => Self::admit(&mut by_key_id, credential, key),
                Err(source) => rejected.push(CredentialError::BadPublicKey { key_id: credential.key_id, source }),
            }
        }
        self.install(by_key_id);
        rejected
    }

    fn admit(by_key_id: &mut HashMap<String, Arc<VerifyingKey>>, credential: ProviderCredential, key: DecodingKey) {
        let provider = AuthorizedProvider { team_id: credential.team_id.into(), topics: credential.topics.into() };
        by_key_id.insert(credential.key_id, Arc::new(VerifyingKey { provider, key }));
    }

    /// Makes `by_key_id` the current set; the new generation invalidates every cached verification.
    fn install(&self, by_key_id: HashMap<String, Arc<VerifyingKey>>) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let generation = current.generation + 1;
        *current = Arc::new(CredentialSet { generation, by_key_id });
    }

    fn snapshot(&self) -> Arc<CredentialSet> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Clone)]
struct VerifiedToken {
    key_id: String,
    generation: u64,
    iat: i64,
    provider: AuthorizedProvider,
}

/// The newest token accepted for one key id, for the refresh-rate limit.
struct LatestToken {
    token: String,
    accepted_at: i64,
}

/// Checks `authorization` header values against the current credentials.
pub struct JwtVerifier {
    credentials: ProviderCredentials,
    max_age_secs: i64,
    verified: Mutex<HashMap<String, VerifiedToken>>,
    /// Shortest time between two new tokens of one key id; 0 = no limit (the default).
    min_refresh_secs: i64,
    /// Key id → the newest token accepted for it (only kept while the limit is on).
    latest: Mutex<HashMap<String, LatestToken>>,
    /// Signature checks done so far: what the cache saves is visible in tests and metrics.
    signature_checks: std::sync::atomic::AtomicU64,
}

impl JwtVerifier {
    pub fn new(credentials: ProviderCredentials, max_age_secs: u64) -> Self {
        JwtVerifier::with_refresh_limit(credentials, max_age_secs, 0)
    }

    /// A verifier that answers `TooManyProviderTokenUpdates` to a key id's new token arriving sooner than
    /// `min_refresh_secs` after its previous one (0 turns the limit off).
    pub fn with_refresh_limit(credentials: ProviderCredentials, max_age_secs: u64, min_refresh_secs: u64) -> Self {
        JwtVerifier {
            credentials,
            max_age_secs: i64::try_from(max_age_secs).unwrap_or(i64::MAX),
            verified: Mutex::new(HashMap::new()),
            min_refresh_secs: i64::try_from(min_refresh_secs).unwrap_or(i64::MAX),
            latest: Mutex::new(HashMap::new()),
            signature_checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many signatures this verifier has checked (cache misses that got as far as a known key).
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Applies the refresh-rate limit to a token whose signature just verified.
    fn check_refresh(&self, key_id: &str, token: &str, now: i64) -> Result<(), Reason> {
        if self.min_refresh_secs == 0 {
            return Ok(());
        }
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        match latest.get(key_id) {
            // The same token again (the cache was cleared): not an update.
            Some(previous) if previous.token == token => return Ok(()),
            Some(previous) if now.saturating_sub(previous.accepted_at) < self.min_refresh_secs => {
                metrics::counter!("courier_gateway_provider_token_updates_refused_total").increment(1);
                return Err(Reason::TooManyProviderTokenUpdates);
            }
            _ => {}
        }
        if latest.len() >= CACHE_CAPACITY {
            latest.clear();
        }
        latest.insert(key_id.to_string(), LatestToken { token: token.to_string(), accepted_at: now });
        Ok(())
    }

    /// Authenticates a push given its `authorization` header (None when absent), at UNIX time `now`.
    pub fn authenticate(&self, authorization: Option<&str>, now: i64) -> Result<AuthorizedProvider, Reason> {
        let header = authorization.ok_or(Reason::MissingProviderToken)?;
        let token = bearer_token(header).ok_or(Reason::InvalidProviderToken)?;
        let set = self.credentials.snapshot();
        let cached = self.cache().get(token).cloned();
        let verified = match cached {
            Some(hit) if hit.generation == set.generation => hit,
            _ => {
                self.signature_checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!("courier_gateway_jwt_signature_checks_total").increment(1);
                let verified = verify(&set, token)?;
                self.check_refresh(&verified.key_id, token, now)?;
                let mut cache = self.cache();
                if cache.len() >= CACHE_CAPACITY {
                    cache.clear();
                }
                cache.insert(token.to_string(), verified.clone());
                verified
            }
        };
        check_age(verified.iat, now, self.max_age_secs)?;
        Ok(verified.provider)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, VerifiedToken>> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The token after a case-insensitive `bearer` scheme, or None for any other shape.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim_start();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= MAX_JWT_LEN).then_some(token)
}

fn check_age(iat: i64, now: i64, max_age_secs: i64) -> Result<(), Reason> {
    if iat.saturating_sub(now) > MAX_CLOCK_SKEW_SECS {
        return Err(Reason::InvalidProviderToken);
    }
    if now.saturating_sub(iat) > max_age_secs {
        return Err(Reason::ExpiredProviderToken);
    }
    Ok(())
}

fn verify(set: &CredentialSet, token: &str) -> Result<VerifiedToken, Reason> {
    let invalid = |_| Reason::InvalidProviderToken;
    let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
    if header.alg != Algorithm::ES256 {
        return Err(Reason::InvalidProviderToken);
    }
    let key_id = header.kid.ok_or(Reason::InvalidProviderToken)?;
    let key = set.by_key_id.get(&key_id).ok_or(Reason::InvalidProviderToken)?;

    // APNs tokens have no `exp`; expiry is `iat` + max age, checked by us on every use.
    let mut validation = Validation::new(Algorithm::ES256);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, &validation)
        .map_err(invalid)?
        .claims;

    match claims.get("iss") {
        Some(serde_json::Value::String(iss)) if *iss == *key.provider.team_id => {}
        _ => return Err(Reason::InvalidProviderToken),
    }
    let iat = claims.get("iat").and_then(parse_iat).ok_or(Reason::InvalidProviderToken)?;
    Ok(VerifiedToken { key_id, generation: set.generation, iat, provider: key.provider.clone() })
}

/// Providers in the wild send `iat` as an integer, a float or a numeric string; all mean UNIX seconds.
fn parse_iat(value: &serde_json::Value) -> Option<i64> {
    let seconds = match value {
        serde_json::Value::Number(n) => n.as_i64().map(|i| i as f64).or_else(|| n.as_f64())?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    // Out-of-range values (and NaN) would saturate silently in the cast; refuse them instead.
    (seconds.is_finite() && seconds.abs() < 1e15).then(|| seconds.floor() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::JwtSigner;
    use jsonwebtoken::{EncodingKey, Header};

    const TEAM: &str = "TEAM123456";
    const KID: &str = "KEY1234567";

    struct Fixture {
        p8: Vec<u8>,
        signer: JwtSigner,
        verifier: JwtVerifier,
        credentials: ProviderCredentials,
    }

    fn credential(kid: &str, team: &str, key: &rcgen::KeyPair, topics: &[&str]) -> ProviderCredential {
        ProviderCredential {
            team_id: team.into(),
            key_id: kid.into(),
            public_key_pem: key.public_key_pem(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn fixture() -> Fixture {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let p8 = key.serialize_pem().into_bytes();
        let credentials = ProviderCredentials::new(vec![credential(KID, TEAM, &key, &[])]).unwrap();
        Fixture {
            signer: JwtSigner::new(TEAM, KID, &p8).unwrap(),
            p8,
            verifier: JwtVerifier::new(credentials.clone(), 3600),
            credentials,
        }
    }

    fn now() -> i64 {
        (courier_core::ids::unix_millis() / 1000) as i64
    }

    fn custom(p8: &[u8], kid: Option<&str>, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_pem(p8).unwrap()).unwrap()
    }

    #[test]
    fn a_fresh_token_is_accepted_with_any_bearer_case() {
        let f = fixture();
        let jwt = f.signer.sign();
        for scheme in ["bearer", "Bearer", "BEARER", "bEaReR"] {
            let provider = f.verifier.authenticate(Some(&format!("{scheme} {jwt}")), now()).unwrap();
            assert_eq!(&*provider.team_id, TEAM);
            assert!(provider.may_push_to("anything"));
        }
    }

    #[test]
    fn missing_and_malformed_headers() {
        let f = fixture();
        let jwt = f.signer.sign();
        assert_eq!(f.verifier.authenticate(None, now()).unwrap_err(), Reason::MissingProviderToken);
        for header in [
            String::new(),
            "bearer".into(),
            "bearer ".into(),
            format!("basic {jwt}"),
            jwt.clone(),
            format!("bearer {jwt}x"),
            "bearer a.b.c".into(),
            "bearer ....".into(),
            format!("bearer {}", "a".repeat(MAX_JWT_LEN + 1)),
        ] {
            assert_eq!(
                f.verifier.authenticate(Some(&header), now()).unwrap_err(),
                Reason::InvalidProviderToken,
                "{header}"
            );
        }
    }

    #[test]
    fn a_token_is_signature_checked_once_however_often_it_is_used() {
        let f = fixture();
        // Both tokens' times are fixed here: a second token made from the clock after the loop could carry
        // the first one's `iat` when the loop crossed a second, and be the same token to the cache.
        let issued = now();
        let header = format!("bearer {}", f.signer.sign_at(issued));
        for _ in 0..1000 {
            assert!(f.verifier.authenticate(Some(&header), now()).is_ok());
        }
        assert_eq!(f.verifier.signature_checks(), 1);
        let other = format!("bearer {}", f.signer.sign_at(issued - 1));
        assert!(f.verifier.authenticate(Some(&other), now()).is_ok());
        assert_eq!(f.verifier.signature_checks(), 2);
        // A new credential set means checking again, once.
        f.credentials
            .replace(vec![credential(
                KID,
                TEAM,
                &rcgen::KeyPair::from_pem(std::str::from_utf8(&f.p8).unwrap()).unwrap(),
                &[],
            )])
            .unwrap();
        for _ in 0..10 {
            assert!(f.verifier.authenticate(Some(&header), now()).is_ok());
        }
        assert_eq!(f.verifier.signature_checks(), 3);
    }

    #[test]
    fn another_key_kid_or_team_is_refused() {
        let f = fixture();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let wrong_key = JwtSigner::new(TEAM, KID, other.serialize_pem().as_bytes()).unwrap();
        let wrong_kid = JwtSigner::new(TEAM, "OTHERKEY00", &f.p8).unwrap();
        let wrong_team = JwtSigner::new("OTHERTEAM0", KID, &f.p8).unwrap();
        for signer in [wrong_key, wrong_kid, wrong_team] {
            let header = format!("bearer {}", signer.sign());
            assert_eq!(f.verifier.authenticate(Some(&header), now()).unwrap_err(), Reason::InvalidProviderToken);
        }
        let no_kid = custom(&f.p8, None, serde_json::json!({"iss": TEAM, "iat": now()}));
        assert_eq!(
            f.verifier.authenticate(Some(&format!("bearer {no_kid}")), now()).unwrap_err(),
            Reason::InvalidProviderToken
        );
    }

    #[test]
    fn other_algorithms_are_refused() {
        let f = fixture();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(KID.into());
        let claims = serde_json::json!({"iss": TEAM, "iat": now()});
        // The classic confusion attack: an HMAC keyed with the public key.
        let public = rcgen::KeyPair::from_pem(std::str::from_utf8(&f.p8).unwrap()).unwrap().public_key_pem();
        let jwt =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(public.as_bytes()).unwrap()).unwrap();
        assert_eq!(
            f.verifier.authenticate(Some(&format!("bearer {jwt}")), now()).unwrap_err(),
            Reason::InvalidProviderToken
        );
    }

    #[test]
    fn age_is_checked_on_every_use() {
        let f = fixture();
        let issued = now();
        let header = format!("bearer {}", f.signer.sign_at(issued));
        assert!(f.verifier.authenticate(Some(&header), issued + 3600).is_ok());
        // Same token, now cached, a second too old.
        assert_eq!(f.verifier.authenticate(Some(&header), issued + 3601).unwrap_err(), Reason::ExpiredProviderToken);
        let old = format!("bearer {}", f.signer.sign_at(issued - 7200));
        assert_eq!(f.verifier.authenticate(Some(&old), issued).unwrap_err(), Reason::ExpiredProviderToken);
    }

    #[test]
    fn a_token_from_the_future_is_invalid() {
        let f = fixture();
        let issued = now();
        let near = format!("bearer {}", f.signer.sign_at(issued + 60));
        assert!(f.verifier.authenticate(Some(&near), issued).is_ok());
        let far = format!("bearer {}", f.signer.sign_at(issued + 600));
        assert_eq!(f.verifier.authenticate(Some(&far), issued).unwrap_err(), Reason::InvalidProviderToken);
    }

    #[test]
    fn iat_may_be_an_integer_a_float_or_a_string() {
        let f = fixture();
        let t = now();
        for iat in [serde_json::json!(t), serde_json::json!(t as f64 + 0.5), serde_json::json!(t.to_string())] {
            let jwt = custom(&f.p8, Some(KID), serde_json::json!({"iss": TEAM, "iat": iat}));
            assert!(f.verifier.authenticate(Some(&format!("bearer {jwt}")), t).is_ok(), "{iat}");
        }
        for iat in
            [serde_json::json!("soon"), serde_json::json!(null), serde_json::json!(1e300), serde_json::json!([t])]
        {
            let jwt = custom(&f.p8, Some(KID), serde_json::json!({"iss": TEAM, "iat": iat}));
            assert_eq!(
                f.verifier.authenticate(Some(&format!("bearer {jwt}")), t).unwrap_err(),
                Reason::InvalidProviderToken,
                "{iat}"
            );
        }
        let no_iat = custom(&f.p8, Some(KID), serde_json::json!({"iss": TEAM}));
        assert!(f.verifier.authenticate(Some(&format!("bearer {no_iat}")), t).is_err());
        let no_iss = custom(&f.p8, Some(KID), serde_json::json!({"iat": t}));
        assert!(f.verifier.authenticate(Some(&format!("bearer {no_iss}")), t).is_err());
    }

    #[test]
    fn replacing_credentials_forgets_verified_tokens() {
        let f = fixture();
        let header = format!("bearer {}", f.signer.sign());
        assert!(f.verifier.authenticate(Some(&header), now()).is_ok());
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        f.credentials.replace(vec![credential(KID, TEAM, &other, &["com.example.app"])]).unwrap();
        assert_eq!(f.verifier.authenticate(Some(&header), now()).unwrap_err(), Reason::InvalidProviderToken);

        let signer = JwtSigner::new(TEAM, KID, other.serialize_pem().as_bytes()).unwrap();
        let provider = f.verifier.authenticate(Some(&format!("bearer {}", signer.sign())), now()).unwrap();
        assert!(provider.may_push_to("com.example.app"));
        assert!(!provider.may_push_to("com.example.other"));
    }

    #[test]
    fn new_tokens_sooner_than_the_refresh_interval_are_refused_when_limited() {
        let f = fixture();
        let limited = JwtVerifier::with_refresh_limit(f.credentials.clone(), 3600, 1200);
        let t = now();
        let first = format!("bearer {}", f.signer.sign_at(t - 10));
        let second = format!("bearer {}", f.signer.sign_at(t - 5));
        assert!(limited.authenticate(Some(&first), t).is_ok());
        assert_eq!(limited.authenticate(Some(&second), t + 60).unwrap_err(), Reason::TooManyProviderTokenUpdates);
        // The first token keeps working, and a forged one is still just invalid.
        assert!(limited.authenticate(Some(&first), t + 60).is_ok());
        assert_eq!(limited.authenticate(Some("bearer a.b.c"), t + 60).unwrap_err(), Reason::InvalidProviderToken);
        assert!(limited.authenticate(Some(&second), t + 1200).is_ok());
        // Off by default.
        assert!(f.verifier.authenticate(Some(&first), t).is_ok());
        assert!(f.verifier.authenticate(Some(&second), t).is_ok());
    }

    /// URL-safe base64 without padding, as JWTs use.
    fn b64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn extra_header_fields_are_tolerated() {
        let f = fixture();
        let header = serde_json::json!({"alg": "ES256", "kid": KID, "typ": "JWT", "x-client": "apns2 0.1"});
        let claims = serde_json::json!({"iss": TEAM, "iat": now(), "aud": "ignored"});
        let message = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let key = EncodingKey::from_ec_pem(&f.p8).unwrap();
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::ES256).unwrap();
        let jwt = format!("{message}.{signature}");
        assert!(f.verifier.authenticate(Some(&format!("Bearer {jwt}")), now()).is_ok());
    }

    #[test]
    fn channels_go_with_the_app_topic() {
        let provider = AuthorizedProvider { team_id: "T".into(), topics: vec!["com.example.app".to_string()].into() };
        assert!(provider.may_push_to("com.example.app.voip"));
        assert!(provider.may_push_to("com.example.app.push-type.liveactivity"));
        assert!(!provider.may_push_to("com.example.other.voip"));
    }

    #[test]
    fn a_bad_public_key_is_refused_and_the_old_set_kept() {
        let f = fixture();
        let broken = ProviderCredential {
            team_id: TEAM.into(),
            key_id: KID.into(),
            public_key_pem: "not pem".into(),
            topics: vec![],
        };
        assert!(f.credentials.replace(vec![broken]).is_err());
        assert!(f.verifier.authenticate(Some(&format!("bearer {}", f.signer.sign())), now()).is_ok());
    }
}
