"""Accept stage for trees: walk each tree from the root (kernels.tree_accept) and emit the accepted drafts plus one
final token, left-aligned in vLLM's sampler output.

Vocabulary: the *accepted* nodes form a path root -> a_1 -> ... -> a_m. The final token is the *bonus* token (the
target's choice after a_m) when a_m is a leaf, or the *recovered* token when every child of a_m was rejected.
Logits row j of a request (within its num_drafts + 1 sampled rows) is the target distribution after node j.

Greedy rows accept the child whose token is the target's argmax; the final token is the argmax after a_m.
Sampled rows (lossless multi-candidate verification with point-mass drafts: each child's token is a deterministic
top-k draft, so its proposal probability is 1): at node u with target distribution p (temperature, top-k, top-p applied
exactly as vLLM's sampler does), try the children in rank order: accept child x with probability p(x) / (mass left),
else remove x from p and renormalise. One coin U per node does this: child k is accepted iff
S_{k-1} <= U < S_k with S_k = p(x_1) + .. + p(x_k). If no child is accepted, the recovered token is sampled from p
with every child's token removed; at a leaf the bonus token is sampled from p. Each emitted token is then distributed
exactly as p: P(x_k) = p(x_k), P(other y) = (1 - S) * p(y) / (1 - S) = p(y).

E.g. (greedy) parents [-1, 0, 1, 0], tokens [_, 5, 7, 6], target argmax per node [6, 9, 4, 7]: root -> node 3
(token 6), node 3's argmax 7 has no child there, so path [0, 3], output [6, 7].
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from vllm_eagle.kernels import tree_accept

from .tree import TreeBuffers
from .verify import TreeStep


@dataclass(frozen=True)
class TreeAcceptance:
    """The accept stage's decision for one step's tree rows, read by KV commit and the next step's features."""
    paths: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}))
    # req_id -> accepted nodes (0, a_1, ..., a_m), root first; absent = the request verified no tree this step


