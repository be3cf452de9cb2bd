//! The verdicts every harness states the same way (the e2e tests, `make chaos`,
//! `make soak`): the provider's ledger against the projection, and a payment's history
//! replayed through the domain.

use crate::client::History;
use anyhow::Context as _;
use payments::machine::PaymentState;
use payments::{Event, Status};
use std::collections::HashMap;

/// The provider's ledger judged against the payments' statuses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LedgerVerdict {
    /// Payments the provider captured more than once.
    pub double_charged: Vec<String>,
    /// Judged payments captured but not `COMPLETED`.
    pub charged_not_completed: Vec<String>,
    /// `COMPLETED` payments the provider never captured.
    pub completed_not_charged: Vec<String>,
}

impl LedgerVerdict {
    /// Fails with every payment the ledger disagrees about.
    pub fn ensure_clean(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            *self == LedgerVerdict::default(),
            "the provider's ledger disagrees with the projection: {self:?}"
        );
        Ok(())
    }
}

/// Judges `ledger` against `statuses` (payment id → status, as projected): at most one
/// capture for any payment, and each judged payment captured exactly when `COMPLETED`.
pub fn ledger(ledger: &simulator::Ledger, statuses: &HashMap<String, String>) -> LedgerVerdict {
    let mut captures: HashMap<&str, u32> = HashMap::new();
    for ch in &ledger.charges {
        *captures.entry(ch.reference.as_str()).or_default() += ch.captures;
    }
    let mut v = LedgerVerdict::default();
    for (id, n) in &captures {
        if *n > 1 {
            v.double_charged.push((*id).to_owned());
        }
        if *n >= 1 && statuses.get(*id).is_some_and(|s| s != "COMPLETED") {
            v.charged_not_completed.push((*id).to_owned());
        }
    }
    for (id, status) in statuses {
        if status == "COMPLETED" && captures.get(id.as_str()).copied().unwrap_or(0) == 0 {
            v.completed_not_charged.push(id.clone());
        }
    }
    v.double_charged.sort();
    v.charged_not_completed.sort();
    v.completed_not_charged.sort();
    v
}

/// One payment's events, in order, replayed through the domain's `evolve`.
#[derive(Debug, Default)]
pub struct Replayed {
    /// The state the events lead to.
    pub state: Option<PaymentState>,
    /// Whether the seqs are not exactly 1..=n.
    pub gap: bool,
    /// Steps the domain's one transition rule forbids.
    pub illegal: usize,
}

pub fn replay<'a>(events: impl IntoIterator<Item = &'a Event>) -> Replayed {
    let mut r = Replayed::default();
    for (i, e) in events.into_iter().enumerate() {
        if e.seq != i as u64 + 1 {
            r.gap = true;
        }
        let from = r.state.as_ref().map(|s| s.status);
        r.state = payments::evolve(r.state.take(), e);
        if let Some(to) = r.state.as_ref().map(|s| s.status) {
            if !Status::transition_allowed(from, to) {
                r.illegal += 1;
            }
        }
    }
    r
}

/// Checks that each payment's seqs are exactly 1..=n and that its history moves only as
/// the domain's one transition rule allows. Returns the number of payments.
pub fn assert_gap_free(events: &History) -> anyhow::Result<usize> {
    let mut by_payment: HashMap<&str, Vec<Event>> = HashMap::new();
    for ((pid, seq), e) in events {
        let event: Event = serde_json::from_value(e.clone())
            .with_context(|| format!("payment {pid}: event {seq} is not an event"))?;
        by_payment.entry(pid).or_default().push(event);
    }
    for (pid, events) in &by_payment {
        let r = replay(events);
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        anyhow::ensure!(
            !r.gap,
            "payment {pid}: seqs {seqs:?} are not 1..={}",
            seqs.len()
        );
        anyhow::ensure!(
            r.illegal == 0,
            "payment {pid}: {} of its events move it as the transition rule forbids",
            r.illegal
        );
    }
    Ok(by_payment.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(reference: &str, captures: u32) -> simulator::Charge {
        simulator::Charge {
            charge_id: format!("ch_{reference}"),
            idempotency_key: reference.to_owned(),
            amount: 100,
            currency: "EUR".into(),
            reference: reference.to_owned(),
            status: simulator::ChargeStatus::Succeeded,
            code: None,
            message: None,
            captures,
            requests: 1,
        }
    }

    #[test]
    fn the_ledger_verdict_names_every_disagreement() {
        let ledger = simulator::Ledger {
            charges: vec![
                charge("a", 1),
                charge("b", 2),
                charge("c", 1),
                charge("x", 1),
            ],
            total_captures: 5,
            requests: 4,
            webhooks_sent: 0,
            faults: 0,
            refunds: Vec::new(),
        };
        let statuses: HashMap<String, String> = [
            ("a", "COMPLETED"),
            ("b", "COMPLETED"),
            ("c", "FAILED"),
            ("d", "COMPLETED"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let v = super::ledger(&ledger, &statuses);
        assert_eq!(v.double_charged, ["b"]);
        assert_eq!(v.charged_not_completed, ["c"]);
        assert_eq!(v.completed_not_charged, ["d"]);
        assert!(v.ensure_clean().is_err());
    }
}
