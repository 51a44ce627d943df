"""Pure-torch references (and the CPU implementations) of the tree kernels: slow, obviously correct.

Shapes: B requests, N node slots per request (root = node 0; nodes >= num_nodes[b] are padding), V vocabulary.
"""
from __future__ import annotations

import torch


def build_tree_masks(parent: torch.Tensor, num_nodes: torch.Tensor):
    """parent [B, N] int32 (-1 at the root, parent[i] < i), num_nodes [B] int32 ->
       depth [B, N] int32, ancestors [B, N] int64 bitsets, mask [B, N, N] bool (mask[b, i, j]: node i sees node j).
    Padding nodes get depth 0, ancestors 0 and an all-False mask row and column."""
    B, N = parent.shape
    depth = torch.zeros(B, N, dtype=torch.int32)
    anc = torch.zeros(B, N, dtype=torch.int64)
    mask = torch.zeros(B, N, N, dtype=torch.bool)
    for b in range(B):
        for i in range(int(num_nodes[b])):
            j, bits, d = i, 0, -1
            while j >= 0:
                bits |= 1 << j
                mask[b, i, j] = True
                d += 1
                j = int(parent[b, j])
            depth[b, i] = d
            anc[b, i] = bits - (1 << 64) if bits >= 1 << 63 else bits
    return depth, anc, mask


def tree_accept(cand: torch.Tensor, first_child: torch.Tensor, next_sibling: torch.Tensor,
                target_argmax: torch.Tensor, target_probs: torch.Tensor | None, uniform: torch.Tensor,
                is_greedy: torch.Tensor, max_depth: int):
    """Walk each request's tree from the root, accepting at most one child per node.

    cand           [B, N] int64  token of each node (the root's is unused)
    first_child    [B, N] int32  -1 = leaf;  next_sibling [B, N] int32, -1 = last
    target_argmax  [B, N] int64  greedy rows: accept the child whose token is the target's argmax after the node
    target_probs   [B, N, V] f32 sampled rows: processed target distribution after each node (None if all greedy)
    uniform        [B, N] f32    sampled rows: one coin per node; child c is accepted at the first sibling where
                                 u < sum of p(token) over siblings so far (point-mass drafts, EAGLE-2 Case B;
                                 strict, so a zero-probability child is never accepted)
    is_greedy      [B] bool
    -> accepted_nodes [B, max_depth + 1] int32 (root first, then the accepted path; -1 padded),
       num_accepted [B] int32 (accepted drafts, root excluded)
    """
    B = cand.shape[0]
    toks, fc, ns, want = cand.tolist(), first_child.tolist(), next_sibling.tolist(), target_argmax.tolist()
    greedy, u = is_greedy.tolist(), uniform.tolist()
    out = [[-1] * (max_depth + 1) for _ in range(B)]
    n_acc = [0] * B
    for b in range(B):
        cur, m = 0, 0
        out[b][0] = 0
        while m < max_depth:
            c, hit, s = fc[b][cur], -1, 0.0
            while c != -1 and hit == -1:
                if greedy[b]:
                    ok = toks[b][c] == want[b][cur]
                else:
                    s += float(target_probs[b, cur, toks[b][c]])
                    ok = u[b][cur] < s
                if ok:
                    hit = c
                c = ns[b][c]
            if hit == -1:
                break
            m += 1
            out[b][m] = hit
            cur = hit
        n_acc[b] = m
    out, n_acc = torch.tensor(out, dtype=torch.int32).view(B, max_depth + 1), torch.tensor(n_acc, dtype=torch.int32)
    return out, n_acc
