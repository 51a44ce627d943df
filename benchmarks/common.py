"""What the benchmark scripts share: the configurations compared (vanilla, ngram, vLLM native EAGLE with the same
head, ours in its shapes), the prompt workloads, the results folder and the environment record every result carries."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass, field

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Config:
    name: str
    spec: dict = field(default_factory=dict)
    k: int = 0                  # draft tokens verified per step (tree: nodes)
    depth: int = 0              # draft forwards per step (chain: k; tree: its depth)


DEFAULT_TREE = "[(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0)]"


def native_method(head: str) -> str:
    """vLLM's own method for the same head folder: eagle3 for an EAGLE-3 head, else eagle."""
    from vllm_eagle.draft_head import HeadConfig
    return "eagle3" if HeadConfig.from_dir(head).eagle3 else "eagle"


def configs(head: str, ks: list[int], which: list[str], trees: list[str] = (),
            dynamic: list[tuple[int, int, int]] = (), fixed: bool = False, lookups: list[int] = (),
            confidences: list[float] = ()) -> list[Config]:
    """fixed=True adds each of ours again with adaptive=False ("-fixed": every step drafts; its c and v(K) are the
    cost model of the shape, while the adaptive rows' mix gated steps in)."""
    import vllm_eagle
    out = [Config("vanilla")]
    for k in ks:
        if "ngram" in which:
            out.append(Config(f"ngram-k{k}", {"speculative_config": {"method": "ngram", "num_speculative_tokens": k,
                                                                     "prompt_lookup_max": 4, "prompt_lookup_min": 2}}, k))
        if "native" in which:
            method = native_method(head)
            out.append(Config(f"native-{method}-k{k}", {"speculative_config": {"method": method, "model": head,
                                                                              "num_speculative_tokens": k}}, k))
        if "ours" in which:
            out.append(Config(f"ours-chain-k{k}", vllm_eagle.speculative_kwargs(head, num_speculative_tokens=k), k, k))
        if "lookup" in which:       # ours with prompt lookup: rows whose context repeats draft without the head
            for n in lookups:
                out.append(Config(f"ours-chain-k{k}-lookup{n}", vllm_eagle.speculative_kwargs(
                    head, num_speculative_tokens=k, lookup=n), max(k, n), k))
        if "confident" in which:    # ours with chains cut where the head's cumulative draft probability is below p
            for c in confidences:
                out.append(Config(f"ours-chain-k{k}-conf{c:g}", vllm_eagle.speculative_kwargs(
                    head, num_speculative_tokens=k, min_confidence=c), k, k))
    if "ours" in which:
        from vllm_eagle.tree import compile_tree
        for t in trees:
            tb = compile_tree(t)
            n = tb.num_nodes - 1
            out.append(Config(f"ours-tree-n{n}-d{tb.max_depth}", vllm_eagle.speculative_kwargs(head, tree=t), n,
                              tb.max_depth))
        for d, k, n in dynamic:
            out.append(Config(f"ours-dynamic-n{n}-d{d}-k{k}", vllm_eagle.speculative_kwargs(
                head, tree="dynamic", depth=d, top_k=k, total_tokens=n), n, d))
    if fixed:
        import copy
        for c in [c for c in out if c.name.startswith("ours")]:
            spec = copy.deepcopy(c.spec)
            spec["additional_config"]["vllm_eagle"]["adaptive"] = False
            out.append(Config(c.name + "-fixed", spec, c.k, c.depth))
    out.append(Config("vanilla-end"))      # vanilla again, last: its speedup is how far the machine drifted meanwhile
    for c in out:
        c.depth = c.depth or c.k
    return out


def workloads(tokenizer, names: list[str], n: int) -> dict[str, list[str]]:
    from vllm_eagle.assets import chat_prompts, humaneval_problems, mtbench_questions, sharegpt_path
    out = {}
    if "mtbench" in names:
        out["mtbench"] = chat_prompts(tokenizer, [q["turns"][0] for q in mtbench_questions()])[:n]
    if "humaneval" in names:
        out["humaneval"] = [p["prompt"] for p in humaneval_problems()][:n]
    if "sharegpt" in names:
        from vllm_eagle.train.data import HOLDOUT_START, parse_sharegpt
        with open(sharegpt_path(), encoding="utf-8") as f:
            recs = parse_sharegpt(f.read())         # 11,128 usable conversations
        # Held out from head training (conversations before HOLDOUT_START): the last ones, short prompts only.
        picked = [r["prompt"] for r in reversed(recs[HOLDOUT_START:]) if len(r["prompt"]) < 1500][:n]
        out["sharegpt"] = chat_prompts(tokenizer, picked)
    return out


def environment() -> dict:
    import torch
    import vllm
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=os.path.dirname(__file__)).stdout.strip())
    except OSError:
        commit, dirty = "unknown", False
    info = open("/proc/cpuinfo").read().splitlines()
    cpu = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), "?")
    flags = set(next((l.split(":", 1)[1].split() for l in info if l.startswith("flags")), []))
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit + ("-dirty" if dirty else ""),
            "cpu": cpu, "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
            "cores": os.cpu_count(), "python": platform.python_version(), "vllm": vllm.__version__,
            "torch": torch.__version__, "threads": {k: os.environ.get(k) for k in
                                                   ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND",
                                                    "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}}
