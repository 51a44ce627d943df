"""Verify stage: how a step's draft trees are laid out for the one target forward that checks them all.

Request r with a tree of n+1 nodes (root = node 0 = the request's first scheduled token, drafts 1..n in BFS order)
occupies query rows start .. start+n and KV slots L .. L+n (L = tokens committed before the root); node i runs at
RoPE position L + depth(i) and attends to the whole prefix (slots < L) plus its ancestors (itself included).
E.g. parents [-1, 0, 0, 1], L = 7: positions [7, 8, 8, 9], slots [7, 8, 9, 10]; node 3 sees slots 0..6, 7, 8, 10.
Requests whose drafts form a chain need none of this: vLLM's causal kernel already verifies them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TreeRow:
    """One request verified as a tree this step."""
    req_index: int              # row in the runner's input batch
    req_id: str
    start: int                  # first query row (the root) in the flattened step
    prefix_len: int             # L: committed tokens before the root
    parent: torch.Tensor        # [num_nodes] int32, -1 at the root
    tokens: torch.Tensor        # [num_nodes] int64 node tokens (root = last committed token)
    ancestors: torch.Tensor     # [num_nodes, num_nodes] bool: node i attends to node j

    @property
    def num_nodes(self) -> int:
        return self.parent.shape[0]


@dataclass
class TreeStep:
    """The trees of one step (attached to the attention metadata as `.tree`)."""
    rows: list[TreeRow]
    pos_delta: torch.Tensor     # [num_scheduled_tokens] int64: slot offset minus depth of each query row (0 off-tree)
