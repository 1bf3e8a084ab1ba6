//! SGLang's approximate radix tree (sgl-router `tree.rs`), over token ids:
//! one tree for all workers ("tenants"), each node recording which tenants
//! inserted a path through it and when they last touched it, with
//! per-tenant size accounting and the size-bounded eviction sweep.
//!
//! Edges are compressed and hold no copy of their tokens: an edge is a
//! range of the `Arc<[u32]>` prompt that created it (the simulator shares
//! prompts between policies already), so inserting ~60M prompt tokens costs
//! one comparison per token and one node per branch point.

use super::PodIndex;
use super::rng::SplitMix64;
use fnv::FnvHashMap;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

const ROOT: u32 = 0;

#[derive(Debug)]
struct Node {
    parent: u32,
    src: Arc<[u32]>,
    start: u32,
    len: u32,
    children: FnvHashMap<u32, u32>,
    /// `(tenant, last access)`; a tenant on a node is on all its ancestors.
    tenants: Vec<(PodIndex, f64)>,
}

impl Node {
    fn label(&self) -> &[u32] {
        &self.src[self.start as usize..(self.start + self.len) as usize]
    }

    fn has(&self, t: PodIndex) -> bool {
        self.tenants.iter().any(|&(x, _)| x == t)
    }

    /// Sets `t`'s access time; returns whether `t` was new here.
    fn touch(&mut self, t: PodIndex, ts: f64) -> bool {
        match self.tenants.iter_mut().find(|(x, _)| *x == t) {
            Some(e) => {
                e.1 = ts;
                false
            }
            None => {
                self.tenants.push((t, ts));
                true
            }
        }
    }
}

/// An eviction candidate, ordered oldest first (then by push order, so the
/// sweep is deterministic).
#[derive(Debug, PartialEq)]
struct Leaf {
    ts: f64,
    seq: u64,
    tenant: PodIndex,
    node: u32,
}

impl Eq for Leaf {}

impl Ord for Leaf {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap and the oldest must pop first.
        other.ts.total_cmp(&self.ts).then(other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Leaf {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Debug)]
pub struct RadixTree {
    nodes: Vec<Node>,
    free: Vec<u32>,
    /// Tokens each tenant holds (the sum of its nodes' edge lengths).
    tenant_tokens: Vec<u64>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl RadixTree {
    pub fn new(tenants: usize) -> RadixTree {
        RadixTree {
            nodes: vec![Node {
                parent: ROOT,
                src: Arc::from(Vec::new()),
                start: 0,
                len: 0,
                children: FnvHashMap::default(),
                tenants: Vec::new(),
            }],
            free: Vec::new(),
            tenant_tokens: vec![0; tenants],
        }
    }

    /// Tokens held by `tenant` (SGLang counts characters: multiply by the
    /// characters per token).
    pub fn tenant_tokens(&self, tenant: PodIndex) -> u64 {
        self.tenant_tokens.get(tenant).copied().unwrap_or(0)
    }

    pub fn tenant_sizes(&self) -> &[u64] {
        &self.tenant_tokens
    }

    /// Live nodes, root included.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    fn alloc(&mut self, node: Node) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    fn add_tokens(&mut self, tenant: PodIndex, n: u64) {
        if tenant >= self.tenant_tokens.len() {
            self.tenant_tokens.resize(tenant + 1, 0);
        }
        self.tenant_tokens[tenant] += n;
    }

    /// Records that `tenant` was sent `text` at `ts`.
    pub fn insert(&mut self, text: &Arc<[u32]>, tenant: PodIndex, ts: f64) {
        let mut cur = ROOT;
        let mut idx = 0usize;
        while idx < text.len() {
            let first = text[idx];
            let Some(&child) = self.nodes[cur as usize].children.get(&first) else {
                let len = text.len() - idx;
                let node = self.alloc(Node {
                    parent: cur,
                    src: Arc::clone(text),
                    start: idx as u32,
                    len: len as u32,
                    children: FnvHashMap::default(),
                    tenants: vec![(tenant, ts)],
                });
                self.nodes[cur as usize].children.insert(first, node);
                self.add_tokens(tenant, len as u64);
                return;
            };
            let shared = common_prefix(self.nodes[child as usize].label(), &text[idx..]);
            let node = if shared < self.nodes[child as usize].len as usize {
                self.split(cur, child, shared)
            } else {
                child
            };
            if self.nodes[node as usize].touch(tenant, ts) {
                let len = u64::from(self.nodes[node as usize].len);
                self.add_tokens(tenant, len);
            }
            cur = node;
            idx += shared;
        }
    }

