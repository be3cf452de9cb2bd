//! Refunds of a completed payment: `PENDING → SUCCEEDED | FAILED`, decided in the
//! payment's own partition, against the payment's own state.
//!
//! A refund lives inside its payment ([`PaymentState::refunds`]) and its events are the
//! payment's events, numbered by the payment's `seq`: so every refund request, answer
//! and webhook for a payment is applied in one order, by one task, and the rule below
//! is checked against everything that came before it.
//!
//! **The rule.** The amounts of succeeded and pending refunds never exceed the captured
//! amount ([`PaymentState::amount_reserved`]). A request is checked against it when it
//! is applied, not when the API accepted it: two concurrent requests both accepted by
//! the API are applied one after the other here, and the second is refused if the first
//! took what was left. A refused request is recorded as a failed refund with its reason
//! ([`EventBody::RefundRefused`]), so the merchant who was answered `202` can read why.
//!
//! **Money moves once.** Every attempt and status check of refund `n` uses one provider
//! idempotency key ([`crate::provider_refund_key`]); a repeated request (same key) is a
//! duplicate. An attempt without an answer is resolved by asking the provider for the
//! refund's status before trying again, as for charges.

use super::{
    jittered_backoff, not_positive, status_poll_delay, unknown, webhook_as_outcome, Decision,
    Ignored, Out, Rejection,
};
use crate::command::{Command, CommandBody, CreateRefund, ProviderOp, ProviderOutcome, TimerKind};
use crate::event::EventBody;
use crate::ids::{IdempotencyKey, RefundId};
use crate::machine::PaymentState;
use crate::Status;
use serde::{Deserialize, Serialize};

/// Tunables of the refund machine; set per processor in `config/topology.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RefundPolicy {
    /// How long to wait for the answer to a refund or status call before asking for the
    /// status. Must exceed the provider client's own request timeout.
    pub reply_timeout_ms: i64,
    /// How long to wait for a webhook after the provider accepted a refund.
    pub webhook_timeout_ms: i64,
    /// Refund attempts before giving up (each attempt uses the same provider key).
    pub max_attempts: u32,
    pub backoff_base_ms: i64,
    pub backoff_max_ms: i64,
    /// Longest gap between two status checks of one attempt.
    pub status_poll_max_ms: i64,
    /// Unanswered status checks after which the payment is marked stuck (alarm).
    pub stuck_after_checks: u32,
    /// Refund requests a payment may receive, refused ones included: bounds the state
    /// one payment holds.
    pub max_refunds_per_payment: u32,
    /// The longest a provider may take to deliver a refund's webhook. A refund is only
    /// started while the payment stays in the store at least this long.
    pub webhook_max_delay_ms: i64,
}

impl Default for RefundPolicy {
    fn default() -> Self {
        RefundPolicy {
            reply_timeout_ms: 10_000,
            webhook_timeout_ms: 30_000,
            max_attempts: 4,
            backoff_base_ms: 200,
            backoff_max_ms: 10_000,
            status_poll_max_ms: 60_000,
            stuck_after_checks: 6,
            max_refunds_per_payment: 20,
            webhook_max_delay_ms: 3 * 24 * 3_600_000,
        }
    }
}

impl RefundPolicy {
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
        if self.max_attempts == 0 {
            p.push("max_attempts must be >= 1".into());
        }
        if self.max_refunds_per_payment == 0 {
            p.push("max_refunds_per_payment must be >= 1".into());
        }
        if self.backoff_max_ms < self.backoff_base_ms {
            p.push("backoff_max_ms must be >= backoff_base_ms".into());
        }
        p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RefundStatus {
    Pending,
    Succeeded,
    Failed,
}

impl RefundStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RefundStatus::Pending => "PENDING",
            RefundStatus::Succeeded => "SUCCEEDED",
            RefundStatus::Failed => "FAILED",
        }
    }

    pub fn is_terminal(self) -> bool {
        self != RefundStatus::Pending
    }

    pub fn parse(s: &str) -> Option<RefundStatus> {
        Some(match s {
            "PENDING" => RefundStatus::Pending,
            "SUCCEEDED" => RefundStatus::Succeeded,
            "FAILED" => RefundStatus::Failed,
            _ => return None,
        })
    }
}

impl std::fmt::Display for RefundStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a pending refund waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefundAwaiting {
    Nothing,
    Reply { attempt: u32 },
    StatusReply { attempt: u32 },
    Webhook { attempt: u32 },
    RetryAt { attempt: u32 },
}

