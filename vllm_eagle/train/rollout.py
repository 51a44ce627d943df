"""Multi-step ("training-time test") rollout of the head over whole sequences in parallel.

At inference the head drafts from the last committed position p: step 1 runs entry (f_p, t_{p+1}) at position p
against committed entries 0..p; step j runs (g_{j-1}, t_{p+j}) at position p+j-1, where g_{j-1} is step j-1's
predicted feature, against committed entries 0..p plus the rollout's own step-2..j entries.

Training runs every start p of a sequence at once. Step j's query at position q belongs to the rollout that started at
p = q-j+1, so it sees:
  step-1 keys at columns c <= q-j+1     (the committed prefix; step-1 entries use true features)
  step-m keys at column  c == q-j+m     (that rollout's own entry of step m, 2 <= m <= j)
E.g. j=3, q=5: step-1 keys 0..3, the step-2 key at 4, the step-3 key at 5 (itself).
"""
from __future__ import annotations

import torch

from ..draft_head import EagleHead, attend


def rollout_mask(T: int, j: int, lengths: torch.Tensor) -> torch.Tensor:
    """lengths [B] -> mask [B, T, j*T] (True = visible) for step j over keys cat(step-1, ..., step-j)."""
    q = torch.arange(T)[:, None]
    c = torch.arange(T)[None, :]
    blocks = [c <= q - j + 1] + [c == q - j + m for m in range(2, j + 1)]
    m = torch.cat(blocks, dim=1)[None]                                   # [1, T, j*T]
    key_ok = (torch.arange(T)[None, :] < lengths[:, None]).repeat(1, j)  # [B, j*T]
    return m & key_ok[:, None, :]


def rollout(head: EagleHead, embeds_next: torch.Tensor, features: torch.Tensor, lengths: torch.Tensor,
            steps: int) -> list[torch.Tensor]:
    """Predicted features of each rollout step.

    embeds_next [B, T, H]  embedding of token t_{q+1} at row q (tokens shifted left by one)
    features    [B, T, H]  target features f_q (noise already added by the caller if training)
    lengths     [B]        valid rows per sequence
    -> steps tensors [B, T, H]: out_j[b, q] is step j's prediction of f_{q+1} for the rollout started at q-j+1
       (rows q < j-1 have no such rollout and are garbage; the loss masks them).
    """
    B, T, H = features.shape
    pos = torch.arange(T).repeat(B)
    keys, values, outs = [], [], []
    feat_in = features
    for j in range(1, steps + 1):
        x = head.project(embeds_next.reshape(B * T, H), feat_in.reshape(B * T, H))
        q, k, v = head.qkv(x, pos)
        keys.append(k.view(B, T, *k.shape[1:]))
        values.append(v.view(B, T, *v.shape[1:]))
        a = attend(q.view(B, T, *q.shape[1:]), torch.cat(keys, 1), torch.cat(values, 1), rollout_mask(T, j, lengths))
        out = head.finish(x, a.reshape(B * T, -1)).view(B, T, H)
        outs.append(out)
        feat_in = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)   # row q takes step j's row q-1
    return outs
