//! API key check (constant time) and signed join tokens (JWT HS256) bound to a room, an identity,
//! permissions and an expiry.
//!
//! Tokens carry a `kid` header naming the key that signed them. Several keys can be accepted at
//! once (`auth.token_secrets`), so a secret is rotated without ending anyone's session: sign
//! with the new key, keep the old one until the tokens it signed have expired. A token without
//! a `kid` (issued before kids existed) is checked with the key named [`DEFAULT_KID`].

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// What a join token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The participant identity (its `participant_id`).
    pub sub: String,
    /// The room it may join.
    pub room: String,
    /// Display name.
    pub name: String,
    #[serde(rename = "pub")]
    pub can_publish: bool,
    #[serde(rename = "subs")]
    pub can_subscribe: bool,
    pub iat: u64,
    pub exp: u64,
}

/// The key id of `auth.token_secret` (the single key of older configurations).
pub const DEFAULT_KID: &str = "default";

/// A key id for a secret given without one (`auth.token_secrets` as a list): `k` and the first
/// 8 hex digits of its SHA-256, so the same secret keeps its id across restarts.
pub fn derived_kid(secret: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(secret.as_bytes());
    format!("k{}", d.iter().take(4).map(|b| format!("{b:02x}")).collect::<String>())
}

/// Signs and checks join tokens; checks the REST API key.
#[derive(Clone)]
pub struct Auth {
    api_key: Vec<u8>,
    /// The key new tokens are signed with, and its id.
    signing_kid: String,
    encoding: EncodingKey,
    /// Every key a token may be signed with, by id.
    keys: std::collections::HashMap<String, DecodingKey>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth { .. }")
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Auth {
    /// One key, id [`DEFAULT_KID`].
    pub fn new(api_key: &str, token_secret: &str) -> Self {
        Self::with_keys(api_key, &[(DEFAULT_KID.to_owned(), token_secret.to_owned())], DEFAULT_KID)
    }

    /// Several keys (id, secret); new tokens are signed with `signing_kid` (the first key if
    /// that id is not among them; the configuration is checked before this).
    pub fn with_keys(api_key: &str, keys: &[(String, String)], signing_kid: &str) -> Self {
        let signing = keys.iter().find(|(k, _)| k == signing_kid).or(keys.first());
        let (kid, secret) = signing.cloned().unwrap_or_else(|| (DEFAULT_KID.to_owned(), String::new()));
        Self {
            api_key: api_key.as_bytes().to_vec(),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            signing_kid: kid,
            keys: keys.iter().map(|(k, s)| (k.clone(), DecodingKey::from_secret(s.as_bytes()))).collect(),
        }
    }

    /// The id of the key new tokens are signed with.
    pub fn signing_kid(&self) -> &str {
        &self.signing_kid
    }

    /// Check an `Authorization` header value against the API key, in constant time.
    pub fn check_bearer(&self, header: Option<&str>) -> Result<(), ApiError> {
        let Some(value) = header else {
            return Err(ApiError::unauthorized("missing Authorization: Bearer <api_key>"));
        };
        let presented = value.strip_prefix("Bearer ").unwrap_or("").trim().as_bytes();
        if bool::from(presented.ct_eq(&self.api_key)) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("invalid API key"))
        }
    }

    /// Sign a token valid for `ttl_s` seconds. Returns the token and its expiry (unix seconds).
    pub fn issue(
        &self,
        room: &str,
        participant: &str,
        name: &str,
        can_publish: bool,
        can_subscribe: bool,
        ttl_s: u64,
    ) -> Result<(String, u64), ApiError> {
        let iat = unix_now();
        let exp = iat.saturating_add(ttl_s);
        let claims = Claims {
            sub: participant.to_owned(),
            room: room.to_owned(),
            name: name.to_owned(),
            can_publish,
            can_subscribe,
            iat,
            exp,
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.signing_kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| ApiError::new(crate::protocol::ErrorCode::Internal, format!("token signing failed: {e}")))?;
        Ok((token, exp))
    }

    /// Verify signature (with the key its `kid` names) and expiry (no leeway: an expired token
    /// is expired).
    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        self.verify_with(token, true)
    }

    /// Verify the signature only: a token that has expired still names who it was issued to.
    /// For ending or trickling a WHIP/WHEP session that its token opened (a broadcast can
    /// outlast the token, and its client still says goodbye with it).
    pub fn verify_ignoring_expiry(&self, token: &str) -> Result<Claims, ApiError> {
        self.verify_with(token, false)
    }

    fn verify_with(&self, token: &str, expiry: bool) -> Result<Claims, ApiError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| ApiError::unauthorized("token is malformed"))?;
        let kid = header.kid.as_deref().unwrap_or(DEFAULT_KID);
        let key =
            self.keys.get(kid).ok_or_else(|| ApiError::unauthorized("token is signed with an unknown key (kid)"))?;
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 0;
        v.validate_exp = expiry;
        v.set_required_spec_claims(&["exp", "sub"]);
        jsonwebtoken::decode::<Claims>(token, key, &v).map(|d| d.claims).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => ApiError::unauthorized("token expired"),
            jsonwebtoken::errors::ErrorKind::InvalidSignature => ApiError::unauthorized("token signature is invalid"),
            _ => ApiError::unauthorized("token is malformed"),
        })
    }
}

/// TURN servers and the secret they share with the gateway (coturn's `use-auth-secret`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnConfig {
    /// `turn:`/`turns:` URLs, as a browser's `RTCIceServer.urls`.
    pub urls: Vec<String>,
    pub secret: String,
}

