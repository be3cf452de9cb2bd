//! How values and times are stored: bincode for values, sortable big-endian keys for
//! times.

use crate::{Result, StoreError};
use serde::{de::DeserializeOwned, Serialize};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PartitionStore, WriteSet};

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
}
