//! Standard Webhooks signatures: `webhook-id`, `webhook-timestamp`, `webhook-signature`.
//!
//! The signed content is `"{id}.{timestamp}.{body}"` over the raw body bytes, with
//! HMAC-SHA256 keyed by the secret (`whsec_` + base64). `webhook-signature` is a
//! space-separated list of `v1,<base64>` entries, so a sender can sign with an old and a
//! new secret while secrets rotate. Comparison is constant-time.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Accepted clock difference between sender and receiver.
pub const TOLERANCE_SECS: i64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not a Unix time in seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is too old (more than {TOLERANCE_SECS} s)")]
    Stale,
    #[error("webhook-timestamp is in the future (more than {TOLERANCE_SECS} s)")]
    Future,
    #[error("no signature in webhook-signature matches")]
    BadSignature,
    #[error("webhook secret is not `whsec_` followed by base64")]
    BadSecret,
}

/// The key bytes of a `whsec_...` secret.
pub fn secret_bytes(secret: &str) -> Result<Vec<u8>, WebhookError> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    B64.decode(b64).map_err(|_| WebhookError::BadSecret)
}

/// `v1,<base64>` signature of one message.
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    format!("v1,{}", B64.encode(mac(secret, id, timestamp, body)))
}

fn mac(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length; the empty MAC of the impossible error matches nothing.
    let Ok(mut m) = HmacSha256::new_from_slice(secret) else {
        return Vec::new();
    };
    m.update(id.as_bytes());
    m.update(b".");
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

/// Verifies a webhook against any of `secrets` (several during a rotation).
pub fn verify(
    secrets: &[Vec<u8>],
    id: Option<&str>,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_secs: i64,
) -> Result<(), WebhookError> {
    let id = id
        .filter(|s| !s.is_empty())
        .ok_or(WebhookError::MissingHeader("webhook-id"))?;
    let ts = timestamp.ok_or(WebhookError::MissingHeader("webhook-timestamp"))?;
    let sig = signature.ok_or(WebhookError::MissingHeader("webhook-signature"))?;
    let ts: i64 = ts.trim().parse().map_err(|_| WebhookError::BadTimestamp)?;
    if now_secs - ts > TOLERANCE_SECS {
        return Err(WebhookError::Stale);
    }
    if ts - now_secs > TOLERANCE_SECS {
        return Err(WebhookError::Future);
    }
    let candidates: Vec<Vec<u8>> = sig
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b| B64.decode(b).ok())
        .collect();
    for secret in secrets {
        let expected = mac(secret, id, ts, body);
        if candidates
            .iter()
            .any(|c| bool::from(c.as_slice().ct_eq(&expected)))
        {
            return Ok(());
        }
    }
    Err(WebhookError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const NOW: i64 = 1_700_000_000;

    fn key() -> Vec<u8> {
        secret_bytes(SECRET).unwrap()
    }

    fn check(sig: &str, body: &[u8], ts: i64, secrets: &[Vec<u8>]) -> Result<(), WebhookError> {
        verify(
            secrets,
            Some("msg_1"),
            Some(&ts.to_string()),
            Some(sig),
            body,
            NOW,
        )
    }

    #[test]
    fn vectors() {
        let body = br#"{"type":"charge.succeeded"}"#;
        let good = sign(&key(), "msg_1", NOW, body);
        assert_eq!(check(&good, body, NOW, &[key()]), Ok(()), "valid");
        assert_eq!(
            check(&good, b"{\"type\":\"charge.failed\"}", NOW, &[key()]),
            Err(WebhookError::BadSignature),
            "tampered body"
        );
        let other = secret_bytes("whsec_c2VjcmV0LXR3bw==").unwrap();
        assert_eq!(
            check(&good, body, NOW, std::slice::from_ref(&other)),
            Err(WebhookError::BadSignature),
            "wrong secret"
        );
        let stale = sign(&key(), "msg_1", NOW - 301, body);
        assert_eq!(
            check(&stale, body, NOW - 301, &[key()]),
            Err(WebhookError::Stale)
        );
        let future = sign(&key(), "msg_1", NOW + 301, body);
        assert_eq!(
            check(&future, body, NOW + 301, &[key()]),
            Err(WebhookError::Future)
        );
        assert_eq!(
            verify(&[key()], None, Some("1"), Some(&good), body, NOW),
            Err(WebhookError::MissingHeader("webhook-id"))
        );
        assert_eq!(
            verify(&[key()], Some("m"), None, Some(&good), body, NOW),
            Err(WebhookError::MissingHeader("webhook-timestamp"))
        );
        assert_eq!(
            verify(&[key()], Some("m"), Some("1"), None, body, NOW),
            Err(WebhookError::MissingHeader("webhook-signature"))
        );
        // Rotation: the sender signs with old and new secrets; either receiver accepts.
        let both = format!("{} {}", sign(&other, "msg_1", NOW, body), good);
        assert_eq!(check(&both, body, NOW, &[key()]), Ok(()));
        assert_eq!(check(&both, body, NOW, &[other]), Ok(()));
        assert_eq!(
            check("v1,@@@ v2,abc", body, NOW, &[key()]),
            Err(WebhookError::BadSignature),
            "garbage"
        );
        assert_eq!(
            verify(&[key()], Some("m"), Some("soon"), Some(&good), body, NOW),
            Err(WebhookError::BadTimestamp)
        );
    }

    #[test]
    fn known_answer_from_the_standard_webhooks_reference() {
        // Test vector from the Standard Webhooks specification's reference libraries.
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&key(), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
