//! A fixed-capacity LRU over 64-bit block hashes, for the history-based
//! peers' indexes (GIE's per-pod LRU of hashes, AIBrix's global table).
//!
//! Nodes live in a slab with intrusive links, so an insert or an eviction
//! is a hash-map operation and a few index writes, with no allocation once
//! the slab has grown to capacity. Only [`Lru::insert`] and [`Lru::touch`]
//! change recency: both peers' lookups leave it alone.

use fnv::FnvHashMap;

const NIL: u32 = u32::MAX;

#[derive(Debug)]
struct Node<V> {
    key: u64,
    value: V,
    /// Towards the most recent end.
    prev: u32,
    /// Towards the least recent end.
    next: u32,
}

#[derive(Debug)]
pub struct Lru<V> {
    capacity: usize,
    map: FnvHashMap<u64, u32>,
    nodes: Vec<Node<V>>,
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
}

impl<V: Default> Lru<V> {
    /// An LRU holding at most `capacity` keys (at least 1).
    pub fn new(capacity: usize) -> Lru<V> {
        Lru {
            capacity: capacity.max(1),
            map: FnvHashMap::default(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }

    /// The value of `key`, without touching its recency.
    pub fn get(&self, key: u64) -> Option<&V> {
        self.map.get(&key).map(|&i| &self.nodes[i as usize].value)
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = &self.nodes[i as usize];
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let n = &mut self.nodes[i as usize];
            n.prev = NIL;
            n.next = old;
        }
        if old == NIL {
            self.tail = i;
        } else {
            self.nodes[old as usize].prev = i;
        }
        self.head = i;
    }

    /// Makes `key` the most recent; returns whether it was present.
    pub fn touch(&mut self, key: u64) -> bool {
        match self.map.get(&key) {
            Some(&i) => {
                self.unlink(i);
                self.push_front(i);
                true
            }
            None => false,
        }
    }

    /// Makes `key` the most recent, inserting it with `V::default()` when
    /// absent; when that overflows the capacity, the least recent key is
    /// evicted and handed to `on_evict` (before `key`'s value is returned).
    pub fn insert(&mut self, key: u64, mut on_evict: impl FnMut(u64, V)) -> &mut V {
        if let Some(&i) = self.map.get(&key) {
            self.unlink(i);
            self.push_front(i);
            return &mut self.nodes[i as usize].value;
        }
        if self.map.len() >= self.capacity
            && let Some((k, v)) = self.pop_lru()
        {
            on_evict(k, v);
        }
        let node = Node {
            key,
            value: V::default(),
            prev: NIL,
            next: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.map.insert(key, i);
        self.push_front(i);
        &mut self.nodes[i as usize].value
    }

    /// The least recent key and its value, without removing it.
    pub fn peek_lru(&self) -> Option<(u64, &V)> {
        (self.tail != NIL).then(|| {
            let n = &self.nodes[self.tail as usize];
            (n.key, &n.value)
        })
    }

    /// Removes and returns the least recent key.
    pub fn pop_lru(&mut self) -> Option<(u64, V)> {
        if self.tail == NIL {
            return None;
        }
        let i = self.tail;
        self.unlink(i);
        let n = &mut self.nodes[i as usize];
        let key = n.key;
        let value = std::mem::take(&mut n.value);
        self.map.remove(&key);
        self.free.push(i);
        Some((key, value))
    }

    /// Keys from the least to the most recent.
    pub fn keys_oldest_first(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.len());
        let mut i = self.tail;
        while i != NIL {
            let n = &self.nodes[i as usize];
            out.push(n.key);
            i = n.prev;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recent_and_reports_it() {
        let mut lru: Lru<u32> = Lru::new(2);
        let mut evicted = Vec::new();
        *lru.insert(1, |k, v| evicted.push((k, v))) = 10;
        *lru.insert(2, |k, v| evicted.push((k, v))) = 20;
        assert!(lru.touch(1), "1 becomes the most recent");
        *lru.insert(3, |k, v| evicted.push((k, v))) = 30;
        assert_eq!(evicted, vec![(2, 20)]);
        assert_eq!(lru.keys_oldest_first(), vec![1, 3]);
        assert_eq!(lru.get(1), Some(&10));
        assert_eq!(lru.get(2), None);
    }

    #[test]
    fn get_does_not_refresh() {
        let mut lru: Lru<()> = Lru::new(2);
        lru.insert(1, |_, _| {});
        lru.insert(2, |_, _| {});
        assert!(lru.get(1).is_some());
        let mut evicted = Vec::new();
        lru.insert(3, |k, _| evicted.push(k));
        assert_eq!(evicted, vec![1]);
    }

    #[test]
    fn reinsert_refreshes_and_keeps_the_value() {
        let mut lru: Lru<u32> = Lru::new(3);
        *lru.insert(1, |_, _| {}) = 5;
        lru.insert(2, |_, _| {});
        assert_eq!(*lru.insert(1, |_, _| {}), 5);
        assert_eq!(lru.keys_oldest_first(), vec![2, 1]);
        assert_eq!(lru.peek_lru(), Some((2, &0)));
        assert_eq!(lru.pop_lru(), Some((2, 0)));
        assert_eq!(lru.pop_lru(), Some((1, 5)));
        assert_eq!(lru.pop_lru(), None);
        assert!(lru.is_empty());
        // Freed slots are reused.
        lru.insert(7, |_, _| {});
        assert_eq!(lru.keys_oldest_first(), vec![7]);
        assert_eq!(lru.nodes.len(), 2);
    }
}
