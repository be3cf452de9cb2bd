//! `refund_state_machine`: applies refund commands to payments through
//! [`payments::machine::refund::decide`], and passes every other command on.
//!
//! It sits in the command chain before `payment_state_machine` and shares its `state`
//! store: a refund lives inside its payment's record, so a refund request is checked
//! against the payment's status and every refund before it, in the partition that owns
//! the payment, in one order. A topology without it runs as before; a refund command
//! that reaches `payment_state_machine` is rejected there as `refunds_not_enabled`.
//!
//! Its `dedup` store records the refund replies, webhooks and timers it applied; a
//! refund request is recorded by the refund it creates. Its timers (the wait for an
//! answer, the back-off) are not cancelled early: each fires once and is ignored when
//! its wait is over, so they are bounded by the refunds in flight.

use crate::config::{CompiledTopology, Role, DEFAULT_STATE_RETENTION};
use crate::metrics::METRICS;
use crate::processor::{
    BuildContext, Configured, Context, NodeSpec, ProcessError, Processor, ProviderCall, Record,
    RecordKind, Span, TimerRequest,
};
use crate::processors::payment_state_machine::stored;
use crate::processors::payment_state_machine::trace_step;
use payments::machine::refund;
use payments::{
    evolve, Command, CommandBody, CommandId, Decision, Effect, PaymentId, RefundPolicy, TimerKind,
};
use stores::dedup;

pub const SPEC: NodeSpec = NodeSpec {
    accepts: &[RecordKind::Command],
    emits: &[
        RecordKind::Command,
        RecordKind::Event,
        RecordKind::ProviderCall,
        RecordKind::DeadLetter,
    ],
    store_roles: &["state", "dedup"],
    configure,
};

/// A refund must be able to finish while its payment is still in the store: the
/// payment stays at least `state_retention` after it finished (and while a refund is in
/// flight), which must exceed how late a refund's webhook may come.
fn configure(ctx: &BuildContext<'_>) -> Result<Configured, Vec<String>> {
    let policy: RefundPolicy = ctx.params()?;
    let mut problems: Vec<String> = policy
        .problems()
        .into_iter()
        .map(|p| format!("invalid params: {p}"))
        .collect();
    // A missing store binding is reported by the compiler.
    let (Ok(state), Ok(dedup)) = (ctx.store("state"), ctx.store("dedup")) else {
        return Err(problems);
    };
    if state.state_retention.as_ms() <= policy.webhook_max_delay_ms {
        problems.push(format!(
            "store `{}` keeps a finished payment for {} (state_retention), not longer than the provider may \
             deliver a refund's webhook ({}, webhook_max_delay_ms). Raise state_retention",
            state.name,
            state.state_retention,
            Span::from_ms(policy.webhook_max_delay_ms)
        ));
    }
    let Some(dedup_retention) = dedup.retention else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let (id, state_store, dedup_store) =
        (ctx.id.to_owned(), state.name.clone(), dedup.name.clone());
    let retention = dedup::Retention::new(dedup_retention.as_ms());
    Ok(Configured::new(move || -> Box<dyn Processor> {
        Box::new(RefundStateMachine {
            id: id.clone(),
            policy: policy.clone(),
            state: state_store.clone(),
            dedup: dedup_store.clone(),
            retention,
        })
    }))
}

pub struct RefundStateMachine {
    id: String,
    policy: RefundPolicy,
    state: String,
    dedup: String,
    retention: dedup::Retention,
}

/// How long after a payment completed a refund of it may still start: the payment's
/// retention in the store less how late the refund's webhook may come, so every refund
/// finishes (its late webhook included) while its payment is held. `None` without a
/// refund processor. The API answers a request past it `409 refund_window_closed`; the
/// processor records one that reaches it anyway as a refused refund.
pub fn window(t: &CompiledTopology) -> Option<Span> {
    let node = t
        .nodes
        .iter()
        .find(|n| n.role == Role::Processor && n.kind == "refund_state_machine")?;
    let policy: RefundPolicy = node.params.clone().try_into().ok()?;
    let retention = t
        .stores
        .get(node.stores.get("state")?)?
        .state_retention
        .unwrap_or(DEFAULT_STATE_RETENTION);
    Some(Span::from_ms(
        retention
            .as_ms()
            .saturating_sub(policy.webhook_max_delay_ms),
    ))
}

