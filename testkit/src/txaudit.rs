//! Exactly-once judged from outside the gateway, the way Kafka's own tests judge it: a
//! `read_committed` consumer reads an output topic whole, and the brokers' log segments
//! (read with Kafka's `DumpLogSegments`, independent of any consumer) say which
//! transaction every record belonged to and how that transaction ended.
//!
//! - `duplicates`: records with an identity (an event's `(payment_id, seq)`, a
//!   notification's id) seen more than once; `duplicates_differing`: those whose copies
//!   are not byte-identical.
//! - `aborted_reads`: records the `read_committed` consumer was given although the log
//!   shows their transaction aborted (or fenced).
//! - `open_transactions`: partitions whose last stable offset is below the high
//!   watermark, and transactions the log shows begun and never ended.

use crate::broker::Cluster;
use crate::kafka::{Kafka, TopicRecord};
use anyhow::Context as _;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::Command;

/// What one topic looked like to a `read_committed` reader, against its log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TopicAudit {
    pub records: usize,
    pub duplicates: usize,
    pub duplicates_differing: usize,
    pub aborted_reads: usize,
    pub open_transactions: usize,
    /// Records of aborted transactions in the log (not visible; for the report).
    pub aborted_in_log: usize,
    /// Transaction markers in the log (commits and aborts).
    pub markers: usize,
    /// The first differing duplicate, for the report.
    pub first_differing: Option<String>,
}

impl TopicAudit {
    pub fn add(&mut self, o: &TopicAudit) {
        self.records += o.records;
        self.duplicates += o.duplicates;
        self.duplicates_differing += o.duplicates_differing;
        self.aborted_reads += o.aborted_reads;
        self.open_transactions += o.open_transactions;
        self.aborted_in_log += o.aborted_in_log;
        self.markers += o.markers;
        if self.first_differing.is_none() {
            self.first_differing.clone_from(&o.first_differing);
        }
    }
}

/// How a topic's records are told apart: `None` for a topic whose keys are rewritten on
/// purpose (a changelog), where only aborted reads and open transactions count.
pub type Identity = fn(&TopicRecord) -> Option<String>;

/// An event's identity: its `(payment_id, seq)`.
pub fn event_identity(r: &TopicRecord) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(r.payload.as_deref()?).ok()?;
    Some(format!(
        "{}#{}",
        v["payment_id"].as_str()?,
        v["seq"].as_i64()?
    ))
}

/// A notification's identity: its id (`evt_<payment>_<seq>`).
pub fn notification_identity(r: &TopicRecord) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(r.payload.as_deref()?).ok()?;
    Some(v["id"].as_str()?.to_owned())
}

/// The transactions of one partition's log, as its segments record them.
#[derive(Debug, Default)]
struct PartitionLog {
    aborted: Vec<RangeInclusive<i64>>,
    /// Producers with records after their last marker.
    open: usize,
    markers: usize,
}

impl PartitionLog {
    fn is_aborted(&self, offset: i64) -> bool {
        self.aborted.iter().any(|r| r.contains(&offset))
    }
}

/// Reads the batches `DumpLogSegments --deep-iteration` prints for a partition's
/// segments, in offset order, and follows each producer's transaction to its marker.
fn parse_dump(text: &str) -> anyhow::Result<PartitionLog> {
    // (base, last, producer, transactional, control)
    let mut batches: Vec<(i64, i64, i64, bool, bool)> = Vec::new();
    let mut markers: HashMap<i64, bool> = HashMap::new(); // control batch base → commit?
    let mut last_control: Option<i64> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("baseOffset:") {
            let f = fields(line);
            let num = |k: &str| -> anyhow::Result<i64> {
                f.get(k)
                    .with_context(|| format!("no {k} in `{line}`"))?
                    .parse()
                    .with_context(|| format!("{k} in `{line}`"))
            };
            let flag = |k: &str| f.get(k).is_some_and(|v| *v == "true");
            let b = (
                num("baseOffset")?,
                num("lastOffset")?,
                num("producerId")?,
                flag("isTransactional"),
                flag("isControl"),
            );
            last_control = b.4.then_some(b.0);
            batches.push(b);
        } else if line.starts_with("| offset:") {
            if let (Some(base), Some(kind)) = (last_control, fields(line).get("endTxnMarker")) {
                markers.insert(base, *kind == "COMMIT");
            }
        }
    }
    batches.sort_by_key(|b| b.0);
    batches.dedup_by_key(|b| b.0);
    let mut log = PartitionLog::default();
    let mut open: BTreeMap<i64, Vec<RangeInclusive<i64>>> = BTreeMap::new();
    for (base, last, producer, transactional, control) in batches {
        if control {
            log.markers += 1;
            let commit = *markers
                .get(&base)
                .with_context(|| format!("control batch at {base} without an endTxnMarker"))?;
            let ranges = open.remove(&producer).unwrap_or_default();
            if !commit {
                log.aborted.extend(ranges);
            }
        } else if transactional {
            open.entry(producer).or_default().push(base..=last);
        }
    }
    log.open = open.len();
    Ok(log)
}

