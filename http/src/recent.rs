//! Creates this API instance accepted recently, until the projection has them: one
//! answer per Idempotency-Key, and reads of a payment it has just accepted.
//!
//! A key is *claimed* before its create is published, in one step under the lock, so of
//! concurrent requests with one key exactly one body can be acknowledged: the same body
//! is published again and answered alike (a duplicate create is harmless to the worker),
//! another body is refused at once. A claim whose publish failed is released once no
//! request with it is still publishing, and the key is free again.

use std::collections::{HashMap, VecDeque};

/// What a request learns when it claims its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// No request with this key is known: this one goes ahead.
    First,
    /// A request with the same body holds the key (published, or being published).
    SameRequest,
    /// A request with another body holds the key.
    OtherRequest,
}

struct Entry {
    hash: String,
    payment_id: String,
    /// Requests with this claim still publishing.
    publishing: u32,
    /// What the accepted create reads back as, once it is in Kafka.
    accepted: Option<Accepted>,
}

/// A create in Kafka that the projection may not hold yet, as JSON text (a tenth of the
/// memory of a parsed value: this is read only in the projection's lag).
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The payment as `GET /v1/payments/{id}` shows it before any event is projected.
    pub payment: Box<str>,
    /// Its history so far (a JSON array), as `GET /v1/payments/{id}/events` shows it.
    pub events: Box<str>,
}

#[derive(Default)]
pub struct RecentCreates {
    by_key: HashMap<(String, String), Entry>,
    /// `(merchant, payment id) → key`, for reads.
    by_id: HashMap<(String, String), String>,
    order: VecDeque<(String, String)>,
}

impl RecentCreates {
    /// Creates remembered, oldest forgotten first: about 1.5 KB each, 30 MB in all. The
    /// projection holds a payment long before this many newer ones arrive (20 s at
    /// 1,000 payments/s; its lag is milliseconds).
    const CAPACITY: usize = 20_000;

    /// Claims `key` of `merchant` for a request whose body hashes to `hash`.
    pub fn claim(&mut self, merchant: &str, key: &str, hash: &str, payment_id: &str) -> Claim {
        let k = (merchant.to_owned(), key.to_owned());
        if let Some(e) = self.by_key.get_mut(&k) {
            return if e.hash == hash {
                e.publishing += 1;
                Claim::SameRequest
            } else {
                Claim::OtherRequest
            };
        }
        self.by_key.insert(
            k.clone(),
            Entry {
                hash: hash.to_owned(),
                payment_id: payment_id.to_owned(),
                publishing: 1,
                accepted: None,
            },
        );
        self.by_id
            .insert((merchant.to_owned(), payment_id.to_owned()), key.to_owned());
        self.order.push_back(k);
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.forget(&old);
            }
        }
        Claim::First
    }

    /// A claimed request's publish failed. The key is free again once no request with
    /// the claim is publishing and none was published.
    pub fn release(&mut self, merchant: &str, key: &str) {
        let k = (merchant.to_owned(), key.to_owned());
        let free = match self.by_key.get_mut(&k) {
            Some(e) => {
                e.publishing = e.publishing.saturating_sub(1);
                e.publishing == 0 && e.accepted.is_none()
            }
            None => false,
        };
        if free {
            self.forget(&k);
            self.order.retain(|o| *o != k);
        }
    }

    /// A claimed request's create is in Kafka.
    pub fn published(&mut self, merchant: &str, key: &str, accepted: Accepted) {
        if let Some(e) = self.by_key.get_mut(&(merchant.to_owned(), key.to_owned())) {
            e.publishing = e.publishing.saturating_sub(1);
            e.accepted = Some(accepted);
        }
    }

    /// The payment `payment_id` of `merchant` as accepted here, if this instance
    /// published its create and still remembers it.
    pub fn accepted(&self, merchant: &str, payment_id: &str) -> Option<&Accepted> {
        let key = self
            .by_id
            .get(&(merchant.to_owned(), payment_id.to_owned()))?;
        self.by_key
            .get(&(merchant.to_owned(), key.clone()))?
            .accepted
            .as_ref()
    }

    fn forget(&mut self, k: &(String, String)) {
        if let Some(e) = self.by_key.remove(k) {
            self.by_id.remove(&(k.0.clone(), e.payment_id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted() -> Accepted {
        Accepted {
            payment: r#"{"id":"pay_1","status":"NEW"}"#.into(),
            events: "[]".into(),
        }
    }

    #[test]
    fn of_concurrent_requests_with_one_key_one_body_is_acknowledged() {
        let mut r = RecentCreates::default();
        assert_eq!(r.claim("m", "k", "h1", "pay_1"), Claim::First);
        assert_eq!(r.claim("m", "k", "h1", "pay_1"), Claim::SameRequest);
        assert_eq!(r.claim("m", "k", "h2", "pay_1"), Claim::OtherRequest);
        // Another merchant's key is its own.
        assert_eq!(r.claim("other", "k", "h2", "pay_2"), Claim::First);
        assert!(
            r.accepted("m", "pay_1").is_none(),
            "readable before it is in Kafka"
        );
        r.published("m", "k", accepted());
        assert!(r
            .accepted("m", "pay_1")
            .is_some_and(|a| a.payment.contains("\"status\":\"NEW\"")));
        assert!(
            r.accepted("other", "pay_1").is_none(),
            "another merchant reads it"
        );
        // A failed publish beside a successful one does not free the key.
        r.release("m", "k");
        assert_eq!(r.claim("m", "k", "h2", "pay_1"), Claim::OtherRequest);
    }

    #[test]
    fn a_key_whose_every_publish_failed_is_free_again() {
        let mut r = RecentCreates::default();
        assert_eq!(r.claim("m", "k", "h1", "pay_1"), Claim::First);
        assert_eq!(r.claim("m", "k", "h1", "pay_1"), Claim::SameRequest);
        r.release("m", "k");
        // One request with the claim is still publishing: the key stays taken.
        assert_eq!(r.claim("m", "k", "h2", "pay_1"), Claim::OtherRequest);
        r.release("m", "k");
        assert_eq!(r.claim("m", "k", "h2", "pay_1"), Claim::First);
    }
}
