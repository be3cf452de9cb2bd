//! Creates this API instance accepted recently, until the projection has them: one
//! answer per Idempotency-Key, and reads of what it has just accepted, alone or in the
//! lists it belongs to.
//!
//! A key is *claimed* before its create is published, in one step under the lock, so of
//! concurrent requests with one key exactly one body can be acknowledged: the same body
//! is published again and answered alike (a duplicate create is harmless to the worker),
//! another body is refused at once. A claim whose publish failed is released once no
//! request with it is still publishing, and the key is free again.
//!
//! A list merges in what the projection did not show ([`RecentCreates::not_in_projection`]);
//! what a read found in the projection is remembered as projected, so later lists ask
//! the projection alone about it. Nothing here is ever the answer for something the
//! projection holds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

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

struct Entry<T> {
    hash: String,
    /// The id of what the request creates (a payment's, a refund's).
    id: String,
    /// Requests with this claim still publishing.
    publishing: u32,
    /// What the accepted request reads back as, once it is in Kafka, with the offset it
    /// was published at: of two publishes of one body, the lower offset is the one the
    /// worker applies (both are in one partition, keyed by the payment).
    accepted: Option<(i64, T)>,
    /// When a read found it in the projection (a read begun later sees it there).
    projected: Option<Instant>,
}

/// Requests accepted here, as `T` (what they read back as) until the projection has them.
pub struct RecentCreates<T> {
    by_key: HashMap<(String, String), Entry<T>>,
    /// `(merchant, id) → key`, for reads.
    by_id: HashMap<(String, String), String>,
    order: VecDeque<(String, String)>,
}

