//! # stores — partition-local state on sled
//!
//! One [`PartitionStore`] per input partition (a *task*). It holds every named store the
//! topology declares (payment state, dedup records, timers, …) as key spaces of one sled
//! tree, so that a task's whole effect for one input record — state change, dedup record,
//! timers, outbox and the next input offset — is written by **one atomic batch**
//! ([`WriteSet`]). This module never talks to Kafka; it only promises atomicity per batch
//! and durability after [`PartitionStore::flush`].

use serde::{de::DeserializeOwned, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Store names starting with `__` are reserved for the engine.
pub const META: &str = "__meta";
pub const OUTBOX: &str = "__outbox";
pub const TIMERS: &str = "__timers";
/// Changelog batches committed but not yet delivered to the changelog topic, in order.
/// Local to this disk: never itself part of the changelog.
pub const CHANGELOG_QUEUE: &str = "__changelog";
/// Facts about this copy of the store (how far it follows the changelog topic). Local
/// to this disk: never part of the changelog.
pub const LOCAL: &str = "__local";
const NEXT_OFFSET: &[u8] = b"next_offset";
const OUTBOX_SEQ: &[u8] = b"outbox_seq";
/// The record that closes every changelog batch: a restore applies a batch only once it
/// has read its marker, so a batch cut short by a crash is never half-applied.
const COMMIT_MARKER: &[u8] = b"~commit";
const CHANGELOG_END: &[u8] = b"changelog_end";
const CHANGELOG_SEQ: &[u8] = b"changelog_seq";
const CLUSTER_ID: &[u8] = b"cluster_id";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled store at {path} failed: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("stored value in `{store}` cannot be decoded ({reason}); the store is corrupt or from an incompatible version: delete it to restore from the changelog")]
    Decode { store: String, reason: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// An entry of a store: its key (without the store's prefix) and value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// The stores of one partition.
#[derive(Clone)]
pub struct PartitionStore {
    tree: sled::Tree,
    db: sled::Db,
    path: PathBuf,
}

fn full_key(store: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + store.len() + key.len());
    k.push(store.len() as u8);
    k.extend_from_slice(store.as_bytes());
    k.extend_from_slice(key);
    k
}

/// sled's page cache per partition in MiB unless configured otherwise (`STORE_CACHE_MB`).
pub const DEFAULT_CACHE_MB: u64 = 64;
pub const DEFAULT_CACHE_BYTES: u64 = DEFAULT_CACHE_MB * 1024 * 1024;

impl PartitionStore {
    /// Opens (or creates) the stores of `topic`/`partition` below `root/application_id`,
    /// with the default cache.
    pub fn open(root: &Path, application_id: &str, topic: &str, partition: i32) -> Result<Self> {
        Self::open_with_cache(root, application_id, topic, partition, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the stores of `topic`/`partition`, with at most `cache_bytes` of
    /// sled's page cache (a bound sled applies approximately).
    pub fn open_with_cache(
        root: &Path,
        application_id: &str,
        topic: &str,
        partition: i32,
        cache_bytes: u64,
    ) -> Result<Self> {
        let path = root
            .join(application_id)
            .join(format!("{topic}-{partition}"));
        let err = |source| StoreError::Sled {
            path: path.clone(),
            source,
        };
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(err)?;
        let tree = db.open_tree("stores").map_err(err)?;
        Ok(PartitionStore { tree, db, path })
    }

    fn err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    pub fn get_raw(&self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.tree
            .get(full_key(store, key))
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| self.err(e))
    }

    pub fn get<T: DeserializeOwned>(&self, store: &str, key: &[u8]) -> Result<Option<T>> {
        self.get_raw(store, key)?
            .map(|b| decode(store, &b))
            .transpose()
    }

    /// The first `limit` entries of `store` with `from <= key < to`, in key order (keys
    /// without the prefix); only those are read.
    pub fn range(&self, store: &str, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Entry>> {
        let prefix_len = 1 + store.len();
        self.tree
            .range(full_key(store, from)..full_key(store, to))
            .take(limit)
            .map(|r| {
                r.map(|(k, v)| (k[prefix_len..].to_vec(), v.to_vec()))
                    .map_err(|e| self.err(e))
            })
            .collect()
    }

    /// The first `limit` entries of `store` with `from <= key`, in key order.
    pub fn range_from(&self, store: &str, from: &[u8], limit: usize) -> Result<Vec<Entry>> {
        let prefix = full_key(store, &[]);
        self.tree
            .range(full_key(store, from)..)
            .take_while(|r| r.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix)))
            .take(limit)
            .map(|r| {
                r.map(|(k, v)| (k[prefix.len()..].to_vec(), v.to_vec()))
                    .map_err(|e| self.err(e))
            })
            .collect()
    }

