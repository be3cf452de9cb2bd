//! `payment_state_machine`: applies commands to payments through [`payments::decide`].
//!
//! Owns two stores: `state` (payment id → [`StoredPayment`]: the state, its pending
//! timers, its expiry) and `dedup` (ids of the commands applied to existing payments; a
//! create is recorded by its payment). The state change, the dedup record, the timers
//! it sets or cancels and the records it emits are staged in one write set, committed
//! with the input offset.
//!
//! Bounded by configuration, not history: a timer is cancelled once the wait it guards
//! is over, and a finished payment leaves the store `state_retention` after it became
//! terminal, by a timer step whose delete reaches the changelog as a tombstone. A
//! create older than that retention is dead-lettered (`expired`), so a redelivered or
//! replayed create can never meet the empty place of its expired payment and charge
//! again; any other command for a payment no longer held is rejected as
//! `unknown_payment` (metric and log) and changes nothing.

pub(crate) mod stored;

use crate::metrics::METRICS;
use crate::processor::{
    BuildContext, Configured, Context, NodeSpec, ProcessError, Processor, ProviderCall, Record,
    RecordKind, Span, TimerRequest,
};
use payments::machine::{timer_is_live, PaymentState};
use payments::{
    decide, evolve, Command, CommandBody, CommandId, Decision, Effect, EventBody, PaymentId,
    Policy, TimerKind,
};
use stored::timer_id;
pub use stored::StoredPayment;
use stores::dedup;

/// Dedup records removed per housekeeping pass (per partition, once a minute).
const PRUNE_PER_PASS: usize = 50_000;
/// Payments in the previous encoding rewritten per housekeeping pass.
const UPGRADE_PER_PASS: usize = 1_000;
/// First byte of an expiry timer's payload and id suffix. A machine timer's payload is
/// the bincode of `(PaymentId, TimerKind)`, which starts with a length byte, and its id
/// ends with the bincode of the kind (a variant index below 3).
const EXPIRY: u8 = 0xFF;

pub const SPEC: NodeSpec = NodeSpec {
    accepts: &[RecordKind::Command],
    emits: &[
        RecordKind::Event,
        RecordKind::ProviderCall,
        RecordKind::DeadLetter,
    ],
    store_roles: &["state", "dedup"],
    configure,
};

