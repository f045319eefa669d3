//! Device tokens: what a provider addresses a push to.
//!
//! A token is `key id (4 bytes, big-endian) || AES-SIV(device id || topic digest)` with the key id as
//! associated data, written as lowercase hex (88 characters) and read in either case (providers and their
//! libraries upper-case hex freely; the bytes, not the spelling, name the device). AES-SIV is deterministic, so the same device,
//! topic and key always give the same token, and its 128-bit synthetic IV doubles as the authentication
//! tag, so a token cannot be forged or altered without the key. The topic digest inside binds a token to
//! one `apns-topic`.
//!
//! Where keys come from is the `Keyring`'s business: the Raft state's token keys (`ctl keys rotate`,
//! `ClusterState::sync_keyring`), the first of them seeded at bootstrap from the file `courier pki init`
//! writes. Gateways and nodes only ever ask the keyring for "the key that mints" and "the key with this id".

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use aes_siv::KeyInit;
use aes_siv::siv::Aes128Siv;
use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;

/// Identifies which token key minted a token; the first four bytes of every token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenKeyId(pub u32);

/// The first 8 bytes of SHA-256 of a topic string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicDigest(pub [u8; 8]);

impl TopicDigest {
    pub fn of(topic: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, topic.as_bytes());
        let mut out = [0u8; 8];
        out.copy_from_slice(&digest.as_ref()[..8]);
        TopicDigest(out)
    }
}

const KEY_ID_LEN: usize = 4;
const PLAINTEXT_LEN: usize = 16 + 8;
const TAG_LEN: usize = 16;
/// Length of a token in bytes; its hex form is twice this.
pub const TOKEN_LEN: usize = KEY_ID_LEN + TAG_LEN + PLAINTEXT_LEN;

/// Why a token could not be opened. All of them mean `BadDeviceToken` to a provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not {} hex characters", TOKEN_LEN * 2)]
    Malformed,
    #[error("token was minted under unknown key {0:?}")]
    UnknownKey(TokenKeyId),
    #[error("token failed authentication")]
    Forged,
    /// Authentic, but minted under a key past its grace period: `ExpiredToken` to a provider.
    #[error("token was minted under retired key {0:?}")]
    Retired(TokenKeyId),
}

/// What a key may still do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Mints new tokens and opens old ones. Exactly one key is active.
    Active,
    /// Opens tokens it minted; devices holding them are given fresh ones.
    Accepting,
    /// Its tokens are recognised but refused: 410 ExpiredToken.
    Retired,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Accepting => "accepting",
            KeyState::Retired => "retired",
        }
    }
}

/// What a valid token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenedToken {
    pub key_id: TokenKeyId,
    pub device_id: DeviceId,
    pub topic: TopicDigest,
}

impl OpenedToken {
    pub fn is_for_topic(&self, topic: &str) -> bool {
        self.topic == TopicDigest::of(topic)
    }
}

/// One token key. Its secret never appears in `Debug` output.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenKey {
    pub id: TokenKeyId,
    #[serde(with = "hex::serde")]
    secret: [u8; 32],
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey").field("id", &self.id).field("secret", &"<redacted>").finish()
    }
}

impl TokenKey {
    pub fn generate(id: TokenKeyId) -> Self {
        TokenKey { id, secret: rand::random() }
    }

    pub fn from_secret(id: TokenKeyId, secret: [u8; 32]) -> Self {
        TokenKey { id, secret }
    }

    fn cipher(&self) -> Aes128Siv {
        Aes128Siv::new((&self.secret).into())
    }

