"""Batch 1, paired prompt by prompt: every configuration's engine is alive at once and the prompts go round them in
turn, so each prompt's speedup is measured against a vanilla run seconds apart, not minutes (within a run of
benchmarks.run the machine drifts by more than the gaps between b1 shapes: docs/notes.md).

    python -m benchmarks.interleaved [--trees "[(0,), (1,), (0, 0)]" ...] [--dynamic 4,4,8] [--prompts 16]

Engines: vanilla twice (the second one's "speedup" is the method's own noise floor), ours chain K=2 and each tree,
all with adaptive=False (every step drafts: the shapes' own costs, not the gate's). Prompt i runs on every engine in
a rotated order (its turn t runs engine (i + t) mod n), greedy, max_tokens each, after an untimed warm-up of every
engine.
Per configuration: tokens/s over all prompts, speedup = median over prompts of (its tokens/s / vanilla's on that
prompt), tau, step ms and our stages per step (benchmarks.run's columns). Markdown + JSON to benchmarks/results.
The order in which the engines are created biases their speed (docs/notes.md, "Trees paired prompt by prompt"): compare
shapes over a normal and a --reverse-start run. Each tree's row also pairs it with the chain prompt by prompt
(vs_chain: median ratio, prompts won).
Run as a script, the engines are in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): a multiprocess engine core polls
its worker, and with several engines alive on a few cores that polling slows every engine (docs/notes.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.common import DEFAULT_TREE, RESULTS, configs, environment, workloads


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.interleaved", description=__doc__.split("\n")[0])
    p.add_argument("--target", help="default: vllm_eagle.default_target()")
    p.add_argument("--head", help="default: vllm_eagle.default_head()")
    p.add_argument("--trees", nargs="*", default=["[(0,), (1,), (0, 0)]", DEFAULT_TREE])
    p.add_argument("--dynamic", nargs="*", default=[], metavar="DEPTH,TOP_K,TOTAL")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--prompts", type=int, default=16, help="MT-Bench first turns (at least 2)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reverse-start", action="store_true",
                   help="create the engines last config first (creation order biases the engines' speed; a second "
                        "run reversed shows which gaps survive)")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    import copy

    import vllm_eagle
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    target, head = a.target or vllm_eagle.default_target(), a.head or vllm_eagle.default_head()
    prompts = workloads(AutoTokenizer.from_pretrained(target), ["mtbench"], a.prompts)["mtbench"]
    cfgs = [c for c in configs(head, [a.k], ["ours"], a.trees,
                               [tuple(int(x) for x in d.split(",")) for d in a.dynamic]) if c.name != "vanilla-end"]
    cfgs.insert(1, copy.deepcopy(cfgs[0]))
    cfgs[1].name = "vanilla-2"
    for c in cfgs[2:]:
        c.spec = copy.deepcopy(c.spec)
        c.spec["additional_config"]["vllm_eagle"]["adaptive"] = False
    engines = [None] * len(cfgs)
    for j in (reversed(range(len(cfgs))) if a.reverse_start else range(len(cfgs))):
        c = cfgs[j]
        print(f"[interleaved] starting {c.name}", flush=True)
        llm = LLM(model=target, dtype=a.dtype, max_model_len=2048, enforce_eager=True, disable_log_stats=False,
                  max_num_seqs=1, seed=0, **{"enable_prefix_caching": False, **c.spec})
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
        engines[j] = llm
    for c, llm in zip(cfgs, engines):
        if c.name.startswith("ours"):
            llm.collective_rpc("eagle_stats", kwargs={"reset": True})
    sp = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)
    secs = [[0.0] * len(prompts) for _ in cfgs]
    for i, prompt in enumerate(prompts):
        for turn in range(len(cfgs)):
            j = (i + turn) % len(cfgs)
            t = time.perf_counter()
            n = len(engines[j].generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids)
            secs[j][i] = time.perf_counter() - t
            assert n == a.max_tokens, (cfgs[j].name, n)
        print(f"[interleaved] prompt {i + 1}/{len(prompts)}: "
              + ", ".join(f"{c.name} {a.max_tokens / s[i]:.1f}" for c, s in zip(cfgs, secs)), flush=True)
    rows, chain = [], next((x for d, x in zip(cfgs, secs) if d.name.startswith("ours-chain")), None)
    for c, llm, s in zip(cfgs, engines, secs):
        row = {"config": c.name, "tokens_per_s": round(a.max_tokens * len(prompts) / sum(s), 2),
               "speedup": round(statistics.median(s0 / x for s0, x in zip(secs[0], s)), 3),
               "speedup_quartiles": [round(q, 3) for q in statistics.quantiles([s0 / x for s0, x in zip(secs[0], s)])],
               "step_ms": round(1000 * sum(s) / (len(prompts) * a.max_tokens), 2)}
        if c.name.startswith("ours"):
            # tau = tokens per verify step, from this engine's own counters (vLLM's Prometheus spec counters are
            # process-wide: every in-process engine reads the same pooled sums). Each prompt's first engine step is
            # its prefill, which emits one token. E.g. 2 prompts x 8 tokens in 8 steps: (16 - 2) / (8 - 2) = 2.33.
            st = llm.collective_rpc("eagle_stats")[0]
            n = len(prompts)
            row["tau"] = round((a.max_tokens - 1) * n / max(1, st["steps"] - n), 3)
            row["step_ms"] = round(1000 * sum(s) / max(1, st["steps"]), 2)
            row["stage_ms"] = {k: round(1000 * st[f"{k}_s"] / max(1, st["steps"]), 2)
                               for k in ("draft", "mask", "tree_attention", "accept", "kv_commit")}
            row["ms_per_token"] = round(row["step_ms"] / row["tau"], 2)
        if c.name.startswith(("ours-tree", "ours-dynamic")) and chain is not None:
            ratios = [x0 / x for x0, x in zip(chain, s)]
            row["vs_chain"] = {"median": round(statistics.median(ratios), 3), "won": sum(r > 1 for r in ratios),
                               "of": len(ratios)}
        rows.append(row)
    for llm in engines:
        llm.llm_engine.engine_core.shutdown()
    env, in_process = environment(), os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
    cmd = "python -m benchmarks.interleaved " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    md = [f"Command: `{cmd}`  ",
          f"Hardware: {env['cpu']}, {env['cores']} cores, no GPU; vLLM {env['vllm']}, torch {env['torch']}, "
          f"Python {env['python']}; commit {env['commit']}; {env['date']}.  ",
          f"MT-Bench first turns, {len(prompts)} prompts x {a.max_tokens} greedy tokens, batch 1, {a.dtype}, every "
          f"engine alive at once ({'in-process' if in_process else 'multiprocess'}), engines created "
          f"{'last config first' if a.reverse_start else 'in table order'}, prompt by prompt in rotated order; "
          "speedup = median over prompts of the ratio to vanilla on the same prompt (quartiles beside it); vs chain = "
          "the same against ours-chain (prompts won); ours with adaptive=False.", "",
          "| config | tok/s | speedup (q1-q3) | vs chain (won) | τ | step ms | ms per token (step / τ) | ours: draft / "
          "mask / tree attn / accept / KV commit ms per step |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r.get("stage_ms")
        md.append(f"| {r['config']} | {r['tokens_per_s']} | {r['speedup']:.2f}× ({r['speedup_quartiles'][0]:.2f}-"
                  f"{r['speedup_quartiles'][2]:.2f}) | "
                  + (f"{r['vs_chain']['median']:.3f}× ({r['vs_chain']['won']}/{r['vs_chain']['of']})"
                     if "vs_chain" in r else "–")
                  + f" | {r.get('tau', '–')} | {r['step_ms']} | "
                  f"{r.get('ms_per_token', '–')} | " + (" / ".join(f"{v:.1f}" for v in st.values()) if st else "–")
                  + " |")
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"{time.strftime('%Y-%m-%d')}-{env['commit']}-interleaved-b1")
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "command": cmd, "rows": rows, "seconds": secs}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")     # after vllm's import: its envs are read lazily
    main()
