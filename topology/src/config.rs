//! `config/topology.toml`: the declared graph, and its compiler.
//!
//! The compiler checks the whole file before anything runs and reports **every** error,
//! each naming its component: unknown types (with the known ones), inputs that match no
//! component, cycles, missing stores, invalid parameters, and records that would have
//! nowhere to go.

use crate::processor::RecordKind;
use crate::registry::{self, NodeSpec};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessingGuarantee {
    AtLeastOnce,
    ExactlyOnce,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyFile {
    pub application_id: String,
    #[serde(default = "default_guarantee")]
    pub processing_guarantee: ProcessingGuarantee,
    #[serde(default)]
    pub stores: BTreeMap<String, StoreDecl>,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceDecl>,
    #[serde(default)]
    pub processors: BTreeMap<String, ComponentDecl>,
    #[serde(default)]
    pub sinks: BTreeMap<String, ComponentDecl>,
}

fn default_guarantee() -> ProcessingGuarantee {
    ProcessingGuarantee::AtLeastOnce
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreDecl {
    #[serde(rename = "type")]
    pub kind: StoreKind,
    /// Dedup stores: how long an id is at least remembered (at most one and a half
    /// times that: records go by time segments of half the retention).
    #[serde(default)]
    pub retention_hours: Option<u64>,
    /// Dedup stores: the same as `retention_hours`, with a unit (`"30m"`, `"7d"`).
    #[serde(default)]
    pub retention: Option<Span>,
    /// Key-value stores that hold payments: how long a finished payment stays after it
    /// became terminal (default [`DEFAULT_STATE_RETENTION`]). Then a step of its
    /// partition deletes it, which reaches the changelog as a tombstone.
    #[serde(default)]
    pub state_retention: Option<Span>,
}

impl StoreDecl {
    /// A dedup store's retention, however it is written.
    pub fn dedup_retention(&self) -> Option<Span> {
        self.retention.or_else(|| {
            self.retention_hours
                .and_then(|h| i64::try_from(h).ok())
                .and_then(|h| h.checked_mul(3_600_000))
                .map(Span::from_ms)
        })
    }
}

/// The shipped retention of finished payments: longer than Kafka's default topic
/// retention (7 days) for the commands, and than a provider's webhook retries (3 days).
pub const DEFAULT_STATE_RETENTION: Span = Span::days(8);
/// The retention a source topic is assumed to have when it does not say (Kafka's
/// `log.retention.hours` default).
pub const DEFAULT_SOURCE_RETENTION: Span = Span::days(7);

/// A length of time written as a whole number and a unit: `90s`, `15m`, `36h`, `8d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Span {
    ms: i64,
}

impl Span {
    pub const fn days(d: i64) -> Span {
        Span {
            ms: d * 24 * 3_600_000,
        }
    }

    pub const fn from_ms(ms: i64) -> Span {
        Span { ms }
    }

    pub fn as_ms(self) -> i64 {
        self.ms
    }
}

impl TryFrom<String> for Span {
    type Error = String;

    fn try_from(text: String) -> Result<Span, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (n, unit) = t.split_at(split);
        let unit_ms: i64 = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "`{text}` is not a duration: write a whole number and one of s, m, h, d (e.g. \"8d\")"
                ))
            }
        };
        let n: i64 = n.parse().map_err(|_| {
            format!("`{text}` is not a duration: the number is missing or too large")
        })?;
        match n.checked_mul(unit_ms) {
            Some(ms) if ms > 0 => Ok(Span { ms }),
            Some(_) => Err(format!("`{text}`: a duration must be longer than zero")),
            None => Err(format!("`{text}` is too long a duration")),
        }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, ms) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)] {
            if self.ms % ms == 0 {
                return write!(f, "{}{unit}", self.ms / ms);
            }
        }
        write!(f, "{}s", self.ms / 1000)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    KeyValue,
    Dedup,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceDecl {
    pub topic: String,
    /// How long the topic keeps records (its `retention.ms`; default
    /// [`DEFAULT_SOURCE_RETENTION`]): what may still be redelivered or replayed.
    #[serde(default)]
    pub retention: Option<Span>,
}

impl SourceDecl {
    pub fn retention(&self) -> Span {
        self.retention.unwrap_or(DEFAULT_SOURCE_RETENTION)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentDecl {
    #[serde(rename = "type")]
    pub kind: String,
    pub inputs: Vec<String>,
    /// Store roles the type needs, mapped to declared store names.
    #[serde(default)]
    pub stores: BTreeMap<String, String>,
    #[serde(default = "empty_table")]
    pub params: toml::Value,
}

fn empty_table() -> toml::Value {
    toml::Value::Table(Default::default())
}

/// One problem found while compiling, naming the component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub component: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.component, self.message)
    }
}

/// All errors of one compilation.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "topology is invalid ({} errors):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Processor,
    Sink,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Processor => "processor",
            Role::Sink => "sink",
        }
    }
}

