//! The partition's key-value store (named stores as key spaces of one sled tree) and the
//! write set that changes it atomically.

use crate::changelog::{commit_marker, ChangelogRecord};
use crate::codec::{decode, encode};
use crate::{
    Result, StoreError, CHANGELOG_END, CHANGELOG_QUEUE, CHANGELOG_SEQ, CLUSTER_ID, DIGEST, LOCAL,
    META, NEXT_OFFSET, OUTBOX_SEQ,
};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use std::hash::Hasher as _;
use std::path::{Path, PathBuf};

/// An entry of a store: its key (without the store's prefix) and value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// The stores of one partition.
#[derive(Clone)]
pub struct PartitionStore {
    pub(crate) tree: sled::Tree,
    db: sled::Db,
    path: PathBuf,
}

pub(crate) fn full_key(store: &str, key: &[u8]) -> Vec<u8> {
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
        self.apply(ws.writes)
    }

    /// Applies records (full keys; `None` deletes) atomically.
    pub(crate) fn apply(&self, records: impl IntoIterator<Item = ChangelogRecord>) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (k, v) in records {
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

    /// The digest of the changelogged state recorded by the last sealed write set (or
    /// read from the changelog by a restore); `None` before the first.
    pub fn digest(&self) -> Result<Option<u64>> {
        self.get(META, DIGEST)
    }

    /// The digest of the changelogged state as this copy holds it, read entry by entry:
    /// what [`PartitionStore::digest`] must equal.
    pub fn compute_digest(&self) -> Result<u64> {
        let mut digest = 0;
        for r in self.tree.iter() {
            let (k, v) = r.map_err(|e| self.err(e))?;
            if digested(&k) {
                digest ^= entry_hash(&k, &v);
            }
        }
        Ok(digest)
    }

    /// Stages in `ws` the digest of the state `ws` leads to: an order-free hash (the XOR
    /// of a hash of every key and value) of every changelogged entry, kept current with
    /// each write set and changelogged with it. A restore that read every committed
    /// record rebuilds a store whose computed digest equals the restored one; a read that
    /// missed some does not (see [`crate::Restore::finish`]). Call it once, after the
    /// write set's last changelogged write and before [`WriteSet::changelog`].
    pub fn seal(&self, ws: &mut WriteSet) -> Result<()> {
        let mut digest = match self.digest()? {
            Some(d) => d,
            // A store written before digests were kept (or a new one): read it once.
            None => self.compute_digest()?,
        };
        let mut changed = false;
        for (k, v) in ws.writes.iter().filter(|(k, _)| digested(k)) {
            let old = self.tree.get(k).map_err(|e| self.err(e))?;
            if let Some(old) = old {
                digest ^= entry_hash(k, &old);
            }
            if let Some(v) = v {
                digest ^= entry_hash(k, v);
            }
            changed = true;
        }
        if changed {
            ws.put(META, DIGEST, &digest);
        }
        Ok(())
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
}

/// Writes staged for one atomic commit, readable before they are committed.
#[derive(Default, Debug)]
pub struct WriteSet {
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

/// The store a full key belongs to.
pub fn store_of(full_key: &[u8]) -> Option<&str> {
    let len = *full_key.first()? as usize;
    std::str::from_utf8(full_key.get(1..1 + len)?).ok()
}

/// Whether an entry counts in the digest: every changelogged entry but the digest.
fn digested(full_key_: &[u8]) -> bool {
    !store_of(full_key_).is_some_and(is_local) && full_key_ != full_key(META, DIGEST).as_slice()
}

/// A stable 64-bit hash of one entry (FNV-1a: the same on every platform and version).
fn entry_hash(full_key_: &[u8], value: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write_u32(full_key_.len() as u32);
    h.write(full_key_);
    h.write(value);
    h.finish()
}

/// Stores that describe this disk's copy and never go to the changelog.
pub(crate) fn is_local(store: &str) -> bool {
    store == CHANGELOG_QUEUE || store == LOCAL
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

    /// The write set as one changelog batch (full key, value or `None` for a delete),
    /// without the disk-local stores, in key order, closed by a commit marker. Empty when nothing but local stores changed. The order within a batch
    /// does not matter: a restore applies a batch only once it has read its marker.
    pub fn changelog(&self) -> Vec<ChangelogRecord> {
        let mut out: Vec<ChangelogRecord> = self
            .writes
            .iter()
            .filter(|(k, _)| !store_of(k).is_some_and(is_local))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !out.is_empty() {
            out.push(commit_marker());
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup;

    const WEEK: dedup::Retention = dedup::Retention::new(7 * 24 * 3_600_000);

    /// Opens a store just closed: sled's flusher thread may hold the directory's lock a
    /// moment after the last handle is dropped (workers wait for it the same way).
    fn reopen(open: impl Fn() -> Result<PartitionStore>) -> PartitionStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match open() {
                Ok(ps) => return ps,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                Err(e) => panic!("the store was not released within 30 s: {e}"),
            }
        }
    }

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
        let ps = reopen(|| PartitionStore::open(dir.path(), "app", "t", 3));
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
        let ps = reopen(|| PartitionStore::open_with_cache(dir.path(), "app", "t", 0, 64 * 1024));
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