impl TurnConfig {
    /// Time-limited credentials for `identity` until `expires` (unix seconds), in the scheme of
    /// coturn's `use-auth-secret` (the "TURN REST API" draft): the username is
    /// `<expires>:<identity>`, the password base64(HMAC-SHA1(secret, username)). The TURN server
    /// checks both with the shared secret alone and refuses them after `expires`.
    pub fn credentials(&self, identity: &str, expires: u64) -> crate::protocol::IceServer {
        use aws_lc_rs::hmac;
        use base64::Engine;
        let username = format!("{expires}:{identity}");
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, self.secret.as_bytes());
        let tag = hmac::sign(&key, username.as_bytes());
        let credential = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
        crate::protocol::IceServer { urls: self.urls.clone(), username, credential }
    }
}

/// Format unix seconds in the contract's timestamp format.
pub fn unix_to_rfc3339(secs: u64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp(secs as i64, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_binding() {
        let a = Auth::new("key", "secret");
        let (t, _) = a.issue("r_1", "alice", "Alice", true, false, 60).unwrap();
        let c = a.verify(&t).unwrap();
        assert_eq!(c.room, "r_1");
        assert_eq!(c.sub, "alice");
        assert!(c.can_publish);
        assert!(!c.can_subscribe);
    }

    #[test]
    fn forged_and_expired_tokens_are_refused() {
        let a = Auth::new("key", "secret");
        let b = Auth::new("key", "other-secret");
        let (t, _) = b.issue("r_1", "alice", "a", true, true, 60).unwrap();
        assert_eq!(a.verify(&t).unwrap_err().message, "token signature is invalid");
        let (t, _) = a.issue("r_1", "alice", "a", true, true, 0).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(a.verify(&t).unwrap_err().message, "token expired");
        assert!(a.verify("not.a.token").is_err());
        assert_eq!(a.verify_ignoring_expiry(&t).unwrap().sub, "alice", "expired, still signed");
        let (forged, _) = b.issue("r_1", "alice", "a", true, true, 60).unwrap();
        assert!(a.verify_ignoring_expiry(&forged).is_err());
    }

    #[test]
    fn turn_credentials_follow_coturns_use_auth_secret() {
        let turn = TurnConfig { urls: vec!["turn:turn.test:3478?transport=udp".into()], secret: "north-secret".into() };
        let c = turn.credentials("alice", 1_700_000_000);
        assert_eq!(c.username, "1700000000:alice");
        // base64(HMAC-SHA1("north-secret", "1700000000:alice")), computed independently.
        assert_eq!(c.credential, "g+jb180fcj+xlpA/2mP60OdIgU0=");
        assert_eq!(c.urls, turn.urls);
    }

    #[test]
    fn tokens_name_their_key_and_rotation_keeps_old_tokens_valid() {
        let old = Auth::new("key", "the-old-secret-0123456789");
        let (t_old, _) = old.issue("r_1", "alice", "a", true, true, 60).unwrap();
        let header = jsonwebtoken::decode_header(&t_old).unwrap();
        assert_eq!(header.kid.as_deref(), Some(DEFAULT_KID));
        // Rotation: sign with k2, still accept the old key.
        let keys = [
            ("k2".to_owned(), "the-new-secret-0123456789".to_owned()),
            (DEFAULT_KID.to_owned(), "the-old-secret-0123456789".to_owned()),
        ];
        let rotated = Auth::with_keys("key", &keys, "k2");
        assert_eq!(rotated.verify(&t_old).unwrap().sub, "alice", "a token of the old key still works");
        let (t_new, _) = rotated.issue("r_1", "bob", "b", true, true, 60).unwrap();
        assert_eq!(jsonwebtoken::decode_header(&t_new).unwrap().kid.as_deref(), Some("k2"));
        assert_eq!(rotated.verify(&t_new).unwrap().sub, "bob");
        assert!(old.verify(&t_new).is_err(), "a gateway without k2 refuses it");
        // The old key retired: its tokens end, the new ones live on.
        let retired = Auth::with_keys("key", &keys[..1], "k2");
        assert_eq!(retired.verify(&t_old).unwrap_err().message, "token is signed with an unknown key (kid)");
        assert!(retired.verify(&t_new).is_ok());
        // A kid that names a key, with another key's signature, is still forged.
        let liar = Auth::with_keys("key", &[("k2".to_owned(), "not-the-right-secret-012345".to_owned())], "k2");
        let (t_forged, _) = liar.issue("r_1", "mallory", "m", true, true, 60).unwrap();
        assert_eq!(rotated.verify(&t_forged).unwrap_err().message, "token signature is invalid");
        // A token without a kid (issued before kids) is checked with the default key.
        let claims = Claims {
            sub: "carol".into(),
            room: "r_1".into(),
            name: "c".into(),
            can_publish: true,
            can_subscribe: true,
            iat: unix_now(),
            exp: unix_now() + 60,
        };
        let legacy = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"the-old-secret-0123456789"),
        )
        .unwrap();
        assert_eq!(rotated.verify(&legacy).unwrap().sub, "carol");
        assert_eq!(derived_kid("abc"), derived_kid("abc"));
        assert_ne!(derived_kid("abc"), derived_kid("abd"));
        assert_eq!(derived_kid("abc").len(), 9);
    }

    #[test]
    fn api_key_check() {
        let a = Auth::new("k3y", "s");
        assert!(a.check_bearer(Some("Bearer k3y")).is_ok());
        assert!(a.check_bearer(Some("Bearer k3")).is_err());
        assert!(a.check_bearer(Some("k3y")).is_err());
        assert!(a.check_bearer(None).is_err());
    }
}
