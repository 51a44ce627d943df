"""Batched tree acceptance: one program per request walks first-child / next-sibling from the root, accepting at
most one child per node (greedy: the target's argmax; sampled: one coin per node against the running sum of the
siblings' target probabilities). The final (bonus or recovered) token is sampled by the caller at the last node."""
from __future__ import annotations

import torch

from . import reference
from ._triton import HAS_TRITON, tl, triton, use_triton

if HAS_TRITON:
    @triton.jit
    def tree_accept_kernel(cand_ptr,           # [B, N] int64
                           first_child_ptr,    # [B, N] int32
                           next_sibling_ptr,   # [B, N] int32
                           argmax_ptr,         # [B, N] int64
                           probs_ptr,          # [B, N, V] float32 (unused when all rows are greedy)
                           uniform_ptr,        # [B, N] float32
                           is_greedy_ptr,      # [B] int8
                           out_ptr,            # [B, MAX_DEPTH + 1] int32 out
                           n_acc_ptr,          # [B] int32 out
                           N, V, MAX_DEPTH: tl.constexpr, MAX_CHILDREN: tl.constexpr):
        b = tl.program_id(0)
        greedy = tl.load(is_greedy_ptr + b) != 0
        cur = tl.zeros((), dtype=tl.int32)
        m = tl.zeros((), dtype=tl.int32)
        done = tl.zeros((), dtype=tl.int1)
        tl.store(out_ptr + b * (MAX_DEPTH + 1), 0)
        for _ in range(MAX_DEPTH):
            c = tl.where(done, -1, tl.load(first_child_ptr + b * N + cur))
            want = tl.load(argmax_ptr + b * N + cur)
            u = tl.load(uniform_ptr + b * N + cur)
            hit = tl.full((), -1, tl.int32)
            s = tl.zeros((), dtype=tl.float32)
            for _k in range(MAX_CHILDREN):
                live = (c >= 0) & (hit < 0)
                cs = tl.maximum(c, 0)
                tok = tl.load(cand_ptr + b * N + cs)
                if greedy:
                    ok = tok == want
                else:
                    s += tl.where(live, tl.load(probs_ptr + (b * N + cur).to(tl.int64) * V + tok), 0.0)
                    ok = u < s
                hit = tl.where(live & ok, c, hit)
                c = tl.where(live, tl.load(next_sibling_ptr + b * N + cs), -1)
            found = hit >= 0
            m = tl.where(found, m + 1, m)
            tl.store(out_ptr + b * (MAX_DEPTH + 1) + m, hit, mask=found)
            cur = tl.where(found, hit, cur)
            done = done | (~found)
        tl.store(n_acc_ptr + b, m)


def tree_accept(cand, first_child, next_sibling, target_argmax, target_probs, uniform, is_greedy, max_depth: int):
    """See kernels.reference.tree_accept (same contract)."""
    B, N = cand.shape
    for t, dt in ((cand, torch.int64), (first_child, torch.int32), (next_sibling, torch.int32),
                  (target_argmax, torch.int64), (uniform, torch.float32)):
        assert t.shape == (B, N) and t.dtype == dt and t.is_contiguous(), (t.shape, t.dtype)
    assert is_greedy.shape == (B,) and is_greedy.dtype == torch.bool
    assert target_probs is None or (target_probs.shape[:2] == (B, N) and target_probs.dtype == torch.float32)
    if not use_triton(cand, first_child, next_sibling, target_argmax, uniform):
        return reference.tree_accept(cand, first_child, next_sibling, target_argmax, target_probs, uniform,
                                     is_greedy, max_depth)
    probs = target_probs if target_probs is not None else torch.zeros(B, N, 1, device=cand.device)
    out = torch.full((B, max_depth + 1), -1, dtype=torch.int32, device=cand.device)
    n_acc = torch.empty(B, dtype=torch.int32, device=cand.device)
    tree_accept_kernel[(B,)](cand, first_child, next_sibling, target_argmax, probs.contiguous(), uniform,
                             is_greedy.to(torch.int8), out, n_acc, N, probs.shape[2], MAX_DEPTH=max_depth,
                             MAX_CHILDREN=N)
    return out, n_acc
