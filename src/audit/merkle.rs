//! The node's Merkle tree over its records (RFC 9162 §2.1), beside the hash
//! chain: leaf `i` is the chain hash of record `seq = i + 1` (its 32 raw
//! bytes), so a leaf binds the record's whole canonical content and its place.
//!
//! Leaf hash `SHA-256(0x00 || leaf)`, node hash `SHA-256(0x01 || left ||
//! right)`. The writer keeps only the tree's right edge (a compact range: one
//! hash per set bit of the size) and extends it at each checkpoint; the hashes
//! of complete subtrees of [`STORED_LEVEL`] and above are stored, so proofs
//! never need more than `2^STORED_LEVEL` leaves per block. The proof
//! algorithms here are pure: they name the ranges whose hashes a proof needs
//! ([`inclusion_ranges`], [`consistency_ranges`]); [`super::tree`] fetches them.

use aws_lc_rs::digest::{Context, SHA256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// Complete subtrees of `2^STORED_LEVEL` leaves and larger have their hash stored (default 16 leaves).
pub const STORED_LEVEL: u32 = 4;

/// `SHA-256(0x00 || leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0]);
    ctx.update(leaf);
    to_hash(ctx.finish().as_ref())
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[1]);
    ctx.update(left);
    ctx.update(right);
    to_hash(ctx.finish().as_ref())
}

/// The root of the empty tree: `SHA-256("")`.
pub fn empty_root() -> Hash {
    to_hash(aws_lc_rs::digest::digest(&SHA256, b"").as_ref())
}

fn to_hash(bytes: &[u8]) -> Hash {
    let mut h = [0; 32];
    h.copy_from_slice(bytes);
    h
}

/// Decodes a 64-digit hex hash.
pub fn from_hex(text: &str) -> Option<Hash> {
    let bytes = hex::decode(text).ok()?;
    (bytes.len() == 32).then(|| to_hash(&bytes))
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// The right edge of a tree: enough to extend it and compute its root.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompactRange {
    /// Leaves in the tree.
    pub size: u64,
    /// Roots of the complete subtrees that make up the tree, largest (leftmost) first.
    pub edge: Vec<Hash>,
}

/// A complete subtree: `2^level` leaves starting at leaf `index << level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subtree {
    /// Height (0 = a leaf).
    pub level: u32,
    /// Position among the subtrees of that height.
    pub index: u64,
}

impl CompactRange {
    /// Appends a leaf hash; returns the complete subtrees it closes, with their hashes.
    pub fn push(&mut self, leaf: Hash) -> Vec<(Subtree, Hash)> {
        let mut closed = Vec::new();
        let mut hash = leaf;
        let mut level = 0;
        let mut size = self.size;
        while size & 1 == 1 {
            let Some(left) = self.edge.pop() else { break };
            hash = node_hash(&left, &hash);
            level += 1;
            size >>= 1;
            closed.push((
                Subtree {
                    level,
                    index: self.size >> level,
                },
                hash,
            ));
        }
        self.edge.push(hash);
        self.size += 1;
        closed
    }

    /// The tree's root hash.
    pub fn root(&self) -> Hash {
        let mut it = self.edge.iter().rev();
        let Some(last) = it.next() else {
            return empty_root();
        };
        it.fold(*last, |acc, left| node_hash(left, &acc))
    }

