//! The compiler's passes, each returning every problem it finds (each naming its
//! component), so one run reports them all:
//!
//! 1. [`check_application`]: the application id and that there are sources;
//! 2. [`check_stores`]: each declared store's kind and retentions;
//! 3. [`declare_nodes`]: every component with its type, its store roles bound to
//!    declared stores, and its type's `configure` (params parsed once, wiring rules);
//! 4. [`connect`]: the edges, each input offering what its component accepts;
//! 5. [`check_outputs`]: every record kind a component emits has somewhere to go;
//! 6. [`order`]: a topological order, or the cycle that prevents one.

use super::{
    CompiledNode, CompiledTopology, ComponentDecl, ConfigError, ConfigErrors, NodeRuntimeSpec,
    Role, StoreKind, TopologyFile, DEFAULT_STATE_RETENTION,
};
use crate::processor::{BuildContext, RecordKind, StoreBinding};
use crate::registry;
use std::collections::{BTreeMap, BTreeSet};

/// A component during compilation: its runtime is `None` when its type could not
/// configure it (its problems are reported), so the later passes still see its shape.
#[derive(Clone)]
struct Draft {
    id: String,
    role: Role,
    kind: String,
    accepts: &'static [RecordKind],
    emits: &'static [RecordKind],
    inputs: Vec<String>,
    stores: BTreeMap<String, String>,
    params: toml::Value,
    topic: Option<String>,
    runtime: Option<NodeRuntimeSpec>,
    downstream: Vec<usize>,
}

fn problem(component: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        component: component.into(),
        message: message.into(),
    }
}

pub fn compile(file: TopologyFile) -> Result<CompiledTopology, ConfigErrors> {
    let mut errors = check_application(&file);
    errors.extend(check_stores(&file));
    let (mut nodes, declared) = declare_nodes(&file);
    errors.extend(declared);
    errors.extend(connect(&mut nodes));
    errors.extend(check_outputs(&nodes));
    let order = match order(&nodes) {
        Ok(order) => order,
        Err(cycle) => {
            errors.push(cycle);
            Vec::new()
        }
    };
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    // Renumber in topological order.
    let mut pos = vec![0; nodes.len()];
    for (new, &old) in order.iter().enumerate() {
        pos[old] = new;
    }
    let mut sorted = Vec::with_capacity(nodes.len());
    for &i in &order {
        let d = nodes[i].clone();
        let Some(runtime) = d.runtime else {
            let label = format!("{} `{}`", d.role.as_str(), d.id);
            return Err(ConfigErrors(vec![problem(
                label,
                "could not be configured",
            )]));
        };
        sorted.push(CompiledNode {
            id: d.id,
            role: d.role,
            kind: d.kind,
            accepts: d.accepts,
            emits: d.emits,
            inputs: d.inputs,
            stores: d.stores,
            params: d.params,
            topic: d.topic,
            runtime,
            downstream: d.downstream.iter().map(|&x| pos[x]).collect(),
        });
    }
    Ok(CompiledTopology {
        application_id: file.application_id,
        processing_guarantee: file.processing_guarantee,
        stores: file.stores,
        nodes: sorted,
    })
}

fn check_application(file: &TopologyFile) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if file.application_id.is_empty()
        || !file
            .application_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        errors.push(problem(
            "application_id",
            "must be non-empty and use only letters, digits, '-', '_' and '.'",
        ));
    }
    if file.sources.is_empty() {
        errors.push(problem("sources", "at least one source is required"));
    }
    errors
}

fn check_stores(file: &TopologyFile) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for (name, s) in &file.stores {
        let mut err = |m: &str| errors.push(problem(format!("store `{name}`"), m));
        if name.starts_with("__") {
            err("names starting with `__` are reserved");
        }
        match (s.kind, s.retention_hours, s.retention) {
            (StoreKind::Dedup, None, None) => {
                err("a dedup store needs `retention_hours` (or `retention` with a unit)")
            }
            (StoreKind::Dedup, Some(_), Some(_)) => {
                err("give `retention_hours` or `retention`, not both")
            }
            (StoreKind::Dedup, Some(0), _) => err("`retention_hours` must be at least 1"),
            (StoreKind::KeyValue, Some(_), _) | (StoreKind::KeyValue, _, Some(_)) => err(
                "`retention_hours` and `retention` are for dedup stores; a key_value store has `state_retention`",
            ),
            _ => {}
        }
        if s.kind == StoreKind::Dedup && s.state_retention.is_some() {
            err("`state_retention` is for key_value stores; a dedup store has `retention_hours`");
        }
    }
    errors
}

