//! How a payment is kept in the `state` store: its [`PaymentState`] and what the
//! processor keeps beside it (its pending timers, when it expires), in a versioned
//! encoding.
//!
//! bincode is positional: a value written before a field existed cannot be read by a
//! struct that has it. So every record from version 2 on starts with [`TAG`] and a
//! version byte, and each version keeps its own reader. Version 1 is the bare bincode
//! of [`PaymentState`] that stores held before: its first byte is a bincode length
//! prefix, never `0xFF`, so the two cannot be confused.
//!
//! Changing the record: add a version, keep the readers of the older ones (a frozen copy
//! of a struct when its shape changes), and a test that the previous encoding still
//! reads.

use crate::processor::{Context, ProcessError};
use payments::machine::PaymentState;
use payments::{PaymentId, TimerKind};
use serde::{Deserialize, Serialize};
use stores::StoreError;

/// First byte of a versioned record: an invalid bincode varint, so no version-1 record
/// starts with it.
const TAG: u8 = 0xFF;
const CURRENT: u8 = 3;

/// A payment as the processor keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPayment {
    pub state: PaymentState,
    /// Timers set for the payment that have neither fired nor been cancelled, as
    /// `(due_at_ms, kind)`: the keys needed to cancel them.
    pub timers: Vec<(i64, TimerKind)>,
    /// When the payment leaves the store; set once it is terminal.
    pub expires_at_ms: Option<i64>,
}

impl StoredPayment {
    pub fn new(state: PaymentState) -> Self {
        StoredPayment {
            state,
            timers: Vec::new(),
            expires_at_ms: None,
        }
    }
}

/// The current encoding.
pub fn encode(p: &StoredPayment) -> Vec<u8> {
    let mut out = vec![TAG, CURRENT];
    out.extend(stores::encode(p));
    out
}

/// The payment `payment_id` as kept in `store`, as this step sees it (its own staged
/// writes included), if the store holds it.
pub fn load(
    ctx: &Context<'_>,
    store: &str,
    payment_id: &PaymentId,
) -> Result<Option<StoredPayment>, ProcessError> {
    match ctx.get_raw(store, &payment_id.key_bytes())? {
        None => Ok(None),
        Some(bytes) => Ok(Some(decode(store, &bytes)?)),
    }
}

/// Stages `p` in `store`, in the current encoding.
pub fn save(ctx: &mut Context<'_>, store: &str, p: &StoredPayment) {
    ctx.put_raw(store, &p.state.payment_id.key_bytes(), encode(p));
}

/// The id of a timer of `kind` set for `payment_id`: the payment, then the kind (the
/// processor that set it is part of a timer's key, so the two machines cannot clash).
pub fn timer_id(payment_id: &PaymentId, kind: TimerKind) -> Vec<u8> {
    let mut id = payment_id.key_bytes().to_vec();
    id.extend(stores::encode(&kind));
    id
}

/// Whether `bytes` are in the current encoding (others are read, and rewritten).
pub fn is_current(bytes: &[u8]) -> bool {
    bytes.starts_with(&[TAG, CURRENT])
}

/// Reads any version this code knows. `store` names the store in errors.
pub fn decode(store: &str, bytes: &[u8]) -> Result<StoredPayment, StoreError> {
    match bytes {
        [TAG, CURRENT, rest @ ..] => stores::decode(store, rest),
        // Version 2: before refunds; the state has none.
        [TAG, 2, rest @ ..] => {
            let (state, timers, expires_at_ms): (v2::PaymentState, _, _) =
                stores::decode(store, rest)?;
            Ok(StoredPayment {
                state: state.into(),
                timers,
                expires_at_ms,
            })
        }
        [TAG, version, ..] => Err(StoreError::Decode {
            store: store.to_owned(),
            reason: format!(
                "payment record version {version} is newer than this worker knows ({CURRENT}): \
                 run a worker of the version that wrote it"
            ),
        }),
        // Version 1: the bare state, written before timers were tracked. Its timers
        // fire and are ignored if stale, as before.
        v1 => stores::decode::<v2::PaymentState>(store, v1).map(|s| StoredPayment::new(s.into())),
    }
}

/// The payment's state as versions 1 and 2 kept it (before refunds), frozen.
mod v2 {
    use payments::machine::Awaiting;
    use payments::{Amount, Currency, IdempotencyKey, MerchantId, PaymentId, Status};
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct PaymentState {
        pub payment_id: PaymentId,
        pub merchant_id: MerchantId,
        pub amount: Amount,
        pub currency: Currency,
        pub idempotency_key: IdempotencyKey,
        pub request_hash: String,
        pub reference: Option<String>,
        pub description: Option<String>,
        pub traceparent: Option<String>,
        pub metadata: BTreeMap<String, String>,
        pub status: Status,
        pub seq: u64,
        pub attempt: u32,
        pub checks: u32,
        pub wait: u32,
        pub awaiting: Awaiting,
        pub cancel_requested: bool,
        pub stuck: bool,
        pub provider_ref: Option<String>,
        pub failure_code: Option<String>,
        pub failure_message: Option<String>,
        pub created_at_ms: i64,
        pub updated_at_ms: i64,
    }