/// `key: value` pairs of one line of `DumpLogSegments`' output.
fn fields(line: &str) -> HashMap<&str, &str> {
    let words: Vec<&str> = line.trim_start_matches('|').split_whitespace().collect();
    let mut out = HashMap::new();
    for pair in words.windows(2) {
        if let Some(k) = pair[0].strip_suffix(':') {
            out.insert(k, pair[1]);
        }
    }
    out
}

/// Dumps the segments of every partition of `topic` held by a running node.
fn partition_logs(
    cluster: &mut Cluster,
    topic: &str,
) -> anyhow::Result<HashMap<i32, PartitionLog>> {
    let mut dirs_by_partition: BTreeMap<i32, PathBuf> = BTreeMap::new();
    for id in cluster.node_ids() {
        if !cluster.is_running(id) {
            continue;
        }
        let data = cluster.data_dir(id)?;
        let Ok(dirs) = std::fs::read_dir(&data) else {
            continue;
        };
        for d in dirs.flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            let Some(p) = name
                .strip_prefix(&format!("{topic}-"))
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            dirs_by_partition.entry(p).or_insert_with(|| d.path());
        }
    }
    let mut out = HashMap::new();
    for (p, dir) in dirs_by_partition {
        out.insert(p, dump_partition(cluster, topic, p, &dir)?);
    }
    Ok(out)
}

/// Dumps one partition's segments. The log cleaner replaces the segments of a compacted
/// topic while it runs: a segment that vanished between the listing and the dump is
/// listed again.
fn dump_partition(
    cluster: &Cluster,
    topic: &str,
    p: i32,
    dir: &std::path::Path,
) -> anyhow::Result<PartitionLog> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|f| f.extension().is_some_and(|x| x == "log"))
            .collect();
        segs.sort();
        if segs.is_empty() {
            return Ok(PartitionLog::default());
        }
        let list = segs
            .iter()
            .map(|s| s.display().to_string())
            .collect::<Vec<_>>()
            .join(",");
        let run = Command::new(cluster.java())
            .arg("-cp")
            .arg(cluster.classpath())
            .arg("-Dlog4j2.level=warn")
            .arg("org.apache.kafka.tools.DumpLogSegments")
            .args(["--deep-iteration", "--files", &list])
            .output()
            .context("running Kafka's DumpLogSegments")?;
        let stderr = String::from_utf8_lossy(&run.stderr);
        if !run.status.success() && stderr.contains("NoSuchFileException") && attempt < 10 {
            std::thread::sleep(std::time::Duration::from_millis(200));
            continue;
        }
        anyhow::ensure!(
            run.status.success(),
            "DumpLogSegments of {topic}-{p} failed: {stderr}"
        );
        return parse_dump(&String::from_utf8_lossy(&run.stdout))
            .with_context(|| format!("reading the log of {topic}-{p}"));
    }
}

