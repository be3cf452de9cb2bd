use super::*;
use crate::command::CreatePayment;
use crate::ids::CommandId;
use proptest::prelude::*;
use std::collections::HashSet;

fn merchant() -> MerchantId {
    MerchantId::parse("acme").unwrap()
}

fn key() -> IdempotencyKey {
    IdempotencyKey::parse("order-42").unwrap()
}

fn pid() -> PaymentId {
    PaymentId::derive(&merchant(), &key())
}

fn cmd(id: &str, at: i64, body: CommandBody) -> Command {
    Command {
        command_id: CommandId::parse(id).unwrap(),
        payment_id: pid(),
        issued_at_ms: at,
        body,
    }
}

fn create(hash: &str) -> CommandBody {
    CommandBody::Create(CreatePayment {
        merchant_id: merchant(),
        amount: Amount::new(1000).unwrap(),
        currency: Currency::parse("EUR").unwrap(),
        idempotency_key: key(),
        request_hash: hash.into(),
        reference: None,
        description: None,
        traceparent: None,
        metadata: [("order".to_owned(), "A-1".to_owned())].into(),
        screening: None,
    })
}

/// Applies commands like the topology does (dedup by command id, except creates: the
/// payment records its create), checking invariants after every step. Returns the
/// events and the final state.
fn run(cmds: &[Command], policy: &Policy, dedup: bool) -> (Vec<Event>, Option<PaymentState>) {
    let mut seen = HashSet::new();
    let mut state: Option<PaymentState> = None;
    let mut events: Vec<Event> = Vec::new();
    for c in cmds {
        let recorded = !matches!(c.body, CommandBody::Create(_));
        if dedup && recorded && !seen.insert(c.command_id.clone()) {
            continue;
        }
        let before = state.as_ref().map(|s| s.status);
        match decide(state.as_ref(), c, policy) {
            Decision::Apply { events: new, .. } => {
                assert!(!new.is_empty(), "an applied decision emits events");
                for e in new {
                    let expected = state.as_ref().map_or(1, |s| s.seq + 1);
                    assert_eq!(e.seq, expected, "seq must be gap-free");
                    let from = state.as_ref().map(|s| s.status);
                    state = evolve(state, &e);
                    let to = state.as_ref().map(|s| s.status);
                    assert!(allowed(from, to), "illegal transition {from:?} -> {to:?}");
                    events.push(e);
                }
            }
            Decision::Ignore(i) => assert!(!i.label().is_empty()),
            Decision::Reject(r) => {
                assert!(
                    !r.code.is_empty() && !r.message.is_empty(),
                    "reason required"
                )
            }
        }
        if let Some(b) = before {
            if b.is_terminal() {
                assert_eq!(state.as_ref().map(|s| s.status), Some(b), "terminal left");
            }
        }
    }
    let completions = events
        .iter()
        .filter(|e| matches!(e.body, EventBody::Completed { .. }))
        .count();
    assert!(completions <= 1, "at most one completion");
    let terminal = events
        .iter()
        .filter(|e| e.body.new_status().is_some_and(Status::is_terminal))
        .count();
    assert!(terminal <= 1, "at most one terminal event");
    (events, state)
}

/// The domain's one transition rule; `None → None` (a rejected create) stays allowed.
fn allowed(from: Option<Status>, to: Option<Status>) -> bool {
    match to {
        None => from.is_none(),
        Some(to) => Status::transition_allowed(from, to),
    }
}

#[test]
fn the_transition_rule_is_the_documented_one() {
    use Status::*;
    let all = [New, Processing, Completed, Failed, Canceled];
    let mut allowed = Vec::new();
    for from in std::iter::once(None).chain(all.map(Some)) {
        for to in all {
            if Status::transition_allowed(from, to) && from != Some(to) {
                allowed.push((from, to));
            }
        }
    }
    assert_eq!(
        allowed,
        vec![
            (None, New),
            (Some(New), Processing),
            (Some(New), Canceled),
            (Some(Processing), Completed),
            (Some(Processing), Failed),
            (Some(Processing), Canceled),
        ]
    );
}

/// A policy whose creates wait for the dispatch timer.
fn delayed() -> Policy {
    Policy {
        dispatch_delay_ms: 1,
        ..Policy::default()
    }
}

