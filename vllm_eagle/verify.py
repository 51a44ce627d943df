"""Verify stage: how a step's draft trees are laid out for the one target forward that checks them all.

Request r with a tree of n+1 nodes (root = node 0 = the request's first scheduled token, drafts 1..n in preorder)
occupies query rows start .. start+n and KV slots L .. L+n (L = tokens committed before the root); node i runs at
RoPE position L + depth(i) and attends to the whole prefix (slots < L) plus its ancestors (itself included).
E.g. parents [-1, 0, 1, 0], L = 7: positions [7, 8, 9, 8], slots [7, 8, 9, 10]; node 3 sees slots 0..6, 7, 10.
Requests whose drafts form a chain need none of this: vLLM's causal kernel already verifies them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import TreeBuffers


@dataclass(frozen=True)
class TreeRow:
    """One request verified as a tree this step."""
    req_index: int              # row in the runner's input batch
    req_id: str
    start: int                  # first query row (the root) in the flattened step
    prefix_len: int             # L: committed tokens before the root
    tree: TreeBuffers           # the nodes the scheduler kept (a prefix of the drafted tree)
    tokens: torch.Tensor        # [num_nodes] int64 node tokens (root: 0, a placeholder acceptance never reads)

    @property
    def num_nodes(self) -> int:
        return self.tree.num_nodes


@dataclass(frozen=True)
class TreeStep:
    """The layout of one step's trees: what verification, tree attention and acceptance read."""
    rows: tuple[TreeRow, ...]
    pos_delta: torch.Tensor     # [num_scheduled_tokens] int64: slot offset minus depth of each query row (0 off-tree)


def build_tree_step(req_ids: list[str], query_start, prefix_lens, scheduled_spec: dict, trees: dict,
                    num_tokens: int) -> TreeStep | None:
    """Lay out this step's trees. trees[req_id] = TreeBuffers the proposer drafted for it (absent for chains).

    query_start [num_reqs + 1] row offsets; prefix_lens [num_reqs] committed tokens before each root;
    scheduled_spec[req_id] = the spec tokens the scheduler kept (a tail-truncated prefix of the drafts, so the first
    n+1 nodes of the tree, still a tree since parent[i] < i). Returns None when no request is a non-chain tree.
    """
    rows, pos_delta = [], None
    for r, rid in enumerate(req_ids):
        tree, spec = trees.get(rid), scheduled_spec.get(rid, ())
        if tree is None or not spec:
            continue
        kept = tree.prefix(len(spec) + 1)
        if kept.is_chain:
            continue                                        # the kept prefix is a chain: the causal kernel verifies it
        if pos_delta is None:
            pos_delta = torch.zeros(num_tokens, dtype=torch.int64)
        start = int(query_start[r])
        pos_delta[start:start + kept.num_nodes] = torch.arange(kept.num_nodes) - kept.depth
        rows.append(TreeRow(req_index=r, req_id=rid, start=start, prefix_len=int(prefix_lens[r]), tree=kept,
                            tokens=torch.tensor([0, *spec])))
    return TreeStep(tuple(rows), pos_delta) if rows else None