/// A component's type as its role's table registers it.
enum Spec {
    Processor(crate::processor::NodeSpec),
    Sink(registry::SinkSpec),
}

/// Every component as a node (edges not yet drawn); ids are unique across sections.
fn declare_nodes(file: &TopologyFile) -> (Vec<Draft>, Vec<ConfigError>) {
    let mut errors = Vec::new();
    let mut nodes: Vec<Draft> = Vec::new();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for (id, s) in &file.sources {
        seen.insert(id);
        if s.topic.is_empty() {
            errors.push(problem(format!("source `{id}`"), "topic must not be empty"));
        }
        nodes.push(Draft {
            id: id.clone(),
            role: Role::Source,
            kind: "kafka".into(),
            accepts: &[],
            emits: &[RecordKind::Raw],
            inputs: vec![],
            stores: BTreeMap::new(),
            params: toml::Value::Table(Default::default()),
            topic: Some(s.topic.clone()),
            runtime: Some(NodeRuntimeSpec::Source),
            downstream: vec![],
        });
    }
    let sources: Vec<_> = file
        .sources
        .iter()
        .map(|(id, s)| (id.clone(), s.retention()))
        .collect();
    for (role, map) in [
        (Role::Processor, &file.processors),
        (Role::Sink, &file.sinks),
    ] {
        for (id, decl) in map {
            let label = format!("{} `{id}`", role.as_str());
            if !seen.insert(id) {
                errors.push(problem(&label, "id is used by another component"));
                continue;
            }
            let mut err = |m: String| errors.push(problem(&label, m));
            // The type, looked up once in its role's table.
            let spec = match role {
                Role::Processor => registry::processor(&decl.kind).map(Spec::Processor),
                _ => registry::sink(&decl.kind).map(Spec::Sink),
            };
            let Some(spec) = spec else {
                let known = match role {
                    Role::Processor => registry::processor_names(),
                    _ => registry::sink_names(),
                };
                err(format!(
                    "unknown type `{}`; known types: {}",
                    decl.kind,
                    known.join(", ")
                ));
                continue;
            };
            let store_roles = match &spec {
                Spec::Processor(p) => p.store_roles,
                Spec::Sink(_) => &[],
            };
            let ctx = BuildContext {
                id,
                params: &decl.params,
                stores: bind_stores(file, decl, store_roles, &mut err),
                sources: sources.clone(),
            };
            let mut draft = Draft {
                id: id.clone(),
                role,
                kind: decl.kind.clone(),
                accepts: &[],
                emits: &[],
                inputs: decl.inputs.clone(),
                stores: decl.stores.clone(),
                params: decl.params.clone(),
                topic: None,
                runtime: None,
                downstream: vec![],
            };
            let configured = match spec {
                Spec::Processor(spec) => {
                    (draft.accepts, draft.emits) = (spec.accepts, spec.emits);
                    (spec.configure)(&ctx).map(NodeRuntimeSpec::Processor)
                }
                Spec::Sink(spec) => {
                    draft.accepts = spec.accepts;
                    (spec.configure)(&ctx).map(|c| {
                        (draft.accepts, draft.topic) = (c.accepts, c.runtime.topic());
                        NodeRuntimeSpec::Sink(c.runtime)
                    })
                }
            };
            match configured {
                Ok(runtime) => draft.runtime = Some(runtime),
                Err(problems) => problems.into_iter().for_each(&mut err),
            }
            nodes.push(draft);
        }
    }
    (nodes, errors)
}

/// The declared stores bound to a component's store roles; every role without one, and
/// every role its type does not have, is reported.
fn bind_stores(
    file: &TopologyFile,
    decl: &ComponentDecl,
    roles: &[&str],
    err: &mut impl FnMut(String),
) -> BTreeMap<String, StoreBinding> {
    let mut bound = BTreeMap::new();
    for role in roles {
        let Some(name) = decl.stores.get(*role) else {
            err(format!(
                "needs store role `{role}` (stores = {{ {role} = \"<store>\" }})"
            ));
            continue;
        };
        let Some(s) = file.stores.get(name) else {
            err(format!(
                "store `{name}` (role `{role}`) is not declared under [stores]"
            ));
            continue;
        };
        if *role == "dedup" && s.kind != StoreKind::Dedup {
            err(format!(
                "store `{name}` for role `dedup` must have type = \"dedup\""
            ));
        }
        bound.insert(
            (*role).to_owned(),
            StoreBinding {
                name: name.clone(),
                kind: s.kind,
                retention: s.dedup_retention(),
                state_retention: s.state_retention.unwrap_or(DEFAULT_STATE_RETENTION),
            },
        );
    }
    for extra in decl.stores.keys().filter(|r| !roles.contains(&r.as_str())) {
        err(format!(
            "unknown store role `{extra}`; this type uses: {}",
            roles.join(", ")
        ));
    }
    bound
}