    /// All entries of `store`, at most `limit`.
    pub fn scan(&self, store: &str, limit: usize) -> Result<Vec<Entry>> {
        let prefix = full_key(store, &[]);
        let prefix_len = prefix.len();
        self.tree
            .scan_prefix(prefix)
            .take(limit)
            .map(|r| {
                r.map(|(k, v)| (k[prefix_len..].to_vec(), v.to_vec()))
                    .map_err(|e| self.err(e))
            })
            .collect()
    }

    /// How many keys `store` holds (a scan: for housekeeping, not the data path).
    pub fn count(&self, store: &str) -> Result<usize> {
        let prefix = full_key(store, &[]);
        let mut n = 0;
        for r in self.tree.scan_prefix(prefix) {
            r.map_err(|e| self.err(e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Applies the write set atomically: either all of it is visible, or none.
    pub fn commit(&self, ws: WriteSet) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (k, v) in ws.writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.tree.apply_batch(batch).map_err(|e| self.err(e))
    }

    /// Empties every store of the partition (before a restore).
    pub fn clear(&self) -> Result<()> {
        self.tree.clear().map_err(|e| self.err(e))
    }

    /// Applies changelog records (full keys as produced by [`WriteSet::changelog`];
    /// `None` deletes) atomically.
    pub fn apply_changelog(
        &self,
        records: impl IntoIterator<Item = ChangelogRecord>,
    ) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (k, v) in records {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.tree.apply_batch(batch).map_err(|e| self.err(e))
    }

    /// Makes everything committed so far durable. Blocks the calling thread until the
    /// log is on disk: async callers run it on a blocking thread. (sled's own
    /// `flush_async` runs the flush on sled's I/O pool, and concurrent flushes of
    /// several stores can fill that pool with flushes waiting for writes queued behind
    /// them: a process-wide deadlock.)
    pub fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(|e| self.err(e))
    }

    /// The next input offset to process, if this store has processed anything.
    pub fn next_offset(&self) -> Result<Option<i64>> {
        self.get(META, NEXT_OFFSET)
    }

    /// Sequence number for the next outbox entry.
    pub fn outbox_seq(&self) -> Result<u64> {
        Ok(self.get(META, OUTBOX_SEQ)?.unwrap_or(0))
    }

    /// Sequence number for the next changelog batch.
    pub fn changelog_seq(&self) -> Result<u64> {
        Ok(self.get(LOCAL, CHANGELOG_SEQ)?.unwrap_or(0))
    }

    /// The changelog offset this copy of the store has caught up to: everything in the
    /// changelog partition below it is reflected here. `None` for a store that never
    /// wrote or read a changelog.
    pub fn changelog_end(&self) -> Result<Option<i64>> {
        self.get(LOCAL, CHANGELOG_END)
    }

    /// The id of the Kafka cluster whose partitions this copy follows, once recorded.
    pub fn cluster_id(&self) -> Result<Option<String>> {
        self.get(LOCAL, CLUSTER_ID)
    }

    /// The current values (or `None`) of the given full keys, as changelog records.
    pub fn current(
        &self,
        full_keys: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<Vec<ChangelogRecord>> {
        full_keys
            .into_iter()
            .map(|k| {
                let v = self.tree.get(&k).map_err(|e| self.err(e))?;
                Ok((k, v.map(|v| v.to_vec())))
            })
            .collect()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes staged for one atomic commit, readable before they are committed.
#[derive(Default, Debug)]
pub struct WriteSet {
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

/// A changelog record: full key (store prefix + key), value or `None` for a delete.
pub type ChangelogRecord = (Vec<u8>, Option<Vec<u8>>);

/// The store a full key belongs to.
pub fn store_of(full_key: &[u8]) -> Option<&str> {
    let len = *full_key.first()? as usize;
    std::str::from_utf8(full_key.get(1..1 + len)?).ok()
}

/// Stores that describe this disk's copy and never go to the changelog.
fn is_local(store: &str) -> bool {
    store == CHANGELOG_QUEUE || store == LOCAL
}

/// The record closing changelog batch `batch`.
pub fn commit_marker(batch: u64) -> ChangelogRecord {
    (full_key(META, COMMIT_MARKER), Some(encode(&batch)))
}

/// Whether a changelog record is a batch's commit marker.
pub fn is_commit_marker(full_key_: &[u8]) -> bool {
    full_key_ == full_key(META, COMMIT_MARKER).as_slice()
}

impl WriteSet {
    pub fn put_raw(&mut self, store: &str, key: &[u8], value: Vec<u8>) {
        self.writes.insert(full_key(store, key), Some(value));
    }

    pub fn put<T: Serialize>(&mut self, store: &str, key: &[u8], value: &T) {
        self.put_raw(store, key, encode(value));
    }

    pub fn delete(&mut self, store: &str, key: &[u8]) {
        self.writes.insert(full_key(store, key), None);
    }

    /// `Some(Some(v))`: staged value; `Some(None)`: staged delete; `None`: not staged.
    pub fn staged(&self, store: &str, key: &[u8]) -> Option<Option<&[u8]>> {
        self.writes.get(&full_key(store, key)).map(|v| v.as_deref())
    }

    /// Orders `store`'s records after the others in [`WriteSet::changelog`].
    /// The write set as one changelog batch (full key, value or `None` for a delete),
    /// without the disk-local stores, in key order, closed by a commit marker carrying
    /// `batch`. Empty when nothing but local stores changed. The order within a batch
    /// does not matter: a restore applies a batch only once it has read its marker.
    pub fn changelog(&self, batch: u64) -> Vec<ChangelogRecord> {
        let mut out: Vec<ChangelogRecord> = self
            .writes
            .iter()
            .filter(|(k, _)| !store_of(k).is_some_and(is_local))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !out.is_empty() {
            out.push(commit_marker(batch));
        }
        out
    }

    /// Records which changelog batch is next (disk-local).
    pub fn set_changelog_seq(&mut self, seq: u64) {
        self.put(LOCAL, CHANGELOG_SEQ, &seq);
    }

    /// Records how far this copy follows the changelog partition (disk-local).
    pub fn set_changelog_end(&mut self, end: i64) {
        self.put(LOCAL, CHANGELOG_END, &end);
    }

    /// Records which Kafka cluster this copy follows (disk-local).
    pub fn set_cluster_id(&mut self, id: &str) {
        self.put(LOCAL, CLUSTER_ID, &id.to_owned());
    }

    pub fn set_next_offset(&mut self, offset: i64) {
        self.put(META, NEXT_OFFSET, &offset);
    }

    pub fn set_outbox_seq(&mut self, seq: u64) {
        self.put(META, OUTBOX_SEQ, &seq);
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }
}

/// Merges changelog batches that are delivered together into one batch: the last write
/// of each key wins, their commit markers give way to one marker (`batch`) at the end,
/// and an outbox entry both added and removed within them is left out altogether (its
/// key is never reused, so the changelog never held it). A restore applies the merged
/// batch whole or not at all, exactly as it would have applied the last of the batches.
pub fn coalesce(
    batches: impl IntoIterator<Item = Vec<ChangelogRecord>>,
    batch: u64,
) -> Vec<ChangelogRecord> {
    let mut latest: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    let mut born: BTreeSet<Vec<u8>> = BTreeSet::new();
    for (k, v) in batches.into_iter().flatten() {
        if is_commit_marker(&k) {
            continue;
        }
        if v.is_some() && store_of(&k) == Some(OUTBOX) && !latest.contains_key(&k) {
            born.insert(k.clone());
        }
        latest.insert(k, v);
    }
    let mut out: Vec<ChangelogRecord> = latest
        .into_iter()
        .filter(|(k, v)| !(v.is_none() && born.contains(k)))
        .collect();
    if !out.is_empty() {
        out.push(commit_marker(batch));
    }
    out
}

/// Rebuilds a store from its changelog, read in order. Records are held until the
/// commit marker of their batch arrives, so the rebuilt store is always a state the
/// writer committed: a batch cut short by a crash (the log's tail without its marker)
/// is left out, and [`Restored::unfinished`] names its keys so the new writer can
/// publish their restored values over it.
pub struct Restore<'a> {
    store: &'a PartitionStore,
    held: Vec<ChangelogRecord>,
    ready: Vec<ChangelogRecord>,
    applied: usize,
}

/// What a finished [`Restore`] did.
#[derive(Debug, Default)]
pub struct Restored {
    /// Records applied (commit markers are not state and not counted).
    pub applied: usize,
    /// Keys of the unfinished batch at the log's end, left out.
    pub unfinished: Vec<Vec<u8>>,
}

impl<'a> Restore<'a> {
    /// Empties `store` and starts rebuilding it.
    pub fn start(store: &'a PartitionStore) -> Result<Self> {
        store.clear()?;
        Ok(Restore {
            store,
            held: Vec::new(),
            ready: Vec::new(),
            applied: 0,
        })
    }

    pub fn push(&mut self, record: ChangelogRecord) -> Result<()> {
        if is_commit_marker(&record.0) {
            // The marker is not state: it only closes the batch.
            self.ready.append(&mut self.held);
            if self.ready.len() >= 10_000 {
                self.apply()?;
            }
        } else {
            self.held.push(record);
        }
        Ok(())
    }

    fn apply(&mut self) -> Result<()> {
        self.applied += self.ready.len();
        self.store.apply_changelog(self.ready.drain(..))
    }

    /// Applies the last complete batches and records that the store follows the
    /// changelog up to offset `end` (exclusive).
    pub fn finish(mut self, end: i64) -> Result<Restored> {
        self.apply()?;
        let mut ws = WriteSet::default();
        ws.set_changelog_end(end);
        self.store.commit(ws)?;
        let mut unfinished: Vec<Vec<u8>> = self.held.into_iter().map(|(k, _)| k).collect();
        unfinished.sort();
        unfinished.dedup();
        Ok(Restored {
            applied: self.applied,
            unfinished,
        })
    }
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// bincode encoding used for every stored value.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding plain serde data into a Vec cannot fail.
    bincode::serde::encode_to_vec(value, config()).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(store: &str, bytes: &[u8]) -> Result<T> {
    bincode::serde::decode_from_slice(bytes, config())
        .map(|(v, _)| v)
        .map_err(|e| StoreError::Decode {
            store: store.to_owned(),
            reason: e.to_string(),
        })
}

/// Sortable big-endian encoding of a signed millisecond timestamp.
pub fn time_key(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

pub fn time_from_key(k: &[u8]) -> Option<i64> {
    let b: [u8; 8] = k.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(b) ^ (1 << 63)) as i64)
}

/// Dedup records kept for a retention, in time segments (as Kafka Streams keeps its
/// windowed stores): a record lives in the segment of the time it was recorded, its key
/// the segment number then the id, with an empty value. A lookup reads the few live
/// segments; retention drops whole segments from the front, in key order, with no
/// index to keep (one key per record, and nothing to rebuild after a restore).
pub mod dedup {
    use super::*;

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
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEEK: dedup::Retention = dedup::Retention::new(7 * 24 * 3_600_000);

    #[test]
    fn batch_is_atomic_and_readable_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ps = PartitionStore::open(dir.path(), "app", "t", 3).unwrap();
            let mut ws = WriteSet::default();
            ws.put("payments", b"p1", &"state".to_string());
            ws.set_next_offset(42);
            dedup::record(&mut ws, "dedup", "cmd-1", 1000, WEEK);
            assert!(dedup::seen(&ps, &ws, "dedup", "cmd-1", 1000, WEEK).unwrap());
            assert_eq!(
                ps.next_offset().unwrap(),
                None,
                "nothing visible before commit"
            );
            ps.commit(ws).unwrap();
            ps.flush().unwrap();
        }
        let ps = PartitionStore::open(dir.path(), "app", "t", 3).unwrap();
        assert_eq!(ps.next_offset().unwrap(), Some(42));
        assert_eq!(
            ps.get::<String>("payments", b"p1").unwrap().as_deref(),
            Some("state")
        );
        let ws = WriteSet::default();
        assert!(dedup::seen(&ps, &ws, "dedup", "cmd-1", 2000, WEEK).unwrap());
        assert!(!dedup::seen(&ps, &ws, "dedup", "cmd-2", 2000, WEEK).unwrap());
    }

    #[test]
    fn dedup_records_are_kept_for_their_retention_then_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let ps = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let retention_ms = 1_000;
        let r = dedup::Retention::new(retention_ms);
        let times: Vec<i64> = (0..27).map(|i| i * 97).collect();
        let mut ws = WriteSet::default();
        for t in &times {
            dedup::record(&mut ws, "dedup", &format!("at-{t}"), *t, r);
        }
        ps.commit(ws).unwrap();
        let seen = |id: &str, now: i64| {
            dedup::seen(&ps, &WriteSet::default(), "dedup", id, now, r).unwrap()
        };
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
            dedup::prune(&ps, &mut ws, "dedup", now, r, 5).unwrap(),
            5,
            "up to its limit"
        );
        ps.commit(ws).unwrap();
        let mut ws = WriteSet::default();
        let rest = dedup::prune(&ps, &mut ws, "dedup", now, r, 1_000).unwrap();
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
        let r = dedup::Retention::new(1_001);
        let mut ws = WriteSet::default();
        for t in 0..1_003 {
            dedup::record(&mut ws, "dedup", &format!("at-{t}"), t, r);
        }
        ps.commit(ws).unwrap();
        for t in 0..1_003 {
            let id = format!("at-{t}");
            assert!(
                dedup::seen(&ps, &WriteSet::default(), "dedup", &id, t + 1_001, r).unwrap(),
                "{id} forgotten at the end of its retention"
            );
        }
    }

    #[test]
    fn a_staged_dedup_record_is_seen_before_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let ps = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let mut ws = WriteSet::default();
        assert!(!dedup::seen(&ps, &ws, "dedup", "c", 10, WEEK).unwrap());
        dedup::record(&mut ws, "dedup", "c", 10, WEEK);
        assert!(dedup::seen(&ps, &ws, "dedup", "c", 10, WEEK).unwrap());
        assert!(!dedup::seen(&ps, &WriteSet::default(), "dedup", "c", 10, WEEK).unwrap());
    }

