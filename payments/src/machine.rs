//! The payment state machine: a pure function from `(state, command)` to a [`Decision`].
//!
//! `NEW → PROCESSING → COMPLETED | FAILED`, `NEW → CANCELED`, and `PROCESSING → CANCELED`
//! only when the provider confirms. A terminal state is never left. Every command that
//! cannot be applied is either *ignored* (a harmless duplicate or a stale message, with a
//! label) or *rejected* (with a reason code and a message); nothing is dropped silently.
//!
//! The machine never reads a clock: "now" is the command's `issued_at_ms`, and retry jitter
//! is derived from the payment id, so replaying the same commands yields the same events.
//! Waits are effects with a delay ([`Effect::Schedule`]): they start when the topology
//! carries the decision out.

use crate::command::{
    Command, CommandBody, CreatePayment, ProviderOp, ProviderOutcome, TimerKind, WebhookOutcome,
};
use crate::event::{Event, EventBody};
use crate::ids::{IdempotencyKey, MerchantId, PaymentId};
use crate::money::{Amount, Currency};
use crate::Status;
pub use refund::{RefundAwaiting, RefundPolicy, RefundState, RefundStatus};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Tunables of the machine; set per processor in `config/topology.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Time a NEW payment waits before processing starts (a cancel in this window
    /// needs no provider call). With 0, the create itself starts processing: the
    /// charge request goes out in the same step, with no timer in between.
    pub dispatch_delay_ms: i64,
    /// How long to wait for the answer to a charge or status call before asking for
    /// the status. Must exceed the provider client's own request timeout.
    pub reply_timeout_ms: i64,
    /// How long to wait for a webhook after the provider accepted a charge.
    pub webhook_timeout_ms: i64,
    /// Charge attempts before giving up (each attempt uses the same idempotency key).
    pub max_attempts: u32,
    pub backoff_base_ms: i64,
    pub backoff_max_ms: i64,
    /// Longest gap between two status checks of one attempt.
    pub status_poll_max_ms: i64,
    /// Unanswered status checks after which the payment is marked stuck (alarm).
    pub stuck_after_checks: u32,
    /// The longest a provider may take to deliver a webhook, retries included (Stripe
    /// retries for up to three days). A finished payment must stay in the partition
    /// store at least this long, so a late webhook still meets its payment.
    pub webhook_max_delay_ms: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            dispatch_delay_ms: 0,
            reply_timeout_ms: 10_000,
            webhook_timeout_ms: 30_000,
            max_attempts: 4,
            backoff_base_ms: 200,
            backoff_max_ms: 10_000,
            status_poll_max_ms: 60_000,
            stuck_after_checks: 6,
            webhook_max_delay_ms: 3 * 24 * 3_600_000,
        }
    }
}

impl Policy {
    /// Every problem with the values, each as one sentence.
    pub fn problems(&self) -> Vec<String> {
        let mut p = not_positive(&[
            ("reply_timeout_ms", self.reply_timeout_ms),
            ("webhook_timeout_ms", self.webhook_timeout_ms),
            ("backoff_base_ms", self.backoff_base_ms),
            ("backoff_max_ms", self.backoff_max_ms),
            ("status_poll_max_ms", self.status_poll_max_ms),
            ("webhook_max_delay_ms", self.webhook_max_delay_ms),
        ]);
        if self.dispatch_delay_ms < 0 {
            p.push("dispatch_delay_ms must be >= 0".into());
        }
        if self.max_attempts == 0 {
            p.push("max_attempts must be >= 1".into());
        }
        if self.backoff_max_ms < self.backoff_base_ms {
            p.push("backoff_max_ms must be >= backoff_base_ms".into());
        }
        p
    }
}

/// A problem for each of the named durations that is not above zero.
fn not_positive(named: &[(&str, i64)]) -> Vec<String> {
    named
        .iter()
        .filter(|(_, v)| *v <= 0)
        .map(|(name, v)| format!("{name} must be > 0 (got {v})"))
        .collect()
}

/// How long status check `check` waits for its answer: the reply timeout, doubling with
/// each unanswered check, capped at `status_poll_max_ms`.
fn status_poll_delay(check: u32, reply_timeout_ms: i64, status_poll_max_ms: i64) -> i64 {
    let shift = check.saturating_sub(1).min(16);
    reply_timeout_ms
        .saturating_mul(1i64 << shift)
        .min(status_poll_max_ms)
}

/// What the machine is waiting for; derived from the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Awaiting {
    Nothing,
    Dispatch,
    ChargeReply { attempt: u32 },
    StatusReply { attempt: u32 },
    Webhook { attempt: u32 },
    RetryAt { attempt: u32 },
}

/// The state of one payment: a left fold of its events with [`evolve`].
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
    /// Always encoded (the stores use a positional format); `default` reads projection
    /// rows written before the field existed.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub status: Status,
    /// Seq of the last event; the next one is `seq + 1`.
    pub seq: u64,
    pub attempt: u32,
    /// Status checks made for the current attempt.
    pub checks: u32,
    /// Bumped whenever a new wait starts; timers of older waits are stale.
    pub wait: u32,
    pub awaiting: Awaiting,
    pub cancel_requested: bool,
    pub stuck: bool,
    pub provider_ref: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// The payment's refunds, in the order requested (a refund's number is its index).
    /// `default`: states written before refunds existed have none.
    #[serde(default)]
    pub refunds: Vec<RefundState>,
}

impl PaymentState {
    /// What succeeded refunds have returned.
    pub fn amount_refunded(&self) -> i64 {
        self.refunds
            .iter()
            .filter(|r| r.status == RefundStatus::Succeeded)
            .map(|r| r.amount)
            .sum()
    }

    /// What succeeded and pending refunds take from the captured amount: never more
    /// than the amount.
    pub fn amount_reserved(&self) -> i64 {
        self.refunds
            .iter()
            .filter(|r| r.status != RefundStatus::Failed)
            .map(|r| r.amount)
            .sum()
    }

    /// Whether a refund is still waiting for its outcome.
    pub fn refund_in_flight(&self) -> bool {
        self.refunds
            .iter()
            .any(|r| r.status == RefundStatus::Pending)
    }
}

/// Side effects the topology must carry out once the decision's events are durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// Call the provider. `key` names the request so a repeated dispatch is recognisable.
    Call {
        op: ProviderOp,
        attempt: u32,
        key: String,
    },
    /// Deliver a `Timer` command of `kind` once `delay_ms` has passed. The wait
    /// starts when the step that asked for it runs, which may be later than the
    /// command's issue time (a backlog, a worker starting): the topology sets the due
    /// time from its own clock.
    Schedule { delay_ms: i64, kind: TimerKind },
}

/// A command that has no effect, and why. Not an error: duplicates and stale messages
/// are expected in an at-least-once world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    DuplicateCreate,
    CancelAlreadyRequested,
    StaleTimer,
    /// A reply for an attempt or wait that is over.
    StaleReply,
    /// A reply or webhook for a payment already terminal, consistent with its outcome.
    AfterTerminal,
    StillPending,
    /// A refund request repeated with the same key and body.
    DuplicateRefund,
}

impl Ignored {
    pub fn label(&self) -> &'static str {
        match self {
            Ignored::DuplicateCreate => "duplicate_create",
            Ignored::CancelAlreadyRequested => "cancel_already_requested",
            Ignored::StaleTimer => "stale_timer",
            Ignored::StaleReply => "stale_reply",
            Ignored::AfterTerminal => "after_terminal",
            Ignored::StillPending => "still_pending",
            Ignored::DuplicateRefund => "duplicate_refund",
        }
    }
}

/// A command the machine refuses. `code` is stable; `message` explains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: &'static str,
    pub message: String,
}

impl Rejection {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Apply {
        events: Vec<Event>,
        effects: Vec<Effect>,
    },
    Ignore(Ignored),
    Reject(Rejection),
}

/// Applies one event to the state. `None` before the first event.
pub fn evolve(state: Option<PaymentState>, event: &Event) -> Option<PaymentState> {
    let mut s = match (&event.body, state) {
        (
            EventBody::Created {
                merchant_id,
                amount,
                currency,
                idempotency_key,
                request_hash,
                reference,
                description,
                traceparent,
                metadata,
            },
            None,
        ) => {
            return Some(PaymentState {
                payment_id: event.payment_id,
                merchant_id: merchant_id.clone(),
                amount: *amount,
                currency: *currency,
                idempotency_key: idempotency_key.clone(),
                request_hash: request_hash.clone(),
                reference: reference.clone(),
                description: description.clone(),
                traceparent: traceparent.clone(),
                metadata: metadata.clone(),
                status: Status::New,
                seq: event.seq,
                attempt: 0,
                checks: 0,
                wait: 0,
                awaiting: Awaiting::Dispatch,
                cancel_requested: false,
                stuck: false,
                provider_ref: None,
                failure_code: None,
                failure_message: None,
                created_at_ms: event.occurred_at_ms,
                updated_at_ms: event.occurred_at_ms,
                refunds: Vec::new(),
            })
        }
        (_, Some(s)) => s,
        (_, None) => return None,
    };
    s.seq = event.seq;
    s.updated_at_ms = event.occurred_at_ms;
    match &event.body {
        EventBody::Created { .. } => {}
        EventBody::ProcessingStarted => s.status = Status::Processing,
        EventBody::ChargeRequested { attempt } => {
            s.attempt = *attempt;
            s.checks = 0;
            s.wait += 1;
            s.awaiting = Awaiting::ChargeReply { attempt: *attempt };
        }
        EventBody::ChargePending {
            attempt,
            provider_ref,
        } => {
            s.provider_ref = Some(provider_ref.clone());
            s.wait += 1;
            s.awaiting = Awaiting::Webhook { attempt: *attempt };
        }
        EventBody::RetryScheduled { attempt, .. } => {
            s.wait += 1;
            s.awaiting = Awaiting::RetryAt { attempt: *attempt };
        }
        EventBody::StatusCheckRequested { attempt, check, .. } => {
            s.checks = *check;
            s.wait += 1;
            s.awaiting = Awaiting::StatusReply { attempt: *attempt };
        }
        EventBody::MarkedStuck { .. } => s.stuck = true,
        EventBody::CancelRequested => s.cancel_requested = true,
        EventBody::CancelRefused { .. } => s.cancel_requested = false,
        EventBody::Completed { provider_ref } => {
            s.status = Status::Completed;
            s.provider_ref = Some(provider_ref.clone());
            s.awaiting = Awaiting::Nothing;
        }
        EventBody::Failed { code, message } => {
            s.status = Status::Failed;
            s.failure_code = Some(code.clone());
            s.failure_message = Some(message.clone());
            s.awaiting = Awaiting::Nothing;
        }
        EventBody::Canceled { .. } => {
            s.status = Status::Canceled;
            s.awaiting = Awaiting::Nothing;
        }
        body => refund::evolve(&mut s, body, event.occurred_at_ms),
    }
    Some(s)
}

/// Collects events and effects, keeping the state current as each event is added.
struct Out<'a> {
    cmd: &'a Command,
    state: Option<PaymentState>,
    events: Vec<Event>,
    effects: Vec<Effect>,
}

impl<'a> Out<'a> {
    fn new(cmd: &'a Command, state: Option<&PaymentState>) -> Self {
        Out {
            cmd,
            state: state.cloned(),
            events: Vec::new(),
            effects: Vec::new(),
        }
    }

    fn emit(&mut self, body: EventBody) -> &mut Self {
        let seq = self.state.as_ref().map_or(1, |s| s.seq + 1);
        let event = Event {
            payment_id: self.cmd.payment_id,
            seq,
            occurred_at_ms: self.cmd.issued_at_ms,
            caused_by: self.cmd.command_id.clone(),
            body,
        };
        self.state = evolve(self.state.take(), &event);
        self.events.push(event);
        self
    }

    /// Current wait number (after the events emitted so far).
    fn wait(&self) -> u32 {
        self.state.as_ref().map_or(0, |s| s.wait)
    }

    fn seq(&self) -> u64 {
        self.state.as_ref().map_or(0, |s| s.seq)
    }

    fn call(&mut self, op: ProviderOp, attempt: u32) -> &mut Self {
        // Keyed by the seq of the event that asked for the call: unique per request,
        // identical on replay.
        let key = format!("{}:{}:{}", op.as_str(), attempt, self.seq());
        self.effects.push(Effect::Call { op, attempt, key });
        self
    }

    fn schedule(&mut self, delay_ms: i64, kind: TimerKind) -> &mut Self {
        self.effects.push(Effect::Schedule { delay_ms, kind });
        self
    }

    fn charge(&mut self, attempt: u32, policy: &Policy) -> &mut Self {
        self.emit(EventBody::ChargeRequested { attempt });
        self.call(ProviderOp::Charge, attempt);
        let wait = self.wait();
        self.schedule(
            policy.reply_timeout_ms,
            TimerKind::ProviderTimeout { attempt, wait },
        )
    }

    fn status_check(&mut self, s: &PaymentState, reason: String, policy: &Policy) -> &mut Self {
        let check = s.checks + 1;
        if check > policy.stuck_after_checks && !s.stuck {
            self.emit(EventBody::MarkedStuck {
                reason: format!("{} status checks without a final answer", s.checks),
            });
        }
        self.emit(EventBody::StatusCheckRequested {
            attempt: s.attempt,
            check,
            reason,
        });
        self.call(ProviderOp::Status, s.attempt);
        let wait = self.wait();
        let delay = status_poll_delay(check, policy.reply_timeout_ms, policy.status_poll_max_ms);
        self.schedule(
            delay,
            TimerKind::ProviderTimeout {
                attempt: s.attempt,
                wait,
            },
        )
    }

    fn retry_or_fail(&mut self, s: &PaymentState, reason: String, policy: &Policy) -> &mut Self {
        if s.attempt < policy.max_attempts {
            let attempt = s.attempt + 1;
            let delay = backoff_ms(&s.payment_id, s.attempt, policy);
            self.emit(EventBody::RetryScheduled {
                attempt,
                due_at_ms: self.cmd.issued_at_ms.saturating_add(delay),
                reason,
            });
            self.schedule(delay, TimerKind::Retry { attempt })
        } else {
            self.emit(EventBody::Failed {
                code: "provider_unavailable".into(),
                message: format!("no charge after {} attempts: {reason}", s.attempt),
            });
            // Void the key so a request still in flight somewhere cannot capture later.
            self.call(ProviderOp::Cancel, s.attempt)
        }
    }

    fn done(self) -> Decision {
        Decision::Apply {
            events: self.events,
            effects: self.effects,
        }
    }
}

/// Exponential back-off with deterministic jitter in [50%, 100%] of the capped delay.
pub fn backoff_ms(payment_id: &PaymentId, attempt: u32, policy: &Policy) -> i64 {
    jittered_backoff(
        &payment_id.key_bytes(),
        attempt,
        policy.backoff_base_ms,
        policy.backoff_max_ms,
    )
}

/// The delay before attempt `attempt + 1`: `base · 2^(attempt-1)` capped at `max`, with a
/// jitter in [50%, 100%] derived from `seed` and the attempt (no random numbers: replays
/// compute the same delay).
fn jittered_backoff(seed: &[u8], attempt: u32, base_ms: i64, max_ms: i64) -> i64 {
    let shift = attempt.saturating_sub(1).min(30);
    let capped = base_ms.saturating_mul(1i64 << shift).min(max_ms);
    // FNV-1a over the seed and attempt: stable across processes and releases.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.iter().chain(attempt.to_be_bytes().iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let frac = (h % 1000) as i64; // 0..999
    capped / 2 + (capped / 2) * frac / 1000
}

/// Decides what a command does to a payment. Pure: same inputs, same decision.
pub fn decide(state: Option<&PaymentState>, cmd: &Command, policy: &Policy) -> Decision {
    if cmd.body.is_refund() {
        // Refunds are the refund state machine's ([`refund::decide`]); a topology
        // without it cannot carry them out, and says so.
        return Decision::Reject(Rejection::new(
            "refunds_not_enabled",
            "this topology has no refund processor: refunds cannot be carried out",
        ));
    }
    match &cmd.body {
        CommandBody::Create(c) => decide_create(state, cmd, c, policy),
        CommandBody::Cancel { merchant_id } => decide_cancel(state, cmd, merchant_id),
        CommandBody::Timer { kind } => decide_timer(state, cmd, *kind, policy),
        CommandBody::ProviderReply {
            op,
            attempt,
            outcome,
        } => decide_reply(state, cmd, *op, *attempt, outcome, policy),
        CommandBody::Webhook { outcome, .. } => decide_webhook(state, cmd, outcome),
        CommandBody::Refund(_) => unknown(cmd),
    }
}

fn unknown(cmd: &Command) -> Decision {
    Decision::Reject(Rejection::new(
        "unknown_payment",
        format!("no payment {} in this partition", cmd.payment_id),
    ))
}

fn decide_create(
    state: Option<&PaymentState>,
    cmd: &Command,
    c: &CreatePayment,
    policy: &Policy,
) -> Decision {
    if let Some(s) = state {
        return if s.request_hash == c.request_hash && s.merchant_id == c.merchant_id {
            Decision::Ignore(Ignored::DuplicateCreate)
        } else {
            Decision::Reject(Rejection::new(
                "idempotency_key_reused",
                format!(
                    "idempotency key {:?} already created payment {} with a different request",
                    c.idempotency_key.as_str(),
                    s.payment_id
                ),
            ))
        };
    }
    if PaymentId::derive(&c.merchant_id, &c.idempotency_key) != cmd.payment_id {
        return Decision::Reject(Rejection::new(
            "invalid_payment_id",
            "payment id does not match the merchant and idempotency key",
        ));
    }
    let mut out = Out::new(cmd, state);
    out.emit(EventBody::Created {
        merchant_id: c.merchant_id.clone(),
        amount: c.amount,
        currency: c.currency,
        idempotency_key: c.idempotency_key.clone(),
        request_hash: c.request_hash.clone(),
        reference: c.reference.clone(),
        description: c.description.clone(),
        traceparent: c.traceparent.clone(),
        metadata: c.metadata.clone(),
    });
    match &c.screening {
        Some(refused) => {
            out.emit(EventBody::ProcessingStarted);
            out.emit(EventBody::Failed {
                code: refused.code.clone(),
                message: refused.message.clone(),
            });
        }
        None if policy.dispatch_delay_ms == 0 => {
            out.emit(EventBody::ProcessingStarted);
            out.charge(1, policy);
        }
        None => {
            out.schedule(policy.dispatch_delay_ms, TimerKind::Dispatch);
        }
    }
    out.done()
}

fn decide_cancel(state: Option<&PaymentState>, cmd: &Command, merchant: &MerchantId) -> Decision {
    let Some(s) = state else {
        return unknown(cmd);
    };
    if &s.merchant_id != merchant {
        // Same answer as for a missing payment: ownership is not disclosed.
        return unknown(cmd);
    }
    let mut out = Out::new(cmd, state);
    match s.status {
        Status::New => {
            out.emit(EventBody::Canceled {
                reason: "canceled by merchant before processing".into(),
            });
        }
        Status::Processing if s.cancel_requested => {
            return Decision::Ignore(Ignored::CancelAlreadyRequested)
        }
        Status::Processing => {
            out.emit(EventBody::CancelRequested);
            out.call(ProviderOp::Cancel, s.attempt);
        }
        terminal => {
            return Decision::Reject(Rejection::new(
                "already_terminal",
                format!("payment is {terminal}; it can no longer be canceled"),
            ))
        }
    }
    out.done()
}

fn decide_timer(
    state: Option<&PaymentState>,
    cmd: &Command,
    kind: TimerKind,
    policy: &Policy,
) -> Decision {
    let Some(s) = state else {
        return unknown(cmd);
    };
    if !timer_is_live(s, kind) {
        return Decision::Ignore(Ignored::StaleTimer);
    }
    let mut out = Out::new(cmd, state);
    match kind {
        TimerKind::Dispatch => {
            out.emit(EventBody::ProcessingStarted);
            out.charge(1, policy);
        }
        TimerKind::Retry { attempt } => {
            out.charge(attempt, policy);
        }
        TimerKind::ProviderTimeout { .. } => {
            let reason = match s.awaiting {
                Awaiting::Webhook { .. } => "no webhook in time",
                Awaiting::StatusReply { .. } => "no answer to the status check in time",
                _ => "no answer to the charge in time",
            };
            out.status_check(s, reason.into(), policy);
        }
        TimerKind::RefundRetry { .. } | TimerKind::RefundTimeout { .. } => {
            return Decision::Ignore(Ignored::StaleTimer)
        }
    }
    out.done()
}

/// Whether the wait a timer guards is still on: a timer that is not live would be
/// ignored as stale when it fires, so it can be cancelled as soon as this turns false
/// (the wait ended with a reply, a webhook, a cancel or a terminal state).
pub fn timer_is_live(s: &PaymentState, kind: TimerKind) -> bool {
    match kind {
        TimerKind::Dispatch => s.status == Status::New,
        TimerKind::Retry { attempt } => {
            s.status == Status::Processing && s.awaiting == (Awaiting::RetryAt { attempt })
        }
        TimerKind::ProviderTimeout { attempt, wait } => {
            s.status == Status::Processing
                && s.attempt == attempt
                && s.wait == wait
                && matches!(
                    s.awaiting,
                    Awaiting::ChargeReply { .. }
                        | Awaiting::StatusReply { .. }
                        | Awaiting::Webhook { .. }
                )
        }
        TimerKind::RefundRetry { .. } | TimerKind::RefundTimeout { .. } => {
            refund::timer_is_live(s, kind)
        }
    }
}

/// Whether a late provider outcome agrees with the terminal status already reached.
fn consistent_with_terminal(status: Status, outcome: &ProviderOutcome) -> bool {
    match outcome {
        ProviderOutcome::Approved { .. } => status == Status::Completed,
        ProviderOutcome::Declined { .. } => status == Status::Failed,
        ProviderOutcome::Canceled => status == Status::Canceled || status == Status::Failed,
        _ => true,
    }
}

fn decide_reply(
    state: Option<&PaymentState>,
    cmd: &Command,
    op: ProviderOp,
    attempt: u32,
    outcome: &ProviderOutcome,
    policy: &Policy,
) -> Decision {
    use ProviderOutcome as P;
    let Some(s) = state else {
        return unknown(cmd);
    };
    if s.status.is_terminal() {
        return if consistent_with_terminal(s.status, outcome) {
            Decision::Ignore(Ignored::AfterTerminal)
        } else {
            Decision::Reject(Rejection::new(
                "terminal_conflict",
                format!(
                    "provider reports {} for a payment that is {}",
                    outcome.label(),
                    s.status
                ),
            ))
        };
    }
    if s.status != Status::Processing {
        return Decision::Reject(Rejection::new(
            "invalid_transition",
            format!("provider reply for a payment that is {}", s.status),
        ));
    }
    let mut out = Out::new(cmd, state);
    // Every attempt uses the same idempotency key, so a final answer from any attempt
    // is a fact about the one charge; only non-final answers can be stale.
    match (op, outcome) {
        (ProviderOp::Charge | ProviderOp::Status, P::Approved { provider_ref }) => {
            out.emit(EventBody::Completed {
                provider_ref: provider_ref.clone(),
            });
        }
        (ProviderOp::Charge | ProviderOp::Status, P::Declined { code, message }) => {
            out.emit(EventBody::Failed {
                code: code.clone(),
                message: message.clone(),
            });
        }
        (_, P::Canceled) => {
            out.emit(EventBody::Canceled {
                reason: "cancel confirmed by the provider".into(),
            });
        }
        (ProviderOp::Cancel, P::CancelRefused { reason }) => {
            if !s.cancel_requested {
                return Decision::Ignore(Ignored::StaleReply);
            }
            out.emit(EventBody::CancelRefused {
                reason: reason.clone(),
            });
        }
        (ProviderOp::Cancel, P::Transient { error } | P::Ambiguous { error }) => {
            if !s.cancel_requested {
                return Decision::Ignore(Ignored::StaleReply);
            }
            out.emit(EventBody::CancelRefused {
                reason: format!("provider did not confirm the cancel: {error}"),
            });
        }
        _ if attempt != s.attempt => return Decision::Ignore(Ignored::StaleReply),
        (ProviderOp::Charge, P::Pending { provider_ref }) => match s.awaiting {
            Awaiting::ChargeReply { .. } | Awaiting::StatusReply { .. } => {
                out.emit(EventBody::ChargePending {
                    attempt,
                    provider_ref: provider_ref.clone(),
                });
                let wait = out.wait();
                out.schedule(
                    policy.webhook_timeout_ms,
                    TimerKind::ProviderTimeout { attempt, wait },
                );
            }
            _ => return Decision::Ignore(Ignored::StaleReply),
        },
        (ProviderOp::Charge, P::Transient { error }) => {
            if s.awaiting != (Awaiting::ChargeReply { attempt }) {
                return Decision::Ignore(Ignored::StaleReply);
            }
            if s.attempt < policy.max_attempts {
                out.retry_or_fail(s, error.clone(), policy);
            } else {
                // Before failing, make sure no charge exists under our key.
                out.status_check(
                    s,
                    format!("attempts exhausted ({error}); confirming no charge exists"),
                    policy,
                );
            }
        }
        (ProviderOp::Charge, P::Ambiguous { error }) => {
            if s.awaiting != (Awaiting::ChargeReply { attempt }) {
                return Decision::Ignore(Ignored::StaleReply);
            }
            out.status_check(s, format!("outcome unknown: {error}"), policy);
        }
        (ProviderOp::Status, P::NotFound) => {
            if !matches!(s.awaiting, Awaiting::StatusReply { .. }) {
                return Decision::Ignore(Ignored::StaleReply);
            }
            out.retry_or_fail(s, "provider has no charge under our key".into(), policy);
        }
        (ProviderOp::Status, P::Pending { .. } | P::Transient { .. } | P::Ambiguous { .. }) => {
            // The status check's own timer polls again, with back-off.
            return Decision::Ignore(Ignored::StillPending);
        }
        (op, outcome) => {
            return Decision::Reject(Rejection::new(
                "unexpected_provider_answer",
                format!(
                    "{} is not an answer to a {} call",
                    outcome.label(),
                    op.as_str()
                ),
            ))
        }
    }
    out.done()
}

/// What a webhook reports, as the answer of a provider call would.
fn webhook_as_outcome(outcome: &WebhookOutcome) -> ProviderOutcome {
    match outcome {
        WebhookOutcome::Succeeded { provider_ref }
        | WebhookOutcome::RefundSucceeded { provider_ref, .. } => ProviderOutcome::Approved {
            provider_ref: provider_ref.clone(),
        },
        WebhookOutcome::Failed { code, message }
        | WebhookOutcome::RefundFailed { code, message, .. } => ProviderOutcome::Declined {
            code: code.clone(),
            message: message.clone(),
        },
        WebhookOutcome::Canceled => ProviderOutcome::Canceled,
    }
}

fn decide_webhook(
    state: Option<&PaymentState>,
    cmd: &Command,
    outcome: &WebhookOutcome,
) -> Decision {
    let Some(s) = state else {
        return unknown(cmd);
    };
    let as_provider = webhook_as_outcome(outcome);
    if s.status.is_terminal() {
        return if consistent_with_terminal(s.status, &as_provider) {
            Decision::Ignore(Ignored::AfterTerminal)
        } else {
            Decision::Reject(Rejection::new(
                "terminal_conflict",
                format!(
                    "webhook reports {} for a payment that is {}",
                    as_provider.label(),
                    s.status
                ),
            ))
        };
    }
    if s.status != Status::Processing {
        return Decision::Reject(Rejection::new(
            "invalid_transition",
            format!("webhook for a payment that is {}", s.status),
        ));
    }
    let mut out = Out::new(cmd, state);
    match outcome {
        WebhookOutcome::Succeeded { provider_ref } => out.emit(EventBody::Completed {
            provider_ref: provider_ref.clone(),
        }),
        WebhookOutcome::Failed { code, message } => out.emit(EventBody::Failed {
            code: code.clone(),
            message: message.clone(),
        }),
        WebhookOutcome::Canceled => out.emit(EventBody::Canceled {
            reason: "cancel confirmed by the provider".into(),
        }),
        WebhookOutcome::RefundSucceeded { .. } | WebhookOutcome::RefundFailed { .. } => {
            return unknown(cmd)
        }
    };
    out.done()
}

pub mod refund;

#[cfg(test)]
mod tests;
