//! `payment_state_machine`: applies commands to payments through [`payments::decide`].
//!
//! Owns two stores: `state` (payment id → [`PaymentState`]) and `dedup` (ids of the
//! commands applied to existing payments; a create is recorded by its payment). The
//! state change, the dedup record, the timers it sets and the records it emits are
//! staged in one write set, committed with the input offset.

use crate::config::{CompiledNode, StoreDecl};
use crate::metrics::METRICS;
use crate::processor::{
    Context, ProcessError, Processor, ProviderCall, Record, RecordKind, TimerRequest,
};
use crate::registry::{parse_params, NodeSpec};
use payments::machine::PaymentState;
use payments::{
    decide, evolve, Command, CommandBody, CommandId, Decision, Effect, EventBody, PaymentId,
    Policy, TimerKind,
};
use std::collections::BTreeMap;
use stores::dedup;

/// Dedup records removed per housekeeping pass (per partition, once a minute).
const PRUNE_PER_PASS: usize = 50_000;

pub const SPEC: NodeSpec = NodeSpec {
    accepts: &[RecordKind::Command],
    emits: &[RecordKind::Event, RecordKind::ProviderCall],
    store_roles: &["state", "dedup"],
    check_params,
    build: Some(build),
};

fn check_params(v: &toml::Value) -> Vec<String> {
    match parse_params::<Policy>(v) {
        Err(e) => vec![e.to_string()],
        Ok(p) => p.problems(),
    }
}

pub struct PaymentStateMachine {
    id: String,
    policy: Policy,
    state: String,
    dedup: String,
    retention: dedup::Retention,
}

fn build(
    node: &CompiledNode,
    stores: &BTreeMap<String, StoreDecl>,
) -> anyhow::Result<Box<dyn Processor>> {
    let decl = node
        .decl
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("payment_state_machine needs a declaration"))?;
    let role = |r: &str| {
        decl.stores
            .get(r)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("store role `{r}` missing"))
    };
    let dedup = role("dedup")?;
    let retention_hours = stores
        .get(&dedup)
        .and_then(|s| s.retention_hours)
        .unwrap_or(168);
    Ok(Box::new(PaymentStateMachine {
        id: node.id.clone(),
        policy: parse_params(&decl.params)?,
        state: role("state")?,
        dedup,
        retention: dedup::Retention::new(
            i64::try_from(retention_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX),
        ),
    }))
}

