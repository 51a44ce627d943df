"""Verify stage: how a step's draft trees are laid out for the one target forward that checks them all.

Request r with a tree of n+1 nodes (root = node 0 = the request's first scheduled token, drafts 1..n in preorder)
occupies query rows start .. start+n and KV slots L .. L+n (L = tokens committed before the root); node i runs at
RoPE position L + depth(i) and attends to the whole prefix (slots < L) plus its ancestors (itself included).
E.g. parents [-1, 0, 1, 0], L = 7: positions [7, 8, 9, 8], slots [7, 8, 9, 10]; node 3 sees slots 0..6, 7, 10.
Requests whose drafts form a chain need none of this: vLLM's causal kernel already verifies them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TreeRow:
    """One request verified as a tree this step."""
    req_index: int              # row in the runner's input batch
    req_id: str
    start: int                  # first query row (the root) in the flattened step
    prefix_len: int             # L: committed tokens before the root
    parent: torch.Tensor        # [num_nodes] int32, -1 at the root
    tokens: torch.Tensor        # [num_nodes] int64 node tokens (root: 0, a placeholder acceptance never reads)
    ancestors: torch.Tensor     # [num_nodes, num_nodes] bool: node i attends to node j

    @property
    def num_nodes(self) -> int:
        return self.parent.shape[0]


@dataclass
class TreeStep:
    """The trees of one step (attached to the attention metadata as `.tree`)."""
    rows: list[TreeRow]
    pos_delta: torch.Tensor     # [num_scheduled_tokens] int64: slot offset minus depth of each query row (0 off-tree)
    scratch: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))   # [S] block ids no
    #                             request owns (tree_attention.reserve_scratch_blocks): room for the trees' paths
    step: int = 0               # the runner's step number (consecutive steps differ by 1)
    private: dict = field(default_factory=dict)     # tree_attention.PrivateBlocks per plan key (KV cache group
    #                             and heads), kept by the runner across steps
    attention_s: float = 0.0    # wall time the attention backend spent on this step's tree rows (all layers),
    #                             beyond its kernel
    recomputed_trees: int = 0   # tree requests whose rows were recomputed (no scratch left for their paths)
    plans: dict = field(default_factory=dict)   # tree_attention plans per plan key (block table, block size, heads)


_SHAPES: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}    # parents -> (depth [n], ancestors [n, n])
_MAX_SHAPES = 4096      # dynamic trees make new shapes; a static tree has a few (its kept prefixes)


def tree_shapes(parents: list[tuple[int, ...]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(depth [n] int32, ancestors [n, n] bool) of each parent list, built by the mask kernel in one batch for the
    shapes not seen before and remembered (the cache is emptied when full). E.g. (-1, 0, 1, 0) -> depth [0, 1, 2,
    1], ancestors rows [1,0,0,0], [1,1,0,0], [1,1,1,0], [1,0,0,1]."""
    from vllm_eagle.kernels import build_tree_masks
    new = list(dict.fromkeys(p for p in parents if p not in _SHAPES))
    if new:
        if len(_SHAPES) + len(new) > _MAX_SHAPES:
            _SHAPES.clear()
            new = list(dict.fromkeys(parents))              # this call's cached shapes went with the rest
        N = max(map(len, new))
        table = torch.full((len(new), N), -1, dtype=torch.int32)
        for b, p in enumerate(new):
            table[b, : len(p)] = torch.tensor(p, dtype=torch.int32)
        depth, _, mask = build_tree_masks(table, torch.tensor([len(p) for p in new], dtype=torch.int32))
        for b, p in enumerate(new):
            _SHAPES[p] = depth[b, : len(p)].clone(), mask[b, : len(p), : len(p)].clone()
    return [_SHAPES[p] for p in parents]


def build_tree_step(req_ids: list[str], query_start, prefix_lens, scheduled_spec: dict, trees: dict,
                    num_tokens: int) -> TreeStep | None:
    """Lay out this step's trees. trees[req_id] = TreeBuffers the proposer drafted for it (absent for chains).

    query_start [num_reqs + 1] row offsets; prefix_lens [num_reqs] committed tokens before each root;
    scheduled_spec[req_id] = the spec tokens the scheduler kept (a tail-truncated prefix of the drafts, so the first
    n+1 nodes of the tree, still a tree since parent[i] < i). Returns None when no request is a non-chain tree.
    """
    rows = []
    for r, rid in enumerate(req_ids):
        tree, n = trees.get(rid), len(scheduled_spec.get(rid, ()))
        if tree is None or n == 0:
            continue
        parent = tuple(tree.parent[: n + 1].tolist())
        if parent == (-1, *range(n)):
            continue                                        # the kept prefix is a chain: the causal kernel verifies it
        rows.append((r, rid, parent, scheduled_spec[rid]))
    if not rows:
        return None
    pos_delta = torch.zeros(num_tokens, dtype=torch.int64)
    out = []
    for (r, rid, p, spec), (depth, ancestors) in zip(rows, tree_shapes([p for _, _, p, _ in rows])):
        n1, start = len(p), int(query_start[r])
        pos_delta[start:start + n1] = torch.arange(n1) - depth
        out.append(TreeRow(req_index=r, req_id=rid, start=start, prefix_len=int(prefix_lens[r]),
                           parent=torch.tensor(p, dtype=torch.int32), tokens=torch.tensor([0, *spec]),
                           ancestors=ancestors))
    return TreeStep(out, pos_delta)