/// One refund of a payment: a fold of its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundState {
    pub refund_id: RefundId,
    /// Minor units of the payment's currency (what was asked, for a refused request).
    pub amount: i64,
    pub idempotency_key: IdempotencyKey,
    pub request_hash: String,
    pub reason: Option<String>,
    pub status: RefundStatus,
    pub attempt: u32,
    pub checks: u32,
    /// Bumped whenever a new wait starts; timers of older waits are stale.
    pub wait: u32,
    pub awaiting: RefundAwaiting,
    pub provider_ref: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// Applies a refund event to its payment's state (the payment's part of the fold is
/// done by [`super::evolve`]). An event naming a refund the state does not hold changes
/// nothing.
pub(super) fn evolve(s: &mut PaymentState, body: &EventBody, at_ms: i64) {
    let new = |refund_id: RefundId,
               amount: i64,
               key: &IdempotencyKey,
               hash: &str,
               reason: &Option<String>,
               status| RefundState {
        refund_id,
        amount,
        idempotency_key: key.clone(),
        request_hash: hash.to_owned(),
        reason: reason.clone(),
        status,
        attempt: 0,
        checks: 0,
        wait: 0,
        awaiting: RefundAwaiting::Nothing,
        provider_ref: None,
        failure_code: None,
        failure_message: None,
        created_at_ms: at_ms,
        updated_at_ms: at_ms,
    };
    match body {
        EventBody::RefundRequested {
            refund_id,
            amount,
            idempotency_key,
            request_hash,
            reason,
            ..
        } => {
            let mut r = new(
                *refund_id,
                amount.minor_units(),
                idempotency_key,
                request_hash,
                reason,
                RefundStatus::Pending,
            );
            r.attempt = 1;
            r.wait = 1;
            r.awaiting = RefundAwaiting::Reply { attempt: 1 };
            s.refunds.push(r);
            return;
        }
        EventBody::RefundRefused {
            refund_id,
            amount,
            idempotency_key,
            request_hash,
            reason,
            code,
            message,
            ..
        } => {
            let mut r = new(
                *refund_id,
                *amount,
                idempotency_key,
                request_hash,
                reason,
                RefundStatus::Failed,
            );
            r.failure_code = Some(code.clone());
            r.failure_message = Some(message.clone());
            s.refunds.push(r);
            return;
        }
        _ => {}
    }
    let Some(r) = body.refund().and_then(|n| s.refunds.get_mut(n as usize)) else {
        return;
    };
    r.updated_at_ms = at_ms;
    match body {
        EventBody::RefundAttempted { attempt, .. } => {
            r.attempt = *attempt;
            r.checks = 0;
            r.wait += 1;
            r.awaiting = RefundAwaiting::Reply { attempt: *attempt };
        }
        EventBody::RefundPending {
            attempt,
            provider_ref,
            ..
        } => {
            r.provider_ref = Some(provider_ref.clone());
            r.wait += 1;
            r.awaiting = RefundAwaiting::Webhook { attempt: *attempt };
        }
        EventBody::RefundRetryScheduled { attempt, .. } => {
            r.wait += 1;
            r.awaiting = RefundAwaiting::RetryAt { attempt: *attempt };
        }
        EventBody::RefundStatusCheckRequested { attempt, check, .. } => {
            r.checks = *check;
            r.wait += 1;
            r.awaiting = RefundAwaiting::StatusReply { attempt: *attempt };
        }
        EventBody::RefundSucceeded { provider_ref, .. } => {
            r.status = RefundStatus::Succeeded;
            r.provider_ref = Some(provider_ref.clone());
            r.awaiting = RefundAwaiting::Nothing;
        }
        EventBody::RefundFailed { code, message, .. } => {
            r.status = RefundStatus::Failed;
            r.failure_code = Some(code.clone());
            r.failure_message = Some(message.clone());
            r.awaiting = RefundAwaiting::Nothing;
        }
        _ => {}
    }
}

