//! # stores — partition-local state on sled
//!
//! One [`PartitionStore`] per input partition (a *task*). It holds every named store the
//! topology declares (payment state, dedup records, timers, …) as key spaces of one sled
//! tree, so that a task's whole effect for one input record — state change, dedup record,
//! timers, outbox and the next input offset — is written by **one atomic batch**
//! ([`WriteSet`]). This crate never talks to Kafka; it only promises atomicity per batch
//! and durability after [`PartitionStore::flush`].
//!
//! - [`store`]: the partition's key-value store and the write set;
//! - [`changelog`]: a write set as changelog records, their merge, the restore that
//!   rebuilds a store from them, and their encoding on the topic;
//! - [`dedup`]: dedup records kept in time segments for a retention;
//! - [`codec`]: the encoding of stored values and time keys.

pub mod changelog;
pub mod codec;
pub mod dedup;
pub mod store;

pub use changelog::{
    coalesce, commit_marker, is_commit_marker, ChangelogRecord, OnMismatch, Restore, Restored,
};
pub use codec::{decode, encode, time_from_key, time_key};
pub use store::{store_of, Entry, PartitionStore, WriteSet, DEFAULT_CACHE_BYTES, DEFAULT_CACHE_MB};

use std::path::PathBuf;

/// Store names starting with `__` are reserved for the engine.
pub const META: &str = "__meta";
pub const OUTBOX: &str = "__outbox";
pub const TIMERS: &str = "__timers";
/// Changelog batches committed but not yet shipped to the changelog topic, in order.
/// Local to this disk: never itself part of the changelog.
pub const CHANGELOG_QUEUE: &str = "__changelog";
/// Facts about this copy of the store (how far it follows the changelog topic). Local
/// to this disk: never part of the changelog.
pub const LOCAL: &str = "__local";
pub(crate) const NEXT_OFFSET: &[u8] = b"next_offset";
pub(crate) const OUTBOX_SEQ: &[u8] = b"outbox_seq";
pub(crate) const CHANGELOG_END: &[u8] = b"changelog_end";
pub(crate) const CHANGELOG_SEQ: &[u8] = b"changelog_seq";
pub(crate) const CLUSTER_ID: &[u8] = b"cluster_id";
/// The digest of the changelogged state (see [`PartitionStore::seal`]).
pub(crate) const DIGEST: &[u8] = b"digest";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled store at {path} failed: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("the store rebuilt from the changelog does not match the digest its writer recorded (recorded {recorded:016x}, rebuilt {rebuilt:016x}): the read of the changelog missed committed records; read it again")]
    IncompleteRestore { recorded: u64, rebuilt: u64 },
    #[error("stored value in `{store}` cannot be decoded ({reason}); the store is corrupt or from an incompatible version: delete it to restore from the changelog")]
    Decode { store: String, reason: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;
