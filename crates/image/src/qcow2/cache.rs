//! A bounded least-recently-used cache of metadata tables keyed by host offset,
//! with a dirty flag per table (L2 tables and refcount blocks).

use std::collections::{BTreeMap, HashMap};

struct Slot<T> {
    value: T,
    dirty: bool,
    tick: u64,
}

/// An LRU cache holding at most `capacity` tables.
pub struct TableCache<T> {
    map: HashMap<u64, Slot<T>>,
    lru: BTreeMap<u64, u64>,
    tick: u64,
    capacity: usize,
}

impl<T> TableCache<T> {
    /// A cache for at most `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            map: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            capacity: capacity.max(2),
        }
    }

    fn touch(&mut self, key: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(slot) = self.map.get_mut(&key) {
            self.lru.remove(&slot.tick);
            slot.tick = tick;
            self.lru.insert(tick, key);
        }
    }

    /// Whether `key` is cached.
    pub fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }

    /// The cached table at `key`, marking it most recently used.
    pub fn get(&mut self, key: u64) -> Option<&T> {
        if self.map.contains_key(&key) {
            self.touch(key);
        }
        self.map.get(&key).map(|s| &s.value)
    }

    /// The cached table at `key` for modification; marks it dirty.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        if self.map.contains_key(&key) {
            self.touch(key);
        }
        self.map.get_mut(&key).map(|s| {
            s.dirty = true;
            &mut s.value
        })
    }

    /// Whether inserting a new table would evict one.
    pub fn is_full(&self) -> bool {
        self.map.len() >= self.capacity
    }

    /// The least recently used entry: (key, dirty).
    pub fn victim(&self) -> Option<(u64, bool)> {
        let (_, &key) = self.lru.iter().next()?;
        self.map.get(&key).map(|s| (key, s.dirty))
    }

    /// Inserts a table (which must not be cached yet).
    pub fn insert(&mut self, key: u64, value: T, dirty: bool) {
        self.tick += 1;
        if let Some(old) = self.map.insert(
            key,
            Slot {
                value,
                dirty,
                tick: self.tick,
            },
        ) {
            self.lru.remove(&old.tick);
        }
        self.lru.insert(self.tick, key);
    }

    /// Removes a table, returning it with its dirty flag.
    pub fn remove(&mut self, key: u64) -> Option<(T, bool)> {
        let slot = self.map.remove(&key)?;
        self.lru.remove(&slot.tick);
        Some((slot.value, slot.dirty))
    }

    /// Keys of all dirty tables, in ascending order.
    pub fn dirty_keys(&self) -> Vec<u64> {
        let mut keys: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&k, _)| k)
            .collect();
        keys.sort_unstable();
        keys
    }

    /// The table at `key` without touching LRU order or the dirty flag.
    pub fn peek(&self, key: u64) -> Option<&T> {
        self.map.get(&key).map(|s| &s.value)
    }

    /// Marks a table clean (after it was written).
    pub fn mark_clean(&mut self, key: u64) {
        if let Some(s) = self.map.get_mut(&key) {
            s.dirty = false;
        }
    }

    /// Drops every table.
    pub fn clear(&mut self) {
        self.map.clear();
        self.lru.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut c = TableCache::new(2);
        c.insert(1, "a", false);
        c.insert(2, "b", true);
        assert_eq!(c.get(1), Some(&"a"));
        assert!(c.is_full());
        assert_eq!(c.victim(), Some((2, true)));
        c.remove(2);
        c.insert(3, "c", false);
        assert_eq!(c.victim(), Some((1, false)));
        assert_eq!(c.dirty_keys(), Vec::<u64>::new());
        c.get_mut(3);
        assert_eq!(c.dirty_keys(), vec![3]);
    }
}
