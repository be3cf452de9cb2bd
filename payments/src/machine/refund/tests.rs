use super::*;
use crate::command::CreatePayment;
use crate::event::Event;
use crate::ids::{CommandId, MerchantId, PaymentId};
use crate::machine::{decide as decide_payment, evolve as fold, Effect, Policy};
use crate::money::{Amount, Currency};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashSet};

const CAPTURED: i64 = 1_000;

/// The machine with the refund window open (the processor's concern).
fn decide(state: Option<&PaymentState>, cmd: &Command, policy: &RefundPolicy) -> Decision {
    super::decide(state, cmd, policy, true)
}

fn merchant() -> MerchantId {
    MerchantId::parse("acme").unwrap()
}

fn pid() -> PaymentId {
    PaymentId::derive(&merchant(), &IdempotencyKey::parse("order-1").unwrap())
}

fn cmd(id: &str, at: i64, body: CommandBody) -> Command {
    Command {
        command_id: CommandId::parse(id).unwrap(),
        payment_id: pid(),
        issued_at_ms: at,
        body,
    }
}

fn apply(
    state: Option<PaymentState>,
    d: Decision,
) -> (Option<PaymentState>, Vec<Event>, Vec<Effect>) {
    match d {
        Decision::Apply { events, effects } => {
            let mut s = state;
            for e in &events {
                s = fold(s, e);
            }
            (s, events, effects)
        }
        _ => (state, vec![], vec![]),
    }
}

/// A payment of [`CAPTURED`] minor units, created and then charged, or not.
fn payment(complete: bool) -> PaymentState {
    let create = cmd(
        "c1",
        1,
        CommandBody::Create(CreatePayment {
            merchant_id: merchant(),
            amount: Amount::new(CAPTURED).unwrap(),
            currency: Currency::parse("EUR").unwrap(),
            idempotency_key: IdempotencyKey::parse("order-1").unwrap(),
            request_hash: "h".into(),
            reference: None,
            description: None,
            metadata: Default::default(),
            traceparent: None,
            screening: None,
        }),
    );
    let policy = Policy::default();
    let (s, _, _) = apply(None, decide_payment(None, &create, &policy));
    if !complete {
        return s.unwrap();
    }
    let reply = cmd(
        "r1",
        2,
        CommandBody::ProviderReply {
            op: ProviderOp::Charge,
            attempt: 1,
            outcome: ProviderOutcome::Approved {
                provider_ref: "ch_1".into(),
            },
        },
    );
    let (s, _, _) = apply(s.clone(), decide_payment(s.as_ref(), &reply, &policy));
    let s = s.unwrap();
    assert_eq!(s.status, Status::Completed);
    s
}

fn request(key: &str, amount: Option<i64>) -> CommandBody {
    let key = IdempotencyKey::parse(key).unwrap();
    CommandBody::Refund(CreateRefund {
        merchant_id: merchant(),
        refund_id: RefundId::derive(&pid(), &key),
        amount: amount.map(|a| Amount::new(a).unwrap()),
        request_hash: format!("{amount:?}"),
        idempotency_key: key,
        reason: None,
    })
}

fn reply(n: u32, attempt: u32, outcome: ProviderOutcome) -> CommandBody {
    CommandBody::ProviderReply {
        op: ProviderOp::Refund { refund: n },
        attempt,
        outcome,
    }
}

fn approved() -> ProviderOutcome {
    ProviderOutcome::Approved {
        provider_ref: "re_p".into(),
    }
}

#[test]
fn a_refund_goes_to_the_provider_once_with_its_own_key_and_succeeds() {
    let s = payment(true);
    let policy = RefundPolicy::default();
    let (s, events, effects) = apply(
        Some(s.clone()),
        decide(
            Some(&s),
            &cmd("x1", 10, request("rf-1", Some(400))),
            &policy,
        ),
    );
    assert_eq!(events.len(), 1);
    assert!(matches!(
        events[0].body,
        EventBody::RefundRequested { refund: 0, .. }
    ));
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Call {
            op: ProviderOp::Refund { refund: 0 },
            attempt: 1,
            ..
        }
    )));
    let s = s.unwrap();
    assert_eq!(s.amount_reserved(), 400);
    assert_eq!(s.amount_refunded(), 0);
    let (s, events, _) = apply(
        Some(s.clone()),
        decide(Some(&s), &cmd("x2", 11, reply(0, 1, approved())), &policy),
    );
    assert!(matches!(
        events[0].body,
        EventBody::RefundSucceeded { refund: 0, .. }
    ));
    let s = s.unwrap();
    assert_eq!(s.amount_refunded(), 400);
    assert_eq!(s.refunds[0].status, RefundStatus::Succeeded);
    assert_eq!(
        s.status,
        Status::Completed,
        "a refund does not change the payment's status"
    );
}

