"""Draft stage: commit this step's entries into the head's KV cache, then grow a static draft tree per request.

Positions (see draft_head.py for "entry"): the root of a row's tree is its last committed entry, at position p; it
predicts g_0 and with it the tokens at p+2. A node c at depth d holds a token at position p+1+d, and its entry
(g_parent(c), token_c) runs at p+d, predicting g_c and the tokens of c's children.
E.g. committed tokens t_0..t_9 (the bonus t_9 just sampled): the root is (f_8, t_9) at position 8; its children draft
t_10 from g_0, and a child's entry (g_0, t_10) runs at 9 to draft t_11 for the grandchildren.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .draft_head import EagleHead, attend
from .draft_kv import DraftKVCache
from .features import FeatureBatch
from .tree import TreeBuffers


def commit_entries(head: EagleHead, kv: DraftKVCache, fb: FeatureBatch,
                   embed: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
    """Write the entries of every committed position of this step into the cache.

    -> x [num_entries, H]: the fc outputs of the entries (rows grouped by request, in batch order);
       last [num_reqs] int: index into x of each row's last entry (-1 for rows without entries).
    """
    rows = np.nonzero(fb.num_committed > 0)[0]
    counts = fb.num_committed[rows]
    # Flat entry i of row r: feature row query_start[r] + o, position start_pos[r] + o, next token at position + 1.
    # E.g. rows with (query_start, start_pos, count) (0, 7, 2), (3, 0, 4): offsets [0,1,0,1,2,3],
    # feature rows [0,1,3,4,5,6], positions [7,8,0,1,2,3].
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    positions = np.repeat(fb.start_pos[rows], counts) + offsets
    ends = np.cumsum(counts)
    # A row verified as a tree committed the nodes of its accepted path: entry j takes node a_j's feature row.
    # E.g. path [0, 2, 5] at query_start 3 -> feature rows [3, 5, 8] for positions L, L+1, L+2.
    row_offsets = offsets.copy()
    for r, s, e in zip(rows, ends - counts, ends):
        if r in fb.tree_paths:
            row_offsets[s:e] = fb.tree_paths[r]
    feat_rows = np.repeat(fb.query_start[rows], counts) + row_offsets
    next_tokens = fb.token_ids[np.repeat(rows, counts), positions + 1]
    source = fb.aux_features if head.eagle3 else fb.features        # EAGLE-3 fuses the captured layers
    if source is None:
        raise RuntimeError("an EAGLE-3 head needs the target's captured layers (aux_features): the worker did not "
                           "turn on capture; start the engine through vllm_eagle.speculative_kwargs")
    x = head.project(embed(torch.from_numpy(next_tokens.astype(np.int64))),
                     head.fuse(source[torch.from_numpy(feat_rows)]))
    _, k, v = head.qkv(x, torch.from_numpy(positions))
    last = np.full(len(fb.req_ids), -1, dtype=np.int64)
    for r, s, e in zip(rows, ends - counts, ends):
        kv.write(fb.req_ids[r], int(fb.start_pos[r]), k[s:e], v[s:e])
        last[r] = e - 1
    return x, last


def draft_tree(head: EagleHead, kv: DraftKVCache, req_ids: list[str], x_last: torch.Tensor, pos_last: np.ndarray,
               tree: TreeBuffers, embed: Callable[[torch.Tensor], torch.Tensor],
               topk_tokens: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Static EAGLE tree with greedy top-k children: node c takes the rank[c]-th most likely token of g_parent(c).

    x_last       [B, H]  fc output of each request's last committed entry (the root)
    pos_last     [B]     its position p (the request has committed entries 0..p in the cache)
    tree                 N = tree.num_nodes nodes, node 0 the root, the others in preorder (any parent[i] < i works)
    topk_tokens          predicted features [M, H], k -> the k most likely token ids [M, k], best first
    ->           [B, N - 1] int64 token ids of nodes 1..N-1

    One head forward per depth for the whole batch, over that depth's nodes with children only: a leaf's entry and
    feature would feed no one. A node's query sees the committed entries and its ancestors' entries, itself included.
    """
    B, N = len(req_ids), tree.num_nodes
    parent, depth, rank = tree.parent.long(), tree.depth.long(), tree.rank.long()     # [N] each
    num_children = torch.bincount(parent[1:], minlength=N)                             # [N]
    # sees[c, j]: node j is on the path root..c; the extra column N is all False (padding).
    # E.g. parents [-1, 0, 0] -> sees [[1,0,0,0], [1,1,0,0], [1,0,1,0]].
    sees = torch.cat([tree.mask, torch.zeros(N, 1, dtype=torch.bool)], dim=1)        # [N, N + 1]
    # Scratch row b: committed entries 0..p_b (entry p_b is the root's), node c's entry at column p_b + c, then
    # padding. Column j shows node clamp(j - p_b, 0, N): committed columns read as the root (every node sees the
    # root, hence all committed entries), padding as the all-False column N; leaves' columns stay unwritten and are
    # visible to no query (a leaf is nobody's ancestor and asks no query itself).
    # E.g. p = [8, 5], N = 5: T = 9 + 4 = 13; row 1's columns 0..12 show nodes [0]*6 + [1, 2, 3, 4] + [5]*3.
    pos = torch.as_tensor(pos_last)                                                    # [B]
    k_pad, v_pad = kv.scratch(req_ids, (pos_last + 1).tolist(), extra=N - 1)           # [B, T, nkv, hd]
    col_node = (torch.arange(k_pad.shape[1])[None, :] - pos[:, None]).clamp(0, N)      # [B, T]
    batch = torch.arange(B)[:, None]
    tokens = torch.zeros(B, N, dtype=torch.int64)                                      # column 0 (root) unused
    slot = torch.zeros(N, dtype=torch.int64)        # row of an expanded node in its depth's g and top

    # Depth 0 expands the root, whose entry is committed: the scratch already holds its K/V.
    expand = torch.zeros(1, dtype=torch.int64)                                         # [m] nodes with children
    x = x_last[:, None]                                                                # [B, m, H] their entries
    q = head.qkv(x_last, pos)[0][:, None]                                              # [B, m, nh, hd]
    for d in range(1, tree.max_depth + 1):
        m = len(expand)
        # masked attention -> features -> top-k, for the expanded nodes of depth d-1
        mask = sees[expand[None, :, None], col_node[:, None, :]]                       # [B, m, T]
        g = head.finish(x, attend(q, k_pad, v_pad, mask))                              # [B, m, H]
        top = topk_tokens(g.flatten(0, 1), int(num_children[expand].max())).view(B, m, -1)   # [B, m, k]
        slot[expand] = torch.arange(m)
        # tokens of depth d: node c is its parent's rank[c]-th best
        level = (depth == d).nonzero()[:, 0]
        tokens[:, level] = top[:, slot[parent[level]], rank[level]]
        if d == tree.max_depth:
            break                                                                      # the deepest nodes are leaves
        # entries (g_parent, token) at p + d of depth d's nodes with children -> their scratch K/V
        expand = level[num_children[level] > 0]
        m = len(expand)
        x = head.project(embed(tokens[:, expand].flatten()), g[:, slot[parent[expand]]].flatten(0, 1))
        q, k, v = head.qkv(x, (pos[:, None] + d).expand(B, m).flatten())
        cols = pos[:, None] + expand                                                   # [B, m]
        k_pad[batch, cols] = k.unflatten(0, (B, m)).float()
        v_pad[batch, cols] = v.unflatten(0, (B, m)).float()
        x, q = x.unflatten(0, (B, m)), q.unflatten(0, (B, m))
    return tokens[:, 1:]