/// The policy, the stores and their retentions. A finished payment must outlive
/// everything that can still arrive for it: every record of the source topics (a create
/// redelivered from them), and the provider's latest webhook.
fn configure(ctx: &BuildContext<'_>) -> Result<Configured, Vec<String>> {
    let policy: Policy = ctx.params()?;
    let mut problems: Vec<String> = policy
        .problems()
        .into_iter()
        .map(|p| format!("invalid params: {p}"))
        .collect();
    let (state, dedup) = (ctx.store("state")?, ctx.store("dedup")?);
    let retention = state.state_retention;
    for (id, source_retention) in &ctx.sources {
        if retention <= *source_retention {
            problems.push(format!(
                "store `{}` keeps a finished payment for {retention} (state_retention), not longer than \
                 source `{id}` keeps its records ({source_retention}, retention): a create redelivered from it could arrive after \
                 its payment left the store. Raise state_retention or lower the topic's retention",
                state.name
            ));
        }
    }
    if retention.as_ms() <= policy.webhook_max_delay_ms {
        problems.push(format!(
            "store `{}` keeps a finished payment for {retention} (state_retention), not longer than the \
             provider may deliver a webhook ({}, webhook_max_delay_ms): a late webhook would no longer meet its \
             payment. Raise state_retention",
            state.name,
            Span::from_ms(policy.webhook_max_delay_ms)
        ));
    }
    let Some(dedup_retention) = dedup.retention else {
        // A dedup store without a retention is reported by the compiler.
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let (id, state_store, dedup_store) =
        (ctx.id.to_owned(), state.name.clone(), dedup.name.clone());
    let retention = dedup::Retention::new(dedup_retention.as_ms());
    let state_retention_ms = state.state_retention.as_ms();
    Ok(Configured::new(move || -> Box<dyn Processor> {
        Box::new(PaymentStateMachine {
            id: id.clone(),
            policy: policy.clone(),
            state: state_store.clone(),
            dedup: dedup_store.clone(),
            retention,
            state_retention_ms,
            upgrade_from: Some(Vec::new()),
        })
    }))
}

pub struct PaymentStateMachine {
    id: String,
    policy: Policy,
    state: String,
    dedup: String,
    retention: dedup::Retention,
    /// How long a finished payment stays in `state`.
    state_retention_ms: i64,
    /// Where the next pass over payments in the previous encoding starts; `None` once a
    /// pass found none.
    upgrade_from: Option<Vec<u8>>,
}

fn expiry_id(payment_id: &PaymentId) -> Vec<u8> {
    let mut id = payment_id.key_bytes().to_vec();
    id.push(EXPIRY);
    id
}

impl PaymentStateMachine {
    fn load(
        &self,
        ctx: &Context<'_>,
        payment_id: &PaymentId,
    ) -> Result<Option<StoredPayment>, ProcessError> {
        stored::load(ctx, &self.state, payment_id)
    }

    fn save(&self, ctx: &mut Context<'_>, p: &StoredPayment) {
        stored::save(ctx, &self.state, p);
    }

    /// Cancels the timers whose wait is over, and once the payment is terminal sets the
    /// timer that removes it after the retention.
    fn settle_timers(&self, ctx: &mut Context<'_>, p: &mut StoredPayment) {
        let pid = p.state.payment_id;
        let state = &p.state;
        let (live, over): (Vec<_>, Vec<_>) = p
            .timers
            .iter()
            .partition(|(_, kind)| timer_is_live(state, *kind));
        for (due, kind) in over {
            METRICS
                .timers_cancelled
                .with_label_values(&[kind.label()])
                .inc();
            ctx.cancel(due, timer_id(&pid, kind));
        }
        p.timers = live;
        if p.state.status.is_terminal() && p.expires_at_ms.is_none() {
            let at = ctx.now_ms().saturating_add(self.state_retention_ms);
            p.expires_at_ms = Some(at);
            let mut payload = vec![EXPIRY];
            payload.extend(stores::encode(&pid));
            ctx.schedule(TimerRequest {
                due_at_ms: at,
                id: expiry_id(&pid),
                payload,
            });
        }
    }

    /// Removes a finished payment whose retention is over, with any timer it still has.
    fn expire(&self, ctx: &mut Context<'_>, payment_id: PaymentId) -> Result<(), ProcessError> {
        let Some(p) = self.load(ctx, &payment_id)? else {
            return Ok(());
        };
        if !p.state.status.is_terminal() {
            // Only a terminal payment schedules its expiry; a record that is not is left.
            tracing::error!(%payment_id, status = %p.state.status.as_str(), "expiry of a payment that is not finished ignored");
            return Ok(());
        }
        if p.state.refund_in_flight() {
            // A refund waits for its outcome: the payment stays another retention.
            let mut p = p;
            let at = ctx.now_ms().saturating_add(self.state_retention_ms);
            p.expires_at_ms = Some(at);
            let mut payload = vec![EXPIRY];
            payload.extend(stores::encode(&payment_id));
            ctx.schedule(TimerRequest {
                due_at_ms: at,
                id: expiry_id(&payment_id),
                payload,
            });
            self.save(ctx, &p);
            tracing::info!(%payment_id, "expiry postponed: a refund is in flight");
            return Ok(());
        }
        for (due, kind) in &p.timers {
            ctx.cancel(*due, timer_id(&payment_id, *kind));
        }
        ctx.delete(&self.state, &payment_id.key_bytes());
        METRICS.payments_expired.inc();
        tracing::debug!(%payment_id, "finished payment left the store after its retention");
        Ok(())
    }

    /// A create issued before the retention horizon may belong to a payment that has
    /// already left the store: applying it could create and charge it again.
    fn refuse_expired_create(&self, ctx: &mut Context<'_>, cmd: &Command) {
        METRICS.dlq_messages.with_label_values(&["expired"]).inc();
        tracing::warn!(payment_id = %cmd.payment_id, command_id = %cmd.command_id, issued_at_ms = cmd.issued_at_ms, "create older than the state retention refused");
        let detail = format!(
            "create issued at {} ms is older than the state retention ({}): the payment it names may have left \
             the store, so it is not applied; a new request needs a new idempotency key",
            cmd.issued_at_ms,
            Span::from_ms(self.state_retention_ms)
        );
        let dl = ctx.dead_letter(
            "expired",
            detail,
            Some(cmd.payment_id.to_string()),
            serde_json::to_string(cmd).ok(),
        );
        ctx.forward(Record::DeadLetter(dl));
    }

    /// Rewrites the previous encoding's payments from key `from` on; returns where the
    /// next pass starts, or `None` once the store holds none.
    fn upgrade_pass(
        &self,
        ctx: &mut Context<'_>,
        from: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, ProcessError> {
        let entries = ctx.scan_from(&self.state, &from, UPGRADE_PER_PASS)?;
        let mut upgraded = 0;
        for (_, bytes) in &entries {
            if stored::is_current(bytes) {
                continue;
            }
            let mut p = stored::decode(&self.state, bytes)?;
            self.settle_timers(ctx, &mut p);
            self.save(ctx, &p);
            upgraded += 1;
        }
        if upgraded > 0 {
            tracing::info!(upgraded, "payments rewritten in the current encoding");
        }
        Ok(match entries.last() {
            Some((key, _)) if entries.len() == UPGRADE_PER_PASS => {
                let mut next = key.clone();
                next.push(0);
                Some(next)
            }
            _ => None,
        })
    }

    /// Decides `cmd` against the stored payment and stages the outcome. `dirty`: the
    /// stored record changed already (a fired timer left its list) and is saved even if
    /// the command changes nothing.
    fn apply(
        &self,
        ctx: &mut Context<'_>,
        stored: Option<StoredPayment>,
        cmd: &Command,
        dirty: bool,
    ) -> Result<(), ProcessError> {
        let state = stored.as_ref().map(|p| &p.state);
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
        let traceparent = trace_step(&span, state, cmd, ctx.incoming_trace());
        ctx.set_outgoing_trace(traceparent.clone());
        let _entered = span.enter();
        let before = state.map(|s| s.status);
        let decision = decide(state, cmd, &self.policy);
        if !matches!(decision, Decision::Apply { .. }) && dirty {
            if let Some(p) = &stored {
                self.save(ctx, p);
            }
        }
        match decision {
            Decision::Apply { events, effects } => {
                span.record("decision", "apply");
                let mut s = state.cloned();
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
                let mut record = match stored {
                    Some(p) => StoredPayment { state: s, ..p },
                    None => StoredPayment::new(s),
                };
                let s = &record.state;
                for e in events {
                    ctx.forward(Record::Event(e));
                }
                let mut scheduled = Vec::new();
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
                            // The wait starts now, on the clock that fires it, even
                            // when the command was issued long before (a backlog).
                            let due_at_ms = ctx.now_ms().saturating_add(delay_ms);
                            ctx.schedule(TimerRequest {
                                due_at_ms,
                                id: timer_id(&s.payment_id, kind),
                                payload: stores::encode(&(s.payment_id, kind)),
                            });
                            scheduled.push((due_at_ms, kind));
                        }
                    }
                }
                record.timers.extend(scheduled);
                self.settle_timers(ctx, &mut record);
                self.save(ctx, &record);
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
                if let CommandBody::Create(_) = cmd.body {
                    // A create the API answered 202 that will not be carried out (a
                    // conflicting reuse of its key across API instances): on record,
                    // where an operator and the merchant's support can find it.
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

/// Places the processing span in the payment's trace: the trace context kept in its
/// state (from the request that created it) is the parent, so retries, timers, webhooks
/// and cancels join the same trace. An input from that trace (a provider reply) is the
/// closer parent; an input from another trace (a webhook or cancel request) is linked.
pub(crate) fn trace_step(
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
        let horizon = ctx.now_ms().saturating_sub(self.state_retention_ms);
        if matches!(cmd.body, CommandBody::Create(_)) && cmd.issued_at_ms < horizon {
            self.refuse_expired_create(ctx, &cmd);
            return Ok(());
        }
        if !matches!(cmd.body, CommandBody::Create(_)) {
            if ctx.seen(&self.dedup, cmd.command_id.as_str(), self.retention)? {
                METRICS.duplicates.with_label_values(&[kind]).inc();
                tracing::debug!(command_id = %cmd.command_id, "duplicate command dropped");
                return Ok(());
            }
            ctx.remember(&self.dedup, cmd.command_id.as_str(), self.retention);
        }
        let stored = self.load(ctx, &cmd.payment_id)?;
        self.apply(ctx, stored, &cmd, false)
    }

    fn on_timer(&mut self, ctx: &mut Context<'_>, payload: &[u8]) -> Result<(), ProcessError> {
        if let [EXPIRY, rest @ ..] = payload {
            let payment_id: PaymentId = stores::decode("__timers", rest)?;
            METRICS.timers.with_label_values(&["expiry"]).inc();
            return self.expire(ctx, payment_id);
        }
        let (payment_id, kind): (PaymentId, TimerKind) = stores::decode("__timers", payload)?;
        METRICS.timers.with_label_values(&[kind.label()]).inc();
        let now = ctx.now_ms();
        // The fired timer leaves the payment's list of pending ones.
        let mut stored = self.load(ctx, &payment_id)?;
        let dirty = stored.as_mut().is_some_and(|p| {
            let before = p.timers.len();
            p.timers.retain(|(due, k)| !(*k == kind && *due <= now));
            p.timers.len() != before
        });
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
        self.apply(ctx, stored, &cmd, dirty)
    }

    /// Runs every minute: removes dedup records of the segments past retention, up to
    /// [`PRUNE_PER_PASS`] of them, which is more than a partition records in a minute at
    /// the rates it sustains (a payment's commands after its create: usually one, the
    /// provider's reply), so a segment is gone within minutes of expiring and the store
    /// does not outgrow one and a half retentions.
    ///
    /// Until one pass over the store found none, it also rewrites payments kept in the
    /// previous encoding (which tracked no timers and no expiry) in the current one, up
    /// to [`UPGRADE_PER_PASS`] a minute, giving each finished one its expiry: so a store
    /// from before retention existed is bounded too.
    fn maintain(&mut self, ctx: &mut Context<'_>) -> Result<(), ProcessError> {
        let pruned = ctx.prune(&self.dedup, self.retention, PRUNE_PER_PASS)?;
        if pruned > 0 {
            tracing::debug!(pruned, "dedup records past retention removed");
        }
        if let Some(from) = self.upgrade_from.take() {
            self.upgrade_from = self.upgrade_pass(ctx, from)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