#[test]
fn happy_path_emits_the_expected_history() {
    let p = delayed();
    let cmds = vec![
        cmd("c1", 1, create("h")),
        cmd(
            "t1",
            2,
            CommandBody::Timer {
                kind: TimerKind::Dispatch,
            },
        ),
        cmd(
            "r1",
            3,
            CommandBody::ProviderReply {
                op: ProviderOp::Charge,
                attempt: 1,
                outcome: ProviderOutcome::Approved {
                    provider_ref: "ch_1".into(),
                },
            },
        ),
    ];
    let (events, state) = run(&cmds, &p, true);
    let kinds: Vec<_> = events.iter().map(|e| e.body.kind()).collect();
    assert_eq!(
        kinds,
        [
            "created",
            "processing_started",
            "charge_requested",
            "completed"
        ]
    );
    assert_eq!(state.unwrap().status, Status::Completed);
}

#[test]
fn without_a_dispatch_delay_the_create_sends_the_charge() {
    let p = Policy::default();
    assert_eq!(p.dispatch_delay_ms, 0);
    match decide(None, &cmd("c1", 1, create("h")), &p) {
        Decision::Apply { events, effects } => {
            let kinds: Vec<_> = events.iter().map(|e| e.body.kind()).collect();
            assert_eq!(kinds, ["created", "processing_started", "charge_requested"]);
            assert_eq!(
                effects,
                [
                    Effect::Call {
                        op: ProviderOp::Charge,
                        attempt: 1,
                        key: "charge:1:3".into(),
                    },
                    Effect::Schedule {
                        delay_ms: p.reply_timeout_ms,
                        kind: TimerKind::ProviderTimeout {
                            attempt: 1,
                            wait: 1
                        },
                    },
                ]
            );
        }
        d => panic!("expected the charge, got {d:?}"),
    }
    // With a delay, the create only schedules the dispatch.
    match decide(None, &cmd("c1", 1, create("h")), &delayed()) {
        Decision::Apply { events, effects } => {
            assert_eq!(events.len(), 1);
            assert_eq!(
                effects,
                [Effect::Schedule {
                    delay_ms: 1,
                    kind: TimerKind::Dispatch
                }]
            );
        }
        d => panic!("expected the dispatch timer, got {d:?}"),
    }
}

#[test]
fn same_key_same_body_is_a_duplicate_and_other_body_is_rejected() {
    let p = Policy::default();
    let (_, state) = run(&[cmd("c1", 1, create("h"))], &p, true);
    let s = state.unwrap();
    assert_eq!(
        decide(Some(&s), &cmd("c2", 2, create("h")), &p),
        Decision::Ignore(Ignored::DuplicateCreate)
    );
    match decide(Some(&s), &cmd("c3", 2, create("other")), &p) {
        Decision::Reject(r) => assert_eq!(r.code, "idempotency_key_reused"),
        d => panic!("expected rejection, got {d:?}"),
    }
}

#[test]
fn transient_errors_retry_then_fail_only_after_status_confirms_no_charge() {
    let p = Policy {
        max_attempts: 2,
        ..delayed()
    };
    let transient = |a| CommandBody::ProviderReply {
        op: ProviderOp::Charge,
        attempt: a,
        outcome: ProviderOutcome::Transient {
            error: "503".into(),
        },
    };
    let cmds = vec![
        cmd("c1", 1, create("h")),
        cmd(
            "t1",
            2,
            CommandBody::Timer {
                kind: TimerKind::Dispatch,
            },
        ),
        cmd("r1", 3, transient(1)),
        cmd(
            "t2",
            500,
            CommandBody::Timer {
                kind: TimerKind::Retry { attempt: 2 },
            },
        ),
        cmd("r2", 501, transient(2)),
    ];
    let (events, state) = run(&cmds, &p, true);
    let s = state.unwrap();
    assert_eq!(
        s.status,
        Status::Processing,
        "not failed before the status check"
    );
    assert_eq!(events.last().unwrap().body.kind(), "status_check_requested");
    let not_found = cmd(
        "r3",
        600,
        CommandBody::ProviderReply {
            op: ProviderOp::Status,
            attempt: 2,
            outcome: ProviderOutcome::NotFound,
        },
    );
    match decide(Some(&s), &not_found, &p) {
        Decision::Apply { events, effects } => {
            assert!(matches!(events[0].body, EventBody::Failed { .. }));
            assert!(
                matches!(
                    effects[0],
                    Effect::Call {
                        op: ProviderOp::Cancel,
                        ..
                    }
                ),
                "the key is voided after giving up"
            );
        }
        d => panic!("{d:?}"),
    }
}