def draft_chain(head: EagleHead, kv: DraftKVCache, req_ids: list[str], x_last: torch.Tensor, pos_last: np.ndarray,
                k: int, embed: Callable[[torch.Tensor], torch.Tensor],
                topk_logprobs: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
                min_logprob: float = -math.inf) -> tuple[torch.Tensor, torch.Tensor]:
    """A chain of up to k greedy drafts per request, with their confidences (the tokens of draft_tree on a chain).

    x_last [B, H] fc output of each request's root entry; pos_last [B] its position p.
    -> tokens [B, k] int64, logprob [B, k] float32: the cumulative draft log-probability of drafts 1..d (the head's
       log-softmax of its best token, summed along the chain). Drafting stops after the depth at which every row's
       logprob fell below min_logprob; the depths not drafted hold token 0 and logprob -inf.

    Depth d's query is the entry at p + d - 1 (the root's for d = 1, then the entry (g, draft d - 1)) and sees scratch
    columns 0..p + d - 1: the committed entries, then the chain's own. E.g. p = 8, k = 3: depth 1 asks from column 8,
    depth 2 writes column 9 and asks from it, depth 3 writes column 10.
    """
    B = len(req_ids)
    pos = torch.as_tensor(pos_last)                                                    # [B]
    k_pad, v_pad = kv.scratch(req_ids, (pos_last + 1).tolist(), extra=k - 1)           # [B, T, nkv, hd]
    cols = torch.arange(k_pad.shape[1])[None, :]                                       # [1, T]
    batch = torch.arange(B)
    tokens = torch.zeros(B, k, dtype=torch.int64)
    logprob = torch.full((B, k), -math.inf)
    x, q = x_last, head.qkv(x_last, pos)[0]                                            # [B, H], [B, nh, hd]
    total = torch.zeros(B)
    for d in range(1, k + 1):
        mask = cols <= (pos + d - 1)[:, None]                                          # [B, T]
        g = head.finish(x[:, None], attend(q[:, None], k_pad, v_pad, mask[:, None]))[:, 0]   # [B, H]
        lp, tok = topk_logprobs(g, 1)                                                  # [B, 1] each
        tokens[:, d - 1], total = tok[:, 0], total + lp[:, 0].float()
        logprob[:, d - 1] = total
        if d == k or bool((total < min_logprob).all()):
            break
        x = head.project(embed(tokens[:, d - 1]), g)                                   # entry (g, draft d) at p + d
        q, k_new, v_new = head.qkv(x, pos + d)
        k_pad[batch, pos + d] = k_new.float()
        v_pad[batch, pos + d] = v_new.float()
    return tokens, logprob


