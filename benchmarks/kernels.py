"""Kernel micro-benchmarks: each tree kernel's host wrapper against the pure-torch reference the tests use, the
paged-KV gather of the tree attention path (strided page views vs the element-wise gather it replaced), one layer of
tree attention (vLLM's stock kernel alone vs with our recompute of the tree rows), the draft head's GEMMs
(F.linear vs vLLM's prepacked CPU GEMM that `EagleHead.pack(engine_linear)` uses), and the target's GEMMs by the
number of rows they multiply (how the linear part of a verify step grows with the tokens it verifies).

    python -m benchmarks.kernels [--reps 50]

On this CPU the wrappers run the references (vLLM's CPU backend has no Triton), so wrapper == reference there; on a
CUDA device the wrappers launch the Triton kernels. Prints a markdown table (median microseconds per call).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e6


def random_trees(B: int, N: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """parent [B, N] int32 with parent[i] < i, num_nodes [B] int32 (odd sizes: padding in most rows)."""
    parent = torch.full((B, N), -1, dtype=torch.int32)
    for i in range(1, N):
        parent[:, i] = torch.randint(0, i, (B,), generator=g, dtype=torch.int32)
    return parent, torch.randint(1, N + 1, (B,), generator=g, dtype=torch.int32)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args(argv)
    from vllm_eagle import kernels
    from vllm_eagle.kernels import reference
    from vllm_eagle.tree import child_links
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    rows = []
    for B, N in ((1, 9), (8, 9), (32, 26), (64, 61)):
        parent, n = random_trees(B, N, g)
        rows.append({"kernel": "build_tree_masks", "shape": f"B={B} N={N}",
                     "reference_us": timed(lambda: reference.build_tree_masks(parent, n), a.reps),
                     "wrapper_us": timed(lambda: kernels.build_tree_masks(parent.to(device), n.to(device)), a.reps)})
        V = 1000
        links = [child_links(parent[b].tolist()[: int(n[b])]) for b in range(B)]      # -1 padded to N
        fc, ns = (torch.tensor([x + [-1] * (N - len(x)) for x in col], dtype=torch.int32) for col in zip(*links))
        cand = torch.randint(0, V, (B, N), generator=g)
        argmax = torch.randint(0, V, (B, N), generator=g)
        probs = torch.rand(B, N, V, generator=g).softmax(-1)
        u = torch.rand(B, N, generator=g)
        greedy = torch.arange(B) % 2 == 0
        args = (cand, fc, ns, argmax, probs, u, greedy, N - 1)
        rows.append({"kernel": "tree_accept", "shape": f"B={B} N={N} V={V}",
                     "reference_us": timed(lambda: reference.tree_accept(*args), a.reps),
                     "wrapper_us": timed(lambda: kernels.tree_accept(*[x.to(device) if torch.is_tensor(x) else x
                                                                       for x in args]), a.reps)})
    rows += gather_rows(a.reps) + tree_attention_rows(a.reps) + draft_gemm_rows(a.reps) + target_gemm_rows(a.reps)
    print(f"device: {device}; median of {a.reps} calls, microseconds\n")
    print("| kernel | shape | reference / element gather (us) | wrapper / strided (us) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['shape']} | {r['reference_us']:.0f} | {r['wrapper_us']:.0f} |")
    return rows


def gather_rows(reps: int) -> list[dict]:
    """The tree-attention prefix gather: SmolLM2's per-layer cache shape (3 KV heads, head 64), 8 requests (a batch-8
    tree step) of 300 prefix tokens each."""
    from vllm.platforms import current_platform
    from vllm_eagle import kv_layout
    current_platform.import_kernels()
    rows = []
    amx = torch.cpu._is_amx_tile_supported()      # amx pages only with AMX tiles, as in tests/test_tree_attention.py
    for dtype, isa in ((torch.bfloat16, "amx" if amx else "vec"), (torch.float32, "vec")):
        for bs in (32, 128):
            kv = torch.randn(200, 3, bs, 128).to(dtype)
            table = torch.randperm(200)[:8 * -(-300 // bs)].view(8, -1).int()       # [8 requests, blocks of 300]
            fast = lambda: kv_layout.gather_kv(kv, table, isa, dtype=torch.float32)   # noqa: E731
            strided = timed(fast, reps)
            layout = kv_layout.page_strides
            kv_layout.page_strides = lambda *a: None                  # force the element-wise fallback
            try:
                element = timed(fast, reps)
            finally:
                kv_layout.page_strides = layout
            rows.append({"kernel": "gather_kv", "shape": f"{dtype} {isa} block {bs}, 8 x L=300",
                         "reference_us": element, "wrapper_us": strided})
    return rows


def tree_attention_rows(reps: int) -> list[dict]:
    """One SmolLM2 attention layer (9 query / 3 KV heads, head 64, block 128, bf16, this CPU's `vec` pages) over R
    requests with L=300 committed tokens, each verifying the 8-node static tree of benchmarks.run: the stock kernel
    alone ("reference") vs TreeCPUAttentionImpl ("wrapper"), both ways: "paths" (each tree's paths through the stock
    kernel in scratch blocks) and "recompute" (the stock kernel, then the tree rows recomputed with the ancestor
    mask). The plan is built once per step for all layers, so it is built before timing."""
    from types import SimpleNamespace

    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends import cpu_attn
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadata
    from vllm_eagle.tree import compile_tree
    from vllm_eagle.tree_attention import TreeAttentionState, TreeAttentionStep, TreeCPUAttentionImpl
    from vllm_eagle.verify import TreeRow, TreeStep
    from benchmarks.common import DEFAULT_TREE
    H_Q, H_KV, D, BS, L, dtype = 9, 3, 64, 128, 300, torch.bfloat16
    tree = compile_tree(DEFAULT_TREE)
    n, nb = tree.num_nodes, -(-(L + tree.num_nodes) // BS)
    config = cpu_attn.get_current_vllm_config
    cpu_attn.get_current_vllm_config = lambda: SimpleNamespace(model_config=SimpleNamespace(dtype=dtype))
    try:
        impls = [cls(num_heads=H_Q, head_size=D, scale=D ** -0.5, num_kv_heads=H_KV, alibi_slopes=None,
                     sliding_window=None, kv_cache_dtype="auto")
                 for cls in (CPUAttentionBackendImpl, TreeCPUAttentionImpl)]
    finally:
        cpu_attn.get_current_vllm_config = config
    rows = []
    for R in (1, 8, 32):
        scratch = 4 * R                                 # the 8-node tree has 4 paths, each in one private block
        kv = torch.randn(R * nb + scratch, H_KV, BS, 2 * D).to(dtype)
        qsl, seq_lens = (torch.arange(R + 1) * n).int(), torch.full((R,), L + n, dtype=torch.int32)
        meta = CPUAttentionMetadata(
            num_actual_tokens=R * n, max_query_len=n, query_start_loc=qsl, max_seq_len=L + n, seq_lens=seq_lens,
            block_table=torch.randperm(R * nb).view(R, nb).int(), slot_mapping=torch.zeros(R * n, dtype=torch.long),
            scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
                num_reqs=R, num_heads=H_Q, num_kv_heads=H_KV, head_dim=D, seq_lens=seq_lens, dtype=dtype,
                query_start_loc=qsl, causal=True, sliding_window_size=-1, isa="vec", enable_kv_split=False))
        q, k = torch.randn(R * n, H_Q, D).to(dtype), torch.randn(R * n, H_KV, D).to(dtype)
        out, layer = torch.empty_like(q), SimpleNamespace(isa="vec", _k_scale_float=1.0, _v_scale_float=1.0)
        layout = TreeStep(tuple(TreeRow(r, f"r{r}", r * n, L, tree, torch.zeros(n, dtype=torch.long))
                                for r in range(R)), torch.zeros(R * n, dtype=torch.long))
        meta.tree = None
        stock = timed(lambda: impls[0].forward(layer, q, k, k, kv, meta, out), reps)
        for route, blocks in (("paths", torch.arange(R * nb, R * nb + scratch)), ("recompute", torch.arange(0))):
            meta.tree = TreeAttentionStep(layout, TreeAttentionState(blocks))     # no mirrors from the other route
            rows.append({"kernel": "tree attention layer", "reference_us": stock,
                         "shape": f"bf16 vec, {R} x (L={L} + {n - 1} nodes), {route}",
                         "wrapper_us": timed(lambda: impls[1].forward(layer, q, k, k, kv, meta, out), reps)})
    return rows


# SmolLM2's decoder-layer GEMMs, name -> (N, K) of the weight [N, K] (q|k|v and gate|up fused, H 576): the target's
# 30 layers and the draft head's one layer have the same shapes.
LAYER_GEMMS = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def gemm_us(N: int, K: int, T: int, reps: int) -> tuple[float, float]:
    """A bf16 weight [N, K] times x [T, K]: (F.linear us, engine_linear us), engine_linear being the GEMM vLLM's own
    linear layers run (its prepacked CPU kernel where it has one)."""
    from vllm_eagle.proposer import engine_linear
    w, x = torch.randn(N, K).to(torch.bfloat16), torch.randn(T, K).to(torch.bfloat16)
    mm = engine_linear(w)
    return timed(lambda: torch.nn.functional.linear(x, w), reps), timed(lambda: mm(x), reps)


def draft_gemm_rows(reps: int) -> list[dict]:
    """SmolLM2's draft-head GEMMs (fc 576 x 1152, one layer, an 8,192-token draft vocabulary) in bf16 at a chain
    step's T=1 and a batch-8 tree depth's T=24: F.linear ("reference") vs engine_linear ("wrapper")."""
    rows = []
    for T in (1, 24):
        for name, (N, K) in {"fc": (576, 1152), **LAYER_GEMMS, "draft_lm_head": (8192, 576)}.items():
            ref, wrap = gemm_us(N, K, T, reps)
            rows.append({"kernel": f"draft {name}", "shape": f"bf16 T={T} N={N} K={K}", "reference_us": ref,
                         "wrapper_us": wrap})
    return rows


def target_gemm_rows(reps: int) -> list[dict]:
    """SmolLM2's GEMMs in one target forward (30 layers of LAYER_GEMMS, the LM head 49,152 x 576) in bf16 over T rows:
    F.linear ("reference") vs engine_linear ("wrapper"); layer GEMMs timed once and counted 30 times. Batch 1
    verifying K drafts multiplies T = K + 1 rows, batch 8 with K drafts T = 8 (K + 1): where the time grows in
    proportion to T (torch's bf16 fallback on a CPU without AVX512-BF16), a verify step costs about T / batch plain
    steps in its linear part, and no draft pays at batch 8 unless tau exceeds that."""
    shapes = {name: (N, K, 30) for name, (N, K) in LAYER_GEMMS.items()} | {"lm_head": (49152, 576, 1)}  # (N, K, times)
    rows = []
    for T in (1, 2, 3, 8, 16, 24):
        ref = wrap = 0.0
        for N, K, times in shapes.values():
            r, w = gemm_us(N, K, T, reps)
            ref, wrap = ref + times * r, wrap + times * w
        rows.append({"kernel": "target GEMMs, one forward", "shape": f"bf16 T={T}", "reference_us": ref,
                     "wrapper_us": wrap})
    return rows


if __name__ == "__main__":
    main()