def child_tables(trees: list[TreeBuffers], N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The trees' first_child, next_sibling stacked into [B, N] int32, -1 padded (= none)."""
    first_child = torch.full((len(trees), N), -1, dtype=torch.int32)
    next_sibling = torch.full((len(trees), N), -1, dtype=torch.int32)
    for b, tree in enumerate(trees):
        first_child[b, : tree.num_nodes] = tree.first_child
        next_sibling[b, : tree.num_nodes] = tree.next_sibling
    return first_child, next_sibling


def accept_and_emit(cand: torch.Tensor, first_child: torch.Tensor, next_sibling: torch.Tensor,
                    target_argmax: torch.Tensor, target_probs: torch.Tensor | None, uniform: torch.Tensor,
                    is_greedy: torch.Tensor, generators: list[torch.Generator | None]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole accept stage on tensors (see the module docstring).

    cand [B, N] int64, first_child / next_sibling [B, N] int32, target_argmax [B, N] int64, target_probs [B, N, V]
    float32 (None if every row is greedy), uniform [B, N] float32 in [0, 1), is_greedy [B] bool, generators [B]
    (per-request RNG for the final token; None = torch's default).
    -> path [B, N] int32 (root first, -1 padded), num_accepted [B] int32, final [B] int64 (bonus or recovered).
    """
    B, N = cand.shape
    path, num_accepted = tree_accept(cand, first_child, next_sibling, target_argmax, target_probs, uniform,
                                     is_greedy, N - 1)
    last = path[torch.arange(B), num_accepted.long()].long()                                # [B] node a_m
    final = target_argmax[torch.arange(B), last].clone()
    rows = torch.nonzero(~is_greedy).flatten()                                              # [R] sampled rows
    if len(rows):
        p = target_probs[rows, last[rows]].clone()                                          # [R, V]
        c = first_child[rows, last[rows]].long()                                            # [R] children of a_m
        while bool((c >= 0).any()):                         # all of them were rejected: remove their tokens
            live = c >= 0
            p[live.nonzero().flatten(), cand[rows[live], c[live]]] = 0.0
            c = torch.where(live, next_sibling[rows, c.clamp(min=0)].long(), c)
        empty = ~(p.sum(-1) > 0)                            # rounding left no mass outside the children
        p[empty] = target_probs[rows[empty], last[rows[empty]]]
        seeded = [i for i, b in enumerate(rows.tolist()) if generators[b] is not None]
        final[rows] = torch.multinomial(p, 1)[:, 0]         # unseeded rows: torch's default generator
        for i in seeded:                                    # seeded rows: their own generator, for reproducibility
            final[rows[i]] = torch.multinomial(p[i], 1, generator=generators[int(rows[i])])[0]
    return path, num_accepted, final


def target_probs_for(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """[n, V] raw target logits of one request's nodes -> [n, V] float32 probabilities, processed as vLLM's sampler
    does (temperature, then top-k / top-p through vLLM's own apply_top_k_top_p)."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
    n = logits.shape[0]
    x = logits.float() / temperature
    k = None if top_k is None else torch.full((n,), top_k, dtype=torch.int64)
    p = None if top_p is None else torch.full((n,), top_p, dtype=torch.float32)
    return apply_top_k_top_p(x, k, p).softmax(dim=-1)


def accept_trees(step: TreeStep, logits: torch.Tensor, cu_num_sampled: torch.Tensor, sampled: torch.Tensor,
                 sampling: dict[int, tuple[float, int | None, float | None, torch.Generator | None]]
                 ) -> TreeAcceptance:
    """Tree acceptance for the rows of `step`, written into `sampled` in place.

    logits         [num_sampled_rows, V] target logits of every scheduled spec position (+ bonus rows), any float
                   dtype: greedy compares argmaxes, which widening to float32 (vLLM's sampler) does not change
    cu_num_sampled [num_reqs] inclusive cumulative sampled rows per request
    sampled        [num_reqs, max_spec_len + 1] int32 vLLM sampler output (-1 padded); tree rows are overwritten
    sampling       {req_index: (temperature, top_k, top_p, generator)} for sampled rows; absent = greedy
    -> the accepted path of each row, for KV commit and the next step's features

    Logits row of node j of tree b: end_b - n_b + j, end_b = cu_num_sampled[req_index] (its rows are its last n_b).
    E.g. cu_num_sampled [1, 5, 9], trees at requests 1 (4 nodes) and 2 (3 nodes) -> rows [[1, 2, 3, 4], [6, 7, 8, 8]]
    (padding repeats the last row; acceptance never reads a padding node).
    """
    B, N = len(step.rows), max(r.num_nodes for r in step.rows)
    ends = cu_num_sampled.tolist()
    index = torch.tensor([[ends[r.req_index] - r.num_nodes + min(j, r.num_nodes - 1) for j in range(N)]
                          for r in step.rows])                                              # [B, N]
    # One pass over every row (no gather of the tree rows: a copy as slow as the max); ties -> first index, as argmax
    argmax = logits.max(dim=-1).indices[index]                                              # [B, N]
    cand = torch.tensor([r.tokens.tolist() + [0] * (N - r.num_nodes) for r in step.rows], dtype=torch.int64)
    is_greedy = torch.tensor([r.req_index not in sampling for r in step.rows])
    probs = None if bool(is_greedy.all()) else torch.zeros(B, N, logits.shape[1])
    uniform = torch.zeros(B, N)
    generators = []
    for b, row in enumerate(step.rows):
        temperature, top_k, top_p, gen = sampling.get(row.req_index, (0.0, None, None, None))
        generators.append(gen)
        if not is_greedy[b]:
            n1, end = row.num_nodes, ends[row.req_index]
            probs[b, :n1] = target_probs_for(logits[end - n1:end], temperature, top_k, top_p)
            uniform[b, :n1] = torch.rand(n1, generator=gen, dtype=torch.float64).float()
    first_child, next_sibling = child_tables([row.tree for row in step.rows], N)
    path, num_accepted, final = accept_and_emit(cand, first_child, next_sibling, argmax, probs, uniform, is_greedy,
                                                generators)
    width, tokens, final = sampled.shape[1], cand.tolist(), final.tolist()
    paths, out = {}, []
    for b, (row, nodes, m) in enumerate(zip(step.rows, path.tolist(), num_accepted.tolist())):
        out.append([tokens[b][i] for i in nodes[1:m + 1]] + [final[b]] + [-1] * (width - m - 1))
        paths[row.req_id] = tuple(nodes[:m + 1])
    sampled[torch.tensor([r.req_index for r in step.rows])] = torch.tensor(out, dtype=sampled.dtype)
    return TreeAcceptance(MappingProxyType(paths))