    /// Splits `child` (of `parent`) after `at` tokens; returns the new upper
    /// node, which inherits `child`'s tenants (sizes are unchanged: the two
    /// parts sum to the old edge).
    fn split(&mut self, parent: u32, child: u32, at: usize) -> u32 {
        let (src, start, tenants, first) = {
            let c = &self.nodes[child as usize];
            (Arc::clone(&c.src), c.start, c.tenants.clone(), c.label()[0])
        };
        let upper = self.alloc(Node {
            parent,
            src,
            start,
            len: at as u32,
            children: FnvHashMap::default(),
            tenants,
        });
        let c = &mut self.nodes[child as usize];
        c.start += at as u32;
        c.len -= at as u32;
        c.parent = upper;
        let lower_first = c.label()[0];
        self.nodes[upper as usize]
            .children
            .insert(lower_first, child);
        self.nodes[parent as usize].children.insert(first, upper);
        upper
    }

    /// The longest match of `text` in the tree (any tenant), and one tenant
    /// of the deepest node reached (chosen with `rng`: SGLang takes an
    /// arbitrary one), whose access times along the path are refreshed.
    pub fn prefix_match(
        &mut self,
        text: &[u32],
        ts: f64,
        rng: &mut SplitMix64,
    ) -> (usize, Option<PodIndex>) {
        let mut cur = ROOT;
        let mut last = ROOT;
        let mut idx = 0usize;
        while idx < text.len() {
            let Some(&child) = self.nodes[cur as usize].children.get(&text[idx]) else {
                break;
            };
            let node = &self.nodes[child as usize];
            let shared = common_prefix(node.label(), &text[idx..]);
            idx += shared;
            last = child;
            if shared < node.len as usize {
                break;
            }
            cur = child;
        }
        if last == ROOT {
            return (idx, None);
        }
        let tenants = &self.nodes[last as usize].tenants;
        if tenants.is_empty() {
            return (idx, None);
        }
        let tenant = tenants[rng.below(tenants.len())].0;
        let mut n = last;
        while n != ROOT {
            self.nodes[n as usize].touch(tenant, ts);
            n = self.nodes[n as usize].parent;
        }
        (idx, Some(tenant))
    }

    fn is_leaf_for(&self, node: u32, tenant: PodIndex) -> bool {
        let n = &self.nodes[node as usize];
        n.has(tenant)
            && !n
                .children
                .values()
                .any(|&c| self.nodes[c as usize].has(tenant))
    }

