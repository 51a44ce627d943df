"""Draft trees as data: Medusa-style path tuples compiled once into buffers.

A path tuple names a node by the top-k ranks taken from the root: (0,) is the root's best child, (1,) its second,
(0, 1) the second-best child of (0,). Node 0 is the root (the last committed token); the others follow in preorder
(depth first, children by rank: the paths sorted), so parent[i] < i, any prefix of the node list is itself a tree
(vLLM truncates spec tokens from the tail: the side branches go first, the best chain last), and every first-child
run is a block of consecutive nodes (tree_attention.py verifies each as one causal sequence). A chain of K is
[(0,), (0, 0), ...].

E.g. paths [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)] compile to
  node     0   1     2      3        4      5
  path     ()  (0,)  (0,0)  (0,0,0)  (0,1)  (1,)
  parent   -1  0     1      2        1      0
  depth    0   1     2      3        2      1
  rank     0   0     0      0        1      1
  first_child [1, 2, 3, -1, -1, -1]; next_sibling [-1, 5, 4, -1, -1, -1]
  ancestors (bit j = node j is on the path root..i, itself included) [0b1, 0b11, 0b111, 0b1111, 0b10011, 0b100001]
  retrieve [[0, 1, 2, 3], [0, 1, 4, -1], [0, 5, -1, -1]]: one root-to-leaf path per leaf, leaves ascending

Every later stage only indexes these buffers: verification's positions (depth) and masks (mask), acceptance's walk
(first_child, next_sibling), tree attention's paths (retrieve). A tree the scheduler cut to its first n nodes is
`tree.prefix(n)`, itself compiled once: compile_tree remembers what it compiled (a static tree and its prefixes are
a handful of shapes; dynamic trees repeat theirs).
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass

import torch

MAX_TREE_NODES = 64          # root included: ancestor sets are one int64 bitset per node


class TreeSpecError(ValueError):
    """A tree description that cannot be compiled; the message names the offending path."""


@dataclass(frozen=True)
class TreeBuffers:
    """One tree, num_nodes = len(paths) + 1 (root first). Dynamic trees produce the same type each step."""
    paths: tuple[tuple[int, ...], ...]   # [num_nodes] node paths, root = ()
    parent: torch.Tensor                 # [num_nodes] int32, -1 at the root
    depth: torch.Tensor                  # [num_nodes] int32
    rank: torch.Tensor                   # [num_nodes] int32: top-k rank among siblings (0 at the root)
    ancestors: torch.Tensor              # [num_nodes] int64 bitset: bit j set iff node j is on the path root..i
    mask: torch.Tensor                   # [num_nodes, num_nodes] bool: mask[i, j] iff node j is on the path root..i
    first_child: torch.Tensor            # [num_nodes] int32, -1 = leaf
    next_sibling: torch.Tensor           # [num_nodes] int32, -1 = last sibling (siblings in ascending rank)
    retrieve: torch.Tensor               # [num_leaves, max_depth + 1] int32: root..leaf node paths, -1 padded

    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @property
    def is_chain(self) -> bool:
        return self.num_nodes == self.max_depth + 1

    def prefix(self, num_nodes: int) -> "TreeBuffers":
        """The first num_nodes nodes (root included): still a tree, since parent[i] < i."""
        return self if num_nodes == self.num_nodes else compile_tree(self.paths[1:num_nodes])


def parse_paths(spec: str | list) -> list[tuple[int, ...]]:
    """'[(0,), (1,), (0, 0)]' (or the list itself) -> list of tuples, validated."""
    try:
        paths = ast.literal_eval(spec) if isinstance(spec, str) else spec
        paths = [tuple(p) for p in paths]
    except (ValueError, SyntaxError, TypeError):
        raise TreeSpecError(f"tree {spec!r} is not a list of path tuples such as '[(0,), (1,), (0, 0)]'") from None
    for p in paths:
        if not p or not all(isinstance(r, int) and r >= 0 for r in p):
            raise TreeSpecError(f"tree path {p!r} must be a non-empty tuple of non-negative ranks")
    return paths


def child_links(parent: list[int]) -> tuple[list[int], list[int]]:
    """parent (-1 at the root, parent[i] < i) -> (first_child, next_sibling), -1 = none; siblings in ascending node
    order, which is ascending rank. E.g. [-1, 0, 0, 1] -> first_child [1, 3, -1, -1], next_sibling [-1, 2, -1, -1]."""
    first_child, next_sibling = [-1] * len(parent), [-1] * len(parent)
    for i in range(len(parent) - 1, 0, -1):                # reversed, so siblings end up in ascending rank
        next_sibling[i] = first_child[parent[i]]
        first_child[parent[i]] = i
    return first_child, next_sibling


def compile_tree(spec: str | list | tuple) -> TreeBuffers:
    """Path tuples (or their string) -> TreeBuffers, nodes in preorder; the same paths return the same buffers."""
    return _compile(tuple(sorted(parse_paths(spec))))


@functools.lru_cache(maxsize=4096)
def _compile(paths: tuple[tuple[int, ...], ...]) -> TreeBuffers:
    from vllm_eagle.kernels import build_tree_masks
    if len(set(paths)) != len(paths):
        raise TreeSpecError(f"tree has duplicate paths: {sorted(p for p in set(paths) if paths.count(p) > 1)}")
    if len(paths) + 1 > MAX_TREE_NODES:
        raise TreeSpecError(f"tree has {len(paths)} nodes; at most {MAX_TREE_NODES - 1} are supported")
    order = [(), *paths]                                   # preorder: the paths sorted
    index = {p: i for i, p in enumerate(order)}
    for p in paths:
        if p[:-1] not in index:
            raise TreeSpecError(f"tree path {p!r} has no parent {p[:-1]!r} in the tree")
        if p[-1] > 0 and p[:-1] + (p[-1] - 1,) not in index:
            raise TreeSpecError(f"tree path {p!r} skips rank {p[-1] - 1} of its parent's children")
    n = len(order)
    parent = [-1] + [index[p[:-1]] for p in paths]
    depth, ancestors, mask = build_tree_masks(torch.tensor([parent], dtype=torch.int32),
                                              torch.tensor([n], dtype=torch.int32))
    first_child, next_sibling = child_links(parent)
    leaves = [i for i in range(n) if first_child[i] == -1]
    retrieve = torch.full((len(leaves), int(depth.max()) + 1), -1, dtype=torch.int32)
    for r, leaf in enumerate(leaves):
        path = mask[0, leaf].nonzero().flatten()             # root..leaf, ascending (= root first)
        retrieve[r, : len(path)] = path.to(torch.int32)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)      # noqa: E731
    return TreeBuffers(tuple(order), i32(parent), depth[0], i32([p[-1] if p else 0 for p in order]), ancestors[0],
                       mask[0], i32(first_child), i32(next_sibling), retrieve)


@functools.lru_cache(maxsize=None)
def chain(k: int) -> TreeBuffers:
    return compile_tree([(0,) * d for d in range(1, k + 1)])
