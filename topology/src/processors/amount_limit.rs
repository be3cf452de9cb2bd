//! `amount_limit`: screens creates against a per-currency (or global) maximum.
//!
//! A create over the limit is not dropped — the API already accepted it — but marked as
//! refused, so the payment is created and fails visibly with `amount_limit_exceeded`.

use crate::processor::{
    BuildContext, Configured, Context, NodeSpec, ProcessError, Processor, Record, RecordKind,
};
use payments::{CommandBody, Screening};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const SPEC: NodeSpec = NodeSpec {
    accepts: &[RecordKind::Command],
    emits: &[RecordKind::Command],
    store_roles: &[],
    configure,
};

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Maximum in minor units for currencies without their own entry.
    max_minor_units: i64,
    /// Per-currency maxima, e.g. `{ JPY = 50000000 }`.
    #[serde(default)]
    per_currency: BTreeMap<String, i64>,
}

fn configure(ctx: &BuildContext<'_>) -> Result<Configured, Vec<String>> {
    let p: Params = ctx.params()?;
    let mut problems = Vec::new();
    if p.max_minor_units <= 0 {
        problems.push("invalid params: max_minor_units must be > 0".to_owned());
    }
    for (c, v) in &p.per_currency {
        if payments::Currency::parse(c).is_err() {
            problems.push(format!(
                "invalid params: per_currency: `{c}` is not an ISO 4217 code"
            ));
        }
        if *v <= 0 {
            problems.push(format!("invalid params: per_currency.{c} must be > 0"));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let (id, params) = (ctx.id.to_owned(), Arc::new(p));
    Ok(Configured::new(move || -> Box<dyn Processor> {
        Box::new(AmountLimit {
            id: id.clone(),
            params: params.clone(),
        })
    }))
}

struct AmountLimit {
    id: String,
    params: Arc<Params>,
}

impl Processor for AmountLimit {
    fn process(&mut self, ctx: &mut Context<'_>, record: Record) -> Result<(), ProcessError> {
        let Record::Command(mut cmd) = record else {
            return Err(ProcessError::UnexpectedRecord {
                processor: self.id.clone(),
                kind: record.kind().as_str(),
            });
        };
        if let CommandBody::Create(create) = &mut cmd.body {
            let limit = self
                .params
                .per_currency
                .get(create.currency.as_str())
                .copied()
                .unwrap_or(self.params.max_minor_units);
            if create.amount.minor_units() > limit && create.screening.is_none() {
                create.screening = Some(Screening {
                    code: "amount_limit_exceeded".into(),
                    message: format!(
                        "{} {} exceeds the limit of {limit} minor units (processor `{}`)",
                        create.amount.minor_units(),
                        create.currency,
                        self.id
                    ),
                });
            }
        }
        ctx.forward(Record::Command(cmd));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processor::testing;
    use payments::Command;

    fn create(amount: i64, currency: &str) -> Record {
        Record::Command(testing::create_command("k-1", amount, currency, 0))
    }

    fn screening(out: &[Record]) -> Option<String> {
        match out {
            [Record::Command(Command {
                body: CommandBody::Create(c),
                ..
            })] => c.screening.as_ref().map(|s| s.code.clone()),
            other => panic!("expected the create forwarded, got {other:?}"),
        }
    }

    #[test]
    fn a_create_over_its_currency_limit_is_marked_and_still_forwarded() {
        let node = testing::configure(&SPEC, "max_minor_units = 1000\nper_currency = { JPY = 50 }")
            .expect("valid params");
        let mut p = node.0.get();
        assert_eq!(
            screening(&testing::process(p.as_mut(), create(1000, "EUR"))),
            None
        );
        assert_eq!(
            screening(&testing::process(p.as_mut(), create(1001, "EUR"))).as_deref(),
            Some("amount_limit_exceeded")
        );
        assert_eq!(
            screening(&testing::process(p.as_mut(), create(51, "JPY"))).as_deref(),
            Some("amount_limit_exceeded")
        );
    }

    #[test]
    fn every_bad_param_is_named() {
        let problems = match testing::configure(
            &SPEC,
            "max_minor_units = 0\nper_currency = { XXQ = 5, USD = -1 }",
        ) {
            Ok(_) => panic!("configured with bad params"),
            Err(p) => p.join("\n"),
        };
        assert!(
            problems.contains("max_minor_units must be > 0"),
            "{problems}"
        );
        assert!(
            problems.contains("`XXQ` is not an ISO 4217 code"),
            "{problems}"
        );
        assert!(
            problems.contains("per_currency.USD must be > 0"),
            "{problems}"
        );
        assert!(testing::configure(&SPEC, "max_minor_units = 5\nextra = 1").is_err());
    }
}