    #[test]
    fn time_keys_sort_like_times() {
        let ts = [i64::MIN, -5, 0, 7, 1_700_000_000_000, i64::MAX];
        for w in ts.windows(2) {
            assert!(time_key(w[0]) < time_key(w[1]));
            assert_eq!(time_from_key(&time_key(w[0])), Some(w[0]));
        }
    }

    #[test]
    fn corrupt_value_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let ps = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let mut ws = WriteSet::default();
        ws.put_raw("payments", b"k", vec![0xff, 0xff, 0xff]);
        ps.commit(ws).unwrap();
        assert!(matches!(
            ps.get::<String>("payments", b"k"),
            Err(StoreError::Decode { .. })
        ));
    }

    #[test]
    fn the_changelog_replays_into_an_equal_store() {
        let dir = tempfile::tempdir().unwrap();
        let live = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        const TEN_MS: dedup::Retention = dedup::Retention::new(10);
        let mut log = Vec::new();
        for i in 0..50u32 {
            let mut ws = WriteSet::default();
            dedup::record(&mut ws, "dedup", &format!("cmd-{i}"), i64::from(i), TEN_MS);
            ws.put("payments", &(i % 7).to_be_bytes(), &i);
            if i % 5 == 0 {
                ws.delete("payments", &((i + 3) % 7).to_be_bytes());
            }
            ws.put_raw(OUTBOX, &i.to_be_bytes(), vec![1]);
            ws.set_next_offset(i64::from(i) + 1);
            ws.set_changelog_seq(u64::from(i) + 1);
            ws.put_raw(CHANGELOG_QUEUE, &i.to_be_bytes(), vec![2]);
            if i == 40 {
                // Retention (segments of 5 ms; at 40 ms those from 30 ms on are live):
                // the first thirty ids are forgotten.
                assert_eq!(
                    dedup::prune(&live, &mut ws, "dedup", 40, TEN_MS, 100).unwrap(),
                    30
                );
            }
            let records = ws.changelog(u64::from(i));
            let stores: Vec<&str> = records.iter().filter_map(|(k, _)| store_of(k)).collect();
            assert!(
                !stores.contains(&LOCAL) && !stores.contains(&CHANGELOG_QUEUE),
                "disk-local stores stay out"
            );
            assert!(stores.contains(&OUTBOX), "the outbox is part of the state");
            assert!(
                is_commit_marker(&records.last().unwrap().0),
                "the marker closes the batch"
            );
            log.extend(records);
            live.commit(ws).unwrap();
        }
        let restored_dir = tempfile::tempdir().unwrap();
        let restored = PartitionStore::open(restored_dir.path(), "app", "t", 0).unwrap();
        restored.put_garbage_for_test();
        let mut r = Restore::start(&restored).unwrap();
        for rec in log.iter().cloned() {
            r.push(rec).unwrap();
        }
        let done = r.finish(log.len() as i64).unwrap();
        assert_eq!(done.applied, log.len() - 50, "all but the 50 markers");
        assert!(done.unfinished.is_empty());
        // Everything but what describes the disk's copy.
        let shared = |ps: &PartitionStore| -> Vec<(Vec<u8>, Vec<u8>)> {
            ps.tree
                .iter()
                .filter_map(|r| r.ok())
                .filter(|(k, _)| !matches!(store_of(k), Some(LOCAL | CHANGELOG_QUEUE)))
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect()
        };
        assert!(
            shared(&live) == shared(&restored),
            "the restored store differs"
        );
        assert_eq!(restored.scan("dedup", 100).unwrap().len(), 20);
        assert_eq!(restored.next_offset().unwrap(), Some(50));
        assert_eq!(restored.changelog_end().unwrap(), Some(log.len() as i64));
        assert!(restored.scan(CHANGELOG_QUEUE, 10).unwrap().is_empty());
    }

    #[test]
    fn a_batch_cut_short_is_left_out_of_a_restore() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Vec::new();
        let mut ws = WriteSet::default();
        ws.put("payments", b"p1", &1u32);
        ws.set_next_offset(1);
        log.extend(ws.changelog(0));
        let mut ws = WriteSet::default();
        ws.put("payments", b"p1", &2u32);
        ws.put("payments", b"p2", &2u32);
        ws.set_next_offset(2);
        let mut second = ws.changelog(1);
        // The writer died after delivering one record of the batch: p1's.
        second.retain(|(k, _)| *k == full_key("payments", b"p1"));
        log.extend(second);
        let ps = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let mut r = Restore::start(&ps).unwrap();
        for rec in log {
            r.push(rec).unwrap();
        }
        let done = r.finish(4).unwrap();
        assert_eq!(ps.get::<u32>("payments", b"p1").unwrap(), Some(1));
        assert_eq!(ps.get::<u32>("payments", b"p2").unwrap(), None);
        assert_eq!(ps.next_offset().unwrap(), Some(1));
        assert_eq!(done.unfinished, vec![full_key("payments", b"p1")]);
        assert_eq!(
            ps.current(done.unfinished).unwrap(),
            vec![(full_key("payments", b"p1"), Some(encode(&1u32)))],
            "the restored value, to publish over the unfinished one"
        );
    }

    #[test]
    fn coalesced_batches_restore_to_the_same_store_as_the_batches() {
        let batches: Vec<Vec<ChangelogRecord>> = (0..20u64)
            .map(|i| {
                let mut ws = WriteSet::default();
                ws.put("payments", &(i % 3).to_be_bytes(), &i);
                if i % 4 == 0 {
                    ws.delete("payments", &((i + 1) % 3).to_be_bytes());
                }
                ws.put_raw(OUTBOX, &i.to_be_bytes(), vec![1]);
                if i > 0 && i % 2 == 0 {
                    // The previous batch's output, published: removed from the outbox.
                    ws.delete(OUTBOX, &(i - 1).to_be_bytes());
                }
                ws.set_next_offset(i as i64);
                ws.changelog(i)
            })
            .collect();
        let restore = |records: Vec<ChangelogRecord>| {
            let dir = tempfile::tempdir().unwrap();
            let ps = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
            let mut r = Restore::start(&ps).unwrap();
            for rec in records {
                r.push(rec).unwrap();
            }
            r.finish(0).unwrap();
            let all: Vec<(Vec<u8>, Vec<u8>)> = ps
                .tree
                .iter()
                .filter_map(|r| r.ok())
                .filter(|(k, _)| !store_of(k).is_some_and(is_local))
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            (dir, all)
        };
        let flat: Vec<ChangelogRecord> = batches.iter().flatten().cloned().collect();
        let merged = coalesce(batches, 19);
        assert!(
            merged.len() < flat.len() / 3,
            "{} of {}",
            merged.len(),
            flat.len()
        );
        assert!(is_commit_marker(&merged.last().unwrap().0));
        assert_eq!(
            merged.iter().filter(|(k, _)| is_commit_marker(k)).count(),
            1
        );
        assert!(
            !merged
                .iter()
                .any(|(k, v)| store_of(k) == Some(OUTBOX) && v.is_none()),
            "outbox entries added and removed here never reach the changelog"
        );
        assert!(
            restore(flat).1 == restore(merged).1,
            "the merged batch restores differently"
        );
        // A removal whose entry went out in an earlier delivery keeps its tombstone.
        let mut ws = WriteSet::default();
        ws.delete(OUTBOX, &7u64.to_be_bytes());
        let alone = coalesce([ws.changelog(20)], 20);
        assert_eq!(alone.len(), 2);
        assert_eq!(alone[0].1, None);
    }

    impl PartitionStore {
        fn put_garbage_for_test(&self) {
            let mut ws = WriteSet::default();
            ws.put("payments", b"stale", &1u8);
            self.commit(ws).unwrap();
        }
    }

    #[test]
    fn a_store_larger_than_its_cache_keeps_every_value() {
        // 20,000 values of 300 B with a 64 KiB cache: most pages are evicted and read
        // back from disk, before and after a reopen.
        let dir = tempfile::tempdir().unwrap();
        let value = |i: u32| vec![(i % 251) as u8; 300];
        {
            let ps = PartitionStore::open_with_cache(dir.path(), "app", "t", 0, 64 * 1024).unwrap();
            for chunk in (0..20_000u32).collect::<Vec<_>>().chunks(500) {
                let mut ws = WriteSet::default();
                for i in chunk {
                    ws.put_raw("payments", &i.to_be_bytes(), value(*i));
                }
                ps.commit(ws).unwrap();
            }
            ps.flush().unwrap();
            for i in (0..20_000u32).step_by(7) {
                assert_eq!(
                    ps.get_raw("payments", &i.to_be_bytes()).unwrap(),
                    Some(value(i))
                );
            }
        }
        let ps = PartitionStore::open_with_cache(dir.path(), "app", "t", 0, 64 * 1024).unwrap();
        assert_eq!(ps.scan("payments", usize::MAX).unwrap().len(), 20_000);
        assert_eq!(
            ps.get_raw("payments", &19_999u32.to_be_bytes()).unwrap(),
            Some(value(19_999))
        );
    }

    #[test]
    fn range_returns_the_first_entries_up_to_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let ps = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let mut ws = WriteSet::default();
        for i in 0..10u8 {
            ws.put_raw("timers", &[i], vec![i]);
        }
        ws.put_raw("timersx", &[3], vec![0]);
        ps.commit(ws).unwrap();
        let keys = |v: Vec<Entry>| v.into_iter().map(|(k, _)| k[0]).collect::<Vec<_>>();
        assert_eq!(
            keys(ps.range("timers", &[2], &[8], 3).unwrap()),
            vec![2, 3, 4]
        );
        assert_eq!(
            keys(ps.range("timers", &[2], &[8], 100).unwrap()),
            vec![2, 3, 4, 5, 6, 7]
        );
        assert!(ps.range("timers", &[2], &[8], 0).unwrap().is_empty());
    }

    /// Many partitions in one process commit and flush at the same time (as a worker's
    /// tasks do): every flush returns. Fails by timing out if the stores deadlock.
    #[test]
    fn concurrent_flushes_of_many_stores_complete() {
        let dir = tempfile::tempdir().unwrap();
        let stores: Vec<PartitionStore> = (0..16)
            .map(|p| PartitionStore::open(dir.path(), "app", "t", p).unwrap())
            .collect();
        let (done, finished) = std::sync::mpsc::channel();
        for ps in stores {
            let done = done.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let mut ws = WriteSet::default();
                    ws.put("payments", &i.to_be_bytes(), &vec![0u8; 300]);
                    ws.set_next_offset(i as i64);
                    let r = ps.commit(ws).and_then(|_| ps.flush());
                    if r.is_err() {
                        let _ = done.send(r);
                        return;
                    }
                }
                let _ = done.send(Ok(()));
            });
        }
        for _ in 0..16 {
            finished
                .recv_timeout(std::time::Duration::from_secs(120))
                .expect("a store's commit-and-flush loop did not finish within 120 s (deadlock)")
                .unwrap();
        }
    }
}
