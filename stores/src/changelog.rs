//! A store's changelog: every committed write set, without the disk-local stores, as
//! one batch of records closed by a commit marker; the merge of batches shipped
//! together; the restore that rebuilds a store from them in order; and the records'
//! values on the topic, tagged so an empty value is not a tombstone.

use crate::store::{full_key, store_of, PartitionStore, WriteSet};
use crate::{Result, StoreError, DIGEST, META, OUTBOX};
use std::collections::{BTreeMap, BTreeSet};

/// A changelog record: full key (store prefix + key), value or `None` for a delete.
pub type ChangelogRecord = (Vec<u8>, Option<Vec<u8>>);

/// The key of the record that closes every changelog batch: a restore applies a batch
/// only once it has read its marker, so a batch cut short by a crash is never
/// half-applied.
const COMMIT_MARKER: &[u8] = b"~commit";

/// The record closing a changelog batch. Its value is empty: only its key matters.
pub fn commit_marker() -> ChangelogRecord {
    (full_key(META, COMMIT_MARKER), Some(Vec::new()))
}

/// Whether a changelog record is a batch's commit marker.
pub fn is_commit_marker(full_key_: &[u8]) -> bool {
    full_key_ == full_key(META, COMMIT_MARKER).as_slice()
}

/// The tag before every value on the changelog topic, so that an empty stored value is
/// not read as a tombstone.
const PUT: u8 = 1;

/// A record's value as the changelog topic carries it (`None`: a tombstone).
pub fn to_topic(value: &Option<Vec<u8>>) -> Option<Vec<u8>> {
    value.as_ref().map(|v| {
        let mut out = Vec::with_capacity(v.len() + 1);
        out.push(PUT);
        out.extend_from_slice(v);
        out
    })
}

/// A changelog value read from the topic was not written by this version.
#[derive(Debug, thiserror::Error)]
#[error("not a changelog record of this version (tag {tag:?}); was the topic written by another application?")]
pub struct ForeignRecord {
    pub tag: Option<u8>,
}

/// A record's value as [`to_topic`] wrote it: the stored value, or `None` for a
/// tombstone.
pub fn from_topic(payload: Option<&[u8]>) -> std::result::Result<Option<Vec<u8>>, ForeignRecord> {
    match payload {
        None => Ok(None),
        Some([PUT, rest @ ..]) => Ok(Some(rest.to_vec())),
        Some(other) => Err(ForeignRecord {
            tag: other.first().copied(),
        }),
    }
}

/// Merges changelog batches that are shipped together into one batch: the last write
/// of each key wins, their commit markers give way to one marker at the end,
/// and an outbox entry both added and removed within them is left out altogether (its
/// key is never reused, so the changelog never held it). A restore applies the merged
/// batch whole or not at all, exactly as it would have applied the last of the batches.
pub fn coalesce(batches: impl IntoIterator<Item = Vec<ChangelogRecord>>) -> Vec<ChangelogRecord> {
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
        out.push(commit_marker());
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
    /// A rebuilt store that does not match its writer's digest, accepted
    /// ([`OnMismatch::Accept`]): the digest recorded and the one rebuilt.
    pub digest_mismatch: Option<(u64, u64)>,
}

