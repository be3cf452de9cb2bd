//! Dedup records kept for a retention, in time segments (as Kafka Streams keeps its
//! windowed stores): a record lives in the segment of the time it was recorded, its key
//! the segment number then the id, with an empty value. A lookup reads the few live
//! segments; retention drops whole segments from the front, in key order, with no
//! index to keep (one key per record, and nothing to rebuild after a restore).

use crate::codec::time_key;
use crate::{PartitionStore, Result, WriteSet};

/// How long records are kept, as segments of half the retention: a record is found
/// for at least the retention and dropped before one and a half times it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    segment_ms: i64,
}

/// Segments before the current one that are still live (with the current one, they
/// span at least the retention).
const LIVE_BEHIND: i64 = 2;

impl Retention {
    pub const fn new(retention_ms: i64) -> Self {
        // Rounded up, so that two segments are never shorter than the retention.
        let half = retention_ms / 2 + retention_ms % 2;
        Retention {
            segment_ms: if half > 1 { half } else { 1 },
        }
    }

    fn segment(self, at_ms: i64) -> i64 {
        at_ms.div_euclid(self.segment_ms)
    }

    /// The live segments at `now_ms`, newest first. One segment ahead is included:
    /// records written while the clock was ahead (a worker moved to a host whose
    /// clock is behind) are still found.
    fn live(self, now_ms: i64) -> impl Iterator<Item = i64> {
        let current = self.segment(now_ms);
        (current.saturating_sub(LIVE_BEHIND)..=current.saturating_add(1)).rev()
    }
}

fn key(segment: i64, id: &str) -> Vec<u8> {
    let mut k = time_key(segment).to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

/// Whether `id` was recorded within the retention (staged writes included).
pub fn seen(
    ps: &PartitionStore,
    ws: &WriteSet,
    store: &str,
    id: &str,
    now_ms: i64,
    retention: Retention,
) -> Result<bool> {
    for segment in retention.live(now_ms) {
        let k = key(segment, id);
        let found = match ws.staged(store, &k) {
            Some(staged) => staged.is_some(),
            None => ps.get_raw(store, &k)?.is_some(),
        };
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

pub fn record(ws: &mut WriteSet, store: &str, id: &str, now_ms: i64, retention: Retention) {
    ws.put_raw(store, &key(retention.segment(now_ms), id), Vec::new());
}

/// Removes up to `limit` records of the segments past retention at `now_ms`, oldest
/// first. Returns how many.
pub fn prune(
    ps: &PartitionStore,
    ws: &mut WriteSet,
    store: &str,
    now_ms: i64,
    retention: Retention,
    limit: usize,
) -> Result<usize> {
    let oldest_live = retention.segment(now_ms).saturating_sub(LIVE_BEHIND);
    let old = ps.range(store, &time_key(i64::MIN), &time_key(oldest_live), limit)?;
    let n = old.len();
    for (k, _) in old {
        ws.delete(store, &k);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEEK: Retention = Retention::new(7 * 24 * 3_600_000);

    #[test]
    fn dedup_records_are_kept_for_their_retention_then_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let ps = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let retention_ms = 1_000;
        let r = Retention::new(retention_ms);
        let times: Vec<i64> = (0..27).map(|i| i * 97).collect();
        let mut ws = WriteSet::default();
        for t in &times {
            record(&mut ws, "dedup", &format!("at-{t}"), *t, r);
        }
        ps.commit(ws).unwrap();
        let seen =
            |id: &str, now: i64| seen(&ps, &WriteSet::default(), "dedup", id, now, r).unwrap();
        for t in &times {
            let id = format!("at-{t}");
            for now in [
                t - 1,
                *t,
                t + retention_ms / 2,
                t + retention_ms - 1,
                t + retention_ms,
            ] {
                assert!(
                    seen(&id, now),
                    "{id} forgotten at {now}, within its retention"
                );
            }
            assert!(
                !seen(&id, t + retention_ms * 3 / 2),
                "{id} still seen at one and a half times its retention"
            );
        }
        // Pruning at `now` removes exactly the records no lookup at `now` finds.
        let now = 2_600;
        let expected = times
            .iter()
            .filter(|t| !seen(&format!("at-{t}"), now))
            .count();
        assert!(expected > 0 && expected < times.len());
        let mut ws = WriteSet::default();
        assert_eq!(
            prune(&ps, &mut ws, "dedup", now, r, 5).unwrap(),
            5,
            "up to its limit"
        );
        ps.commit(ws).unwrap();
        let mut ws = WriteSet::default();
        let rest = prune(&ps, &mut ws, "dedup", now, r, 1_000).unwrap();
        ps.commit(ws).unwrap();
        assert_eq!(5 + rest, expected);
        assert_eq!(
            ps.scan("dedup", 1_000).unwrap().len(),
            times.len() - expected
        );
        for t in times.iter().filter(|t| **t + retention_ms >= now) {
            assert!(
                seen(&format!("at-{t}"), now),
                "at-{t} pruned within its retention"
            );
        }
    }

    #[test]
    fn an_odd_retention_is_not_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let ps = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let r = Retention::new(1_001);
        let mut ws = WriteSet::default();
        for t in 0..1_003 {
            record(&mut ws, "dedup", &format!("at-{t}"), t, r);
        }
        ps.commit(ws).unwrap();
        for t in 0..1_003 {
            let id = format!("at-{t}");
            assert!(
                seen(&ps, &WriteSet::default(), "dedup", &id, t + 1_001, r).unwrap(),
                "{id} forgotten at the end of its retention"
            );
        }
    }

    #[test]
    fn a_staged_dedup_record_is_seen_before_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let ps = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let mut ws = WriteSet::default();
        assert!(!seen(&ps, &ws, "dedup", "c", 10, WEEK).unwrap());
        record(&mut ws, "dedup", "c", 10, WEEK);
        assert!(seen(&ps, &ws, "dedup", "c", 10, WEEK).unwrap());
        assert!(!seen(&ps, &WriteSet::default(), "dedup", "c", 10, WEEK).unwrap());
    }
}