#[test]
fn a_repeated_request_is_a_duplicate_and_another_body_under_its_key_is_refused() {
    let s = payment(true);
    let policy = RefundPolicy::default();
    let (s, _, _) = apply(
        Some(s.clone()),
        decide(
            Some(&s),
            &cmd("x1", 10, request("rf-1", Some(400))),
            &policy,
        ),
    );
    let s = s.unwrap();
    assert_eq!(
        decide(
            Some(&s),
            &cmd("x2", 11, request("rf-1", Some(400))),
            &policy
        ),
        Decision::Ignore(Ignored::DuplicateRefund)
    );
    match decide(
        Some(&s),
        &cmd("x3", 12, request("rf-1", Some(300))),
        &policy,
    ) {
        Decision::Reject(r) => assert_eq!(r.code, "idempotency_key_reused"),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn a_refund_of_a_payment_that_is_not_completed_is_recorded_as_refused_and_never_sent() {
    let s = payment(false);
    let policy = RefundPolicy::default();
    let (s, events, effects) = apply(
        Some(s.clone()),
        decide(Some(&s), &cmd("x1", 10, request("rf-1", None)), &policy),
    );
    assert!(
        effects.is_empty(),
        "nothing goes to the provider: {effects:?}"
    );
    match &events[0].body {
        EventBody::RefundRefused { code, .. } => assert_eq!(code, "payment_not_completed"),
        other => panic!("expected a refused refund, got {other:?}"),
    }
    let s = s.unwrap();
    assert_eq!(s.refunds[0].status, RefundStatus::Failed);
    assert_eq!(s.amount_reserved(), 0);
}

#[test]
fn concurrent_requests_cannot_take_more_than_was_captured() {
    let s = payment(true);
    let policy = RefundPolicy::default();
    let (s, _, _) = apply(
        Some(s.clone()),
        decide(
            Some(&s),
            &cmd("x1", 10, request("rf-1", Some(700))),
            &policy,
        ),
    );
    let s = s.unwrap();
    // The first is still pending: its amount is reserved.
    let (s, events, effects) = apply(
        Some(s.clone()),
        decide(
            Some(&s),
            &cmd("x2", 11, request("rf-2", Some(400))),
            &policy,
        ),
    );
    assert!(effects.is_empty());
    match &events[0].body {
        EventBody::RefundRefused { code, message, .. } => {
            assert_eq!(code, "amount_exceeds_refundable");
            assert!(message.contains("300 left"), "{message}");
        }
        other => panic!("expected a refused refund, got {other:?}"),
    }
    // No amount: what is left.
    let s = s.unwrap();
    let (s, events, _) = apply(
        Some(s.clone()),
        decide(Some(&s), &cmd("x3", 12, request("rf-3", None)), &policy),
    );
    match &events[0].body {
        EventBody::RefundRequested { amount, refund, .. } => {
            assert_eq!(amount.minor_units(), 300);
            assert_eq!(*refund, 2);
        }
        other => panic!("expected a refund, got {other:?}"),
    }
    let s = s.unwrap();
    assert_eq!(s.amount_reserved(), CAPTURED);
    // A failed refund gives its amount back.
    let declined = ProviderOutcome::Declined {
        code: "refund_declined".into(),
        message: "no".into(),
    };
    let (s, _, _) = apply(
        Some(s.clone()),
        decide(Some(&s), &cmd("x4", 13, reply(0, 1, declined)), &policy),
    );
    let s = s.unwrap();
    assert_eq!(s.amount_reserved(), 300);
    let (_, events, _) = apply(
        Some(s.clone()),
        decide(Some(&s), &cmd("x5", 14, request("rf-4", None)), &policy),
    );
    assert!(
        matches!(&events[0].body, EventBody::RefundRequested { amount, .. } if amount.minor_units() == 700)
    );
}

#[test]
fn an_unanswered_refund_asks_for_its_status_before_trying_again() {
    let s = payment(true);
    let policy = RefundPolicy::default();
    let (s, _, _) = apply(
        Some(s.clone()),
        decide(Some(&s), &cmd("x1", 10, request("rf-1", None)), &policy),
    );
    let s = s.unwrap();
    let ambiguous = ProviderOutcome::Ambiguous {
        error: "timed out".into(),
    };
    let (s, events, effects) = apply(
        Some(s.clone()),
        decide(Some(&s), &cmd("x2", 11, reply(0, 1, ambiguous)), &policy),
    );
    assert!(matches!(
        events[0].body,
        EventBody::RefundStatusCheckRequested {
            refund: 0,
            check: 1,
            ..
        }
    ));
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Call {
            op: ProviderOp::RefundStatus { refund: 0 },
            ..
        }
    )));
    let s = s.unwrap();
    let not_found = CommandBody::ProviderReply {
        op: ProviderOp::RefundStatus { refund: 0 },
        attempt: 1,
        outcome: ProviderOutcome::NotFound,
    };
    let (s, events, effects) = apply(
        Some(s.clone()),
        decide(Some(&s), &cmd("x3", 12, not_found), &policy),
    );
    assert!(matches!(
        events[0].body,
        EventBody::RefundRetryScheduled {
            refund: 0,
            attempt: 2,
            ..
        }
    ));
    let Some(Effect::Schedule { kind, .. }) = effects.first() else {
        panic!("a retry is scheduled: {effects:?}")
    };
    let s = s.unwrap();
    let (s, events, effects) = apply(
        Some(s.clone()),
        decide(
            Some(&s),
            &cmd("x4", 13, CommandBody::Timer { kind: *kind }),
            &policy,
        ),
    );
    assert!(matches!(
        events[0].body,
        EventBody::RefundAttempted {
            refund: 0,
            attempt: 2
        }
    ));
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Call {
            op: ProviderOp::Refund { refund: 0 },
            attempt: 2,
            ..
        }
    )));
    // The answer of the first attempt, late: a final answer is a fact about the refund.
    let s = s.unwrap();
    let (s, events, _) = apply(
        Some(s.clone()),
        decide(Some(&s), &cmd("x5", 14, reply(0, 1, approved())), &policy),
    );
    assert!(matches!(events[0].body, EventBody::RefundSucceeded { .. }));
    // And the webhook after it changes nothing.
    let s = s.unwrap();
    let hook = CommandBody::Webhook {
        webhook_id: "w1".into(),
        outcome: WebhookOutcome::RefundSucceeded {
            refund: 0,
            provider_ref: "re_p".into(),
        },
    };
    assert_eq!(
        decide(Some(&s), &cmd("x6", 15, hook), &policy),
        Decision::Ignore(Ignored::AfterTerminal)
    );
}