/// A node after compilation, in topological order.
#[derive(Debug, Clone)]
pub struct CompiledNode {
    pub id: String,
    pub role: Role,
    pub kind: String,
    pub spec: NodeSpec,
    pub decl: Option<ComponentDecl>,
    pub topic: Option<String>,
    /// Indices of downstream nodes.
    pub downstream: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct CompiledTopology {
    pub application_id: String,
    pub processing_guarantee: ProcessingGuarantee,
    pub stores: BTreeMap<String, StoreDecl>,
    pub nodes: Vec<CompiledNode>,
}

impl CompiledTopology {
    /// The compacted topic that holds the changelog of the stores of `source`'s tasks
    /// (partition `p` of the source ↔ partition `p` of the changelog).
    pub fn changelog_topic(&self, source: &str) -> String {
        format!("{}-{source}-changelog", self.application_id)
    }

    pub fn source_topics(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter_map(|n| n.topic.clone().filter(|_| n.role == Role::Source))
            .collect()
    }

    pub fn sink_topics(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter_map(|n| n.topic.clone().filter(|_| n.role == Role::Sink))
            .collect()
    }

    /// The graph as text, one component a line: `GET /topology` and `gateway topology`.
    pub fn describe(&self) -> serde_json::Value {
        let nodes: Vec<_> = self
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "id": n.id,
                    "role": n.role.as_str(),
                    "type": n.kind,
                    "topic": n.topic,
                    "inputs": n.decl.as_ref().map(|d| d.inputs.clone()).unwrap_or_default(),
                    "stores": n.decl.as_ref().map(|d| d.stores.clone()).unwrap_or_default(),
                    "downstream": n.downstream.iter().map(|i| self.nodes[*i].id.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "application_id": self.application_id,
            "processing_guarantee": format!("{:?}", self.processing_guarantee),
            "stores": self.stores.keys().collect::<Vec<_>>(),
            "nodes": nodes,
        })
    }
}

/// Parses and compiles a topology file's text.
pub fn compile_str(text: &str) -> Result<CompiledTopology, ConfigErrors> {
    let file: TopologyFile = toml::from_str(text).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            component: "topology.toml".into(),
            message: e.to_string(),
        }])
    })?;
    compile(file)
}