impl<T> Default for RecentCreates<T> {
    fn default() -> Self {
        RecentCreates {
            by_key: HashMap::new(),
            by_id: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<T> RecentCreates<T> {
    /// Creates remembered, oldest forgotten first: about 1.5 KB each, 30 MB in all. The
    /// projection holds a payment long before this many newer ones arrive (20 s at
    /// 1,000 payments/s; its lag is milliseconds).
    const CAPACITY: usize = 20_000;

    /// Claims `key` of `merchant` for a request whose body hashes to `hash` and which
    /// creates `id`.
    pub fn claim(&mut self, merchant: &str, key: &str, hash: &str, id: &str) -> Claim {
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
                id: id.to_owned(),
                publishing: 1,
                accepted: None,
                projected: None,
            },
        );
        self.by_id
            .insert((merchant.to_owned(), id.to_owned()), key.to_owned());
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

    /// A claimed request is in Kafka at `offset` of the commands topic.
    pub fn published(&mut self, merchant: &str, key: &str, offset: i64, accepted: T) {
        if let Some(e) = self.by_key.get_mut(&(merchant.to_owned(), key.to_owned())) {
            e.publishing = e.publishing.saturating_sub(1);
            if e.accepted.as_ref().is_none_or(|(at, _)| offset < *at) {
                e.accepted = Some((offset, accepted));
            }
        }
    }

    /// What `id` of `merchant` reads back as, if this instance published its request
    /// and still remembers it.
    pub fn accepted(&self, merchant: &str, id: &str) -> Option<&T> {
        let e = self.by_key.get(&self.key_of(merchant, id)?)?;
        e.accepted.as_ref().map(|(_, a)| a)
    }

    /// A read found `id` of `merchant` in the projection.
    pub fn projected(&mut self, merchant: &str, id: &str) {
        let key = self.key_of(merchant, id);
        if let Some(e) = key.and_then(|k| self.by_key.get_mut(&k)) {
            e.projected.get_or_insert_with(Instant::now);
        }
    }

    /// What a read of the projection begun at `asked` may lack of `merchant`'s accepted
    /// requests, each `pick`ed (`None` leaves it out) with its offset: those it did not
    /// return (`shown` are the ids it returned, remembered as projected from now on) and
    /// no read had found in the projection before `asked`. One may have been projected
    /// since `asked`: a list that must not show it twice asks the projection again.
    pub fn not_in_projection<U>(
        &mut self,
        merchant: &str,
        asked: Instant,
        shown: &HashSet<&str>,
        pick: impl Fn(&T) -> Option<U>,
    ) -> Vec<(i64, U)> {
        for id in shown {
            self.projected(merchant, id);
        }
        self.by_key
            .iter()
            .filter(|((m, _), e)| {
                m == merchant
                    && !shown.contains(e.id.as_str())
                    && e.projected.is_none_or(|at| at >= asked)
            })
            .filter_map(|(_, e)| {
                let (offset, a) = e.accepted.as_ref()?;
                Some((*offset, pick(a)?))
            })
            .collect()
    }

    /// The claim of `id` of `merchant`.
    fn key_of(&self, merchant: &str, id: &str) -> Option<(String, String)> {
        let key = self.by_id.get(&(merchant.to_owned(), id.to_owned()))?;
        Some((merchant.to_owned(), key.clone()))
    }

    fn forget(&mut self, k: &(String, String)) {
        if let Some(e) = self.by_key.remove(k) {
            self.by_id.remove(&(k.0.clone(), e.id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIEW: &str = r#"{"id":"pay_1","status":"NEW"}"#;

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
        r.published("m", "k", 7, VIEW);
        assert!(r
            .accepted("m", "pay_1")
            .is_some_and(|a| a.contains("\"status\":\"NEW\"")));
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
        let mut r = RecentCreates::<&str>::default();
        assert_eq!(r.claim("m", "k", "h1", "pay_1"), Claim::First);
        assert_eq!(r.claim("m", "k", "h1", "pay_1"), Claim::SameRequest);
        r.release("m", "k");
        // One request with the claim is still publishing: the key stays taken.
        assert_eq!(r.claim("m", "k", "h2", "pay_1"), Claim::OtherRequest);
        r.release("m", "k");
        assert_eq!(r.claim("m", "k", "h2", "pay_1"), Claim::First);
    }

    #[test]
    fn of_two_publishes_of_one_body_the_lower_offset_reads_back() {
        let mut r = RecentCreates::default();
        r.claim("m", "k", "h", "pay_1");
        r.claim("m", "k", "h", "pay_1");
        r.published("m", "k", 9, "later");
        r.published("m", "k", 4, "applied");
        assert_eq!(r.accepted("m", "pay_1"), Some(&"applied"));
        r.claim("m", "k", "h", "pay_1");
        r.published("m", "k", 12, "duplicate");
        assert_eq!(r.accepted("m", "pay_1"), Some(&"applied"));
    }

    #[test]
    fn a_list_merges_in_what_the_projection_did_not_show() {
        let mut r = RecentCreates::default();
        for (key, id, offset) in [("k1", "pay_1", 1), ("k2", "pay_2", 2), ("k3", "pay_3", 3)] {
            r.claim("m", key, "h", id);
            r.published("m", key, offset, id);
        }
        r.claim("other", "k1", "h", "pay_9");
        r.published("other", "k1", 4, "pay_9");
        r.claim("m", "k4", "h", "pay_4"); // still publishing: not accepted yet
        let ids = |r: &mut RecentCreates<&'static str>, asked, shown: &[&str]| {
            let shown: HashSet<&str> = shown.iter().copied().collect();
            let mut got = r.not_in_projection("m", asked, &shown, |id| Some(*id));
            got.sort();
            got
        };
        let before = Instant::now();
        assert_eq!(
            ids(&mut r, before, &["pay_1"]),
            [(2, "pay_2"), (3, "pay_3")],
            "what the projection showed is shown once, from it"
        );
        // A read begun before pay_1 was found projected still merges it in (and its
        // caller asks the projection again); one begun after does not.
        assert_eq!(ids(&mut r, before, &[]).len(), 3);
        r.projected("m", "pay_3");
        let after = Instant::now();
        assert_eq!(ids(&mut r, after, &[]), [(2, "pay_2")]);
        // Picking filters.
        let shown = HashSet::new();
        let picked = r.not_in_projection("m", before, &shown, |id| (*id == "pay_1").then_some(1));
        assert_eq!(picked, [(1, 1)]);
        // The readback of a projected create stays for single reads.
        assert_eq!(r.accepted("m", "pay_3"), Some(&"pay_3"));
    }
}