#[test]
fn a_refund_past_the_window_is_recorded_as_refused() {
    let s = payment(true);
    let d = super::decide(
        Some(&s),
        &cmd("x1", 10, request("rf-1", None)),
        &RefundPolicy::default(),
        false,
    );
    let (_, events, effects) = apply(Some(s.clone()), d);
    assert!(effects.is_empty());
    assert!(
        matches!(&events[0].body, EventBody::RefundRefused { code, .. } if code == "refund_window_closed"),
        "{events:?}"
    );
}

#[test]
fn the_payment_machine_refuses_refund_commands_and_the_refund_machine_payment_ones() {
    let s = payment(true);
    match decide_payment(
        Some(&s),
        &cmd("x1", 10, request("rf-1", None)),
        &Policy::default(),
    ) {
        Decision::Reject(r) => assert_eq!(r.code, "refunds_not_enabled"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    let cancel = CommandBody::Cancel {
        merchant_id: merchant(),
    };
    match decide(Some(&s), &cmd("x2", 10, cancel), &RefundPolicy::default()) {
        Decision::Reject(r) => assert_eq!(r.code, "not_a_refund_command"),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn provider_refund_keys_name_their_payment_and_refund() {
    let key = crate::provider_refund_key(&pid(), 7);
    assert_eq!(crate::parse_provider_refund_key(&key), Some((pid(), 7)));
    assert_eq!(
        crate::parse_provider_refund_key(&crate::provider_idempotency_key(&pid())),
        None
    );
    assert_eq!(crate::parse_provider_refund_key("pay_zz_r1"), None);
}

use crate::command::WebhookOutcome;

/// One input of the property test: which refund it is about is an index into the
/// refunds requested so far (modulo their number).
#[derive(Debug, Clone)]
enum Step {
    Request {
        key: u8,
        amount: Option<i64>,
    },
    Reply {
        refund: u8,
        op_status: bool,
        attempt: u32,
        outcome: u8,
    },
    Webhook {
        refund: u8,
        ok: bool,
    },
    FireTimers,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..6, prop::option::of(1i64..700))
            .prop_map(|(key, amount)| Step::Request { key, amount }),
        (0u8..6, any::<bool>(), 1u32..4, 0u8..6).prop_map(
            |(refund, op_status, attempt, outcome)| Step::Reply {
                refund,
                op_status,
                attempt,
                outcome
            }
        ),
        (0u8..6, any::<bool>()).prop_map(|(refund, ok)| Step::Webhook { refund, ok }),
        Just(Step::FireTimers),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever arrives, duplicated or in any order: succeeded and pending refunds never
    /// exceed the captured amount, a refund's outcome never changes once reached, seq
    /// stays gap-free, and each refund number is requested from the provider under one
    /// key only, by one request.
    #[test]
    fn refunds_never_exceed_the_captured_amount(steps in prop::collection::vec(step(), 1..60), complete in prop::bool::weighted(0.9)) {
        let policy = RefundPolicy { max_attempts: 2, stuck_after_checks: 3, ..RefundPolicy::default() };
        let mut s = payment(complete);
        let mut at = 100;
        let mut pending_timers: Vec<TimerKind> = Vec::new();
        let mut outcomes: BTreeMap<u32, RefundStatus> = BTreeMap::new();
        let mut requested: HashSet<u32> = HashSet::new();
        let mut seen_ids: HashSet<String> = HashSet::new();
        for (i, st) in steps.iter().enumerate() {
            at += 10;
            let n_refunds = s.refunds.len().max(1) as u32;
            let mut bodies = Vec::new();
            match st {
                Step::Request { key, amount } => bodies.push(request(&format!("rf-{key}"), *amount)),
                Step::Reply { refund, op_status, attempt, outcome } => {
                    let n = u32::from(*refund) % n_refunds;
                    let op = if *op_status { ProviderOp::RefundStatus { refund: n } } else { ProviderOp::Refund { refund: n } };
                    let outcome = match outcome {
                        0 => approved(),
                        1 => ProviderOutcome::Declined { code: "d".into(), message: "m".into() },
                        2 => ProviderOutcome::Transient { error: "503".into() },
                        3 => ProviderOutcome::Ambiguous { error: "timeout".into() },
                        4 => ProviderOutcome::Pending { provider_ref: "re_p".into() },
                        _ => ProviderOutcome::NotFound,
                    };
                    bodies.push(CommandBody::ProviderReply { op, attempt: *attempt, outcome });
                }
                Step::Webhook { refund, ok } => {
                    let n = u32::from(*refund) % n_refunds;
                    bodies.push(CommandBody::Webhook {
                        webhook_id: format!("w{i}"),
                        outcome: if *ok {
                            WebhookOutcome::RefundSucceeded { refund: n, provider_ref: "re_p".into() }
                        } else {
                            WebhookOutcome::RefundFailed { refund: n, code: "d".into(), message: "m".into() }
                        },
                    });
                }
                Step::FireTimers => {
                    bodies.extend(pending_timers.drain(..).map(|kind| CommandBody::Timer { kind }));
                }
            }
            for (j, body) in bodies.into_iter().enumerate() {
                let c = cmd(&format!("s{i}-{j}"), at, body);
                let before = s.seq;
                let (next, events, effects) = apply(Some(s.clone()), decide(Some(&s), &c, &policy));
                let next = next.expect("the payment stays");
                for (k, e) in events.iter().enumerate() {
                    prop_assert_eq!(e.seq, before + 1 + k as u64, "seq is gap-free");
                    if let EventBody::RefundRequested { refund, refund_id, .. } = &e.body {
                        prop_assert!(requested.insert(*refund), "refund {} requested twice", refund);
                        prop_assert!(seen_ids.insert(refund_id.to_string()), "refund id {} requested twice", refund_id);
                    }
                }
                for eff in effects {
                    match eff {
                        Effect::Schedule { kind, .. } => pending_timers.push(kind),
                        Effect::Call { op, .. } => {
                            let n = op.refund().expect("refund calls only");
                            prop_assert!(requested.contains(&n), "a call for refund {} that was never requested", n);
                        }
                    }
                }
                prop_assert!(next.amount_reserved() <= CAPTURED, "reserved {} of {}", next.amount_reserved(), CAPTURED);
                for (n, r) in next.refunds.iter().enumerate() {
                    if let Some(done) = outcomes.get(&(n as u32)) {
                        prop_assert_eq!(*done, r.status, "refund {} left its outcome", n);
                    } else if r.status.is_terminal() {
                        outcomes.insert(n as u32, r.status);
                    }
                }
                if !complete {
                    prop_assert_eq!(next.amount_reserved(), 0);
                }
                s = next;
            }
        }
    }
}
