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
const NEXT_OFFSET: &[u8] = b"next_offset";
const OUTBOX_SEQ: &[u8] = b"outbox_seq";

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

impl PartitionStore {
    /// Opens (or creates) the stores of `topic`/`partition` below `root/application_id`.
    pub fn open(root: &Path, application_id: &str, topic: &str, partition: i32) -> Result<Self> {
        let path = root
            .join(application_id)
            .join(format!("{topic}-{partition}"));
        let err = |source| StoreError::Sled {
            path: path.clone(),
            source,
        };
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(64 * 1024 * 1024)
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

    /// Entries of `store` with `from <= key < to`, in key order (keys without the prefix).
    pub fn range(&self, store: &str, from: &[u8], to: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let prefix_len = 1 + store.len();
        self.tree
            .range(full_key(store, from)..full_key(store, to))
            .map(|r| {
                r.map(|(k, v)| (k[prefix_len..].to_vec(), v.to_vec()))
                    .map_err(|e| self.err(e))
            })
            .collect()
    }

    /// All entries of `store`, at most `limit`.
    pub fn scan(&self, store: &str, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
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

    /// Makes everything committed so far durable.
    pub async fn flush(&self) -> Result<()> {
        self.db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The next input offset to process, if this store has processed anything.
    pub fn next_offset(&self) -> Result<Option<i64>> {
        self.get(META, NEXT_OFFSET)
    }

    /// Sequence number for the next outbox entry.
    pub fn outbox_seq(&self) -> Result<u64> {
        Ok(self.get(META, OUTBOX_SEQ)?.unwrap_or(0))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes staged for one atomic commit, readable before they are committed.
#[derive(Default, Debug)]
pub struct WriteSet {
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Stores whose records go last in the changelog (dedup records, the checkpoint).
    late: BTreeSet<String>,
}

/// A changelog record: full key (store prefix + key), value or `None` for a delete.
pub type ChangelogRecord = (Vec<u8>, Option<Vec<u8>>);

/// The store a full key belongs to.
pub fn store_of(full_key: &[u8]) -> Option<&str> {
    let len = *full_key.first()? as usize;
    std::str::from_utf8(full_key.get(1..1 + len)?).ok()
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
    pub fn mark_late(&mut self, store: &str) {
        if !self.late.contains(store) {
            self.late.insert(store.to_owned());
        }
    }

    /// The write set as changelog records (full key, value or `None` for a delete),
    /// without the stores in `exclude`. Ordered so that any delivered prefix is a state
    /// the task could have been in: every other store first, then the stores marked late
    /// (a dedup record must never be visible without the state change it guards), and
    /// the checkpoint (`__meta`) last.
    pub fn changelog(&self, exclude: &[&str]) -> Vec<ChangelogRecord> {
        let rank = |k: &[u8]| match store_of(k) {
            Some(META) => 2,
            Some(s) if self.late.contains(s) => 1,
            _ => 0,
        };
        let mut out: Vec<ChangelogRecord> = self
            .writes
            .iter()
            .filter(|(k, _)| !store_of(k).is_some_and(|s| exclude.contains(&s)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // A stable sort: key order within each rank.
        out.sort_by_key(|(k, _)| rank(k));
        out
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

/// Dedup records with retention: `id → first-seen time`, plus a time index for pruning.
pub mod dedup {
    use super::*;

    fn index_store(store: &str) -> String {
        format!("{store}.by_time")
    }

    pub fn seen(ps: &PartitionStore, ws: &WriteSet, store: &str, id: &str) -> Result<bool> {
        if let Some(staged) = ws.staged(store, id.as_bytes()) {
            return Ok(staged.is_some());
        }
        Ok(ps.get_raw(store, id.as_bytes())?.is_some())
    }

    pub fn record(ws: &mut WriteSet, store: &str, id: &str, at_ms: i64) {
        ws.put(store, id.as_bytes(), &at_ms);
        ws.mark_late(store);
        let mut k = time_key(at_ms).to_vec();
        k.extend_from_slice(id.as_bytes());
        let index = index_store(store);
        ws.put_raw(&index, &k, Vec::new());
        ws.mark_late(&index);
    }

    /// Removes up to `limit` records first seen before `cutoff_ms`. Returns how many.
    pub fn prune(
        ps: &PartitionStore,
        ws: &mut WriteSet,
        store: &str,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<usize> {
        let idx = index_store(store);
        let old = ps.range(&idx, &time_key(i64::MIN), &time_key(cutoff_ms))?;
        let mut n = 0;
        for (k, _) in old.into_iter().take(limit) {
            ws.delete(&idx, &k);
            ws.delete(store, &k[8..]);
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_is_atomic_and_readable_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ps = PartitionStore::open(dir.path(), "app", "t", 3).unwrap();
            let mut ws = WriteSet::default();
            ws.put("payments", b"p1", &"state".to_string());
            ws.set_next_offset(42);
            dedup::record(&mut ws, "dedup", "cmd-1", 1000);
            assert!(dedup::seen(&ps, &ws, "dedup", "cmd-1").unwrap());
            assert_eq!(
                ps.next_offset().unwrap(),
                None,
                "nothing visible before commit"
            );
            ps.commit(ws).unwrap();
            futures_lite_block(ps.flush()).unwrap();
        }
        let ps = PartitionStore::open(dir.path(), "app", "t", 3).unwrap();
        assert_eq!(ps.next_offset().unwrap(), Some(42));
        assert_eq!(
            ps.get::<String>("payments", b"p1").unwrap().as_deref(),
            Some("state")
        );
        let ws = WriteSet::default();
        assert!(dedup::seen(&ps, &ws, "dedup", "cmd-1").unwrap());
        assert!(!dedup::seen(&ps, &ws, "dedup", "cmd-2").unwrap());
    }

    #[test]
    fn dedup_prune_respects_retention() {
        let dir = tempfile::tempdir().unwrap();
        let ps = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let mut ws = WriteSet::default();
        dedup::record(&mut ws, "dedup", "old", 100);
        dedup::record(&mut ws, "dedup", "new", 5000);
        ps.commit(ws).unwrap();
        let mut ws = WriteSet::default();
        assert_eq!(dedup::prune(&ps, &mut ws, "dedup", 1000, 10).unwrap(), 1);
        ps.commit(ws).unwrap();
        let ws = WriteSet::default();
        assert!(!dedup::seen(&ps, &ws, "dedup", "old").unwrap());
        assert!(dedup::seen(&ps, &ws, "dedup", "new").unwrap());
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
    fn the_changelog_replays_into_an_equal_store_and_orders_guards_last() {
        let dir = tempfile::tempdir().unwrap();
        let live = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let mut log = Vec::new();
        for i in 0..50u32 {
            let mut ws = WriteSet::default();
            dedup::record(&mut ws, "dedup", &format!("cmd-{i}"), i64::from(i));
            ws.put("payments", &(i % 7).to_be_bytes(), &i);
            if i % 5 == 0 {
                ws.delete("payments", &((i + 3) % 7).to_be_bytes());
            }
            ws.put_raw(OUTBOX, &i.to_be_bytes(), vec![1]);
            ws.set_next_offset(i64::from(i) + 1);
            let records = ws.changelog(&[OUTBOX]);
            let stores: Vec<&str> = records.iter().filter_map(|(k, _)| store_of(k)).collect();
            assert!(!stores.contains(&OUTBOX), "excluded stores stay out");
            let first_late = stores.iter().position(|s| s.starts_with("dedup")).unwrap();
            assert!(stores[..first_late].iter().all(|s| *s == "payments"));
            assert_eq!(stores.last(), Some(&META), "the checkpoint goes last");
            log.extend(records);
            live.commit(ws).unwrap();
        }
        let restored_dir = tempfile::tempdir().unwrap();
        let restored = PartitionStore::open(restored_dir.path(), "app", "t", 0).unwrap();
        restored.put_garbage_for_test();
        restored.clear().unwrap();
        restored.apply_changelog(log).unwrap();
        let without_outbox = |ps: &PartitionStore| -> Vec<(Vec<u8>, Vec<u8>)> {
            ps.tree
                .iter()
                .filter_map(|r| r.ok())
                .filter(|(k, _)| store_of(k) != Some(OUTBOX))
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect()
        };
        assert_eq!(without_outbox(&live), without_outbox(&restored));
        assert_eq!(restored.next_offset().unwrap(), Some(50));
        assert!(restored.scan(OUTBOX, 10).unwrap().is_empty());
    }

    impl PartitionStore {
        fn put_garbage_for_test(&self) {
            let mut ws = WriteSet::default();
            ws.put("payments", b"stale", &1u8);
            self.commit(ws).unwrap();
        }
    }

    /// Minimal executor for the one async call in these tests.
    fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut f = std::pin::pin!(f);
        loop {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::yield_now();
        }
    }
}
