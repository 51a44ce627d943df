"""Multi-step ("training-time test", EAGLE-3's name) rollout of the head over whole sequences in parallel.

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

import math

import torch
import torch.nn.functional as F

from ..draft_head import EagleHead


def rollout_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """Step j = len(keys) of the rollout's attention, without materialising the [T, j*T] mask.

    q [B, T, nh, hd]; keys[m-1], values[m-1] [B, T, nkv, hd] of step m -> [B, T, nh*hd].
    Row q sees step-1 keys c <= q-j+1 (one causal product) and one key of each step m >= 2, at column q-j+m (a
    diagonal: elementwise products); both join one softmax. Rows q < j-1 (no rollout started there; the loss masks
    them) see step-1 column 0 and their in-range diagonals only, so every row stays finite.
    """
    B, T, nh, hd = q.shape
    j, rep, scale = len(keys), nh // keys[0].shape[2], 1.0 / math.sqrt(hd)
    qh = q.transpose(1, 2).float()                                                # [B, nh, T, hd]
    expand = lambda t: t.transpose(1, 2).repeat_interleave(rep, dim=1).float()    # noqa: E731  [B, nh, T, hd]
    k1, v1 = expand(keys[0]), expand(values[0])
    rows, cols = torch.arange(T)[:, None], torch.arange(T)[None, :]
    prefix = torch.matmul(qh, k1.transpose(-1, -2)) * scale                       # [B, nh, T, T]
    prefix = prefix.masked_fill(cols > (rows - j + 1).clamp(min=0), float("-inf"))
    diag_s, diag_v = [], []
    for m in range(2, j + 1):                                   # step m's key for row q sits at row q - (j - m)
        shift = j - m
        km = F.pad(expand(keys[m - 1]), (0, 0, shift, 0))[:, :, :T]              # row q <- row q - shift
        vm = F.pad(expand(values[m - 1]), (0, 0, shift, 0))[:, :, :T]
        sm = (qh * km).sum(-1, keepdim=True) * scale                             # [B, nh, T, 1]
        diag_s.append(sm.masked_fill(torch.arange(T)[:, None] < shift, float("-inf")))
        diag_v.append(vm)
    w = torch.cat([prefix] + diag_s, dim=-1).softmax(-1)                          # [B, nh, T, T + j - 1]
    out = torch.matmul(w[..., :T], v1)
    for i, vm in enumerate(diag_v):
        out = out + w[..., T + i: T + i + 1] * vm
    return out.transpose(1, 2).reshape(B, T, nh * hd).to(q.dtype)


def rollout(head: EagleHead, embeds_next: torch.Tensor, features: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Predicted features of each rollout step.

    embeds_next [B, T, H]  embedding of token t_{q+1} at row q (tokens shifted left by one)
    features    [B, T, F]  target features f_q (noise already added by the caller if training); F = 3 H_target for
                           EAGLE-3 (the captured layers, fused by the head's fc)
    -> steps tensors [B, T, H]: out_j[b, q] is step j's output g for the rollout started at q-j+1 (it predicts
       token t_{q+2}; EAGLE-1 trains it towards f_{q+1} too)
       (rows q < j-1 have no such rollout and are garbage; the loss masks them).
    """
    B, T, H = embeds_next.shape
    pos = torch.arange(T).repeat(B)
    keys, values, outs = [], [], []
    feat_in = head.fuse(features)                                     # EAGLE-3: fc over the fused layers
    for j in range(1, steps + 1):
        x = head.project(embeds_next.reshape(B * T, H), feat_in.reshape(B * T, H))
        q, k, v = head.qkv(x, pos)
        keys.append(k.view(B, T, *k.shape[1:]))
        values.append(v.view(B, T, *v.shape[1:]))
        a = rollout_attention(q.view(B, T, *q.shape[1:]), keys, values)
        out = head.finish(x, a.reshape(B * T, -1)).view(B, T, H)
        outs.append(out)
        feat_in = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)   # row q takes step j's row q-1
    return outs