/// Whether the wait a refund timer guards is still on.
pub fn timer_is_live(s: &PaymentState, kind: TimerKind) -> bool {
    let live = |refund: u32, f: &dyn Fn(&RefundState) -> bool| {
        s.refunds
            .get(refund as usize)
            .is_some_and(|r| r.status == RefundStatus::Pending && f(r))
    };
    match kind {
        TimerKind::RefundRetry { refund, attempt } => live(refund, &|r| {
            r.awaiting == RefundAwaiting::RetryAt { attempt }
        }),
        TimerKind::RefundTimeout {
            refund,
            attempt,
            wait,
        } => live(refund, &|r| {
            r.attempt == attempt
                && r.wait == wait
                && matches!(
                    r.awaiting,
                    RefundAwaiting::Reply { .. }
                        | RefundAwaiting::StatusReply { .. }
                        | RefundAwaiting::Webhook { .. }
                )
        }),
        _ => false,
    }
}

/// Decides a refund command (one for which [`CommandBody::is_refund`] holds) against
/// the payment. `window_open`: whether a new refund may still start (the topology
/// knows how long the payment stays; see the refund processor). Pure: same inputs,
/// same decision.
pub fn decide(
    state: Option<&PaymentState>,
    cmd: &Command,
    policy: &RefundPolicy,
    window_open: bool,
) -> Decision {
    let Some(s) = state else {
        return unknown(cmd);
    };
    match &cmd.body {
        CommandBody::Refund(req) => decide_request(s, cmd, req, policy, window_open),
        CommandBody::ProviderReply {
            op,
            attempt,
            outcome,
        } => match op.refund() {
            Some(n) => decide_answer(s, cmd, n, *op, *attempt, outcome, policy),
            None => not_a_refund(cmd),
        },
        CommandBody::Webhook { outcome, .. } => match outcome.refund() {
            Some(n) => decide_answer(
                s,
                cmd,
                n,
                ProviderOp::RefundStatus { refund: n },
                0,
                &webhook_as_outcome(outcome),
                policy,
            ),
            None => not_a_refund(cmd),
        },
        CommandBody::Timer { kind } => decide_timer(s, cmd, *kind, policy),
        CommandBody::Create(_) | CommandBody::Cancel { .. } => not_a_refund(cmd),
    }
}

fn not_a_refund(cmd: &Command) -> Decision {
    Decision::Reject(Rejection::new(
        "not_a_refund_command",
        format!(
            "a {} command is the payment's, not a refund's: the topology's wiring is wrong",
            cmd.body.kind()
        ),
    ))
}

fn decide_request(
    s: &PaymentState,
    cmd: &Command,
    req: &CreateRefund,
    policy: &RefundPolicy,
    window_open: bool,
) -> Decision {
    if s.merchant_id != req.merchant_id {
        // Same answer as for a missing payment: ownership is not disclosed.
        return unknown(cmd);
    }
    if RefundId::derive(&s.payment_id, &req.idempotency_key) != req.refund_id {
        return Decision::Reject(Rejection::new(
            "invalid_refund_id",
            "refund id does not match the payment and idempotency key",
        ));
    }
    if let Some(r) = s.refunds.iter().find(|r| r.refund_id == req.refund_id) {
        return if r.request_hash == req.request_hash {
            Decision::Ignore(Ignored::DuplicateRefund)
        } else {
            Decision::Reject(Rejection::new(
                "idempotency_key_reused",
                format!(
                    "idempotency key {:?} already requested refund {} with a different request",
                    req.idempotency_key.as_str(),
                    r.refund_id
                ),
            ))
        };
    }
    let number = s.refunds.len() as u32;
    if number >= policy.max_refunds_per_payment {
        return Decision::Reject(Rejection::new(
            "too_many_refunds",
            format!(
                "payment {} already has {number} refund requests, the most one payment may have",
                s.payment_id
            ),
        ));
    }
    let left = s.amount.minor_units() - s.amount_reserved();
    let asked = req.amount.map_or(left, |a| a.minor_units());
    let refusal = if s.status != Status::Completed {
        Some((
            "payment_not_completed",
            format!(
                "payment is {}; only a COMPLETED payment can be refunded",
                s.status
            ),
        ))
    } else if !window_open {
        Some((
            "refund_window_closed",
            "the payment completed too long ago to be refunded here".to_owned(),
        ))
    } else if left <= 0 {
        Some((
            "nothing_to_refund",
            "the payment is refunded in full already (or refunds in flight take what is left)"
                .to_owned(),
        ))
    } else if asked > left {
        Some((
            "amount_exceeds_refundable",
            format!(
                "a refund of {asked} exceeds the {left} left to refund of {} captured",
                s.amount.minor_units()
            ),
        ))
    } else {
        None
    };
    let mut out = Out::new(cmd, Some(s));
    match (refusal, crate::Amount::new(asked)) {
        (None, Ok(amount)) => {
            out.emit(EventBody::RefundRequested {
                refund: number,
                refund_id: req.refund_id,
                amount,
                idempotency_key: req.idempotency_key.clone(),
                request_hash: req.request_hash.clone(),
                reason: req.reason.clone(),
            });
            out.refund_call(number, 1, policy);
        }
        (refusal, _) => {
            let (code, message) = refusal.unwrap_or_else(|| {
                (
                    "nothing_to_refund",
                    "there is nothing left to refund".to_owned(),
                )
            });
            out.emit(EventBody::RefundRefused {
                refund: number,
                refund_id: req.refund_id,
                amount: asked,
                idempotency_key: req.idempotency_key.clone(),
                request_hash: req.request_hash.clone(),
                reason: req.reason.clone(),
                code: code.to_owned(),
                message,
            });
        }
    }
    out.done()
}

