"""The head's KV cache, owned by this package (not vLLM's paged pool).

Committed entries live per request in a growable dense tensor, written at their positions, so recomputation after
preemption simply overwrites them. Draft entries of the current step never touch it: they live in a padded scratch
built per step (`scratch`), which the draft stage extends one column per draft depth.

Why not the paged pool: vLLM's custom_class hook gets no lookahead slots and no KV-cache spec for the head; a single
1-layer head's KV is small (SmolLM2: 768 B per position in bf16), so a dense cache is cheap and step-local scratch
keeps drafts isolated from committed state.
"""
from __future__ import annotations

import torch


class DraftKVCache:
    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        self.shape, self.dtype = (num_kv_heads, head_dim), dtype
        self._kv: dict[str, torch.Tensor] = {}    # req_id -> [capacity, 2, num_kv_heads, head_dim]

    def __len__(self) -> int:
        return len(self._kv)

    def write(self, req_id: str, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, num_kv_heads, head_dim] -> positions start .. start+n-1 of req_id."""
        end = start + k.shape[0]
        buf = self._kv.get(req_id)
        if buf is None or buf.shape[0] < end:
            grown = torch.zeros(max(end, 2 * (0 if buf is None else buf.shape[0]), 256), 2, *self.shape, dtype=self.dtype)
            if buf is not None:
                grown[: buf.shape[0]] = buf
            buf = self._kv[req_id] = grown
        buf[start:end, 0] = k
        buf[start:end, 1] = v

    def free(self, req_ids) -> None:
        for r in req_ids:
            self._kv.pop(r, None)

    def scratch(self, req_ids: list[str], lengths: list[int], extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded fp32 copies of the first lengths[b] committed entries of each request, with `extra` free columns
        (fp32: drafting attention computes in fp32, see draft_head.attend; converting once here, not per depth).

        -> k, v [B, max(lengths) + extra, num_kv_heads, head_dim]; columns past a row's length are zero.
        """
        T = max(lengths) + extra
        kv = torch.zeros(len(req_ids), T, 2, *self.shape, dtype=torch.float32)
        for b, (r, n) in enumerate(zip(req_ids, lengths)):
            kv[b, :n] = self._kv[r][:n]
        return kv[:, :, 0], kv[:, :, 1]