    /// The stored form: the edge's hashes, hex, comma-separated.
    pub fn edge_text(&self) -> String {
        self.edge
            .iter()
            .map(hex::encode)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Reads the stored form back; `None` if it does not fit `size`.
    pub fn from_text(size: u64, edge: &str) -> Option<CompactRange> {
        let edge: Vec<Hash> = if edge.is_empty() {
            Vec::new()
        } else {
            edge.split(',').map(from_hex).collect::<Option<_>>()?
        };
        (edge.len() == size.count_ones() as usize).then_some(CompactRange { size, edge })
    }
}

/// The complete subtrees that make up leaves `[start, end)`, left to right,
/// where `start` is a multiple of the largest power of two not above `end - start`
/// (true of every range a proof names).
pub fn blocks(start: u64, end: u64) -> Vec<Subtree> {
    let mut out = Vec::new();
    let mut a = start;
    while a < end {
        let n = end - a;
        let mut level = 63 - n.leading_zeros();
        while level > 0 && !a.is_multiple_of(1 << level) {
            level -= 1;
        }
        out.push(Subtree {
            level,
            index: a >> level,
        });
        a += 1 << level;
    }
    out
}

/// The hash of a range from the hashes of its [`blocks`], in order.
pub fn fold_blocks(hashes: &[Hash]) -> Hash {
    let mut it = hashes.iter().rev();
    let Some(last) = it.next() else {
        return empty_root();
    };
    it.fold(*last, |acc, left| node_hash(left, &acc))
}

/// The leaf ranges whose hashes form the inclusion proof of leaf `index` in a
/// tree of `size` leaves (RFC 9162 `PATH`), in proof order.
pub fn inclusion_ranges(index: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let (mut m, mut a, mut b) = (index, 0, size);
    while b - a > 1 {
        let k = split(b - a);
        if m < k {
            out.push((a + k, b));
            b = a + k;
        } else {
            out.push((a, a + k));
            m -= k;
            a += k;
        }
    }
    out.reverse();
    out
}

/// The leaf ranges whose hashes form the consistency proof from `old` to
/// `new` leaves (RFC 9162 `SUBPROOF`), in proof order; empty when `old` is 0 or `new`.
pub fn consistency_ranges(old: u64, new: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    if old == 0 || old >= new {
        return out;
    }
    let (mut m, mut a, mut b, mut complete) = (old, 0, new, true);
    loop {
        let n = b - a;
        if m == n {
            if !complete {
                out.push((a, b));
            }
            break;
        }
        let k = split(n);
        if m <= k {
            out.push((a + k, b));
            b = a + k;
        } else {
            out.push((a, a + k));
            m -= k;
            a += k;
            complete = false;
        }
    }
    out.reverse();
    out
}

/// Checks an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode, mut r) = (index, size - 1, *leaf);
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// Checks a consistency proof from `old` to `new` leaves (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if old > new {
        return false;
    }
    if old == 0 {
        return proof.is_empty();
    }
    if old == new {
        return proof.is_empty() && old_root == new_root;
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let (mut fnode, mut snode) = (old - 1, new - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    fr == *old_root && sr == *new_root && snode == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9162 MTH, straight from the definition.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    fn range(leaves: &[Hash], (a, b): (u64, u64)) -> Hash {
        let hashes: Vec<Hash> = blocks(a, b)
            .into_iter()
            .map(|s| {
                let start = (s.index << s.level) as usize;
                mth(&leaves[start..start + (1 << s.level)])
            })
            .collect();
        assert_eq!(fold_blocks(&hashes), mth(&leaves[a as usize..b as usize]));
        fold_blocks(&hashes)
    }

    #[test]
    fn compact_range_proofs_and_verification_agree_with_the_definition() {
        let leaves: Vec<Hash> = (0..70u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut tree = CompactRange::default();
        assert_eq!(tree.root(), empty_root());
        for (i, leaf) in leaves.iter().enumerate() {
            for (s, h) in tree.push(*leaf) {
                let start = (s.index << s.level) as usize;
                assert_eq!(h, mth(&leaves[start..start + (1 << s.level)]));
            }
            assert_eq!(tree.root(), mth(&leaves[..=i]));
            let back = CompactRange::from_text(tree.size, &tree.edge_text()).unwrap();
            assert_eq!(back, tree);
        }
        for size in 1..=leaves.len() as u64 {
            let root = mth(&leaves[..size as usize]);
            for index in 0..size {
                let proof: Vec<Hash> = inclusion_ranges(index, size)
                    .into_iter()
                    .map(|r| range(&leaves, r))
                    .collect();
                assert!(verify_inclusion(
                    index,
                    size,
                    &leaves[index as usize],
                    &proof,
                    &root
                ));
                let other = leaf_hash(b"other");
                assert!(!verify_inclusion(index, size, &other, &proof, &root));
                if !proof.is_empty() {
                    let mut bad = proof.clone();
                    bad[0][0] ^= 1;
                    assert!(!verify_inclusion(
                        index,
                        size,
                        &leaves[index as usize],
                        &bad,
                        &root
                    ));
                }
            }
            for old in 0..=size {
                let old_root = mth(&leaves[..old as usize]);
                let proof: Vec<Hash> = consistency_ranges(old, size)
                    .into_iter()
                    .map(|r| range(&leaves, r))
                    .collect();
                assert!(
                    verify_consistency(old, size, &old_root, &root, &proof),
                    "{old} -> {size}"
                );
                if old > 0 && old < size {
                    let other = leaf_hash(b"fork");
                    assert!(!verify_consistency(old, size, &other, &root, &proof));
                    let mut bad = proof.clone();
                    bad[0][0] ^= 1;
                    assert!(!verify_consistency(old, size, &old_root, &root, &bad));
                }
            }
        }
    }

    #[test]
    fn known_answer_from_rfc_6962_test_vectors() {
        // The empty tree, and a one-leaf tree over the empty leaf (certificate-transparency-go testdata).
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex::encode(leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
    }
}
