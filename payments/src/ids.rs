//! Identifiers. Each one is parsed once at the edge and cannot hold an invalid value.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Why a value could not be parsed into a domain type. The message says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ParseError {
    pub field: &'static str,
    pub message: String,
}

impl ParseError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// Namespace for deriving payment ids from `(merchant, idempotency key)`.
const PAYMENT_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2b7e_9a44_4c1e_8d0b_52a7_e3f9_1c60);

/// A payment's id: a UUID rendered as `pay_<32 hex>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PaymentId(Uuid);

impl PaymentId {
    /// The id of the payment created by `merchant` under `key`. Deterministic, so a
    /// repeated create (same key) names the same payment on every API instance.
    pub fn derive(merchant: &MerchantId, key: &IdempotencyKey) -> Self {
        let name = format!("{}\u{0}{}", merchant.as_str(), key.as_str());
        PaymentId(Uuid::new_v5(&PAYMENT_NAMESPACE, name.as_bytes()))
    }

    pub fn from_uuid(u: Uuid) -> Self {
        PaymentId(u)
    }

    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let hex = s
            .strip_prefix("pay_")
            .ok_or_else(|| ParseError::new("payment_id", "must look like pay_<32 hex digits>"))?;
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseError::new(
                "payment_id",
                "must look like pay_<32 hex digits>",
            ));
        }
        Uuid::parse_str(hex)
            .map(PaymentId)
            .map_err(|e| ParseError::new("payment_id", e.to_string()))
    }

    /// Key bytes used for Kafka message keys and store keys.
    pub fn key_bytes(&self) -> [u8; 16] {
        *self.0.as_bytes()
    }
}

impl fmt::Display for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pay_{}", self.0.simple())
    }
}

impl TryFrom<String> for PaymentId {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        PaymentId::parse(&s)
    }
}

impl From<PaymentId> for String {
    fn from(p: PaymentId) -> String {
        p.to_string()
    }
}

/// Namespace for deriving refund ids from `(payment, idempotency key)`.
const REFUND_NAMESPACE: Uuid = Uuid::from_u128(0x2d8e_51a0_7c3b_4f69_b1e4_0a93_6c27_d845);

/// A refund's id: a UUID rendered as `re_<32 hex>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RefundId(Uuid);

impl RefundId {
    /// The id of the refund of `payment` requested under `key`. Deterministic, so a
    /// repeated request (same key) names the same refund on every API instance.
    pub fn derive(payment: &PaymentId, key: &IdempotencyKey) -> Self {
        let mut name = payment.key_bytes().to_vec();
        name.extend_from_slice(key.as_str().as_bytes());
        RefundId(Uuid::new_v5(&REFUND_NAMESPACE, &name))
    }

    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let hex = s
            .strip_prefix("re_")
            .filter(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| ParseError::new("refund_id", "must look like re_<32 hex digits>"))?;
        Uuid::parse_str(hex)
            .map(RefundId)
            .map_err(|e| ParseError::new("refund_id", e.to_string()))
    }
}

impl fmt::Display for RefundId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "re_{}", self.0.simple())
    }
}

impl TryFrom<String> for RefundId {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        RefundId::parse(&s)
    }
}

impl From<RefundId> for String {
    fn from(r: RefundId) -> String {
        r.to_string()
    }
}

macro_rules! string_newtype {
    ($name:ident, $field:literal, $max:expr, $allowed:expr, $desc:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const MAX_LEN: usize = $max;

            pub fn parse(s: &str) -> Result<Self, ParseError> {
                if s.is_empty() || s.len() > Self::MAX_LEN {
                    return Err(ParseError::new(
                        $field,
                        format!("must be 1 to {} characters long ({})", Self::MAX_LEN, $desc),
                    ));
                }
                let allowed: fn(u8) -> bool = $allowed;
                if !s.bytes().all(allowed) {
                    return Err(ParseError::new($field, concat!("may contain only ", $desc)));
                }
                Ok($name(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = ParseError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                $name::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
    };
}

string_newtype!(
    MerchantId,
    "merchant_id",
    64,
    |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-',
    "lowercase letters, digits, '_' and '-'"
);

string_newtype!(
    IdempotencyKey,
    "idempotency_key",
    255,
    |b| b.is_ascii_graphic(),
    "printable ASCII without spaces"
);

string_newtype!(
    CommandId,
    "command_id",
    200,
    |b| b.is_ascii_graphic(),
    "printable ASCII without spaces"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payment_id_round_trips_and_rejects_garbage() {
        let m = MerchantId::parse("acme").unwrap();
        let k = IdempotencyKey::parse("order-1").unwrap();
        let id = PaymentId::derive(&m, &k);
        assert_eq!(PaymentId::parse(&id.to_string()).unwrap(), id);
        assert_eq!(id, PaymentId::derive(&m, &k), "derivation is deterministic");
        let other = PaymentId::derive(&MerchantId::parse("other").unwrap(), &k);
        assert_ne!(id, other, "same key, other merchant: other payment");
        for bad in [
            "",
            "pay_",
            "pay_xyz",
            "12345678123456781234567812345678",
            "pay_1234",
        ] {
            assert!(PaymentId::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn refund_id_is_derived_per_payment_and_key_and_round_trips() {
        let m = MerchantId::parse("acme").unwrap();
        let k = IdempotencyKey::parse("order-1").unwrap();
        let pay = PaymentId::derive(&m, &k);
        let other_pay = PaymentId::derive(&m, &IdempotencyKey::parse("order-2").unwrap());
        let r = RefundId::derive(&pay, &k);
        assert_eq!(RefundId::parse(&r.to_string()).unwrap(), r);
        assert_eq!(r, RefundId::derive(&pay, &k));
        assert_ne!(
            r,
            RefundId::derive(&other_pay, &k),
            "same key, other payment"
        );
        for bad in ["", "re_", "re_xyz", &pay.to_string()] {
            assert!(RefundId::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn idempotency_key_bounds() {
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse(&"a".repeat(255)).is_ok());
        assert!(IdempotencyKey::parse(&"a".repeat(256)).is_err());
        assert!(IdempotencyKey::parse("has space").is_err());
        assert!(IdempotencyKey::parse("ключ").is_err());
    }

    #[test]
    fn merchant_id_charset() {
        assert!(MerchantId::parse("shop_1-a").is_ok());
        assert!(MerchantId::parse("Shop").is_err());
        assert!(MerchantId::parse("a/b").is_err());
    }
}
