//! Where a key belongs: the Java client's partitioner, `(murmur2(key) &
//! 0x7fffffff) % partitions`, which librdkafka calls `murmur2_random`.
//!
//! The router compares every record's partition with this, so the choice is
//! part of the dedup contract: every copy of an event_id must be checked on
//! the partition this function names, whichever client published it.

/// The partition of `key` in a topic of `partitions` partitions (> 0).
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    debug_assert!(partitions > 0, "a topic has at least one partition");
    let hash = murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff;
    // Both sides are non-negative, so the remainder fits back into an i32.
    (hash % partitions.max(1) as u32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// librdkafka's own test vectors (`rdmurmur2.c`), which it checks
    /// against the Java client's results.
    #[test]
    fn hashes_as_the_java_client_does() {
        let cases: [(&str, u32); 5] = [
            ("kafka", 0xd067cf64),
            ("giberish123456789", 0x8f552b0c),
            ("1234", 0x9fc97b14),
            ("PreAmbleWillBeRemoved,ThePrePartThatIs", 0x78424f1c),
            ("", 0x106e08d9),
        ];
        for (key, want) in cases {
            assert_eq!(
                murmur2::murmur2(key.as_bytes(), murmur2::KAFKA_SEED),
                want,
                "{key:?}"
            );
            assert_eq!(
                partition_for(key.as_bytes(), 7),
                ((want & 0x7fff_ffff) % 7) as i32
            );
        }
    }

    #[test]
    fn a_hash_with_the_top_bit_set_still_gives_a_valid_partition() {
        // 0xd067cf64 has its top bit set: Java masks it rather than taking abs().
        assert_eq!(partition_for(b"kafka", 1000), 0x5067cf64 % 1000);
        for n in [1, 2, 3, 12, 1000] {
            for i in 0..500 {
                let p = partition_for(format!("evt-{i}").as_bytes(), n);
                assert!((0..n).contains(&p));
            }
        }
    }
}
