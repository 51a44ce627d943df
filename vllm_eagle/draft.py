"""Draft stage: commit this step's entries into the head's KV cache, then roll the head out K times per request.

Positions (see draft_head.py for "entry"): a row whose last committed entry sits at position p drafts token p+2 from
that entry (depth 1), then runs its own entry (g_1, d_1) at p+1 to draft the token at p+3 (depth 2), and so on.
E.g. committed tokens t_0..t_9 (the bonus t_9 just sampled): the last committed entry is (f_8, t_9) at position 8;
depth 1 drafts t_10, depth 2 runs (g_1, t_10) at 9 and drafts t_11.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .draft_head import EagleHead, attend
from .draft_kv import DraftKVCache
from .features import FeatureBatch


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
    feat_rows = np.repeat(fb.query_start[rows], counts) + offsets
    positions = np.repeat(fb.start_pos[rows], counts) + offsets
    next_tokens = fb.token_ids[np.repeat(rows, counts), positions + 1]
    x = head.project(embed(torch.from_numpy(next_tokens.astype(np.int64))), fb.features[torch.from_numpy(feat_rows)])
    _, k, v = head.qkv(x, torch.from_numpy(positions))
    last = np.full(len(fb.req_ids), -1, dtype=np.int64)
    ends = np.cumsum(counts)
    for r, s, e in zip(rows, ends - counts, ends):
        kv.write(fb.req_ids[r], int(fb.start_pos[r]), k[s:e], v[s:e])
        last[r] = e - 1
    return x, last


def draft_chain(head: EagleHead, kv: DraftKVCache, req_ids: list[str], x_last: torch.Tensor, pos_last: np.ndarray,
                num_drafts: int, embed: Callable[[torch.Tensor], torch.Tensor],
                greedy_token: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Greedy chain of num_drafts tokens per request.

    x_last       [B, H]  fc output of each request's last committed entry
    pos_last     [B]     its position p (the request has committed entries 0..p in the cache)
    greedy_token         predicted features [B, H] -> most likely token ids [B] (through the shared LM head)
    ->           [B, num_drafts] int64 draft token ids
    """
    B = len(req_ids)
    lengths = (pos_last + 1).tolist()
    k_pad, v_pad = kv.scratch(req_ids, lengths, extra=num_drafts - 1)      # [B, T, nkv, hd]
    col = torch.arange(k_pad.shape[1])
    limit = torch.as_tensor(lengths)                                       # visible columns < limit
    pos = torch.as_tensor(pos_last)
    batch = torch.arange(B)
    x, drafts = x_last, []
    q, _, _ = head.qkv(x, pos)
    for depth in range(1, num_drafts + 1):
        mask = (col[None, :] < limit[:, None])[:, None, :]                 # [B, 1, T]
        g = head.finish(x, attend(q[:, None], k_pad, v_pad, mask)[:, 0])  # predicted feature, [B, H]
        token = greedy_token(g)                                            # [B]
        drafts.append(token)
        if depth == num_drafts:
            break
        # The draft's own entry (g, token) at the next position joins the scratch.
        x = head.project(embed(token), g)
        pos = pos + 1
        q, k, v = head.qkv(x, pos)
        k_pad[batch, limit] = k
        v_pad[batch, limit] = v
        limit = limit + 1
    return torch.stack(drafts, dim=1)