#[test]
fn webhook_beating_the_synchronous_reply_wins_and_the_reply_is_ignored() {
    let p = delayed();
    let cmds = vec![
        cmd("c1", 1, create("h")),
        cmd(
            "t1",
            2,
            CommandBody::Timer {
                kind: TimerKind::Dispatch,
            },
        ),
        cmd(
            "w1",
            3,
            CommandBody::Webhook {
                webhook_id: "msg_1".into(),
                outcome: WebhookOutcome::Succeeded {
                    provider_ref: "ch".into(),
                },
            },
        ),
    ];
    let (_, state) = run(&cmds, &p, true);
    let s = state.unwrap();
    assert_eq!(s.status, Status::Completed);
    let late = cmd(
        "r1",
        4,
        CommandBody::ProviderReply {
            op: ProviderOp::Charge,
            attempt: 1,
            outcome: ProviderOutcome::Pending {
                provider_ref: "ch".into(),
            },
        },
    );
    assert_eq!(
        decide(Some(&s), &late, &p),
        Decision::Ignore(Ignored::AfterTerminal)
    );
}

#[test]
fn cancel_while_processing_needs_the_provider() {
    let p = delayed();
    let cmds = vec![
        cmd("c1", 1, create("h")),
        cmd(
            "t1",
            2,
            CommandBody::Timer {
                kind: TimerKind::Dispatch,
            },
        ),
        cmd(
            "x1",
            3,
            CommandBody::Cancel {
                merchant_id: merchant(),
            },
        ),
    ];
    let (_, state) = run(&cmds, &p, true);
    let s = state.unwrap();
    assert_eq!(s.status, Status::Processing);
    assert!(s.cancel_requested);
    // The charge completes before the provider handles the cancel: completion wins.
    let approved = cmd(
        "r1",
        4,
        CommandBody::ProviderReply {
            op: ProviderOp::Charge,
            attempt: 1,
            outcome: ProviderOutcome::Approved {
                provider_ref: "ch".into(),
            },
        },
    );
    let refused = cmd(
        "r2",
        5,
        CommandBody::ProviderReply {
            op: ProviderOp::Cancel,
            attempt: 1,
            outcome: ProviderOutcome::CancelRefused {
                reason: "captured".into(),
            },
        },
    );
    let (_, end) = run(&[cmds, vec![approved, refused]].concat(), &p, true);
    assert_eq!(end.unwrap().status, Status::Completed);
}

#[test]
fn cancel_of_another_merchants_payment_looks_like_unknown() {
    let p = Policy::default();
    let (_, state) = run(&[cmd("c1", 1, create("h"))], &p, true);
    let other = cmd(
        "x",
        2,
        CommandBody::Cancel {
            merchant_id: MerchantId::parse("evil").unwrap(),
        },
    );
    match decide(state.as_ref(), &other, &p) {
        Decision::Reject(r) => assert_eq!(r.code, "unknown_payment"),
        d => panic!("{d:?}"),
    }
}

#[test]
fn backoff_is_capped_deterministic_and_jittered() {
    let p = Policy::default();
    let a = backoff_ms(&pid(), 1, &p);
    assert_eq!(a, backoff_ms(&pid(), 1, &p));
    assert!((p.backoff_base_ms / 2..=p.backoff_base_ms).contains(&a));
    let big = backoff_ms(&pid(), 30, &p);
    assert!(big <= p.backoff_max_ms && big >= p.backoff_max_ms / 2);
}

// ---- property tests -------------------------------------------------------------

#[derive(Debug, Clone)]
enum Spec {
    Create(bool),
    Cancel(bool),
    Dispatch,
    Retry(u32),
    Timeout(u32, u32),
    Reply(u8, u32, u8),
    Webhook(u8),
    Repeat(usize),
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        any::<bool>().prop_map(Spec::Create),
        any::<bool>().prop_map(Spec::Cancel),
        Just(Spec::Dispatch),
        (1u32..6).prop_map(Spec::Retry),
        (1u32..6, 0u32..14).prop_map(|(a, w)| Spec::Timeout(a, w)),
        (0u8..3, 1u32..6, 0u8..8).prop_map(|(o, a, r)| Spec::Reply(o, a, r)),
        (0u8..3).prop_map(Spec::Webhook),
        (0usize..40).prop_map(Spec::Repeat),
    ]
}