/// Audits `topic` of a cluster this harness owns (see the module's documentation).
pub fn audit(kafka: &Kafka, topic: &str, identity: Option<Identity>) -> anyhow::Result<TopicAudit> {
    let committed = kafka.read_all_isolated(topic, true)?;
    let logs = partition_logs(&mut *kafka.cluster()?, topic)?;
    let mut a = TopicAudit {
        records: committed.len(),
        ..TopicAudit::default()
    };
    for log in logs.values() {
        a.aborted_in_log += log
            .aborted
            .iter()
            .map(|r| (r.end() - r.start() + 1) as usize)
            .sum::<usize>();
        a.markers += log.markers;
        a.open_transactions += log.open;
    }
    let stable = kafka.extents(topic, true)?;
    let high = kafka.extents(topic, false)?;
    let lagging: HashSet<i32> = high
        .iter()
        .filter(|(p, (_, hw))| stable.get(p).is_some_and(|(_, lso)| lso < hw))
        .map(|(p, _)| *p)
        .collect();
    a.open_transactions = a.open_transactions.max(lagging.len());
    let mut seen: HashMap<String, Option<Vec<u8>>> = HashMap::new();
    for r in &committed {
        if logs
            .get(&r.partition)
            .is_some_and(|l| l.is_aborted(r.offset))
        {
            a.aborted_reads += 1;
        }
        let Some(id) = identity.and_then(|f| f(r)) else {
            continue;
        };
        match seen.get(&id) {
            None => {
                seen.insert(id, r.payload.clone());
            }
            Some(first) => {
                a.duplicates += 1;
                if first != &r.payload {
                    a.duplicates_differing += 1;
                    if a.first_differing.is_none() {
                        a.first_differing = Some(format!(
                            "{id} at {}-{}: {} / {}",
                            r.partition,
                            r.offset,
                            String::from_utf8_lossy(first.as_deref().unwrap_or_default()),
                            String::from_utf8_lossy(r.payload.as_deref().unwrap_or_default())
                        ));
                    }
                }
            }
        }
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_is_aborted_exactly_when_its_marker_says_so() {
        let dump = "\
Dumping /x/00000000000000000000.log
Log starting offset: 0
baseOffset: 0 lastOffset: 1 count: 2 baseSequence: 0 lastSequence: 1 producerId: 7 producerEpoch: 0 partitionLeaderEpoch: 0 isTransactional: true isControl: false position: 0
| offset: 0 CreateTime: 1 keySize: 1 valueSize: 1 sequence: 0 headerKeys: []
| offset: 1 CreateTime: 1 keySize: 1 valueSize: 1 sequence: 1 headerKeys: []
baseOffset: 2 lastOffset: 2 count: 1 baseSequence: 0 lastSequence: 0 producerId: 8 producerEpoch: 0 partitionLeaderEpoch: 0 isTransactional: true isControl: false position: 90
| offset: 2 CreateTime: 1 keySize: 1 valueSize: 1 sequence: 0 headerKeys: []
baseOffset: 3 lastOffset: 3 count: 1 baseSequence: -1 lastSequence: -1 producerId: 7 producerEpoch: 1 partitionLeaderEpoch: 0 isTransactional: true isControl: true position: 150
| offset: 3 CreateTime: 1 keySize: 4 valueSize: 6 sequence: -1 headerKeys: [] endTxnMarker: ABORT coordinatorEpoch: 0
baseOffset: 4 lastOffset: 4 count: 1 baseSequence: -1 lastSequence: -1 producerId: 8 producerEpoch: 0 partitionLeaderEpoch: 0 isTransactional: true isControl: true position: 200
| offset: 4 CreateTime: 1 keySize: 4 valueSize: 6 sequence: -1 headerKeys: [] endTxnMarker: COMMIT coordinatorEpoch: 0
baseOffset: 5 lastOffset: 5 count: 1 baseSequence: 2 lastSequence: 2 producerId: 8 producerEpoch: 0 partitionLeaderEpoch: 0 isTransactional: true isControl: false position: 250
| offset: 5 CreateTime: 1 keySize: 1 valueSize: 1 sequence: 2 headerKeys: []
";
        let log = parse_dump(dump).expect("parses");
        assert!(log.is_aborted(0) && log.is_aborted(1));
        assert!(!log.is_aborted(2) && !log.is_aborted(5));
        assert_eq!(log.markers, 2);
        assert_eq!(
            log.open, 1,
            "producer 8's second transaction has no marker yet"
        );
    }
}