    /// sgl-router's `evict_tenant_by_size`: for every tenant above
    /// `max_tokens`, drop its leaves, least recently accessed first, until
    /// it is back under; a node no tenant holds any more is removed.
    pub fn evict_by_size(&mut self, max_tokens: u64) {
        if self.tenant_tokens.iter().all(|&t| t <= max_tokens) {
            return;
        }
        let mut heap = BinaryHeap::new();
        let mut seq = 0u64;
        let mut stack = vec![ROOT];
        while let Some(i) = stack.pop() {
            let node = &self.nodes[i as usize];
            stack.extend(node.children.values().copied());
            if i == ROOT {
                continue;
            }
            for &(t, ts) in &node.tenants {
                if self.tenant_tokens[t] > max_tokens && self.is_leaf_for(i, t) {
                    heap.push(Leaf {
                        ts,
                        seq,
                        tenant: t,
                        node: i,
                    });
                    seq += 1;
                }
            }
        }
        while let Some(Leaf { tenant, node, .. }) = heap.pop() {
            if self.tenant_tokens[tenant] <= max_tokens {
                continue;
            }
            let n = &mut self.nodes[node as usize];
            let Some(pos) = n.tenants.iter().position(|&(x, _)| x == tenant) else {
                continue;
            };
            n.tenants.swap_remove(pos);
            let len = u64::from(n.len);
            let parent = n.parent;
            self.tenant_tokens[tenant] = self.tenant_tokens[tenant].saturating_sub(len);
            if n.tenants.is_empty() && n.children.is_empty() {
                let first = n.label()[0];
                self.nodes[parent as usize].children.remove(&first);
                self.nodes[node as usize].src = Arc::from(Vec::new());
                self.free.push(node);
            }
            if parent != ROOT && self.is_leaf_for(parent, tenant) {
                let ts = self.nodes[parent as usize]
                    .tenants
                    .iter()
                    .find(|&&(x, _)| x == tenant)
                    .map_or(0.0, |&(_, ts)| ts);
                heap.push(Leaf {
                    ts,
                    seq,
                    tenant,
                    node: parent,
                });
                seq += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: &[u32]) -> Arc<[u32]> {
        Arc::from(v.to_vec())
    }

    #[test]
    fn insert_splits_edges_and_counts_each_tenants_tokens() {
        let mut t = RadixTree::new(2);
        t.insert(&text(&[1, 2, 3, 4]), 0, 1.0);
        t.insert(&text(&[1, 2, 9]), 1, 2.0);
        // Edges: [1 2] {0, 1}, [3 4] {0}, [9] {1}.
        assert_eq!(t.tenant_tokens(0), 4);
        assert_eq!(t.tenant_tokens(1), 3);
        assert_eq!(t.node_count(), 4);
        // Re-inserting adds nothing.
        t.insert(&text(&[1, 2, 3, 4]), 0, 3.0);
        assert_eq!(t.tenant_tokens(0), 4);
        // Tenant 1 extends over tenant 0's branch: [3 4] gains tenant 1.
        t.insert(&text(&[1, 2, 3, 4, 5]), 1, 4.0);
        assert_eq!(t.tenant_tokens(1), 3 + 2 + 1);
    }

    #[test]
    fn prefix_match_counts_partial_edges_and_returns_a_holder() {
        let mut t = RadixTree::new(2);
        let mut rng = SplitMix64::new(1);
        t.insert(&text(&[1, 2, 3, 4]), 0, 1.0);
        t.insert(&text(&[1, 2, 9]), 1, 1.0);
        assert_eq!(t.prefix_match(&[1, 2, 3, 7], 2.0, &mut rng), (3, Some(0)));
        assert_eq!(t.prefix_match(&[1, 2, 9, 9], 2.0, &mut rng), (3, Some(1)));
        assert_eq!(t.prefix_match(&[5], 2.0, &mut rng), (0, None));
        // Stopping exactly at the end of the shared [1 2] edge: either.
        let (len, who) = t.prefix_match(&[1, 2], 2.0, &mut rng);
        assert_eq!(len, 2);
        assert!(who.is_some());
    }

    #[test]
    fn eviction_drops_the_oldest_leaves_of_oversized_tenants_only() {
        let mut t = RadixTree::new(2);
        t.insert(&text(&[1, 1, 1]), 0, 1.0);
        t.insert(&text(&[2, 2, 2]), 0, 5.0);
        t.insert(&text(&[3, 3, 3, 3, 3]), 1, 0.5);
        assert_eq!(t.tenant_sizes(), &[6, 5]);
        // Cap 5: tenant 0 (6) loses its oldest leaf [1 1 1]; tenant 1 (5)
        // is not above the cap and keeps its older leaf.
        t.evict_by_size(5);
        assert_eq!(t.tenant_sizes(), &[3, 5]);
        let mut rng = SplitMix64::new(1);
        assert_eq!(t.prefix_match(&[1, 1, 1], 6.0, &mut rng), (0, None));
        assert_eq!(t.prefix_match(&[2, 2, 2], 6.0, &mut rng), (3, Some(0)));
        assert_eq!(t.node_count(), 3);
    }

    #[test]
    fn eviction_walks_up_from_leaves_and_keeps_shared_nodes() {
        let mut t = RadixTree::new(2);
        // [7 7] shared by both; tenant 0 also has [8 8 8] below it and a
        // newer [9].
        t.insert(&text(&[7, 7, 8, 8, 8]), 0, 1.0);
        t.insert(&text(&[7, 7]), 1, 2.0);
        t.insert(&text(&[9]), 0, 10.0);
        assert_eq!(t.tenant_sizes(), &[6, 2]);
        // Cap 2: tenant 0 loses [8 8 8] (ts 1, node removed), which makes
        // [7 7] (ts 1) its leaf: that goes before [9] (ts 10), and the node
        // stays for tenant 1. At 1 token tenant 0 is under the cap.
        t.evict_by_size(2);
        assert_eq!(t.tenant_sizes(), &[1, 2]);
        let mut rng = SplitMix64::new(1);
        assert_eq!(t.prefix_match(&[7, 7, 8], 11.0, &mut rng), (2, Some(1)));
        assert_eq!(t.prefix_match(&[9], 11.0, &mut rng), (1, Some(0)));
    }

    #[test]
    fn a_recent_access_protects_a_leaf() {
        let mut t = RadixTree::new(1);
        let mut rng = SplitMix64::new(1);
        t.insert(&text(&[1, 1]), 0, 1.0);
        t.insert(&text(&[2, 2]), 0, 2.0);
        // Matching [1 1] at t = 3 refreshes it: [2 2] is now the oldest.
        t.prefix_match(&[1, 1], 3.0, &mut rng);
        t.evict_by_size(2);
        assert_eq!(t.prefix_match(&[2, 2], 4.0, &mut rng), (0, None));
        assert_eq!(t.prefix_match(&[1, 1], 4.0, &mut rng), (2, Some(0)));
    }
}
