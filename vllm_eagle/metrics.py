"""Speculation counters of a running `vllm.LLM`, for the CLI, the benchmarks and the tests."""
from __future__ import annotations


def spec_counters(llm) -> dict:
    """vLLM's spec-decode counters, prefix dropped: {"drafts": n, "draft_tokens": n, "accepted_tokens": n,
    "accepted_tokens_per_pos": [n, ...]} (what the engine counted so far; empty without speculation)."""
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num_"):
            out[m.name[len("vllm:spec_decode_num_"):]] = getattr(m, "values", None) or getattr(m, "value", None)
    return out
