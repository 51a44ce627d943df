"""Tree attention masks: depth, ancestor bitsets and the node-on-node visibility mask for a batch of trees.

One program per (request, node) walks up the parents (O(depth), no cross-program dependency), as SGLang's
build_tree_efficient does. E.g. parent [-1, 0, 0, 1]: node 3 walks 3 -> 1 -> 0, so depth 2, ancestors 0b1011,
mask row [1, 1, 0, 1].
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton, use_triton

if HAS_TRITON:
    @triton.jit
    def build_tree_masks_kernel(parent_ptr,      # [B, N] int32
                                num_nodes_ptr,   # [B] int32
                                depth_ptr,       # [B, N] int32 out
                                anc_ptr,         # [B, N] int64 out
                                mask_ptr,        # [B, N, N] int8 out
                                N, MAX_DEPTH: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        i = tl.program_id(1)
        cols = tl.arange(0, BLOCK_N)
        n = tl.load(num_nodes_ptr + b)
        valid = i < n
        j = tl.where(valid, i, -1)
        bits = tl.zeros((), dtype=tl.int64)
        row = tl.zeros((BLOCK_N,), dtype=tl.int8)
        d = -1
        for _ in range(MAX_DEPTH + 1):
            live = j >= 0
            bits = bits | tl.where(live, tl.full((), 1, tl.int64) << j.to(tl.int64), 0)
            row = tl.where(live & (cols == j), 1, row).to(tl.int8)
            d = d + tl.where(live, 1, 0)
            j = tl.where(live, tl.load(parent_ptr + b * N + tl.maximum(j, 0)), -1)
        tl.store(depth_ptr + b * N + i, tl.maximum(d, 0))
        tl.store(anc_ptr + b * N + i, bits)
        tl.store(mask_ptr + (b * N + i) * N + cols, row, mask=cols < N)


def build_tree_masks_cpu(parent: torch.Tensor, num_nodes: torch.Tensor):
    """The CPU path (same contract as kernels.reference.build_tree_masks), vectorised over the batch: since
    parent[i] < i, node i's mask row is its parent's row plus itself, one [B, N] step per node.
    E.g. parent [-1, 0, 0, 1]: rows 0: [1,0,0,0], 1: row 0 + bit 1 = [1,1,0,0], 2: [1,0,1,0], 3: row 1 + bit 3."""
    B, N = parent.shape
    mask = torch.zeros(B, N, N, dtype=torch.bool)
    batch = torch.arange(B)
    p = parent.long()
    for i in range(N):
        row = mask[batch, p[:, i].clamp(min=0)] & (p[:, i] >= 0)[:, None]                 # [B, N] parent's row
        row[:, i] = True
        mask[:, i] = row & (i < num_nodes)[:, None]
    depth = (mask.sum(-1) - 1).clamp(min=0).to(torch.int32)
    anc = (mask.long() << torch.arange(N)).sum(-1)       # bit 63 wraps to the sign bit, as the reference's int64
    return depth, anc, mask


def build_tree_masks(parent: torch.Tensor, num_nodes: torch.Tensor):
    """See kernels.reference.build_tree_masks (same contract)."""
    assert parent.ndim == 2 and parent.dtype == torch.int32 and parent.is_contiguous(), parent.dtype
    assert num_nodes.shape == (parent.shape[0],) and num_nodes.dtype == torch.int32
    B, N = parent.shape
    assert N <= 64, "ancestor bitsets hold 64 nodes"
    if not use_triton(parent, num_nodes):
        return build_tree_masks_cpu(parent, num_nodes)
    depth = torch.empty(B, N, dtype=torch.int32, device=parent.device)
    anc = torch.empty(B, N, dtype=torch.int64, device=parent.device)
    mask = torch.empty(B, N, N, dtype=torch.int8, device=parent.device)
    build_tree_masks_kernel[(B, N)](parent, num_nodes, depth, anc, mask, N, MAX_DEPTH=N,
                                    BLOCK_N=triton.next_power_of_2(N))
    return depth, anc, mask.bool()