/// Draws the edges from the declared inputs.
fn connect(nodes: &mut [Draft]) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let index: BTreeMap<String, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.clone(), i))
        .collect();
    let mut upstream: Vec<Vec<usize>> = vec![vec![]; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        if n.role == Role::Source {
            continue;
        }
        let label = format!("{} `{}`", n.role.as_str(), n.id);
        if n.inputs.is_empty() {
            errors.push(problem(&label, "needs at least one input"));
        }
        for input in &n.inputs {
            match index.get(input) {
                None => errors.push(problem(
                    &label,
                    format!("input `{input}` doesn't match any component"),
                )),
                Some(&j) if nodes[j].role == Role::Sink => errors.push(problem(
                    &label,
                    format!("input `{input}` is a sink; sinks have no outputs"),
                )),
                Some(&j) => {
                    upstream[i].push(j);
                    let offered: BTreeSet<RecordKind> = nodes[j].emits.iter().copied().collect();
                    if !n.accepts.iter().any(|k| offered.contains(k)) {
                        errors.push(problem(
                            &label,
                            format!(
                                "input `{input}` emits {} but this component accepts {}",
                                kinds(nodes[j].emits),
                                kinds(n.accepts)
                            ),
                        ));
                    }
                }
            }
        }
    }
    for (i, ups) in upstream.iter().enumerate() {
        for &j in ups {
            nodes[j].downstream.push(i);
        }
    }
    errors
}

/// Every record a component emits must be accepted by some downstream component.
fn check_outputs(nodes: &[Draft]) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for n in nodes.iter().filter(|n| n.role != Role::Sink) {
        for kind in n.emits {
            if !n
                .downstream
                .iter()
                .any(|&d| nodes[d].accepts.contains(kind))
            {
                errors.push(problem(
                    format!("{} `{}`", n.role.as_str(), n.id),
                    format!("its {} records have nowhere to go: add a component with this input that accepts them", kind.as_str()),
                ));
            }
        }
    }
    errors
}

/// A topological order, or the first cycle found (depth first, reported as its path).
fn order(nodes: &[Draft]) -> Result<Vec<usize>, ConfigError> {
    topo_order(nodes).map_err(|cycle| {
        let path: Vec<_> = cycle.iter().map(|&i| nodes[i].id.as_str()).collect();
        problem(
            format!("{} `{}`", nodes[cycle[0]].role.as_str(), nodes[cycle[0]].id),
            format!("cycle {}", path.join(" → ")),
        )
    })
}

fn kinds(k: &[RecordKind]) -> String {
    if k.is_empty() {
        return "nothing".into();
    }
    k.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
}

/// Topological order, or the nodes of one cycle (first node repeated at the end).
fn topo_order(nodes: &[Draft]) -> Result<Vec<usize>, Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        i: usize,
        nodes: &[Draft],
        mark: &mut [Mark],
        stack: &mut Vec<usize>,
        out: &mut Vec<usize>,
    ) -> Result<(), Vec<usize>> {
        match mark[i] {
            Mark::Done => return Ok(()),
            Mark::Active => {
                let start = stack.iter().position(|&s| s == i).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(i);
                return Err(cycle);
            }
            Mark::New => {}
        }
        mark[i] = Mark::Active;
        stack.push(i);
        for &d in &nodes[i].downstream {
            visit(d, nodes, mark, stack, out)?;
        }
        stack.pop();
        mark[i] = Mark::Done;
        out.push(i);
        Ok(())
    }
    let mut mark = vec![Mark::New; nodes.len()];
    let mut out = Vec::new();
    for i in 0..nodes.len() {
        visit(i, nodes, &mut mark, &mut Vec::new(), &mut out)?;
    }
    out.reverse();
    Ok(out)
}