    /// Mints the token for `device` and `topic`, as lowercase hex.
    pub fn mint(&self, device: DeviceId, topic: &str) -> String {
        let key_id = self.id.0.to_be_bytes();
        let mut plaintext = [0u8; PLAINTEXT_LEN];
        plaintext[..16].copy_from_slice(&device.to_bytes());
        plaintext[16..].copy_from_slice(&TopicDigest::of(topic).0);
        let sealed = self
            .cipher()
            .encrypt([&key_id[..]], &plaintext)
            .expect("AES-SIV encryption of a fixed-size buffer cannot fail");
        let mut token = Vec::with_capacity(TOKEN_LEN);
        token.extend_from_slice(&key_id);
        token.extend_from_slice(&sealed);
        hex::encode(token)
    }

    fn open_sealed(&self, key_id: &[u8], sealed: &[u8]) -> Result<OpenedToken, TokenError> {
        let plaintext = self.cipher().decrypt([key_id], sealed).map_err(|_| TokenError::Forged)?;
        let device_id =
            DeviceId::from_slice(plaintext.get(..16).ok_or(TokenError::Forged)?).ok_or(TokenError::Forged)?;
        let topic: [u8; 8] = plaintext.get(16..).and_then(|t| t.try_into().ok()).ok_or(TokenError::Forged)?;
        Ok(OpenedToken { key_id: self.id, device_id, topic: TopicDigest(topic) })
    }
}