impl RefundStateMachine {
    fn apply(&self, ctx: &mut Context<'_>, cmd: &Command) -> Result<(), ProcessError> {
        let kind = cmd.body.kind();
        let stored = stored::load(ctx, &self.state, &cmd.payment_id)?;
        let state = stored.as_ref().map(|p| &p.state);
        let span = tracing::info_span!(
            "refund.process",
            otel.name = %format_args!("process refund {kind}"),
            otel.kind = "consumer",
            payment_id = %cmd.payment_id,
            command = kind,
            command_id = %cmd.command_id,
        );
        let traceparent = trace_step(&span, state, cmd, ctx.incoming_trace());
        ctx.set_outgoing_trace(traceparent.clone());
        let _entered = span.enter();
        // A refund starts only while its payment stays in the store long enough for
        // the refund's latest webhook: the expiry is set when the payment finished.
        let window_open = stored
            .as_ref()
            .and_then(|p| p.expires_at_ms)
            .is_none_or(|at| {
                ctx.now_ms()
                    .saturating_add(self.policy.webhook_max_delay_ms)
                    < at
            });
        match refund::decide(state, cmd, &self.policy, window_open) {
            Decision::Apply { events, effects } => {
                let Some(mut record) = stored else {
                    return Ok(());
                };
                for e in &events {
                    METRICS.events.with_label_values(&[e.body.kind()]).inc();
                    if let payments::EventBody::RefundRetryScheduled { .. } = e.body {
                        METRICS.retries.with_label_values(&["refund"]).inc();
                    }
                    if let payments::EventBody::MarkedStuck { reason } = &e.body {
                        METRICS.stuck.inc();
                        tracing::error!(payment_id = %e.payment_id, %reason, "payment marked stuck");
                    }
                    tracing::debug!(payment_id = %e.payment_id, seq = e.seq, event = e.body.kind(), "event");
                    match evolve(Some(record.state.clone()), e) {
                        Some(s) => record.state = s,
                        None => return Ok(()),
                    }
                }
                let s = &record.state;
                for effect in effects {
                    match effect {
                        Effect::Call { op, attempt, key } => {
                            let Some(r) = op
                                .refund()
                                .and_then(|n| s.refunds.get(n as usize).map(|r| (n, r)))
                            else {
                                continue;
                            };
                            ctx.forward(Record::ProviderCall(ProviderCall {
                                payment_id: s.payment_id,
                                op,
                                attempt,
                                request_key: key,
                                idempotency_key: payments::provider_refund_key(&s.payment_id, r.0),
                                amount: r.1.amount,
                                currency: s.currency.to_string(),
                                traceparent: traceparent.clone(),
                            }));
                        }
                        Effect::Schedule { delay_ms, kind } => {
                            ctx.schedule(TimerRequest {
                                due_at_ms: ctx.now_ms().saturating_add(delay_ms),
                                id: stored::timer_id(&s.payment_id, kind),
                                payload: stores::encode(&(s.payment_id, kind)),
                            });
                        }
                    }
                }
                for e in events {
                    ctx.forward(Record::Event(e));
                }
                stored::save(ctx, &self.state, &record);
            }
            Decision::Ignore(why) => {
                METRICS.ignored.with_label_values(&[why.label()]).inc();
                tracing::debug!(reason = why.label(), "refund command ignored");
            }
            Decision::Reject(r) => {
                METRICS.rejected.with_label_values(&[r.code]).inc();
                tracing::warn!(payment_id = %cmd.payment_id, command = kind, command_id = %cmd.command_id, code = r.code, message = %r.message, "refund command rejected");
                if let CommandBody::Refund(_) = cmd.body {
                    // A request the API answered 202 that will not be carried out (its
                    // payment left the store, or its key was reused across instances):
                    // on record, where an operator can find it.
                    METRICS.dlq_messages.with_label_values(&[r.code]).inc();
                    let dl = ctx.dead_letter(
                        r.code,
                        r.message.clone(),
                        Some(cmd.payment_id.to_string()),
                        serde_json::to_string(cmd).ok(),
                    );
                    ctx.forward(Record::DeadLetter(dl));
                }
            }
        }
        Ok(())
    }
}

impl Processor for RefundStateMachine {
    fn process(&mut self, ctx: &mut Context<'_>, record: Record) -> Result<(), ProcessError> {
        let Record::Command(cmd) = record else {
            return Err(ProcessError::UnexpectedRecord {
                processor: self.id.clone(),
                kind: record.kind().as_str(),
            });
        };
        if !cmd.body.is_refund() {
            ctx.forward(Record::Command(cmd));
            return Ok(());
        }
        let kind = cmd.body.kind();
        METRICS.commands.with_label_values(&[kind]).inc();
        // A refund request needs no dedup record: the refund it creates records it.
        if !matches!(cmd.body, CommandBody::Refund(_)) {
            if ctx.seen(&self.dedup, cmd.command_id.as_str(), self.retention)? {
                METRICS.duplicates.with_label_values(&[kind]).inc();
                return Ok(());
            }
            ctx.remember(&self.dedup, cmd.command_id.as_str(), self.retention);
        }
        self.apply(ctx, &cmd)
    }

    fn on_timer(&mut self, ctx: &mut Context<'_>, payload: &[u8]) -> Result<(), ProcessError> {
        let (payment_id, kind): (PaymentId, TimerKind) = stores::decode("__timers", payload)?;
        METRICS.timers.with_label_values(&[kind.label()]).inc();
        let now = ctx.now_ms();
        let id = format!("timer:{payment_id}:{}:{now}", kind.label());
        let Ok(command_id) = CommandId::parse(&id) else {
            return Ok(());
        };
        let cmd = Command {
            command_id,
            payment_id,
            issued_at_ms: now,
            body: CommandBody::Timer { kind },
        };
        self.apply(ctx, &cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processor::testing;

    #[test]
    fn params_are_checked_and_a_short_state_retention_is_refused() {
        let e = testing::configure(&SPEC, "max_attempts = 0").expect_err("invalid");
        assert!(
            e.iter().any(|p| p.contains("max_attempts must be >= 1")),
            "{e:?}"
        );
    }

    #[test]
    fn commands_that_are_not_about_refunds_pass_through_unchanged() {
        let mut p = RefundStateMachine {
            id: "refunds".into(),
            policy: RefundPolicy::default(),
            state: "payments".into(),
            dedup: "dedup".into(),
            retention: dedup::Retention::new(60_000),
        };
        let create = testing::create_command("k-1", 100, "EUR", 1_000);
        let out = testing::process(&mut p, Record::Command(create.clone()));
        assert!(
            matches!(out.as_slice(), [Record::Command(c)] if *c == create),
            "{out:?}"
        );
    }
}
