//! A bounded cache of metadata tables keyed by host offset (L2 tables, refcount
//! blocks), with a dirty flag per table. Replacement follows the CLOCK algorithm: a
//! lookup only sets a "referenced" bit, and eviction sweeps a hand over the slots,
//! giving referenced tables a second chance, so both are O(1) amortised.

use std::collections::HashMap;

struct Slot<T> {
    key: u64,
    value: T,
    dirty: bool,
    referenced: bool,
}

/// A cache holding at most `capacity` tables.
pub struct TableCache<T> {
    slots: Vec<Option<Slot<T>>>,
    index: HashMap<u64, usize>,
    free: Vec<usize>,
    hand: usize,
    capacity: usize,
}

impl<T> TableCache<T> {
    /// A cache for at most `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            slots: Vec::new(),
            index: HashMap::new(),
            free: Vec::new(),
            hand: 0,
            capacity: capacity.max(2),
        }
    }

    /// Whether `key` is cached.
    pub fn contains(&self, key: u64) -> bool {
        self.index.contains_key(&key)
    }

    fn slot_mut(&mut self, key: u64) -> Option<&mut Slot<T>> {
        let i = *self.index.get(&key)?;
        self.slots[i].as_mut()
    }

    /// The cached table at `key`, marking it recently used.
    pub fn get(&mut self, key: u64) -> Option<&T> {
        let s = self.slot_mut(key)?;
        s.referenced = true;
        Some(&s.value)
    }

    /// The cached table at `key` for modification; marks it dirty.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        let s = self.slot_mut(key)?;
        s.referenced = true;
        s.dirty = true;
        Some(&mut s.value)
    }

    /// Whether inserting a new table would evict one.
    pub fn is_full(&self) -> bool {
        self.index.len() >= self.capacity
    }

    /// The table to evict next: (key, dirty). Clears "referenced" bits as the hand
    /// passes them.
    pub fn victim(&mut self) -> Option<(u64, bool)> {
        if self.index.is_empty() {
            return None;
        }
        // Two sweeps at most: the first clears every referenced bit.
        for _ in 0..2 * self.slots.len() {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let i = self.hand;
            self.hand += 1;
            if let Some(s) = self.slots[i].as_mut() {
                if s.referenced {
                    s.referenced = false;
                } else {
                    return Some((s.key, s.dirty));
                }
            }
        }
        None
    }

    /// Inserts a table (which must not be cached yet).
    pub fn insert(&mut self, key: u64, value: T, dirty: bool) {
        if let Some(old) = self.index.get(&key).copied() {
            self.slots[old] = None;
            self.free.push(old);
        }
        let slot = Slot {
            key,
            value,
            dirty,
            referenced: true,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.index.insert(key, i);
    }

    /// Removes a table, returning it with its dirty flag.
    pub fn remove(&mut self, key: u64) -> Option<(T, bool)> {
        let i = self.index.remove(&key)?;
        let s = self.slots[i].take()?;
        self.free.push(i);
        Some((s.value, s.dirty))
    }

    /// Keys of all dirty tables, in ascending order.
    pub fn dirty_keys(&self) -> Vec<u64> {
        let mut keys: Vec<u64> = self
            .slots
            .iter()
            .flatten()
            .filter(|s| s.dirty)
            .map(|s| s.key)
            .collect();
        keys.sort_unstable();
        keys
    }

    /// The table at `key` without touching its referenced bit or dirty flag.
    pub fn peek(&self, key: u64) -> Option<&T> {
        let i = *self.index.get(&key)?;
        self.slots[i].as_ref().map(|s| &s.value)
    }

    /// Marks a table clean (after it was written).
    pub fn mark_clean(&mut self, key: u64) {
        if let Some(s) = self.slot_mut(key) {
            s.dirty = false;
        }
    }

    /// Drops every table.
    pub fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
        self.free.clear();
        self.hand = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_chance_eviction() {
        let mut c = TableCache::new(2);
        c.insert(1, "a", false);
        c.insert(2, "b", true);
        assert!(c.is_full());
        // Both were just used: the sweep clears both bits and evicts the first.
        assert_eq!(c.victim(), Some((1, false)));
        // 2 is referenced again: the next victim is 1 (its bit was cleared).
        c.get(2);
        assert_eq!(c.victim(), Some((1, false)));
        c.remove(1);
        c.insert(3, "c", false);
        assert_eq!(c.dirty_keys(), vec![2]);
        c.get_mut(3);
        assert_eq!(c.dirty_keys(), vec![2, 3]);
        c.mark_clean(2);
        assert_eq!(c.dirty_keys(), vec![3]);
        assert_eq!(c.peek(3), Some(&"c"));
    }
}
