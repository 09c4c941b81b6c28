//! Exact, partition-local dedup state.
//!
//! Every event_id seen in the window is remembered as a 128-bit xxh3 hash
//! (collisions are ~2^-64 likely even at billions of keys, so dedup stays
//! exact in practice) plus the second it was first seen. The state of input
//! partition p is mirrored to partition p of the compacted dedup topic, so
//! whoever owns p next restores exactly p's keys before consuming p.
//!
//! The topic holds *chunks*: one record per batch and partition, keyed by a
//! random chunk id, holding that batch's new keys with their first-seen
//! seconds. One record per key made a restore cost one broker record per key
//! (34 s for a million keys on tansu) and doubled the records every batch
//! produced; with chunks both scale with batches instead. A chunk is
//! tombstoned as a whole once its newest key has left the window.

use std::collections::HashMap;

use xxhash_rust::xxh3::xxh3_128;

/// The key of one event_id: its xxh3-128 hash split in two words, so a map
/// slot is 24 bytes (no 16-byte alignment padding of a u128).
pub type DedupKey = [u64; 2];

/// The record key of one chunk in the dedup topic.
pub type ChunkId = [u8; 16];

/// Keys per chunk record at most: 4096 × 20 bytes stays well under every
/// broker's default record limit.
pub const CHUNK_MAX_KEYS: usize = 4096;

const CHUNK_VERSION: u8 = 1;
const ENTRY_BYTES: usize = 20;

pub fn key_of(event_id: &str) -> DedupKey {
    let h = xxh3_128(event_id.as_bytes());
    [(h >> 64) as u64, h as u64]
}

/// The dedup key of an event from a public (client) key: its source's own
/// namespace, so a guessed event_id cannot drop another source's event.
pub fn source_key_of(source: &str, event_id: &str) -> DedupKey {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(source.as_bytes());
    // A NUL cannot end a source name, so no two pairs hash the same input.
    h.update(&[0]);
    h.update(event_id.as_bytes());
    let h = h.digest128();
    [(h >> 64) as u64, h as u64]
}

/// A fresh chunk id; random, so chunks written by successive owners of a
/// partition never overwrite each other under compaction.
pub fn new_chunk_id() -> ChunkId {
    fastrand::u128(..).to_be_bytes()
}