def draft_dynamic(head: EagleHead, kv: DraftKVCache, req_ids: list[str], x_last: torch.Tensor, pos_last: np.ndarray,
                  depth: int, top_k: int, total: int, embed: Callable[[torch.Tensor], torch.Tensor],
                  topk_logprobs: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EAGLE-2 dynamic tree: grow by cumulative draft confidence, then rerank globally.

    x_last [B, H] fc output of each request's root entry; pos_last [B] its position p.
    topk_logprobs   predicted features [M, H], k -> (draft log-probs [M, k], token ids [M, k]), best first
    Depth 1 takes the root's top_k children. Each further depth expands the frontier (the top_k nodes of the previous
    depth by score = sum of draft log-probs from the root) with one head forward and scores its top_k children each.
    Every scored node joins the candidate pool; the `total` best candidates form the tree. A child never scores above
    its parent, nor a sibling above a lower-ranked one, so with ties broken by pool order (parents and lower ranks
    first) the selection is a tree whose sibling ranks have no gaps.

    -> (selected [B, total] pool indices in ascending pool order, tokens [B, P], parent [B, P] pool index or -1 for
       the root's children, rank [B, P] top-k rank among siblings); P = top_k + (depth - 1) * top_k**2.
    E.g. top_k 2, depth 2: pool 0, 1 = the root's children; 2, 3 = node 0's (or node 1's, whichever is in the
    frontier) children, and so on.

    Scratch columns: committed entries 0..p, then the entry of frontier slot i at depth d in column p + 1 +
    (d-1)*top_k + i. A frontier node sees the committed columns and the columns of its expanded ancestors and itself.
    """
    B, K, E = len(req_ids), top_k, (depth - 1) * top_k
    pos = torch.as_tensor(pos_last)                                                    # [B]
    k_pad, v_pad = kv.scratch(req_ids, (pos_last + 1).tolist(), extra=E)               # [B, T, nkv, hd]
    T = k_pad.shape[1]
    cols = torch.arange(T)[None, :]
    committed = cols <= pos[:, None]                                                   # [B, T]
    extra_col = cols - pos[:, None] - 1                                                # [B, T] index into vis
    extra_col = torch.where((extra_col >= 0) & (extra_col < E), extra_col, E)          # E = the all-False column
    batch = torch.arange(B)[:, None]

    q = head.qkv(x_last, pos)[0][:, None]                                              # [B, 1, nh, hd]
    g = head.finish(x_last[:, None], attend(q, k_pad, v_pad, committed[:, None, :]))   # [B, 1, H]
    lp, tok = (t.view(B, K) for t in topk_logprobs(g[:, 0], K))                        # [B, K]
    pool_tok, pool_score = [tok], [lp]
    pool_parent, pool_rank = [torch.full((B, K), -1)], [torch.arange(K).expand(B, K)]
    front, front_score, front_tok = torch.arange(K).expand(B, K), lp, tok             # [B, K] pool idx, score, token
    g_parent = g.expand(B, K, -1)                                                      # [B, K, H]
    vis = torch.zeros(B, K, E + 1, dtype=torch.bool)                                   # [B, K, E + 1]
    offset = K
    for d in range(1, depth):
        # entries (g_parent, token) of the frontier, depth d, at position p + d -> scratch columns
        x = head.project(embed(front_tok.flatten()), g_parent.flatten(0, 1))           # [B*K, H]
        q, k, v = head.qkv(x, (pos[:, None] + d).expand(B, K).flatten())
        own = (d - 1) * K + torch.arange(K)                                            # [K] extra columns
        k_pad[batch, pos[:, None] + 1 + own] = k.unflatten(0, (B, K)).float()
        v_pad[batch, pos[:, None] + 1 + own] = v.unflatten(0, (B, K)).float()
        vis[:, torch.arange(K), own] = True
        mask = committed[:, None, :] | vis.gather(2, extra_col[:, None, :].expand(B, K, T))   # [B, K, T]
        g = head.finish(x.unflatten(0, (B, K)), attend(q.unflatten(0, (B, K)), k_pad, v_pad, mask))  # [B, K, H]
        lp, tok = (t.view(B, K, K) for t in topk_logprobs(g.flatten(0, 1), K))         # [B, K, K]
        score = (front_score[:, :, None] + lp).flatten(1)                              # [B, K*K]
        pool_tok.append(tok.flatten(1))
        pool_score.append(score)
        pool_parent.append(front[:, :, None].expand(B, K, K).flatten(1))
        pool_rank.append(torch.arange(K).repeat(K).expand(B, K * K))
        if d == depth - 1:
            break
        best = score.topk(K, dim=1).indices                                            # [B, K] into this depth
        slot = best // K                                                               # frontier slot of the parent
        front, front_score, front_tok = offset + best, score.gather(1, best), tok.flatten(1).gather(1, best)
        g_parent, vis = g[batch, slot], vis[batch, slot]
        offset += K * K
    scores = torch.cat(pool_score, 1)                                                  # [B, P]
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :total]                 # best first, ties: pool order
    selected = order.sort(dim=1).values                                                # [B, total]
    return selected, torch.cat(pool_tok, 1), torch.cat(pool_parent, 1), torch.cat(pool_rank, 1)


def dynamic_tree_paths(selected: list[int], parent: list[int], rank: list[int]) -> list[tuple[int, ...]]:
    """Path tuples of the selected pool nodes (ascending pool order, so parents come first).

    E.g. selected [0, 1, 2], parent [-1, -1, 0], rank [0, 1, 0] -> [(0,), (1,), (0, 0)].
    """
    path: dict[int, tuple[int, ...]] = {}
    for i in selected:
        path[i] = (path[parent[i]] if parent[i] >= 0 else ()) + (rank[i],)
    return [path[i] for i in selected]
