"""Tree attention on vLLM's CPU backend: the stock kernel for every row, then exact recomputation of the tree rows.

vLLM's CPU kernel only knows causal masks, under which tree node i would see every node before it in BFS order,
siblings included. So after the kernel has run, the tree rows of all TreeRows are recomputed together, one torch SDPA
(fp32) per layer over each request's prefix (gathered from the paged cache in whole blocks, kv_layout.py) plus the
tree's own K/V (this step's `key`/`value`), masked by the ancestors. Rows are padded to the step's largest tree and
prefix; what the layers share (pages, query rows, mask) is planned once per step. Cost: one extra attention over
prefix + tree for tree requests only; chains and other requests keep the kernel's output untouched. See verify.py
for the layout of a tree step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm.v1.attention.backend import AttentionLayer, AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata)

from .kv_layout import gather_kv
from .verify import TreeRow, TreeStep

_BACKEND_PATH = "vllm_eagle.tree_attention.TreeCPUAttentionBackend"


class TreeCPUAttentionImpl(CPUAttentionBackendImpl):

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,            # [num_tokens, num_heads, head_size]
        key: torch.Tensor,              # [num_tokens, num_kv_heads, head_size], already in kv_cache
        value: torch.Tensor,            # [num_tokens, num_kv_heads, head_size], already in kv_cache
        kv_cache: torch.Tensor,         # [num_blocks, num_kv_heads, block_size, 2 * head_size]
        attn_metadata: CPUAttentionMetadata | None,
        output: torch.Tensor,           # [num_tokens, num_heads, head_size] (or [num_tokens, num_heads * head_size])
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        args = (layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        tree = getattr(attn_metadata, "tree", None)
        if not isinstance(tree, TreeStep):
            return super().forward(*args)
        self._check_tree_supported()
        super().forward(*args)                  # every row, tree rows causally: overwritten below
        t0 = time.perf_counter()
        plan_key = (attn_metadata.block_table.data_ptr(), kv_cache.shape[2])     # the same for every layer here
        if plan_key not in tree.plans:
            tree.plans[plan_key] = plan_tree_attention(tree.rows, attn_metadata.block_table, kv_cache.shape[2],
                                                       self.num_heads // self.num_kv_heads)
        plan = tree.plans[plan_key]
        (R, N), G = plan.query_rows.shape, self.num_heads // self.num_kv_heads
        k, v = gather_kv(kv_cache, plan.blocks, layer.isa, dtype=torch.float32)    # [R, num_kv_heads, P, head_size]
        k = torch.cat([k, key[plan.query_rows].transpose(1, 2).float()], dim=2)  # [R, num_kv_heads, P + N, head_size]
        v = torch.cat([v, value[plan.query_rows].transpose(1, 2).float()], dim=2)
        # Query head h reads KV head h // G: fold each KV head's G query heads into its rows (plain multi-head
        # attention over num_kv_heads, G * N rows, no K/V expansion: 2x faster than enable_gqa here).
        q = query[plan.query_rows].view(R, N, self.num_kv_heads, G, self.head_size).permute(0, 2, 3, 1, 4)
        q = q.reshape(R, self.num_kv_heads, G * N, self.head_size).float()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.bias, scale=self.scale)
        o = o.view(R, self.num_kv_heads, G, N, self.head_size).permute(0, 3, 1, 2, 4)   # [R, N, kv heads, G, hs]
        out = output.view(-1, self.num_heads, self.head_size)
        out[plan.out_rows] = o.reshape(R * N, self.num_heads, self.head_size)[plan.valid].to(out.dtype)
        tree.attention_s += time.perf_counter() - t0
        return output

    def _check_tree_supported(self) -> None:
        unsupported = [name for name, bad in (
            ("sliding window", self.sliding_window != -1),
            ("ALiBi", self.alibi_slopes is not None),
            ("logits soft cap", self.logits_soft_cap != 0),
            ("attention sinks", self.sinks is not None),
            ("fp8 KV cache", self.is_fp8_kv_cache),
            (f"attention type {self.attn_type}", self.attn_type != AttentionType.DECODER),
            ("KV sharing across layers", self.kv_sharing_target_layer_name is not None),
        ) if bad]
        if unsupported:
            raise NotImplementedError(f"vllm-eagle tree verification does not support {', '.join(unsupported)}; "
                                      "use a chain tree (the default) for this model")


@dataclass
class TreeAttentionPlan:
    """What every layer of one tree step shares. R tree rows, padded to N nodes and NB prefix blocks (P = NB *
    block_size prefix columns, then N node columns)."""
    blocks: torch.Tensor        # [R, NB] int64: row r's prefix blocks (a shorter prefix repeats its last block)
    query_rows: torch.Tensor    # [R, N] int64: step row of node i (padding repeats the last node)
    mask: torch.Tensor          # [R, 1, N, P + N] bool, True = attend: prefix columns < L, then the node's ancestors
    valid: torch.Tensor         # [R * N] bool: real nodes, not padding
    out_rows: torch.Tensor      # [num valid] int64: their step rows
    bias: torch.Tensor          # [R, 1, G * N, P + N] fp32: the mask for G query heads per KV head, additive (0 where
    #                             row g * N + i, head group g and node i, attends; -inf elsewhere: SDPA is faster so)


def plan_tree_attention(rows: list[TreeRow], block_table: torch.Tensor, block_size: int,
                        groups: int) -> TreeAttentionPlan:
    """block_table: [num_reqs, max_blocks] int32 (the attention metadata's); groups: query heads per KV head.

    E.g. block 32, rows (start 0, L 45, 6 nodes) and (start 9, L 1, 4 nodes): NB = 2, N = 6, P = 64; row 1 reads
    its block twice with prefix column 0 alone unmasked, its query rows are [9, 10, 11, 12, 12, 12] and its nodes 4
    and 5 are padding (valid False); node columns 64..69 hold each row's node K/V, padding columns masked out."""
    N = max(r.num_nodes for r in rows)
    nbs = [max(1, -(-r.prefix_len // block_size)) for r in rows]
    NB, col, node = max(nbs), torch.arange(max(nbs)), torch.arange(N)
    P = NB * block_size
    blocks = torch.stack([block_table[r.req_index, col.clamp(max=nb - 1)] for r, nb in zip(rows, nbs)]).long()
    query_rows = torch.stack([r.start + node.clamp(max=r.num_nodes - 1) for r in rows])
    mask = torch.zeros(len(rows), 1, N, P + N, dtype=torch.bool)
    for b, r in enumerate(rows):
        mask[b, 0, :, : r.prefix_len] = True
        mask[b, 0, :, P: P + r.num_nodes] = r.ancestors[node.clamp(max=r.num_nodes - 1)]
    valid = torch.stack([node < r.num_nodes for r in rows]).flatten()
    grouped = mask.repeat(1, 1, groups, 1)
    bias = torch.zeros(grouped.shape).masked_fill_(~grouped, float("-inf"))
    return TreeAttentionPlan(blocks, query_rows, mask, valid, query_rows.flatten()[valid], bias)


class TreeCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with tree rows recomputed; get_name() stays "CPU_ATTN" so vLLM's CPU-specific paths still apply."""

    @staticmethod
    def get_impl_cls() -> type[TreeCPUAttentionImpl]:
        return TreeCPUAttentionImpl


def register_tree_attention() -> None:
    """Idempotent: make AttentionBackendEnum.CPU_ATTN resolve to TreeCPUAttentionBackend, dropping backends the
    selector cached before. Must run before the model's Attention layers are built."""
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    if AttentionBackendEnum.CPU_ATTN.get_path() == _BACKEND_PATH:
        return
    register_backend(AttentionBackendEnum.CPU_ATTN, _BACKEND_PATH)
    selector._cached_get_attn_backend.cache_clear()