pub fn compile(file: TopologyFile) -> Result<CompiledTopology, ConfigErrors> {
    let mut errors = Vec::new();
    let mut err = |component: &str, message: String| {
        errors.push(ConfigError {
            component: component.to_owned(),
            message,
        })
    };

    if file.application_id.is_empty()
        || !file
            .application_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        err(
            "application_id",
            "must be non-empty and use only letters, digits, '-', '_' and '.'".into(),
        );
    }
    if file.sources.is_empty() {
        err("sources", "at least one source is required".into());
    }
    for (name, s) in &file.stores {
        if name.starts_with("__") {
            err(
                &format!("store `{name}`"),
                "names starting with `__` are reserved".into(),
            );
        }
        match (s.kind, s.retention_hours, s.retention) {
            (StoreKind::Dedup, None, None) => err(
                &format!("store `{name}`"),
                "a dedup store needs `retention_hours` (or `retention` with a unit)".into(),
            ),
            (StoreKind::Dedup, Some(_), Some(_)) => err(
                &format!("store `{name}`"),
                "give `retention_hours` or `retention`, not both".into(),
            ),
            (StoreKind::Dedup, Some(0), _) => err(
                &format!("store `{name}`"),
                "`retention_hours` must be at least 1".into(),
            ),
            (StoreKind::KeyValue, Some(_), _) | (StoreKind::KeyValue, _, Some(_)) => err(
                &format!("store `{name}`"),
                "`retention_hours` and `retention` are for dedup stores; a key_value store has `state_retention`".into(),
            ),
            _ => {}
        }
        if s.kind == StoreKind::Dedup && s.state_retention.is_some() {
            err(
                &format!("store `{name}`"),
                "`state_retention` is for key_value stores; a dedup store has `retention_hours`"
                    .into(),
            );
        }
    }

    // Collect every component with its role; ids are unique across sections.
    let mut nodes: Vec<CompiledNode> = Vec::new();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for (id, s) in &file.sources {
        seen.insert(id);
        if s.topic.is_empty() {
            err(&format!("source `{id}`"), "topic must not be empty".into());
        }
        nodes.push(CompiledNode {
            id: id.clone(),
            role: Role::Source,
            kind: "kafka".into(),
            spec: registry::source_spec(),
            decl: None,
            topic: Some(s.topic.clone()),
            downstream: vec![],
        });
    }
    for (role, map) in [
        (Role::Processor, &file.processors),
        (Role::Sink, &file.sinks),
    ] {
        for (id, decl) in map {
            let label = format!("{} `{id}`", role.as_str());
            if !seen.insert(id) {
                err(&label, "id is used by another component".into());
                continue;
            }
            let spec = match role {
                Role::Processor => registry::processor_spec(&decl.kind),
                _ => registry::sink_spec(&decl.kind),
            }
            .map(|s| registry::specialise(&decl.kind, &decl.params, s));
            let Some(spec) = spec else {
                let known = match role {
                    Role::Processor => registry::PROCESSOR_TYPES,
                    _ => registry::SINK_TYPES,
                };
                err(
                    &label,
                    format!(
                        "unknown type `{}`; known types: {}",
                        decl.kind,
                        known.join(", ")
                    ),
                );
                continue;
            };
            for problem in (spec.check_params)(&decl.params) {
                err(&label, format!("invalid params: {problem}"));
            }
            for problem in (spec.check_wiring)(decl, &file) {
                err(&label, problem);
            }
            for role_name in spec.store_roles {
                match decl.stores.get(*role_name) {
                    None => err(&label, format!("needs store role `{role_name}` (stores = {{ {role_name} = \"<store>\" }})")),
                    Some(store) => match file.stores.get(store) {
                        None => err(&label, format!("store `{store}` (role `{role_name}`) is not declared under [stores]")),
                        Some(s) if *role_name == "dedup" && s.kind != StoreKind::Dedup => {
                            err(&label, format!("store `{store}` for role `dedup` must have type = \"dedup\""))
                        }
                        Some(_) => {}
                    },
                }
            }
            for extra in decl
                .stores
                .keys()
                .filter(|r| !spec.store_roles.contains(&r.as_str()))
            {
                err(
                    &label,
                    format!(
                        "unknown store role `{extra}`; this type uses: {}",
                        spec.store_roles.join(", ")
                    ),
                );
            }
            let topic = decl
                .params
                .get("topic")
                .and_then(|t| t.as_str())
                .map(str::to_owned);
            nodes.push(CompiledNode {
                id: id.clone(),
                role,
                kind: decl.kind.clone(),
                spec,
                decl: Some(decl.clone()),
                topic,
                downstream: vec![],
            });
        }
    }

    // Edges.
    let index: BTreeMap<String, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.clone(), i))
        .collect();
    let mut upstream: Vec<Vec<usize>> = vec![vec![]; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        let Some(decl) = &n.decl else { continue };
        let label = format!("{} `{}`", n.role.as_str(), n.id);
        if decl.inputs.is_empty() {
            err(&label, "needs at least one input".into());
        }
        for input in &decl.inputs {
            match index.get(input) {
                None => err(
                    &label,
                    format!("input `{input}` doesn't match any component"),
                ),
                Some(&j) if nodes[j].role == Role::Sink => err(
                    &label,
                    format!("input `{input}` is a sink; sinks have no outputs"),
                ),
                Some(&j) => {
                    upstream[i].push(j);
                    let offered: BTreeSet<RecordKind> =
                        nodes[j].spec.emits.iter().copied().collect();
                    if !n.spec.accepts.iter().any(|k| offered.contains(k)) {
                        err(
                            &label,
                            format!(
                                "input `{input}` emits {} but this component accepts {}",
                                kinds(nodes[j].spec.emits),
                                kinds(n.spec.accepts)
                            ),
                        );
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
    // Every record a component emits must be accepted by some downstream component.
    for n in &nodes {
        if n.role == Role::Sink {
            continue;
        }
        for kind in n.spec.emits {
            if !n
                .downstream
                .iter()
                .any(|&d| nodes[d].spec.accepts.contains(kind))
            {
                err(
                    &format!("{} `{}`", n.role.as_str(), n.id),
                    format!("its {} records have nowhere to go: add a component with this input that accepts them", kind.as_str()),
                );
            }
        }
    }

    // Cycles (depth-first search, reporting each cycle's path).
    let order = match topo_order(&nodes) {
        Ok(order) => order,
        Err(cycle) => {
            let path: Vec<_> = cycle.iter().map(|&i| nodes[i].id.as_str()).collect();
            err(
                &format!("{} `{}`", nodes[cycle[0]].role.as_str(), nodes[cycle[0]].id),
                format!("cycle {}", path.join(" → ")),
            );
            (0..nodes.len()).collect()
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
    let mut sorted: Vec<CompiledNode> = order.iter().map(|&i| nodes[i].clone()).collect();
    for n in &mut sorted {
        n.downstream = n.downstream.iter().map(|&d| pos[d]).collect();
    }
    Ok(CompiledTopology {
        application_id: file.application_id,
        processing_guarantee: file.processing_guarantee,
        stores: file.stores,
        nodes: sorted,
    })
}

fn kinds(k: &[RecordKind]) -> String {
    if k.is_empty() {
        return "nothing".into();
    }
    k.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
}

/// Topological order, or the nodes of one cycle (first node repeated at the end).
fn topo_order(nodes: &[CompiledNode]) -> Result<Vec<usize>, Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        i: usize,
        nodes: &[CompiledNode],
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

#[cfg(test)]
mod tests;
