"""Tree attention on vLLM's CPU backend: the stock kernel for every row, then exact recomputation of the tree rows.

vLLM's CPU kernel only knows causal masks, under which tree node i would see every node before it in BFS order,
siblings included. So after the kernel has run, each TreeRow's rows are recomputed with torch SDPA in fp32 over the
request's prefix (gathered from the paged cache in whole blocks, kv_layout.py) plus the tree's own K/V (this step's
`key`/`value`), masked by row.ancestors. Cost: one extra attention over prefix + tree for tree requests only; chains and other
requests keep the kernel's output untouched. See verify.py for the layout of a tree step.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from vllm.v1.attention.backend import AttentionLayer, AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata)

from .kv_layout import gather_kv
from .verify import TreeStep

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
        out = output.view(-1, self.num_heads, self.head_size)
        for row in tree.rows:
            s, n, L = row.start, row.num_nodes, row.prefix_len
            # E.g. L = 45, n = 6, block 32: columns 0..44 prefix (cache), 45..63 padding, 64..69 tree nodes 0..5 (this
            # step's key rows s..s+5)
            k, v = gather_kv(kv_cache, attn_metadata.block_table[row.req_index], L, layer.isa, extra=n,
                             dtype=torch.float32)                               # [num_kv_heads, P + n, head_size]
            P = k.shape[1] - n
            k[:, P:] = key[s:s + n].transpose(0, 1)
            v[:, P:] = value[s:s + n].transpose(0, 1)
            mask = row.ancestors.new_zeros(n, P + n)                            # [n, P + n] bool, True = attend
            mask[:, :L] = True
            mask[:, P:] = row.ancestors
            o = F.scaled_dot_product_attention(query[s:s + n].float().transpose(0, 1), k, v, attn_mask=mask,
                                               scale=self.scale, enable_gqa=True)  # [num_heads, n, head_size]
            out[s:s + n] = o.transpose(0, 1).to(out.dtype)
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