    impl From<PaymentState> for payments::machine::PaymentState {
        fn from(s: PaymentState) -> Self {
            payments::machine::PaymentState {
                payment_id: s.payment_id,
                merchant_id: s.merchant_id,
                amount: s.amount,
                currency: s.currency,
                idempotency_key: s.idempotency_key,
                request_hash: s.request_hash,
                reference: s.reference,
                description: s.description,
                traceparent: s.traceparent,
                metadata: s.metadata,
                status: s.status,
                seq: s.seq,
                attempt: s.attempt,
                checks: s.checks,
                wait: s.wait,
                awaiting: s.awaiting,
                cancel_requested: s.cancel_requested,
                stuck: s.stuck,
                provider_ref: s.provider_ref,
                failure_code: s.failure_code,
                failure_message: s.failure_message,
                created_at_ms: s.created_at_ms,
                updated_at_ms: s.updated_at_ms,
                refunds: Vec::new(),
            }
        }
    }

    /// What the previous versions wrote (refunds dropped), for the tests that write it.
    #[cfg(test)]
    impl From<&payments::machine::PaymentState> for PaymentState {
        fn from(s: &payments::machine::PaymentState) -> Self {
            let s = s.clone();
            PaymentState {
                payment_id: s.payment_id,
                merchant_id: s.merchant_id,
                amount: s.amount,
                currency: s.currency,
                idempotency_key: s.idempotency_key,
                request_hash: s.request_hash,
                reference: s.reference,
                description: s.description,
                traceparent: s.traceparent,
                metadata: s.metadata,
                status: s.status,
                seq: s.seq,
                attempt: s.attempt,
                checks: s.checks,
                wait: s.wait,
                awaiting: s.awaiting,
                cancel_requested: s.cancel_requested,
                stuck: s.stuck,
                provider_ref: s.provider_ref,
                failure_code: s.failure_code,
                failure_message: s.failure_message,
                created_at_ms: s.created_at_ms,
                updated_at_ms: s.updated_at_ms,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use payments::machine::Awaiting;
    use payments::{
        decide, evolve, Command, CommandBody, CommandId, CreatePayment, Decision, IdempotencyKey,
        MerchantId, PaymentId, Policy,
    };

    fn a_payment() -> PaymentState {
        let merchant = MerchantId::parse("demo").expect("merchant");
        let key = IdempotencyKey::parse("key-1").expect("key");
        let cmd = Command {
            command_id: CommandId::parse("create-1").expect("command id"),
            payment_id: PaymentId::derive(&merchant, &key),
            issued_at_ms: 1_700_000_000_000,
            body: CommandBody::Create(CreatePayment {
                merchant_id: merchant,
                amount: payments::money::Amount::new(1050).expect("amount"),
                currency: payments::money::Currency::parse("EUR").expect("currency"),
                idempotency_key: key,
                request_hash: "hash".into(),
                reference: Some("order-1".into()),
                description: None,
                metadata: [("k".to_owned(), "v".to_owned())].into(),
                traceparent: None,
                screening: None,
            }),
        };
        let Decision::Apply { events, .. } = decide(None, &cmd, &Policy::default()) else {
            panic!("a create applies");
        };
        events.iter().fold(None, evolve).expect("a created payment")
    }

    #[test]
    fn a_record_written_by_the_previous_format_is_read() {
        let state = a_payment();
        // What stores held first: the bare bincode of the state.
        let v1 = stores::encode(&v2::PaymentState::from(&state));
        assert_ne!(v1.first(), Some(&TAG));
        let read = decode("payments", &v1).expect("version 1 reads");
        assert_eq!(read, StoredPayment::new(state.clone()));
        // Then the state with its timers and expiry, before refunds.
        let timers = vec![(42, TimerKind::Dispatch)];
        let mut v2 = vec![TAG, 2];
        v2.extend(stores::encode(&(
            v2::PaymentState::from(&state),
            timers.clone(),
            Some(9i64),
        )));
        let read = decode("payments", &v2).expect("version 2 reads");
        assert_eq!(
            read,
            StoredPayment {
                state,
                timers,
                expires_at_ms: Some(9)
            }
        );
    }

    #[test]
    fn the_current_format_round_trips() {
        let mut p = StoredPayment::new(a_payment());
        p.state.awaiting = Awaiting::ChargeReply { attempt: 1 };
        p.timers = vec![(
            42,
            TimerKind::ProviderTimeout {
                attempt: 1,
                wait: 3,
            },
        )];
        p.expires_at_ms = Some(7);
        let bytes = encode(&p);
        assert_eq!(&bytes[..2], &[TAG, CURRENT]);
        assert_eq!(decode("payments", &bytes).expect("reads"), p);
    }

    #[test]
    fn a_newer_version_is_refused_with_what_to_do() {
        let mut bytes = encode(&StoredPayment::new(a_payment()));
        bytes[1] = CURRENT + 1;
        let e = decode("payments", &bytes).expect_err("unknown version");
        assert!(
            e.to_string().contains("newer than this worker knows"),
            "{e}"
        );
    }
}
