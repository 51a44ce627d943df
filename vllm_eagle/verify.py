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
    attention_s: float = 0.0    # wall time the attention backend spent on this step's tree rows (all layers),
    #                             beyond its kernel
    recomputed_trees: int = 0   # tree requests whose rows were recomputed (no scratch left for their paths)
    plans: dict = field(default_factory=dict)   # tree_attention plans per (block table, block size)


def build_tree_step(req_ids: list[str], query_start, prefix_lens, scheduled_spec: dict, trees: dict,
                    num_tokens: int) -> TreeStep | None:
    """Lay out this step's trees. trees[req_id] = TreeBuffers the proposer drafted for it (absent for chains).

    query_start [num_reqs + 1] row offsets; prefix_lens [num_reqs] committed tokens before each root;
    scheduled_spec[req_id] = the spec tokens the scheduler kept (a tail-truncated prefix of the drafts, so the first
    n+1 nodes of the tree, still a tree since parent[i] < i). Returns None when no request is a non-chain tree.
    """
    from kernels import build_tree_masks
    rows = []
    for r, rid in enumerate(req_ids):
        tree, n = trees.get(rid), len(scheduled_spec.get(rid, ()))
        if tree is None or n == 0:
            continue
        parent = tree.parent[: n + 1]
        if bool((parent[1:] == torch.arange(n, dtype=parent.dtype)).all()):
            continue                                        # the kept prefix is a chain: the causal kernel verifies it
        rows.append((r, rid, parent, torch.as_tensor(scheduled_spec[rid], dtype=torch.int64)))
    if not rows:
        return None
    N = max(p.shape[0] for _, _, p, _ in rows)
    parents = torch.full((len(rows), N), -1, dtype=torch.int32)
    for b, (_, _, p, _) in enumerate(rows):
        parents[b, : p.shape[0]] = p
    depth, _, mask = build_tree_masks(parents, torch.tensor([p.shape[0] for _, _, p, _ in rows], dtype=torch.int32))
    pos_delta = torch.zeros(num_tokens, dtype=torch.int64)
    out = []
    for b, (r, rid, p, spec) in enumerate(rows):
        n1, start = p.shape[0], int(query_start[r])
        pos_delta[start:start + n1] = torch.arange(n1) - depth[b, :n1].long()
        out.append(TreeRow(req_index=r, req_id=rid, start=start, prefix_len=int(prefix_lens[r]), parent=p,
                           tokens=torch.cat([spec.new_zeros(1), spec]), ancestors=mask[b, :n1, :n1].clone()))
    return TreeStep(out, pos_delta)