/// Whether a late answer agrees with the refund's outcome.
fn consistent_with_terminal(status: RefundStatus, outcome: &ProviderOutcome) -> bool {
    match outcome {
        ProviderOutcome::Approved { .. } => status == RefundStatus::Succeeded,
        ProviderOutcome::Declined { .. } => status == RefundStatus::Failed,
        _ => true,
    }
}

/// An answer about refund `n`: a provider reply (`attempt` > 0) or a webhook (final
/// answers only, `attempt` 0).
fn decide_answer(
    s: &PaymentState,
    cmd: &Command,
    n: u32,
    op: ProviderOp,
    attempt: u32,
    outcome: &ProviderOutcome,
    policy: &RefundPolicy,
) -> Decision {
    use ProviderOutcome as P;
    let Some(r) = s.refunds.get(n as usize) else {
        return Decision::Reject(Rejection::new(
            "unknown_refund",
            format!("payment {} has no refund number {n}", s.payment_id),
        ));
    };
    if r.status.is_terminal() {
        return if consistent_with_terminal(r.status, outcome) {
            Decision::Ignore(Ignored::AfterTerminal)
        } else {
            Decision::Reject(Rejection::new(
                "terminal_conflict",
                format!(
                    "provider reports {} for refund {} that is {}",
                    outcome.label(),
                    r.refund_id,
                    r.status
                ),
            ))
        };
    }
    let mut out = Out::new(cmd, Some(s));
    // Every attempt uses the same provider key, so a final answer from any attempt is
    // a fact about the one refund; only non-final answers can be stale.
    match (op, outcome) {
        (_, P::Approved { provider_ref }) => {
            out.emit(EventBody::RefundSucceeded {
                refund: n,
                provider_ref: provider_ref.clone(),
            });
        }
        (_, P::Declined { code, message }) => {
            out.emit(EventBody::RefundFailed {
                refund: n,
                code: code.clone(),
                message: message.clone(),
            });
        }
        _ if attempt != r.attempt => return Decision::Ignore(Ignored::StaleReply),
        (ProviderOp::Refund { .. }, P::Pending { provider_ref }) => match r.awaiting {
            RefundAwaiting::Reply { .. } | RefundAwaiting::StatusReply { .. } => {
                out.emit(EventBody::RefundPending {
                    refund: n,
                    attempt,
                    provider_ref: provider_ref.clone(),
                });
                let wait = out.refund_wait(n);
                out.schedule(
                    policy.webhook_timeout_ms,
                    TimerKind::RefundTimeout {
                        refund: n,
                        attempt,
                        wait,
                    },
                );
            }
            _ => return Decision::Ignore(Ignored::StaleReply),
        },
        (ProviderOp::Refund { .. }, P::Transient { error }) => {
            if r.awaiting != (RefundAwaiting::Reply { attempt }) {
                return Decision::Ignore(Ignored::StaleReply);
            }
            if r.attempt < policy.max_attempts {
                out.refund_retry_or_fail(s, n, r, error.clone(), policy);
            } else {
                // Before failing, make sure no refund exists under our key.
                out.refund_status_check(
                    s,
                    n,
                    r,
                    format!("attempts exhausted ({error}); confirming no refund exists"),
                    policy,
                );
            }
        }
        (ProviderOp::Refund { .. }, P::Ambiguous { error }) => {
            if r.awaiting != (RefundAwaiting::Reply { attempt }) {
                return Decision::Ignore(Ignored::StaleReply);
            }
            out.refund_status_check(s, n, r, format!("outcome unknown: {error}"), policy);
        }
        (ProviderOp::RefundStatus { .. }, P::NotFound) => {
            if !matches!(r.awaiting, RefundAwaiting::StatusReply { .. }) {
                return Decision::Ignore(Ignored::StaleReply);
            }
            out.refund_retry_or_fail(
                s,
                n,
                r,
                "provider has no refund under our key".into(),
                policy,
            );
        }
        (
            ProviderOp::RefundStatus { .. },
            P::Pending { .. } | P::Transient { .. } | P::Ambiguous { .. },
        ) => {
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

fn decide_timer(
    s: &PaymentState,
    cmd: &Command,
    kind: TimerKind,
    policy: &RefundPolicy,
) -> Decision {
    if !timer_is_live(s, kind) {
        return Decision::Ignore(Ignored::StaleTimer);
    }
    let mut out = Out::new(cmd, Some(s));
    match kind {
        TimerKind::RefundRetry { refund, attempt } => {
            out.emit(EventBody::RefundAttempted { refund, attempt });
            out.refund_call(refund, attempt, policy);
        }
        TimerKind::RefundTimeout { refund, .. } => {
            let Some(r) = s.refunds.get(refund as usize) else {
                return Decision::Ignore(Ignored::StaleTimer);
            };
            let reason = match r.awaiting {
                RefundAwaiting::Webhook { .. } => "no webhook in time",
                RefundAwaiting::StatusReply { .. } => "no answer to the status check in time",
                _ => "no answer to the refund in time",
            };
            out.refund_status_check(s, refund, r, reason.into(), policy);
        }
        _ => return Decision::Ignore(Ignored::StaleTimer),
    }
    out.done()
}

impl Out<'_> {
    /// The current wait number of refund `n` (after the events emitted so far).
    fn refund_wait(&self, n: u32) -> u32 {
        self.state
            .as_ref()
            .and_then(|s| s.refunds.get(n as usize))
            .map_or(0, |r| r.wait)
    }

    /// Sends attempt `attempt` of refund `n` (its event is emitted already) and waits
    /// for the answer.
    fn refund_call(&mut self, n: u32, attempt: u32, policy: &RefundPolicy) -> &mut Self {
        self.call(ProviderOp::Refund { refund: n }, attempt);
        let wait = self.refund_wait(n);
        self.schedule(
            policy.reply_timeout_ms,
            TimerKind::RefundTimeout {
                refund: n,
                attempt,
                wait,
            },
        )
    }

    fn refund_status_check(
        &mut self,
        s: &PaymentState,
        n: u32,
        r: &RefundState,
        reason: String,
        policy: &RefundPolicy,
    ) -> &mut Self {
        let check = r.checks + 1;
        if check > policy.stuck_after_checks && !s.stuck {
            self.emit(EventBody::MarkedStuck {
                reason: format!(
                    "refund {}: {} status checks without a final answer",
                    r.refund_id, r.checks
                ),
            });
        }
        self.emit(EventBody::RefundStatusCheckRequested {
            refund: n,
            attempt: r.attempt,
            check,
            reason,
        });
        self.call(ProviderOp::RefundStatus { refund: n }, r.attempt);
        let wait = self.refund_wait(n);
        let delay = status_poll_delay(check, policy.reply_timeout_ms, policy.status_poll_max_ms);
        self.schedule(
            delay,
            TimerKind::RefundTimeout {
                refund: n,
                attempt: r.attempt,
                wait,
            },
        )
    }

    fn refund_retry_or_fail(
        &mut self,
        s: &PaymentState,
        n: u32,
        r: &RefundState,
        reason: String,
        policy: &RefundPolicy,
    ) -> &mut Self {
        if r.attempt < policy.max_attempts {
            let attempt = r.attempt + 1;
            let mut seed = s.payment_id.key_bytes().to_vec();
            seed.extend(n.to_be_bytes());
            let delay = jittered_backoff(
                &seed,
                r.attempt,
                policy.backoff_base_ms,
                policy.backoff_max_ms,
            );
            self.emit(EventBody::RefundRetryScheduled {
                refund: n,
                attempt,
                due_at_ms: self.cmd.issued_at_ms.saturating_add(delay),
                reason,
            });
            self.schedule(delay, TimerKind::RefundRetry { refund: n, attempt })
        } else {
            self.emit(EventBody::RefundFailed {
                refund: n,
                code: "provider_unavailable".into(),
                message: format!("no refund after {} attempts: {reason}", r.attempt),
            })
        }
    }
}

#[cfg(test)]
mod tests;