fn outcome(i: u8) -> ProviderOutcome {
    match i {
        0 => ProviderOutcome::Approved {
            provider_ref: "ch".into(),
        },
        1 => ProviderOutcome::Declined {
            code: "card_declined".into(),
            message: "declined".into(),
        },
        2 => ProviderOutcome::Pending {
            provider_ref: "ch".into(),
        },
        3 => ProviderOutcome::NotFound,
        4 => ProviderOutcome::Canceled,
        5 => ProviderOutcome::CancelRefused {
            reason: "captured".into(),
        },
        6 => ProviderOutcome::Transient {
            error: "503".into(),
        },
        _ => ProviderOutcome::Ambiguous {
            error: "timeout".into(),
        },
    }
}

fn build(specs: &[Spec]) -> Vec<Command> {
    let mut out: Vec<Command> = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let at = i as i64 * 100;
        let id = format!("cmd-{i}");
        let body = match s {
            Spec::Create(same) => create(if *same { "h" } else { "other" }),
            Spec::Cancel(mine) => CommandBody::Cancel {
                merchant_id: if *mine {
                    merchant()
                } else {
                    MerchantId::parse("evil").unwrap()
                },
            },
            Spec::Dispatch => CommandBody::Timer {
                kind: TimerKind::Dispatch,
            },
            Spec::Retry(a) => CommandBody::Timer {
                kind: TimerKind::Retry { attempt: *a },
            },
            Spec::Timeout(a, w) => CommandBody::Timer {
                kind: TimerKind::ProviderTimeout {
                    attempt: *a,
                    wait: *w,
                },
            },
            Spec::Reply(o, a, r) => CommandBody::ProviderReply {
                op: [ProviderOp::Charge, ProviderOp::Status, ProviderOp::Cancel][*o as usize],
                attempt: *a,
                outcome: outcome(*r),
            },
            Spec::Webhook(w) => CommandBody::Webhook {
                webhook_id: format!("msg_{i}"),
                outcome: match w {
                    0 => WebhookOutcome::Succeeded {
                        provider_ref: "ch".into(),
                    },
                    1 => WebhookOutcome::Failed {
                        code: "x".into(),
                        message: "y".into(),
                    },
                    _ => WebhookOutcome::Canceled,
                },
            },
            Spec::Repeat(j) => match out.get(*j) {
                Some(c) => {
                    out.push(c.clone()); // a redelivery: same id, same content
                    continue;
                }
                None => continue,
            },
        };
        out.push(cmd(&id, at, body));
    }
    out
}