/// A chunk record's value: a version byte, then per key its 16 hash bytes
/// and 4 bytes of first-seen seconds.
pub fn encode_chunk(entries: &[(DedupKey, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + entries.len() * ENTRY_BYTES);
    out.push(CHUNK_VERSION);
    for (k, t) in entries {
        out.extend_from_slice(&k[0].to_be_bytes());
        out.extend_from_slice(&k[1].to_be_bytes());
        out.extend_from_slice(&t.to_be_bytes());
    }
    out
}

/// The entries of a chunk value; `None` for a value this version cannot read.
pub fn decode_chunk(b: &[u8]) -> Option<Vec<(DedupKey, u32)>> {
    let (&version, body) = b.split_first()?;
    if version != CHUNK_VERSION || body.len() % ENTRY_BYTES != 0 {
        return None;
    }
    let word = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    Some(
        body.chunks_exact(ENTRY_BYTES)
            .map(|e| {
                let t = u32::from_be_bytes(e[16..].try_into().expect("4 bytes"));
                ([word(&e[..8]), word(&e[8..16])], t)
            })
            .collect(),
    )
}

/// One input partition's remembered event_ids.
#[derive(Debug, Default)]
pub struct PartitionDedup {
    /// foldhash: the keys are hashes already, SipHash's strength buys nothing.
    seen: HashMap<DedupKey, u32, foldhash::fast::RandomState>,
    /// Live chunks in the topic with their newest first-seen second, so
    /// expiry knows which to tombstone.
    chunks: Vec<(ChunkId, u32)>,
}

impl PartitionDedup {
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Whether any chunk is still to be tombstoned (or live).
    pub fn has_chunks(&self) -> bool {
        !self.chunks.is_empty()
    }

    pub fn contains(&self, k: &DedupKey) -> bool {
        self.seen.contains_key(k)
    }

    /// Adds a chunk's keys (written by this instance, or restored).
    pub fn insert_chunk(&mut self, id: ChunkId, entries: &[(DedupKey, u32)]) {
        let Some(newest) = entries.iter().map(|(_, t)| *t).max() else {
            return;
        };
        self.seen.extend(entries.iter().copied());
        self.chunks.push((id, newest));
    }

    /// Forgets the keys first seen before `oldest_live` (they can no longer
    /// match anything) and returns the chunks now wholly outside the window,
    /// which stay listed until [`Self::drop_chunks`]: their tombstones must
    /// be durable first, or a failed batch would lose them for good.
    pub fn expire(&mut self, oldest_live: u32) -> Vec<ChunkId> {
        self.seen.retain(|_, t| *t >= oldest_live);
        self.chunks
            .iter()
            .filter(|(_, newest)| *newest < oldest_live)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Unlists chunks whose tombstones are written.
    pub fn drop_chunks(&mut self, ids: &[ChunkId]) {
        self.chunks.retain(|(id, _)| !ids.contains(id));
    }

    /// Heap bytes held (map slots × (key + value) plus one control byte per
    /// slot, and the chunk list), for the state-size metric and the benchmark.
    pub fn heap_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(DedupKey, u32)>() + 1;
        (self.seen.capacity() * 8 / 7).next_power_of_two() * slot
            + self.chunks.capacity() * std::mem::size_of::<(ChunkId, u32)>()
    }
}

/// Rebuilds a partition's state from its dedup topic partition, read from
/// the beginning. Chunks are held until the end because a chunk's tombstone
/// comes after it (a broker that compacts lazily, or not at all, still
/// serves both).
#[derive(Debug, Default)]
pub struct Restore {
    chunks: HashMap<ChunkId, Vec<u8>>,
    unreadable: usize,
}

impl Restore {
    /// One record of the dedup topic; a tombstone has no value.
    pub fn record(&mut self, key: &[u8], value: Option<&[u8]>) {
        let Ok(id) = ChunkId::try_from(key) else {
            self.unreadable += 1;
            return;
        };
        match value {
            Some(v) => {
                self.chunks.insert(id, v.to_vec());
            }
            None => {
                self.chunks.remove(&id);
            }
        }
    }

    /// The state, without keys already past the window; also how many
    /// records could not be read (another version's, or damaged).
    pub fn finish(self, oldest_live: u32) -> (PartitionDedup, usize) {
        let mut state = PartitionDedup::default();
        let mut unreadable = self.unreadable;
        for (id, value) in self.chunks {
            match decode_chunk(&value) {
                Some(mut entries) => {
                    let newest = entries.iter().map(|(_, t)| *t).max().unwrap_or(0);
                    entries.retain(|(_, t)| *t >= oldest_live);
                    if entries.is_empty() {
                        // Expired while nobody held it: kept as a chunk only,
                        // so the next expiry tombstones it instead of every
                        // later restore reading it again.
                        state.chunks.push((id, newest));
                    } else {
                        state.insert_chunk(id, &entries);
                    }
                }
                None => unreadable += 1,
            }
        }
        (state, unreadable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(ids: std::ops::Range<u32>, t: u32) -> Vec<(DedupKey, u32)> {
        ids.map(|i| (key_of(&format!("evt-{i}")), t)).collect()
    }

    #[test]
    fn chunks_round_trip_through_bytes() {
        let e = vec![(key_of("evt_01JDX0007"), 1_700_000_000), (key_of("b"), 7)];
        assert_eq!(decode_chunk(&encode_chunk(&e)), Some(e));
        assert_ne!(key_of("evt_1"), key_of("evt_2"));
        assert_eq!(decode_chunk(b""), None);
        assert_eq!(decode_chunk(&[CHUNK_VERSION, 1, 2, 3]), None);
        assert_eq!(decode_chunk(&[9]), None, "unknown version");
        assert_ne!(new_chunk_id(), new_chunk_id());
    }

    #[test]
    fn restore_applies_tombstones_and_skips_expired_keys() {
        let (a, b, c) = (new_chunk_id(), new_chunk_id(), new_chunk_id());
        let mut r = Restore::default();
        r.record(&a, Some(&encode_chunk(&entries(0..3, 100))));
        r.record(&b, Some(&encode_chunk(&entries(3..6, 10))));
        r.record(&c, Some(&encode_chunk(&entries(6..9, 100))));
        r.record(&c, None);
        r.record(b"legacy-key", Some(b"1234"));
        let (state, unreadable) = r.finish(50);
        assert_eq!(unreadable, 1);
        assert_eq!(state.len(), 3);
        assert!(state.contains(&key_of("evt-0")));
        assert!(!state.contains(&key_of("evt-4")), "expired");
        assert!(!state.contains(&key_of("evt-7")), "tombstoned");
    }

    #[test]
    fn expire_drops_old_keys_and_tombstones_only_whole_chunks() {
        let mut p = PartitionDedup::default();
        let (old, mixed, new) = (new_chunk_id(), new_chunk_id(), new_chunk_id());
        p.insert_chunk(old, &entries(0..5, 10));
        let mut m = entries(5..7, 20);
        m.extend(entries(7..9, 60));
        p.insert_chunk(mixed, &m);
        p.insert_chunk(new, &entries(9..10, 70));
        assert_eq!(p.expire(50), vec![old]);
        // Until its tombstone is written, the chunk is listed (and found again).
        assert_eq!(p.expire(50), vec![old]);
        p.drop_chunks(&[old]);
        assert_eq!(p.len(), 3);
        assert!(!p.contains(&key_of("evt-5")));
        assert!(p.contains(&key_of("evt-8")));
        let mut gone = p.expire(100);
        gone.sort();
        let mut want = vec![mixed, new];
        want.sort();
        assert_eq!(gone, want);
        assert!(p.is_empty());
    }

    #[test]
    fn memory_per_key_is_within_budget() {
        let mut p = PartitionDedup::default();
        for c in 0..100u32 {
            p.insert_chunk(new_chunk_id(), &entries(c * 1000..(c + 1) * 1000, c));
        }
        let per_key = p.heap_bytes() as f64 / p.len() as f64;
        assert!(per_key <= 64.0, "{per_key} bytes/key");
    }
}
