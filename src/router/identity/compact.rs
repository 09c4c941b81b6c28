//! A sorted map in one exactly sized allocation, for the few entries a
//! profile has of each kind: most people have one or two click ids and no
//! external ids, where a `BTreeMap` allocates a 540-byte node for its first
//! entry and seven optional strings take 168 bytes whether set or not.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, PartialEq, Eq)]
pub struct CompactMap<K, V>(Box<[(K, V)]>);

impl<K, V> Default for CompactMap<K, V> {
    fn default() -> Self {
        CompactMap(Box::default())
    }
}

impl<K: Ord, V> CompactMap<K, V> {
    fn find<Q>(&self, key: &Q) -> Result<usize, usize>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.0.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    /// Sets `key` to `value`, in place if it is there; growing reallocates,
    /// which is rare: a profile learns a new kind of fact now and then.
    pub fn insert(&mut self, key: K, value: V) {
        match self.find(&key) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => {
                let mut v = std::mem::take(&mut self.0).into_vec();
                v.insert(i, (key, value));
                self.0 = v.into_boxed_slice();
            }
        }
    }

    pub fn remove(&mut self, key: &K) {
        if let Ok(i) = self.find(key) {
            let mut v = std::mem::take(&mut self.0).into_vec();
            v.remove(i);
            self.0 = v.into_boxed_slice();
        }
    }
}

impl<K, V> CompactMap<K, V> {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn as_slice(&self) -> &[(K, V)] {
        &self.0
    }

    /// Keeps the first `n` entries in key order.
    pub fn truncate(&mut self, n: usize) {
        if self.0.len() > n {
            let mut v = std::mem::take(&mut self.0).into_vec();
            v.truncate(n);
            self.0 = v.into_boxed_slice();
        }
    }

    /// The entries' own allocation, not what they point to.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.0)
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for CompactMap<K, V> {
    /// Of equal keys, the last one stays.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut v: Vec<(K, V)> = iter.into_iter().collect();
        // Stable: equal keys keep their order, and dedup keeps the first.
        v.reverse();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        CompactMap(v.into_boxed_slice())
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for CompactMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Serialize, V: Serialize> Serialize for CompactMap<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, K, V> Deserialize<'de> for CompactMap<K, V>
where
    K: Ord + Deserialize<'de>,
    V: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries<K, V>(PhantomData<(K, V)>);
        impl<'de, K, V> Visitor<'de> for Entries<K, V>
        where
            K: Ord + Deserialize<'de>,
            V: Deserialize<'de>,
        {
            type Value = CompactMap<K, V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0).min(16));
                while let Some(entry) = a.next_entry()? {
                    v.push(entry);
                }
                Ok(v.into_iter().collect())
            }
        }
        d.deserialize_map(Entries(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_sorted_through_inserts_and_removals() {
        let mut m = CompactMap::default();
        for (k, v) in [(3, "c"), (1, "a"), (2, "b"), (1, "A")] {
            m.insert(k, v);
        }
        assert_eq!(m.as_slice(), &[(1, "A"), (2, "b"), (3, "c")]);
        assert_eq!(m.get(&2), Some(&"b"));
        assert_eq!(m.get(&4), None);
        m.remove(&2);
        m.remove(&9);
        assert_eq!(m.as_slice(), &[(1, "A"), (3, "c")]);
        assert_eq!(m.heap_bytes(), 2 * std::mem::size_of::<(i32, &str)>());
    }

    #[test]
    fn collects_sorted_with_the_last_of_equal_keys() {
        let m: CompactMap<&str, i32> = [("b", 1), ("a", 2), ("b", 3)].into_iter().collect();
        assert_eq!(m.as_slice(), &[("a", 2), ("b", 3)]);
    }

    #[test]
    fn is_a_map_on_the_wire() {
        let m: CompactMap<String, u8> = serde_json::from_str(r#"{"z":1,"a":2,"z":3}"#).unwrap();
        assert_eq!(m.as_slice(), &[("a".into(), 2), ("z".into(), 3)]);
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"a":2,"z":3}"#);
    }
}
