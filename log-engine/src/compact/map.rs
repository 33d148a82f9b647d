//! The cleaner's key → latest offset map: fixed capacity, allocated once.
//!
//! Open addressing with linear probing over 24-byte slots `[hash low, hash high, offset + 1]`
//! (0 in the last word marks an empty slot, so a fresh table is zeroed memory that the
//! operating system hands out lazily: only the part a pass uses becomes resident). A key is
//! stored as its 128-bit XXH3 hash, as Kafka's cleaner stores an MD5: two keys with the same
//! hash would be treated as one (probability about n² / 2¹²⁹ for n keys: nil in practice).
//!
//! The map accepts new keys until `capacity` (90% of the slots, Kafka's default load factor)
//! and then refuses them; the caller stops there and cleans only the prefix of the dirty part
//! whose keys fit, leaving the rest to the next pass. Memory never depends on the partition.

/// Bytes of one slot.
pub(crate) const SLOT_BYTES: usize = 24;
/// Fraction of slots that may be used, in percent.
const LOAD_PERCENT: usize = 90;

/// Hash of a record key.
pub(crate) fn key_hash(key: &[u8]) -> u128 {
    twox_hash::XxHash3_128::oneshot(key)
}

/// One slot: the key's hash and its latest offset + 1 (0: empty), side by side so that a
/// probe touches one cache line. A plain array, so that `vec![FREE; n]` is a zeroed
/// allocation.
type Slot = [u64; 3];

const _: () = assert!(size_of::<Slot>() == SLOT_BYTES);

const FREE: Slot = [0; 3];

#[derive(Debug)]
pub(crate) struct OffsetMap {
    slots: Vec<Slot>,
    /// Slots in use by this pass (at most `slots.len()`).
    active: usize,
    /// Slots that may be non-zero (written since they were last cleared).
    touched: usize,
    len: usize,
}

#[inline]
fn split(h: u128) -> [u64; 2] {
    [h as u64, (h >> 64) as u64]
}

impl OffsetMap {
    /// A map using at most `bytes` of memory (at least a few slots).
    pub(crate) fn with_memory(bytes: usize) -> OffsetMap {
        let slots = (bytes / SLOT_BYTES).max(4);
        let active = slots.min(16);
        OffsetMap {
            slots: vec![FREE; slots],
            active,
            touched: active,
            len: 0,
        }
    }

    /// Total slots.
    pub(crate) fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Keys this pass may hold.
    pub(crate) fn capacity(&self) -> usize {
        (self.active * LOAD_PERCENT / 100).max(1)
    }

    /// Keys held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Empties the map for a pass expected to see about `expected_keys` distinct keys: only
    /// enough slots for them are used (and cleared), so a small pass stays cache-friendly.
    pub(crate) fn reset(&mut self, expected_keys: usize) {
        let want = expected_keys
            .saturating_mul(100)
            .div_ceil(LOAD_PERCENT)
            .max(16)
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX);
        self.slots[..self.touched].fill(FREE);
        self.active = want.min(self.slots.len());
        self.touched = self.active;
        self.len = 0;
    }

    #[inline]
    fn slot(&self, h: u128) -> usize {
        // Lemire's multiply-shift range reduction of the high 64 bits.
        (((h >> 64) as u64 as u128 * self.active as u128) >> 64) as usize
    }

    /// Records `offset` as the latest for `hash`. Returns false, changing nothing, when the
    /// key is new and the map is full.
    #[inline]
    pub(crate) fn insert(&mut self, hash: u128, offset: u64) -> bool {
        let [h0, h1] = split(hash);
        let full = self.len >= self.capacity();
        let stored = offset.saturating_add(1);
        let mut i = self.slot(hash);
        loop {
            let s = &mut self.slots[i];
            if s[2] == 0 {
                if full {
                    return false;
                }
                *s = [h0, h1, stored];
                self.len += 1;
                return true;
            }
            if s[0] == h0 && s[1] == h1 {
                s[2] = s[2].max(stored);
                return true;
            }
            i += 1;
            if i == self.active {
                i = 0;
            }
        }
    }

    /// The latest offset recorded for `hash`.
    #[inline]
    pub(crate) fn get(&self, hash: u128) -> Option<u64> {
        let [h0, h1] = split(hash);
        let mut i = self.slot(hash);
        loop {
            let s = &self.slots[i];
            if s[2] == 0 {
                return None;
            }
            if s[0] == h0 && s[1] == h1 {
                return Some(s[2] - 1);
            }
            i += 1;
            if i == self.active {
                i = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn latest_offset_wins_and_capacity_is_enforced() {
        let mut m = OffsetMap::with_memory(100 * SLOT_BYTES);
        m.reset(usize::MAX);
        assert_eq!(m.capacity(), 90);
        assert!(m.insert(key_hash(b"zero"), 0), "offset 0 is a valid offset");
        assert_eq!(m.get(key_hash(b"zero")), Some(0));
        m.reset(usize::MAX);
        for i in 0..90u64 {
            assert!(m.insert(key_hash(&i.to_be_bytes()), i));
        }
        assert!(!m.insert(key_hash(b"new"), 1000), "full");
        assert_eq!(m.len(), 90);
        // Updating a known key still works when full.
        assert!(m.insert(key_hash(&5u64.to_be_bytes()), 500));
        assert_eq!(m.get(key_hash(&5u64.to_be_bytes())), Some(500));
        assert_eq!(m.get(key_hash(b"new")), None);
        m.reset(10);
        assert_eq!(m.len(), 0);
        assert_eq!(m.get(key_hash(&5u64.to_be_bytes())), None);
        assert_eq!(m.capacity(), 14, "16 slots used for 10 keys");
    }

    #[test]
    fn agrees_with_a_hashmap() {
        let mut m = OffsetMap::with_memory(1 << 16);
        m.reset(1000);
        let mut model = HashMap::new();
        let mut x = 12345u64;
        for off in 0..5000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = (x >> 54).to_be_bytes();
            let h = key_hash(&key);
            if m.insert(h, off) {
                model.insert(key, off);
            } else {
                assert!(!model.contains_key(&key));
            }
        }
        for (k, v) in &model {
            assert_eq!(m.get(key_hash(k)), Some(*v));
        }
        assert_eq!(m.len(), model.len());
    }
}