/// The shipped policy (processing starts with the create) and one with a dispatch delay
/// (processing starts on a timer, so a cancel can come first).
fn policies() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::default()),
        Just(Policy {
            dispatch_delay_ms: 50,
            ..Policy::default()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random sequences with duplicates, reorders and redeliveries: the invariants hold
    /// (checked inside `run`), and a replay yields identical events.
    #[test]
    fn invariants_hold_for_any_command_sequence(
        specs in proptest::collection::vec(spec(), 0..40),
        start_with_create in any::<bool>(),
        p in policies(),
    ) {
        let mut specs = specs;
        if start_with_create {
            specs.insert(0, Spec::Create(true));
        }
        let cmds = build(&specs);
        let (events, state) = run(&cmds, &p, true);
        let (again, state_again) = run(&cmds, &p, true);
        prop_assert_eq!(&events, &again, "replay must be deterministic");
        prop_assert_eq!(&state, &state_again);
        // State is the fold of the events.
        let folded = events.iter().fold(None, evolve);
        prop_assert_eq!(folded, state);
    }

    /// Even with the dedup store forgotten (retention elapsed), redelivered commands never
    /// break the machine's invariants.
    #[test]
    fn invariants_hold_without_dedup(
        specs in proptest::collection::vec(spec(), 0..40),
        p in policies(),
    ) {
        let mut specs = specs;
        specs.insert(0, Spec::Create(true));
        run(&build(&specs), &p, false);
    }

    /// A simulated provider that charges at most once per idempotency key, answering
    /// with random delays, errors, timeouts and webhooks: every payment reaches a terminal
    /// state and the provider's ledger holds at most one charge, consistent with it.
    #[test]
    fn every_payment_terminates_and_is_charged_at_most_once(
        answers in proptest::collection::vec(0u8..10, 64),
        webhook_first in any::<bool>(),
        p in policies(),
    ) {
        let p = Policy { max_attempts: 3, ..p };
        let (state, charged) = simulate(&p, &answers, webhook_first);
        let s = state.expect("payment exists");
        prop_assert!(s.status.is_terminal(), "stuck in {:?}", s);
        prop_assert!(charged <= 1);
        prop_assert_eq!(charged == 1, s.status == Status::Completed,
            "ledger and state disagree: charged={} status={}", charged, s.status);
    }
}

/// A tiny discrete-event loop: timers fire in due order, provider calls are answered
/// according to `answers` (cycled), webhooks for pending charges are delivered.
fn simulate(p: &Policy, answers: &[u8], webhook_first: bool) -> (Option<PaymentState>, u32) {
    #[derive(Clone, Copy, PartialEq)]
    enum Charge {
        None,
        Captured,
        Declined,
    }
    let mut provider = Charge::None;
    let mut queue: Vec<(i64, Command)> = vec![(0, cmd("create", 0, create("h")))];
    let mut state: Option<PaymentState> = None;
    let mut n = 0usize;
    let mut next_answer = || {
        n += 1;
        answers[(n - 1) % answers.len()]
    };
    let mut ids = 0u64;
    for _ in 0..500 {
        if state.as_ref().is_some_and(|s| s.status.is_terminal()) {
            break;
        }
        queue.sort_by_key(|(t, _)| *t);
        if queue.is_empty() {
            break;
        }
        let (now, c) = queue.remove(0);
        let Decision::Apply { events, effects } = decide(state.as_ref(), &c, p) else {
            continue;
        };
        for e in &events {
            state = evolve(state, e);
        }
        for eff in effects {
            ids += 1;
            match eff {
                Effect::Schedule { delay_ms, kind } => {
                    let due_at_ms = now + delay_ms;
                    queue.push((
                        due_at_ms,
                        cmd(
                            &format!("timer-{ids}"),
                            due_at_ms,
                            CommandBody::Timer { kind },
                        ),
                    ))
                }
                Effect::Call { op, attempt, .. } => {
                    let a = next_answer();
                    let at = now + 10 + i64::from(a) * 7;
                    let outcome = match op {
                        ProviderOp::Charge => match (provider, a) {
                            (Charge::Captured, _) => Some(ProviderOutcome::Approved {
                                provider_ref: "ch".into(),
                            }),
                            (Charge::Declined, _) => Some(ProviderOutcome::Declined {
                                code: "d".into(),
                                message: "d".into(),
                            }),
                            (Charge::None, 0..=2) => {
                                provider = Charge::Captured;
                                Some(ProviderOutcome::Approved {
                                    provider_ref: "ch".into(),
                                })
                            }
                            (Charge::None, 3) => {
                                provider = Charge::Declined;
                                Some(ProviderOutcome::Declined {
                                    code: "d".into(),
                                    message: "d".into(),
                                })
                            }
                            (Charge::None, 4 | 5) => Some(ProviderOutcome::Transient {
                                error: "503".into(),
                            }),
                            (Charge::None, 6) => {
                                provider = Charge::Captured;
                                Some(ProviderOutcome::Ambiguous {
                                    error: "timeout".into(),
                                })
                            }
                            (Charge::None, 7) => None, // lost on the way
                            (Charge::None, _) => {
                                let hook_at = if webhook_first { at - 5 } else { at + 50 };
                                queue.push((
                                    hook_at,
                                    cmd(
                                        &format!("hook-{ids}"),
                                        hook_at,
                                        CommandBody::Webhook {
                                            webhook_id: format!("msg-{ids}"),
                                            outcome: WebhookOutcome::Succeeded {
                                                provider_ref: "ch".into(),
                                            },
                                        },
                                    ),
                                ));
                                provider = Charge::Captured;
                                Some(ProviderOutcome::Pending {
                                    provider_ref: "ch".into(),
                                })
                            }
                        },
                        ProviderOp::Status => Some(match provider {
                            Charge::None => ProviderOutcome::NotFound,
                            Charge::Captured => ProviderOutcome::Approved {
                                provider_ref: "ch".into(),
                            },
                            Charge::Declined => ProviderOutcome::Declined {
                                code: "d".into(),
                                message: "d".into(),
                            },
                        }),
                        ProviderOp::Cancel => Some(match provider {
                            Charge::Captured => ProviderOutcome::CancelRefused {
                                reason: "captured".into(),
                            },
                            _ => ProviderOutcome::Canceled,
                        }),
                        ProviderOp::Refund { .. } | ProviderOp::RefundStatus { .. } => {
                            unreachable!("the payment machine makes no refund calls")
                        }
                    };
                    if let Some(outcome) = outcome {
                        queue.push((
                            at,
                            cmd(
                                &format!("reply-{ids}"),
                                at,
                                CommandBody::ProviderReply {
                                    op,
                                    attempt,
                                    outcome,
                                },
                            ),
                        ));
                    }
                }
            }
        }
    }
    let charged = u32::from(provider == Charge::Captured);
    (state, charged)
}
