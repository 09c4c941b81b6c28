//! Exact, partition-local dedup state.
//!
//! Every event_id seen in the window is remembered as a 128-bit xxh3 hash
//! (collisions are ~2^-64 likely even at billions of keys, so dedup stays
//! exact in practice) plus the second it was first seen. The state of input
//! partition p is mirrored to partition p of the compacted dedup topic (key =
//! the 16 hash bytes, value = first-seen seconds), so whoever owns p next
//! restores exactly p's keys before consuming p.

use std::collections::HashMap;

use xxhash_rust::xxh3::xxh3_128;

/// The key of one event_id: its xxh3-128 hash split in two words, so a map
/// slot is 24 bytes (no 16-byte alignment padding of a u128).
pub type DedupKey = [u64; 2];

pub fn key_of(event_id: &str) -> DedupKey {
    let h = xxh3_128(event_id.as_bytes());
    [(h >> 64) as u64, h as u64]
}

/// The record key in the dedup topic.
pub fn key_bytes(k: &DedupKey) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&k[0].to_be_bytes());
    b[8..].copy_from_slice(&k[1].to_be_bytes());
    b
}

pub fn key_from_bytes(b: &[u8]) -> Option<DedupKey> {
    let b: &[u8; 16] = b.try_into().ok()?;
    let (hi, lo) = b.split_at(8);
    Some([
        u64::from_be_bytes(hi.try_into().ok()?),
        u64::from_be_bytes(lo.try_into().ok()?),
    ])
}

pub fn value_bytes(first_seen: u32) -> [u8; 4] {
    first_seen.to_be_bytes()
}

pub fn value_from_bytes(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// One input partition's remembered event_ids.
#[derive(Debug, Default)]
pub struct PartitionDedup {
    seen: HashMap<DedupKey, u32>,
}

impl PartitionDedup {
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    pub fn contains(&self, k: &DedupKey) -> bool {
        self.seen.contains_key(k)
    }

    /// Applies one restored record (a tombstone is `None`). Entries already
    /// past the window are skipped, so a broker that compacts lazily (or not
    /// at all) still restores only live keys.
    pub fn restore(&mut self, k: DedupKey, first_seen: Option<u32>, oldest_live: u32) {
        match first_seen {
            Some(t) if t >= oldest_live => {
                self.seen.insert(k, t);
            }
            _ => {
                self.seen.remove(&k);
            }
        }
    }

    pub fn insert(&mut self, k: DedupKey, first_seen: u32) {
        self.seen.insert(k, first_seen);
    }

    /// Removes and returns the keys first seen before `oldest_live`; the
    /// caller writes a tombstone for each.
    pub fn expire(&mut self, oldest_live: u32) -> Vec<DedupKey> {
        let old: Vec<DedupKey> = self
            .seen
            .iter()
            .filter(|(_, t)| **t < oldest_live)
            .map(|(k, _)| *k)
            .collect();
        for k in &old {
            self.seen.remove(k);
        }
        old
    }

    /// Heap bytes held by the map (slots × (key + value) plus one control
    /// byte per slot), for the state-size metric and the benchmark.
    pub fn heap_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(DedupKey, u32)>() + 1;
        (self.seen.capacity() * 8 / 7).next_power_of_two() * slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_bytes() {
        let k = key_of("evt_01JDX0007");
        assert_eq!(key_from_bytes(&key_bytes(&k)), Some(k));
        assert_ne!(key_of("evt_1"), key_of("evt_2"));
        assert_eq!(key_from_bytes(b"short"), None);
        assert_eq!(
            value_from_bytes(&value_bytes(1_700_000_000)),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn restore_skips_expired_entries_and_applies_tombstones() {
        let mut p = PartitionDedup::default();
        let (a, b) = (key_of("a"), key_of("b"));
        p.restore(a, Some(100), 50);
        p.restore(b, Some(10), 50);
        assert!(p.contains(&a));
        assert!(!p.contains(&b));
        p.restore(a, None, 50);
        assert!(p.is_empty());
    }

    #[test]
    fn expire_returns_exactly_the_old_keys() {
        let mut p = PartitionDedup::default();
        for i in 0..10u32 {
            p.insert(key_of(&i.to_string()), i * 10);
        }
        let mut gone = p.expire(50);
        gone.sort();
        let mut want: Vec<_> = (0..5u32).map(|i| key_of(&i.to_string())).collect();
        want.sort();
        assert_eq!(gone, want);
        assert_eq!(p.len(), 5);
    }

    #[test]
    fn memory_per_key_is_within_budget() {
        let mut p = PartitionDedup::default();
        for i in 0..100_000u32 {
            p.insert(key_of(&format!("evt-{i}")), i);
        }
        let per_key = p.heap_bytes() as f64 / p.len() as f64;
        assert!(per_key <= 64.0, "{per_key} bytes/key");
    }
}
