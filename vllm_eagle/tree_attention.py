"""Tree attention on vLLM's CPU backend: the stock kernel for every row, then exact recomputation of the tree rows.

vLLM's CPU kernel only knows causal masks, under which tree node i would see every node before it in BFS order,
siblings included. So after the kernel has run, the tree rows of all TreeRows are recomputed together, one torch
SDPA per layer in the cache's dtype over each request's pages up to its last node (gathered from the paged cache in
whole pages, kv_layout.py: vLLM writes this step's K/V into the cache before attention, so the pages already hold
the prefix at slots < L and node j at slot L + j), masked to the prefix and the node's ancestors. Rows are padded to
the step's largest tree and page count; what the layers share (pages, query rows, mask) is planned once per step.
Cost: one extra attention over prefix + tree for tree requests only; chains and other requests keep the kernel's
output untouched. See verify.py for the layout of a tree step.
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
                                                       self.num_heads // self.num_kv_heads, kv_cache.dtype)
        plan = tree.plans[plan_key]
        o = tree_rows_attention(query, kv_cache, plan, layer.isa, self.num_kv_heads, self.scale)
        out = output.view(-1, self.num_heads, self.head_size)
        out.index_copy_(0, plan.out_rows, o.to(out.dtype))
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


def tree_rows_attention(query: torch.Tensor, kv_cache: torch.Tensor, plan: "TreeAttentionPlan", isa: str,
                        num_kv_heads: int, scale: float) -> torch.Tensor:
    """The tree rows' attention over prefix + ancestors, in the cache's dtype (torch's CPU SDPA accumulates a bf16
    one in fp32, as the stock kernel does).

    query [num_tokens, num_heads, hs] (the step's rows); kv_cache: one layer's paged cache, this step's K/V already
    written -> [num valid tree rows, num_heads, hs], in plan.out_rows order."""
    (R, N), H, hs = plan.query_rows.shape, num_kv_heads, query.shape[-1]
    G = query.shape[1] // H
    k, v = gather_kv(kv_cache, plan.blocks, isa)                          # [R, H, P, hs]: prefix and nodes
    # Query head h reads KV head h // G: fold each KV head's G query heads into its rows (plain multi-head
    # attention over num_kv_heads, G * N rows, no K/V expansion: 2x faster than enable_gqa here).
    q = query[plan.query_rows].view(R, N, H, G, hs).permute(0, 2, 3, 1, 4).reshape(R, H, G * N, hs)
    o = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=plan.bias, scale=scale)
    o = o.view(R, H, G, N, hs).permute(0, 3, 1, 2, 4).reshape(R * N, H * G, hs)   # [R * N, num_heads, hs]
    return o.index_select(0, plan.valid_rows)


@dataclass
class TreeAttentionPlan:
    """What every layer of one tree step shares. R tree rows, padded to N nodes and NB blocks (P = NB * block_size
    columns: a row's tokens in slot order, prefix then nodes)."""
    blocks: torch.Tensor        # [R, NB] int64: row r's blocks up to its last node (a shorter row repeats its last)
    query_rows: torch.Tensor    # [R, N] int64: step row of node i (padding repeats the last node)
    mask: torch.Tensor          # [R, 1, N, P] bool, True = attend: columns < L, then L + j for the node's ancestors j
    valid_rows: torch.Tensor    # [num valid] int64: flat index r * N + i of the real nodes (not padding)
    out_rows: torch.Tensor      # [num valid] int64: their step rows
    bias: torch.Tensor          # [R, 1, G * N, P] in the cache dtype: the mask for G query heads per KV head,
    #                             additive (0 where row g * N + i, head group g and node i, attends; -inf elsewhere:
    #                             SDPA is faster so)


def plan_tree_attention(rows: list[TreeRow], block_table: torch.Tensor, block_size: int, groups: int,
                        dtype: torch.dtype = torch.float32) -> TreeAttentionPlan:
    """block_table: [num_reqs, max_blocks] int32 (the attention metadata's); groups: query heads per KV head; dtype:
    the KV cache's (attention runs in it).

    E.g. block 32, rows (start 0, L 45, 6 nodes: slots 0..50) and (start 9, L 1, 4 nodes: slots 0..4): NB = 2,
    N = 6, P = 64; row 0 attends columns 0..44 and its ancestors among 45..50; row 1 reads its block twice, attends
    column 0 and its ancestors among 1..4; its query rows are [9, 10, 11, 12, 12, 12] and its nodes 4 and 5 are
    padding (valid_rows skips 10 and 11)."""
    N = max(r.num_nodes for r in rows)
    nbs = [-(-(r.prefix_len + r.num_nodes) // block_size) for r in rows]
    NB, col, node = max(nbs), torch.arange(max(nbs)), torch.arange(N)
    blocks = torch.stack([block_table[r.req_index, col.clamp(max=nb - 1)] for r, nb in zip(rows, nbs)]).long()
    query_rows = torch.stack([r.start + node.clamp(max=r.num_nodes - 1) for r in rows])
    mask = torch.zeros(len(rows), 1, N, NB * block_size, dtype=torch.bool)
    for b, r in enumerate(rows):
        L = r.prefix_len
        mask[b, 0, :, :L] = True
        mask[b, 0, :, L: L + r.num_nodes] = r.ancestors[node.clamp(max=r.num_nodes - 1)]
    valid_rows = torch.stack([node < r.num_nodes for r in rows]).flatten().nonzero().squeeze(1)
    grouped = mask.repeat(1, 1, groups, 1)
    bias = torch.zeros(grouped.shape, dtype=dtype).masked_fill_(~grouped, float("-inf"))
    return TreeAttentionPlan(blocks, query_rows, mask, valid_rows, query_rows.flatten()[valid_rows], bias)


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
