//! The fields a grant names, compiled once at policy load: the policy's
//! declaration of what may be released or written, kept here so that the
//! policy never depends on the gateway that enforces it.
//!
//! A grant names fields as dotted paths (`names.surname`, `visas`); a
//! [`FieldSet`] holds them as a tree of segments. A path names a whole
//! subtree: `visas` absorbs `visas.number`. The gateway walks the tree when it
//! minimises an answer (`crate::gateway::release::minimise`).

use std::collections::BTreeMap;

/// The set of granted field paths, as a tree of path segments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet {
    pub(crate) root: Node,
    /// The granted paths in sorted order; a whole-subtree node's `leaf` indexes this.
    pub(crate) leaves: Vec<String>,
}

/// One path segment. A node with `all` set releases its whole subtree and has no children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Node {
    pub(crate) all: bool,
    /// Index into [`FieldSet::leaves`] when `all` is set, so `apply` can record presence without building strings.
    pub(crate) leaf: usize,
    pub(crate) children: BTreeMap<String, Node>,
}

impl FieldSet {
    /// Builds the tree from dotted paths; a path covers its subtree, so `visas` absorbs `visas.number`.
    /// Empty paths and empty segments are ignored (policy validation rejects them earlier).
    pub fn from_paths<S: AsRef<str>>(paths: &[S]) -> FieldSet {
        let mut root = Node::default();
        for path in paths {
            let mut node = &mut root;
            let mut any = false;
            for segment in path.as_ref().split('.').filter(|s| !s.is_empty()) {
                if node.all {
                    break;
                }
                any = true;
                node = node.children.entry(segment.to_owned()).or_default();
            }
            if any {
                node.all = true;
                node.children.clear();
            }
        }
        let mut leaves = Vec::new();
        number_leaves(&mut root, &mut String::new(), &mut leaves);
        FieldSet { root, leaves }
    }

    /// The granted paths, normalised (subsumed paths dropped) and sorted.
    pub fn paths(&self) -> Vec<String> {
        self.leaves.clone()
    }

    /// True when nothing is granted.
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    /// True when `path` lies inside a granted path (`visas.number` is covered by `visas`).
    pub fn covers(&self, path: &str) -> bool {
        self.reach(path).is_some_and(|node| node.all)
    }

    /// True when `path` and a granted path are equal or one contains the other
    /// (`visas` overlaps `visas.number` both ways).
    pub fn overlaps(&self, path: &str) -> bool {
        self.reach(path).is_some()
    }

    /// The node `path` leads to, stopping early at a granted subtree; `None` when it leaves the tree.
    fn reach(&self, path: &str) -> Option<&Node> {
        let mut node = &self.root;
        for segment in path.split('.') {
            if node.all {
                return Some(node);
            }
            node = node.children.get(segment)?;
        }
        Some(node)
    }
}

/// Assigns leaf indices in tree order, which is also the sorted order of the
/// dotted paths because `.` sorts before every character a segment may hold.
fn number_leaves(node: &mut Node, prefix: &mut String, leaves: &mut Vec<String>) {
    if node.all {
        node.leaf = leaves.len();
        leaves.push(prefix.clone());
        return;
    }
    for (name, child) in node.children.iter_mut() {
        let len = prefix.len();
        if !prefix.is_empty() {
            prefix.push('.');
        }
        prefix.push_str(name);
        number_leaves(child, prefix, leaves);
        prefix.truncate(len);
    }
}