/// Splits a hex token (either case, even mixed) into its key id and sealed part without trusting any of it.
pub fn parse_token(hex_token: &str) -> Result<(TokenKeyId, Vec<u8>), TokenError> {
    if hex_token.len() != TOKEN_LEN * 2 {
        return Err(TokenError::Malformed);
    }
    let bytes = hex::decode(hex_token).map_err(|_| TokenError::Malformed)?;
    let (key_id, _) = bytes.split_at(KEY_ID_LEN);
    let key_id = u32::from_be_bytes(key_id.try_into().map_err(|_| TokenError::Malformed)?);
    Ok((TokenKeyId(key_id), bytes))
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct KeyringState {
    /// The key that mints new tokens.
    active: Option<TokenKeyId>,
    /// Every key known, the active one included.
    keys: BTreeMap<TokenKeyId, TokenKey>,
    /// Keys whose tokens are refused as expired.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    retired: std::collections::BTreeSet<TokenKeyId>,
}

/// The set of token keys a process knows. Cheap to clone; every clone sees replacements.
#[derive(Clone, Default)]
pub struct Keyring {
    state: Arc<RwLock<KeyringState>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("Keyring")
            .field("active", &state.active)
            .field("keys", &state.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("reading token keys from {path} (create them with `courier pki init`): {source}")]
    Io { path: String, source: std::io::Error },
    #[error("token key file {path} is not valid: {source}")]
    Format { path: String, source: serde_json::Error },
    #[error("token key file {0} names no active key")]
    NoActiveKey(String),
}

impl Keyring {
    /// A keyring holding exactly `key`, which mints.
    pub fn with_active(key: TokenKey) -> Self {
        let keyring = Keyring::default();
        keyring.replace(key.id, vec![key]);
        keyring
    }

    /// Replaces the whole key set; `active` must be among `keys`.
    pub fn replace(&self, active: TokenKeyId, keys: Vec<TokenKey>) {
        self.replace_with_states(keys.into_iter().map(|k| {
            let state = if k.id == active { KeyState::Active } else { KeyState::Accepting };
            (k, state)
        }));
    }

    /// Replaces the whole key set with keys in the given states (as the Raft state holds them).
    pub fn replace_with_states(&self, keys: impl IntoIterator<Item = (TokenKey, KeyState)>) {
        let mut next = KeyringState::default();
        for (key, key_state) in keys {
            match key_state {
                KeyState::Active => next.active = Some(key.id),
                KeyState::Retired => {
                    next.retired.insert(key.id);
                }
                KeyState::Accepting => {}
            }
            next.keys.insert(key.id, key);
        }
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = next;
    }

    /// The key that mints now, if any.
    pub fn active_id(&self) -> Option<TokenKeyId> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).active
    }

    pub fn active(&self) -> Option<TokenKey> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state.active.and_then(|id| state.keys.get(&id).cloned())
    }

    /// Mints a token under the active key; `None` when the keyring is empty.
    pub fn mint(&self, device: DeviceId, topic: &str) -> Option<String> {
        self.active().map(|key| key.mint(device, topic))
    }

    /// Opens an authentic token whatever its key's state, and says that state; for deciding whether a
    /// device needs a fresh token.
    pub fn open_any(&self, hex_token: &str) -> Result<(OpenedToken, KeyState), TokenError> {
        match self.open(hex_token) {
            Ok(opened) => {
                let state =
                    if self.active_id() == Some(opened.key_id) { KeyState::Active } else { KeyState::Accepting };
                Ok((opened, state))
            }
            Err(TokenError::Retired(key_id)) => {
                let (_, bytes) = parse_token(hex_token)?;
                let key = {
                    let state = self.state.read().unwrap_or_else(|p| p.into_inner());
                    state.keys.get(&key_id).cloned().ok_or(TokenError::UnknownKey(key_id))?
                };
                let (prefix, sealed) = bytes.split_at(KEY_ID_LEN);
                Ok((key.open_sealed(prefix, sealed)?, KeyState::Retired))
            }
            Err(other) => Err(other),
        }
    }

    /// Opens a hex token with whichever known key minted it.
    pub fn open(&self, hex_token: &str) -> Result<OpenedToken, TokenError> {
        let (key_id, bytes) = parse_token(hex_token)?;
        let (key, retired) = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            let key = state.keys.get(&key_id).cloned().ok_or(TokenError::UnknownKey(key_id))?;
            (key, state.retired.contains(&key_id))
        };
        let (prefix, sealed) = bytes.split_at(KEY_ID_LEN);
        let opened = key.open_sealed(prefix, sealed)?;
        if retired {
            return Err(TokenError::Retired(key_id));
        }
        Ok(opened)
    }

    /// Creates the key file at `path` with one fresh key unless it exists, then loads it.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyringError> {
        if !path.exists() {
            let key = TokenKey::generate(TokenKeyId(1));
            let state = KeyringState { active: Some(key.id), keys: [(key.id, key)].into(), ..Default::default() };
            let text = serde_json::to_string_pretty(&state)
                .map_err(|source| KeyringError::Format { path: path.display().to_string(), source })?;
            crate::secret_file::write_secret(path, text.as_bytes())
                .map_err(|source| KeyringError::Io { path: path.display().to_string(), source })?;
        }
        Self::load(path)
    }

    /// Loads the key file at `path` (written by `courier pki init`); a missing file is an error, since
    /// keys made up on the spot would be shared with no other process.
    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| KeyringError::Io { path: path.display().to_string(), source })?;
        let state: KeyringState = serde_json::from_str(&text)
            .map_err(|source| KeyringError::Format { path: path.display().to_string(), source })?;
        let active = state.active.ok_or_else(|| KeyringError::NoActiveKey(path.display().to_string()))?;
        let keyring = Keyring::default();
        keyring.replace_with_states(state.keys.into_values().map(|key| {
            let key_state = if key.id == active {
                KeyState::Active
            } else if state.retired.contains(&key.id) {
                KeyState::Retired
            } else {
                KeyState::Accepting
            };
            (key, key_state)
        }));
        if keyring.active().is_none() {
            return Err(KeyringError::NoActiveKey(path.display().to_string()));
        }
        Ok(keyring)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring() -> Keyring {
        Keyring::with_active(TokenKey::from_secret(TokenKeyId(7), [42u8; 32]))
    }

    #[test]
    fn mint_is_deterministic_and_opens_to_the_same_device_and_topic() {
        let keys = keyring();
        let device = DeviceId(12345);
        let a = keys.mint(device, "com.example.app").unwrap();
        let b = keys.mint(device, "com.example.app").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), TOKEN_LEN * 2);
        assert!(a.len() <= 100);
        let opened = keys.open(&a).unwrap();
        assert_eq!(opened.device_id, device);
        assert_eq!(opened.key_id, TokenKeyId(7));
        assert!(opened.is_for_topic("com.example.app"));
        assert!(!opened.is_for_topic("com.example.other"));
    }

    #[test]
    fn different_devices_topics_and_keys_give_different_tokens() {
        let keys = keyring();
        let a = keys.mint(DeviceId(1), "t").unwrap();
        assert_ne!(a, keys.mint(DeviceId(2), "t").unwrap());
        assert_ne!(a, keys.mint(DeviceId(1), "u").unwrap());
        let other = Keyring::with_active(TokenKey::from_secret(TokenKeyId(7), [43u8; 32]));
        assert_ne!(a, other.mint(DeviceId(1), "t").unwrap());
        assert_eq!(other.open(&a), Err(TokenError::Forged));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let keys = keyring();
        let token = hex::decode(keys.mint(DeviceId(99), "t").unwrap()).unwrap();
        for byte in 0..token.len() {
            for bit in 0..8 {
                let mut forged = token.clone();
                forged[byte] ^= 1 << bit;
                let result = keys.open(&hex::encode(&forged));
                assert!(result.is_err(), "flip of byte {byte} bit {bit} was accepted");
            }
        }
    }

    #[test]
    fn tokens_open_in_either_case() {
        let keys = keyring();
        let token = keys.mint(DeviceId(77), "t").unwrap();
        assert_eq!(token, token.to_ascii_lowercase(), "minted lowercase");
        let mixed: String =
            token.chars().enumerate().map(|(i, c)| if i % 2 == 0 { c.to_ascii_uppercase() } else { c }).collect();
        for spelling in [token.to_ascii_uppercase(), mixed] {
            assert_eq!(keys.open(&spelling), keys.open(&token), "{spelling}");
        }
    }

    #[test]
    fn hostile_strings_are_malformed_not_panics() {
        let keys = keyring();
        for input in ["", "zz", &"g".repeat(TOKEN_LEN * 2), &"a".repeat(TOKEN_LEN * 2 + 2), "é".repeat(44).as_str()] {
            assert!(keys.open(input).is_err(), "{input:?}");
        }
        assert_eq!(keys.open(&"0".repeat(TOKEN_LEN * 2)), Err(TokenError::UnknownKey(TokenKeyId(0))));
    }

    #[test]
    fn retired_keys_are_recognised_only_for_authentic_tokens() {
        let old = TokenKey::from_secret(TokenKeyId(1), [1; 32]);
        let new = TokenKey::from_secret(TokenKeyId(2), [2; 32]);
        let keys = Keyring::with_active(old.clone());
        let token = keys.mint(DeviceId(4), "t").unwrap();
        keys.replace_with_states([(old.clone(), KeyState::Accepting), (new.clone(), KeyState::Active)]);
        assert_eq!(keys.open(&token).unwrap().key_id, TokenKeyId(1), "accepting keys still open");
        assert_eq!(keys.active_id(), Some(TokenKeyId(2)));
        keys.replace_with_states([(old, KeyState::Retired), (new, KeyState::Active)]);
        assert_eq!(keys.open(&token), Err(TokenError::Retired(TokenKeyId(1))));
        let mut forged = hex::decode(&token).unwrap();
        forged[10] ^= 1;
        assert_eq!(keys.open(&hex::encode(forged)), Err(TokenError::Forged), "forgeries stay BadDeviceToken");
    }

    #[test]
    fn key_file_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token-keys.json");
        let first = Keyring::load_or_create(&path).unwrap();
        let token = first.mint(DeviceId(5), "t").unwrap();
        let second = Keyring::load_or_create(&path).unwrap();
        assert_eq!(second.open(&token).unwrap().device_id, DeviceId(5));
        assert!(!format!("{second:?}").contains(&hex::encode([42u8; 4])));
    }
}
