//! Merchant authentication: bearer API keys, stored as SHA-256 hashes, compared in
//! constant time. A key is never logged.

use payments::MerchantId;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone)]
pub struct MerchantKey {
    pub merchant: MerchantId,
    pub key_sha256: [u8; 32],
}

impl MerchantKey {
    /// From `merchant_id` and the hex SHA-256 of the key.
    pub fn from_hash(merchant: &str, hex_sha256: &str) -> Result<Self, String> {
        let merchant = MerchantId::parse(merchant).map_err(|e| e.to_string())?;
        let bytes = hex::decode(hex_sha256.trim())
            .map_err(|_| format!("key hash of {merchant} is not hex"))?;
        let key_sha256: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("key hash of {merchant} must be 64 hex digits (SHA-256)"))?;
        Ok(MerchantKey {
            merchant,
            key_sha256,
        })
    }

    pub fn from_plain(merchant: &str, key: &str) -> Result<Self, String> {
        Self::from_hash(merchant, &hash_key(key))
    }
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The merchant owning the bearer key in `authorization`, if any.
pub fn authenticate(keys: &[MerchantKey], authorization: Option<&str>) -> Option<MerchantId> {
    let token = authorization?.strip_prefix("Bearer ")?.trim();
    if token.is_empty() {
        return None;
    }
    let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    // Compare against every key, so timing does not reveal which merchant matched.
    let mut found = None;
    for k in keys {
        if bool::from(k.key_sha256.ct_eq(&presented)) {
            found = Some(k.merchant.clone());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys() {
        let keys = vec![
            MerchantKey::from_plain("acme", "sk_a").unwrap(),
            MerchantKey::from_plain("globex", "sk_g").unwrap(),
        ];
        assert_eq!(
            authenticate(&keys, Some("Bearer sk_g")).unwrap().as_str(),
            "globex"
        );
        assert!(authenticate(&keys, Some("Bearer sk_x")).is_none());
        assert!(authenticate(&keys, Some("sk_a")).is_none());
        assert!(authenticate(&keys, Some("Bearer ")).is_none());
        assert!(authenticate(&keys, None).is_none());
        assert!(MerchantKey::from_hash("acme", "zz").is_err());
    }
}