impl PaymentStateMachine {
    fn apply(
        &self,
        ctx: &mut Context<'_>,
        state: Option<PaymentState>,
        cmd: &Command,
    ) -> Result<(), ProcessError> {
        let kind = cmd.body.kind();
        let span = tracing::info_span!(
            "payment.process",
            otel.name = %format_args!("process {kind}"),
            otel.kind = "consumer",
            payment_id = %cmd.payment_id,
            command = kind,
            command_id = %cmd.command_id,
            transition = tracing::field::Empty,
            decision = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let traceparent = trace_step(&span, state.as_ref(), cmd, ctx.incoming_trace());
        ctx.set_outgoing_trace(traceparent.clone());
        let _entered = span.enter();
        let before = state.as_ref().map(|s| s.status);
        match decide(state.as_ref(), cmd, &self.policy) {
            Decision::Apply { events, effects } => {
                span.record("decision", "apply");
                let mut s = state;
                for e in &events {
                    s = evolve(s, e);
                    METRICS.events.with_label_values(&[e.body.kind()]).inc();
                    if let (Some(status), Some(st)) = (e.body.new_status(), s.as_ref()) {
                        if status.is_terminal() {
                            METRICS.terminal.with_label_values(&[status.as_str()]).inc();
                            let secs = (e.occurred_at_ms - st.created_at_ms).max(0) as f64 / 1000.0;
                            METRICS.processing_seconds.observe(secs);
                        }
                    }
                    if let EventBody::RetryScheduled { .. } = e.body {
                        METRICS.retries.with_label_values(&["charge"]).inc();
                    }
                    if let EventBody::MarkedStuck { reason } = &e.body {
                        METRICS.stuck.inc();
                        tracing::error!(payment_id = %e.payment_id, %reason, "payment marked stuck");
                    }
                    tracing::debug!(payment_id = %e.payment_id, seq = e.seq, event = e.body.kind(), "event");
                }
                let Some(s) = s else { return Ok(()) };
                if before != Some(s.status) {
                    let from = before.map_or("none", |b| b.as_str());
                    span.record("transition", format_args!("{from}->{}", s.status.as_str()));
                }
                ctx.put(&self.state, &s.payment_id.key_bytes(), &s);
                for e in events {
                    ctx.forward(Record::Event(e));
                }
                for effect in effects {
                    match effect {
                        Effect::Call { op, attempt, key } => {
                            ctx.forward(Record::ProviderCall(ProviderCall {
                                payment_id: s.payment_id,
                                op,
                                attempt,
                                request_key: key,
                                idempotency_key: payments::provider_idempotency_key(&s.payment_id),
                                amount: s.amount.minor_units(),
                                currency: s.currency.to_string(),
                                traceparent: traceparent.clone(),
                            }))
                        }
                        Effect::Schedule { delay_ms, kind } => {
                            let mut id = s.payment_id.key_bytes().to_vec();
                            id.extend(stores::encode(&kind));
                            // The wait starts now, on the clock that fires it, even
                            // when the command was issued long before (a backlog).
                            ctx.schedule(TimerRequest {
                                due_at_ms: ctx.now_ms().saturating_add(delay_ms),
                                id,
                                payload: stores::encode(&(s.payment_id, kind)),
                            });
                        }
                    }
                }
            }
            Decision::Ignore(why) => {
                span.record("decision", "ignore");
                METRICS.ignored.with_label_values(&[why.label()]).inc();
                tracing::debug!(reason = why.label(), "command ignored");
            }
            Decision::Reject(r) => {
                span.record("decision", "reject");
                METRICS.rejected.with_label_values(&[r.code]).inc();
                tracing::warn!(payment_id = %cmd.payment_id, command = kind, command_id = %cmd.command_id, code = r.code, message = %r.message, "command rejected");
            }
        }
        Ok(())
    }
}

/// Places the processing span in the payment's trace: the trace context kept in its
/// state (from the request that created it) is the parent, so retries, timers, webhooks
/// and cancels join the same trace. An input from that trace (a provider reply) is the
/// closer parent; an input from another trace (a webhook or cancel request) is linked.
fn trace_step(
    span: &tracing::Span,
    state: Option<&PaymentState>,
    cmd: &Command,
    incoming: Option<&str>,
) -> Option<String> {
    let payment_trace = match (&cmd.body, state) {
        (_, Some(s)) => s.traceparent.as_deref(),
        (CommandBody::Create(c), None) => c.traceparent.as_deref(),
        _ => None,
    };
    let same_trace = |a: &str, b: &str| {
        telemetry::trace_id(a).is_some() && telemetry::trace_id(a) == telemetry::trace_id(b)
    };
    match (payment_trace, incoming) {
        (Some(p), Some(i)) if same_trace(p, i) => telemetry::adopt(span, Some(i), &[]),
        (Some(p), Some(i)) => telemetry::adopt(span, Some(p), &[i]),
        (Some(p), None) => telemetry::adopt(span, Some(p), &[]),
        (None, i) => telemetry::adopt(span, i, &[]),
    }
}

impl Processor for PaymentStateMachine {
    fn process(&mut self, ctx: &mut Context<'_>, record: Record) -> Result<(), ProcessError> {
        let Record::Command(cmd) = record else {
            return Err(ProcessError::UnexpectedRecord {
                processor: self.id.clone(),
                kind: record.kind().as_str(),
            });
        };
        let kind = cmd.body.kind();
        METRICS.commands.with_label_values(&[kind]).inc();
        // A create needs no dedup record: the payment it creates records it, for longer
        // than any dedup retention, and `decide` answers another create of that payment
        // as a duplicate (same request) or a conflicting reuse of its key.
        if !matches!(cmd.body, CommandBody::Create(_)) {
            if ctx.seen(&self.dedup, cmd.command_id.as_str(), self.retention)? {
                METRICS.duplicates.with_label_values(&[kind]).inc();
                tracing::debug!(command_id = %cmd.command_id, "duplicate command dropped");
                return Ok(());
            }
            ctx.remember(&self.dedup, cmd.command_id.as_str(), self.retention);
        }
        let state: Option<PaymentState> = ctx.get(&self.state, &cmd.payment_id.key_bytes())?;
        self.apply(ctx, state, &cmd)
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
        let state: Option<PaymentState> = ctx.get(&self.state, &payment_id.key_bytes())?;
        self.apply(ctx, state, &cmd)
    }

    /// Runs every minute: removes dedup records of the segments past retention, up to
    /// [`PRUNE_PER_PASS`] of them, which is more than a partition records in a minute at
    /// the rates it sustains (a payment's commands after its create: usually one, the
    /// provider's reply), so a segment is gone within minutes of expiring and the store
    /// does not outgrow one and a half retentions.
    fn maintain(&mut self, ctx: &mut Context<'_>) -> Result<(), ProcessError> {
        let pruned = ctx.prune(&self.dedup, self.retention, PRUNE_PER_PASS)?;
        if pruned > 0 {
            tracing::debug!(pruned, "dedup records past retention removed");
        }
        Ok(())
    }
}