/// What a restore does with a rebuilt store that does not match the digest its writer
/// recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMismatch {
    /// Refuse it ([`StoreError::IncompleteRestore`]): the store would lack committed
    /// writes (under exactly-once, a read that missed part of a committed transaction).
    Refuse,
    /// Keep it as the changelog holds it and make its digest the rebuilt one, so the
    /// next batch records a digest the changelog agrees with (under at-least-once, where
    /// a previous owner's late writes can land after the new owner's and the changelog
    /// is the state the next owner gets either way).
    Accept,
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
        self.store.apply(self.ready.drain(..))
    }

    /// Applies the last complete batches, checks the rebuilt store against the digest
    /// its writer recorded (a read that missed committed records fails with
    /// [`StoreError::IncompleteRestore`]) and records that the store follows the
    /// changelog up to offset `end` (exclusive).
    pub fn finish(self, end: i64) -> Result<Restored> {
        self.finish_with(end, OnMismatch::Refuse)
    }

    /// [`Restore::finish`], with a choice of what a digest mismatch does.
    pub fn finish_with(mut self, end: i64, on_mismatch: OnMismatch) -> Result<Restored> {
        self.apply()?;
        let mut ws = WriteSet::default();
        let mut digest_mismatch = None;
        if let Some(recorded) = self.store.digest()? {
            let rebuilt = self.store.compute_digest()?;
            if rebuilt != recorded {
                if on_mismatch == OnMismatch::Refuse {
                    return Err(StoreError::IncompleteRestore { recorded, rebuilt });
                }
                ws.put(META, DIGEST, &rebuilt);
                digest_mismatch = Some((recorded, rebuilt));
            }
        }
        ws.set_changelog_end(end);
        self.store.commit(ws)?;
        let mut unfinished: Vec<Vec<u8>> = self.held.into_iter().map(|(k, _)| k).collect();
        unfinished.sort();
        unfinished.dedup();
        Ok(Restored {
            applied: self.applied,
            unfinished,
            digest_mismatch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode;
    use crate::store::is_local;
    use crate::{dedup, CHANGELOG_QUEUE, LOCAL};

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
            let records = ws.changelog();
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
        log.extend(ws.changelog());
        let mut ws = WriteSet::default();
        ws.put("payments", b"p1", &2u32);
        ws.put("payments", b"p2", &2u32);
        ws.set_next_offset(2);
        let mut second = ws.changelog();
        // The writer died after shipping one record of the batch: p1's.
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
                ws.changelog()
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
        let merged = coalesce(batches);
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
        // A removal whose entry went out in an earlier shipment keeps its tombstone.
        let mut ws = WriteSet::default();
        ws.delete(OUTBOX, &7u64.to_be_bytes());
        let alone = coalesce([ws.changelog()]);
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
    fn values_survive_the_topic_and_tombstones_stay_tombstones() {
        for v in [None, Some(vec![]), Some(vec![0]), Some(vec![PUT, 9, 9])] {
            let wire = to_topic(&v);
            assert_eq!(wire.is_none(), v.is_none(), "only a delete is a tombstone");
            assert_eq!(from_topic(wire.as_deref()).unwrap(), v);
        }
        assert!(from_topic(Some(&[7, 1, 2])).is_err());
        assert!(from_topic(Some(&[])).is_err());
    }

    /// Batches written as a task writes them (each write set sealed, then its changelog
    /// taken and the write set committed): a payment store, an outbox entry added by one
    /// batch and removed by the next.
    fn sealed_batches(live: &PartitionStore) -> Vec<Vec<ChangelogRecord>> {
        (0..12u64)
            .map(|i| {
                let mut ws = WriteSet::default();
                ws.put("payments", &(i % 4).to_be_bytes(), &i);
                ws.put_raw(OUTBOX, &i.to_be_bytes(), vec![1]);
                if i > 0 {
                    ws.delete(OUTBOX, &(i - 1).to_be_bytes());
                }
                ws.set_next_offset(i as i64 + 1);
                live.seal(&mut ws).unwrap();
                let records = ws.changelog();
                live.commit(ws).unwrap();
                records
            })
            .collect()
    }

    fn restore_into(records: impl IntoIterator<Item = ChangelogRecord>) -> Result<PartitionStore> {
        let dir = tempfile::tempdir().unwrap();
        let ps = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let mut r = Restore::start(&ps)?;
        for rec in records {
            r.push(rec)?;
        }
        r.finish(0)?;
        Ok(ps)
    }

    #[test]
    fn a_restore_that_read_every_committed_record_matches_its_writers_digest() {
        let dir = tempfile::tempdir().unwrap();
        let live = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let batches = sealed_batches(&live);
        assert_eq!(live.digest().unwrap(), Some(live.compute_digest().unwrap()));

        let whole = restore_into(batches.iter().flatten().cloned()).expect("a whole read");
        assert_eq!(whole.digest().unwrap(), live.digest().unwrap());
        // Merged before shipping, and compacted on the topic (only each key's last
        // record left), the log restores to the same verified store.
        let coalesced = restore_into(coalesce(batches.clone())).expect("a coalesced read");
        assert_eq!(coalesced.digest().unwrap(), live.digest().unwrap());
        let mut last: BTreeMap<Vec<u8>, (usize, ChangelogRecord)> = BTreeMap::new();
        for (i, r) in batches.iter().flatten().enumerate() {
            last.insert(r.0.clone(), (i, r.clone()));
        }
        let mut compacted: Vec<(usize, ChangelogRecord)> = last.into_values().collect();
        compacted.sort_by_key(|(i, _)| *i);
        restore_into(compacted.into_iter().map(|(_, r)| r)).expect("a compacted read");
    }

    #[test]
    fn a_restore_that_missed_committed_records_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let live = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let batches = sealed_batches(&live);
        // A reader that skipped a stretch in the middle (batches 5 and 6): batch 5 removed
        // the outbox entry of batch 4, which a store without it would publish again.
        let skipped = batches
            .iter()
            .enumerate()
            .filter(|(i, _)| !(5..=6).contains(i))
            .flat_map(|(_, b)| b.iter().cloned());
        match restore_into(skipped) {
            Err(StoreError::IncompleteRestore { recorded, rebuilt }) => {
                assert_eq!(Some(recorded), live.digest().unwrap());
                assert_ne!(recorded, rebuilt);
            }
            Err(e) => {
                panic!("a restore that missed batches must be refused as incomplete, got {e}")
            }
            Ok(_) => panic!("a restore that missed batches must be refused"),
        }
    }

    #[test]
    fn an_accepted_mismatch_keeps_the_changelogs_state_and_its_next_batch_records_a_digest_that_matches(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let live = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let batches = sealed_batches(&live);
        let skipped: Vec<ChangelogRecord> = batches
            .iter()
            .enumerate()
            .filter(|(i, _)| !(5..=6).contains(i))
            .flat_map(|(_, b)| b.iter().cloned())
            .collect();
        let dir2 = tempfile::tempdir().unwrap();
        let restored = PartitionStore::open(dir2.path(), "app", "t", 0).unwrap();
        let mut r = Restore::start(&restored).unwrap();
        for rec in skipped.iter().cloned() {
            r.push(rec).unwrap();
        }
        let done = r.finish_with(7, OnMismatch::Accept).unwrap();
        let (recorded, rebuilt) = done.digest_mismatch.expect("the mismatch is reported");
        assert_eq!(Some(recorded), live.digest().unwrap());
        assert_eq!(restored.digest().unwrap(), Some(rebuilt));
        assert_eq!(restored.compute_digest().unwrap(), rebuilt);
        assert_eq!(restored.changelog_end().unwrap(), Some(7));

        // The next write set's batch carries a digest that a restore of the whole log,
        // this batch included, agrees with.
        let mut ws = WriteSet::default();
        ws.put("payments", b"after", &9u64);
        restored.seal(&mut ws).unwrap();
        let next = ws.changelog();
        restored.commit(ws).unwrap();
        let again = restore_into(skipped.into_iter().chain(next)).expect("a verified restore");
        assert_eq!(again.digest().unwrap(), restored.digest().unwrap());
    }

    #[test]
    fn a_store_written_before_digests_gets_one_from_its_entries() {
        let dir = tempfile::tempdir().unwrap();
        let ps = PartitionStore::open(dir.path(), "app", "t", 0).unwrap();
        let mut ws = WriteSet::default();
        ws.put("payments", b"p1", &1u64);
        ps.commit(ws).unwrap();
        assert_eq!(ps.digest().unwrap(), None);
        let mut ws = WriteSet::default();
        ws.put("payments", b"p2", &2u64);
        ps.seal(&mut ws).unwrap();
        ps.commit(ws).unwrap();
        assert_eq!(ps.digest().unwrap(), Some(ps.compute_digest().unwrap()));
        // Disk-local writes change no digest.
        let mut ws = WriteSet::default();
        ws.set_changelog_end(7);
        ps.seal(&mut ws).unwrap();
        assert!(ws.changelog().is_empty());
    }
}
