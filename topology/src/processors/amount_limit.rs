//! `amount_limit`: screens creates against a per-currency (or global) maximum.
//!
//! A create over the limit is not dropped — the API already accepted it — but marked as
//! refused, so the payment is created and fails visibly with `amount_limit_exceeded`.

use crate::config::{CompiledNode, StoreDecl};
use crate::processor::{Context, ProcessError, Processor, Record, RecordKind};
use crate::registry::{no_wiring_rules, parse_params, NodeSpec};
use payments::{CommandBody, Screening};
use std::collections::BTreeMap;

pub const SPEC: NodeSpec = NodeSpec {
    accepts: &[RecordKind::Command],
    emits: &[RecordKind::Command],
    store_roles: &[],
    check_params,
    check_wiring: no_wiring_rules,
    build: Some(build),
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

fn check_params(v: &toml::Value) -> Vec<String> {
    match parse_params::<Params>(v) {
        Err(e) => vec![e.to_string()],
        Ok(p) => {
            let mut problems = Vec::new();
            if p.max_minor_units <= 0 {
                problems.push("max_minor_units must be > 0".to_owned());
            }
            for (c, v) in &p.per_currency {
                if payments::Currency::parse(c).is_err() {
                    problems.push(format!("per_currency: `{c}` is not an ISO 4217 code"));
                }
                if *v <= 0 {
                    problems.push(format!("per_currency.{c} must be > 0"));
                }
            }
            problems
        }
    }
}

struct AmountLimit {
    id: String,
    params: Params,
}

fn build(
    node: &CompiledNode,
    _: &BTreeMap<String, StoreDecl>,
) -> anyhow::Result<Box<dyn Processor>> {
    let decl = node
        .decl
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("amount_limit needs params"))?;
    Ok(Box::new(AmountLimit {
        id: node.id.clone(),
        params: parse_params(&decl.params)?,
    }))
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
