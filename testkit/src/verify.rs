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

/// A refund as the projection holds it (the `refunds` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectedRefund {
    pub refund_id: String,
    pub payment_id: String,
    /// Its number within the payment (its provider key is `pay_<id>_r<number>`).
    pub number: u32,
    pub amount: i64,
    pub status: String,
}

/// Where the provider's refunds disagree with the projection.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RefundVerdict {
    /// Payments the provider returned more money for than they were (projected) for.
    pub over_refunded: Vec<String>,
    /// Refund keys the provider returned money for more than once.
    pub double_refunded: Vec<String>,
    /// Accepted refunds the projection does not hold, or holds as still `PENDING`.
    pub lost: Vec<String>,
    /// Refunds whose money moved without the projection saying `SUCCEEDED`, or the
    /// other way round.
    pub mismatched: Vec<String>,
}

/// Judges the provider's refunds against the projection: `amounts` (payment id → captured
/// amount), `refunds` (every projected refund) and `accepted` (the refund ids the API
/// answered 202).
pub fn refunds(
    ledger: &simulator::Ledger,
    amounts: &HashMap<String, i64>,
    projected: &[ProjectedRefund],
    accepted: &[String],
) -> RefundVerdict {
    let mut v = RefundVerdict::default();
    let mut returned: HashMap<&str, i64> = HashMap::new();
    let mut moved: HashMap<&str, u32> = HashMap::new();
    for r in &ledger.refunds {
        if r.refunds_made > 1 {
            v.double_refunded.push(r.idempotency_key.clone());
        }
        if r.refunds_made >= 1 {
            *returned.entry(r.reference.as_str()).or_default() += r.amount;
        }
        moved.insert(r.idempotency_key.as_str(), r.refunds_made);
    }
    for (payment, sum) in &returned {
        if amounts.get(*payment).is_none_or(|a| sum > a) {
            v.over_refunded.push((*payment).to_owned());
        }
    }
    let by_id: HashMap<&str, &ProjectedRefund> = projected
        .iter()
        .map(|r| (r.refund_id.as_str(), r))
        .collect();
    for id in accepted {
        match by_id.get(id.as_str()) {
            Some(r) if r.status != "PENDING" => {}
            _ => v.lost.push(id.clone()),
        }
    }
    for r in projected {
        let Ok(payment) = payments::PaymentId::parse(&r.payment_id) else {
            v.mismatched.push(r.refund_id.clone());
            continue;
        };
        let key = payments::provider_refund_key(&payment, r.number);
        let made = moved.get(key.as_str()).copied().unwrap_or(0) >= 1;
        if made != (r.status == "SUCCEEDED") && r.status != "PENDING" {
            v.mismatched.push(r.refund_id.clone());
        }
    }
    for list in [
        &mut v.over_refunded,
        &mut v.double_refunded,
        &mut v.lost,
        &mut v.mismatched,
    ] {
        list.sort();
    }
    v
}

/// The notifications a merchant endpoint received, judged against the events they
/// announce.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NotificationVerdict {
    /// Ids (`evt_<payment>_<seq>`) of status changes that no delivery announced.
    pub missing: Vec<String>,
    /// Deliveries whose id no status change explains, or whose body disagrees with the
    /// event of its id (id, type, payment or seq).
    pub wrong: Vec<String>,
}

