"""Accept stage for trees: walk each tree from the root along the target's greedy choices (kernels.tree_accept) and
emit the accepted drafts plus the bonus token, left-aligned in vLLM's sampler output.

Vocabulary: the *accepted* nodes form a path root -> a_1 -> ... -> a_m; the *bonus* token is the target's choice after
a_m. Logits row j of a request (within its num_drafts + 1 sampled rows) is the target distribution after node j.
E.g. parents [-1, 0, 0, 1], tokens [_, 5, 6, 7], target argmax per node [6, 9, 7, 4]: root -> node 2 (token 6),
node 2's argmax 7 has no child there, so path [0, 2], output [6, 7].
"""
from __future__ import annotations

import torch

from kernels import tree_accept

from .verify import TreeStep


def accept_trees(step: TreeStep, logits: torch.Tensor, cu_num_sampled: torch.Tensor, sampled: torch.Tensor) -> dict:
    """Greedy tree acceptance for the rows of `step`, written into `sampled` in place.

    logits         [num_sampled_rows, V] target logits of every scheduled spec position (+ bonus rows)
    cu_num_sampled [num_reqs] inclusive cumulative sampled rows per request
    sampled        [num_reqs, max_spec_len + 1] int32 vLLM sampler output (-1 padded); tree rows are overwritten
    -> {req_id: accepted path [0, a_1, ..., a_m]} for KV commit and the next step's features
    """
    B, N = len(step.rows), max(r.num_nodes for r in step.rows)
    cand = torch.zeros(B, N, dtype=torch.int64)
    first_child = torch.full((B, N), -1, dtype=torch.int32)
    next_sibling = torch.full((B, N), -1, dtype=torch.int32)
    argmax = torch.zeros(B, N, dtype=torch.int64)
    for b, row in enumerate(step.rows):
        n1 = row.num_nodes
        cand[b, :n1] = row.tokens
        for i in range(n1 - 1, 0, -1):                      # reversed: siblings in ascending rank
            p = int(row.parent[i])
            next_sibling[b, i] = first_child[b, p]
            first_child[b, p] = i
        end = int(cu_num_sampled[row.req_index])
        argmax[b, :n1] = logits[end - n1:end].argmax(dim=-1)
    max_depth = N - 1
    path, num_accepted = tree_accept(cand, first_child, next_sibling, argmax, None, torch.zeros(B, N),
                                     torch.ones(B, dtype=torch.bool), max_depth)
    paths = {}
    for b, row in enumerate(step.rows):
        m = int(num_accepted[b])
        nodes = path[b, : m + 1].long()
        out = sampled[row.req_index]
        out.fill_(-1)
        out[:m] = cand[b, nodes[1:]].to(out.dtype)
        out[m] = argmax[b, nodes[-1]].to(out.dtype)       # bonus: the target's choice after the last accepted node
        paths[row.req_id] = nodes
    return paths
