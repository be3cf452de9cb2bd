//! `merchant_notifier`: turns the events that change a payment's or a refund's status
//! into merchant notifications ([`payments::notify`]), each carrying the resource as the
//! API returns it, read from the payments' store (`state`) as the step that emitted the
//! event left it.
//!
//! It only makes the notifications; a `kafka` sink with `records = "notification"`
//! publishes them, and the `notifier` role delivers them to the merchants' endpoints.
//! Its output is deterministic: a replayed event makes the same notification, with the
//! same id, which the delivery side takes once.

use crate::metrics::METRICS;
use crate::processor::{
    BuildContext, Configured, Context, NodeSpec, ProcessError, Processor, Record, RecordKind,
};
use crate::processors::payment_state_machine::stored;

pub const SPEC: NodeSpec = NodeSpec {
    accepts: &[RecordKind::Event],
    emits: &[RecordKind::Notification],
    store_roles: &["state"],
    configure,
};

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

fn configure(ctx: &BuildContext<'_>) -> Result<Configured, Vec<String>> {
    let NoParams {} = ctx.params()?;
    let state = ctx.store("state")?.name.clone();
    let id = ctx.id.to_owned();
    Ok(Configured::new(move || -> Box<dyn Processor> {
        Box::new(MerchantNotifier {
            id: id.clone(),
            state: state.clone(),
        })
    }))
}

struct MerchantNotifier {
    id: String,
    state: String,
}

impl Processor for MerchantNotifier {
    fn process(&mut self, ctx: &mut Context<'_>, record: Record) -> Result<(), ProcessError> {
        let Record::Event(event) = record else {
            return Err(ProcessError::UnexpectedRecord {
                processor: self.id.clone(),
                kind: record.kind().as_str(),
            });
        };
        if payments::notify::kind(&event.body).is_none() {
            return Ok(());
        }
        let Some(payment) = stored::load(ctx, &self.state, &event.payment_id)? else {
            // The payment left the store in this very step: nothing to describe.
            return Ok(());
        };
        if let Some(n) = payments::notify::notification(&event, &payment.state) {
            METRICS.notifications.with_label_values(&[&n.kind]).inc();
            ctx.forward(Record::Notification(n));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processor::testing;

    #[test]
    fn it_needs_its_store_and_takes_no_params() {
        let e = testing::configure(&SPEC, "colour = 1").expect_err("unknown param");
        assert!(e.iter().any(|p| p.contains("colour")), "{e:?}");
    }
}