/// Judges `received` (each delivery's `webhook-id` and body, duplicates allowed) against
/// the status changes among `events` (every payment's events, duplicates allowed): each
/// must have been delivered at least once, and each delivery must describe its event.
pub fn notifications<'a>(
    events: impl IntoIterator<Item = &'a Event>,
    received: &[(String, serde_json::Value)],
) -> NotificationVerdict {
    let mut expected: HashMap<String, (&'static str, String, u64)> = HashMap::new();
    for e in events {
        if let Some(kind) = payments::notify::kind(&e.body) {
            let id = format!("evt_{}_{}", e.payment_id.as_uuid().simple(), e.seq);
            expected.insert(id, (kind, e.payment_id.to_string(), e.seq));
        }
    }
    let mut v = NotificationVerdict::default();
    let mut seen = std::collections::HashSet::new();
    for (id, body) in received {
        let fits = expected.get(id).is_some_and(|(kind, payment, seq)| {
            body["id"] == id.as_str()
                && body["type"] == *kind
                && body["payment_id"] == payment.as_str()
                && body["seq"] == *seq
        });
        if !fits {
            v.wrong.push(id.clone());
        }
        seen.insert(id.as_str());
    }
    v.missing = expected
        .into_keys()
        .filter(|id| !seen.contains(id.as_str()))
        .collect();
    v.missing.sort();
    v.wrong.sort();
    v.wrong.dedup();
    v
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

    fn refund(payment: &str, n: u32, amount: i64, made: u32) -> simulator::Refund {
        let pid = payments::PaymentId::parse(payment).unwrap();
        simulator::Refund {
            refund_id: format!("re_sim_{n}"),
            idempotency_key: payments::provider_refund_key(&pid, n),
            charge_key: payments::provider_idempotency_key(&pid),
            reference: payment.to_owned(),
            refund: n,
            amount,
            currency: "EUR".into(),
            status: if made > 0 {
                simulator::RefundStatus::Succeeded
            } else {
                simulator::RefundStatus::Failed
            },
            code: None,
            message: None,
            refunds_made: made,
            requests: 1,
        }
    }

    fn projected(
        refund_id: &str,
        payment: &str,
        n: u32,
        amount: i64,
        status: &str,
    ) -> ProjectedRefund {
        ProjectedRefund {
            refund_id: refund_id.into(),
            payment_id: payment.into(),
            number: n,
            amount,
            status: status.into(),
        }
    }

    #[test]
    fn the_refund_verdict_names_every_disagreement() {
        let (a, b) = (
            "pay_0000000000000000000000000000000a",
            "pay_0000000000000000000000000000000b",
        );
        let ledger = simulator::Ledger {
            charges: vec![],
            total_captures: 0,
            requests: 0,
            webhooks_sent: 0,
            faults: 0,
            refunds: vec![
                refund(a, 0, 600, 1),
                refund(a, 1, 600, 1),
                refund(b, 0, 100, 2),
                refund(b, 1, 50, 0),
            ],
        };
        let amounts: HashMap<String, i64> = [(a.to_owned(), 1000), (b.to_owned(), 1000)].into();
        let rows = vec![
            projected("re_a0", a, 0, 600, "SUCCEEDED"),
            projected("re_a1", a, 1, 600, "FAILED"),
            projected("re_b0", b, 0, 100, "SUCCEEDED"),
            projected("re_b1", b, 1, 50, "FAILED"),
            projected("re_b2", b, 2, 10, "PENDING"),
        ];
        let accepted = ["re_a0", "re_b1", "re_b2", "re_gone"].map(String::from);
        let v = refunds(&ledger, &amounts, &rows, &accepted);
        assert_eq!(
            v,
            RefundVerdict {
                over_refunded: vec![a.to_owned()],
                double_refunded: vec![payments::provider_refund_key(
                    &payments::PaymentId::parse(b).unwrap(),
                    0
                )],
                lost: vec!["re_b2".to_owned(), "re_gone".to_owned()],
                mismatched: vec!["re_a1".to_owned()],
            }
        );
        let ledger = simulator::Ledger {
            refunds: vec![refund(b, 0, 100, 1), refund(b, 1, 50, 0)],
            ..ledger
        };
        let clean = refunds(&ledger, &amounts, &rows[2..4], &["re_b1".to_owned()]);
        assert_eq!(clean, RefundVerdict::default());
    }

    #[test]
    fn the_notification_verdict_names_what_is_missing_and_what_is_wrong() {
        let pid = payments::PaymentId::parse("pay_0000000000000000000000000000000a").unwrap();
        let event = |seq: u64, body: payments::EventBody| Event {
            payment_id: pid,
            seq,
            occurred_at_ms: 0,
            caused_by: payments::CommandId::parse("c").unwrap(),
            body,
        };
        let events = [
            event(2, payments::EventBody::ProcessingStarted),
            // Not a status change: nobody is told.
            event(3, payments::EventBody::ChargeRequested { attempt: 1 }),
            event(4, payments::EventBody::ProcessingStarted),
            // A redelivered event is one notification.
            event(4, payments::EventBody::ProcessingStarted),
        ];
        let hex = pid.as_uuid().simple();
        let delivery = |seq: u64, kind: &str| {
            let id = format!("evt_{hex}_{seq}");
            let body = serde_json::json!({
                "id": id, "type": kind, "payment_id": pid.to_string(), "seq": seq,
            });
            (id, body)
        };
        let all = [
            delivery(2, "payment.processing"),
            delivery(4, "payment.processing"),
        ];
        let v = notifications(&events, &[all[0].clone(), all[1].clone(), all[0].clone()]);
        assert_eq!(v, NotificationVerdict::default(), "duplicates are fine");
        let v = notifications(&events, &all[..1]);
        assert_eq!(v.missing, [format!("evt_{hex}_4")]);
        let v = notifications(
            &events,
            &[
                all[0].clone(),
                delivery(4, "payment.completed"),
                delivery(3, "payment.processing"),
            ],
        );
        assert_eq!(v.wrong, [format!("evt_{hex}_3"), format!("evt_{hex}_4")]);
        assert!(v.missing.is_empty(), "{v:?}");
    }
}
