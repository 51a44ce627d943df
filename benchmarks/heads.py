"""Heads side by side, in one run: acceptance per draft position and tau for K = 1..6, per workload.

Each head runs our chain with K = 6 drafts and every step drafting (greedy drafts of a chain do not depend on K, so
tau(K) = 1 + the first K per-position acceptances), and vLLM's native method with the same folder (`eagle` or
`eagle3`) at the same K, on MT-Bench first turns and on held-out ShareGPT first turns of the categories the corpus
balances (corpus.category; conversations after data.HOLDOUT_START, never trained on).

    python -m benchmarks.heads --heads HEAD_A HEAD_B [--max-tokens 256 128] [--prompts 24] [--dtype float32]
"""
from __future__ import annotations

import argparse
import json
import os
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
K = 6


def category_prompts(tokenizer, per_category: int) -> dict[str, list[str]]:
    """Held-out ShareGPT first turns per corpus category (chat-templated), up to per_category each."""
    from vllm_eagle.assets import chat_prompts, sharegpt_path
    from vllm_eagle.train.corpus import category
    from vllm_eagle.train.data import HOLDOUT_START, sharegpt_conversations
    with open(sharegpt_path(), encoding="utf-8") as f:
        convs = sharegpt_conversations(f.read())[HOLDOUT_START:]
    out: dict[str, list[str]] = {}
    for turns in convs:
        text = turns[0]["value"]
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > 1500:
            continue
        c = category(text, n)
        if len(out.setdefault(c, [])) < per_category:
            out[c].append(text)
    return {f"sharegpt-{c}": chat_prompts(tokenizer, qs) for c, qs in sorted(out.items())}


def acceptance(llm, prompts: list[str], max_tokens: int) -> dict:
    from vllm import SamplingParams

    from vllm_eagle.cli import spec_counters
    before = spec_counters(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    wall = time.perf_counter() - t0
    after = spec_counters(llm)
    drafts = after["drafts"] - before.get("drafts", 0)
    per_pos = [(a - b) / max(1, drafts) for a, b in zip(after["accepted_tokens_per_pos"],
                                                        before.get("accepted_tokens_per_pos", [0] * K))]
    tau = [1 + sum(per_pos[:k]) for k in range(1, K + 1)]
    return {"per_position_acceptance": [round(p, 4) for p in per_pos], "tau_by_k": [round(t, 3) for t in tau],
            "tokens": sum(len(o.outputs[0].token_ids) for o in outs), "seconds": round(wall, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.heads", description=__doc__.split("\n")[0])
    p.add_argument("--heads", nargs="+", required=True)
    p.add_argument("--target")
    p.add_argument("--prompts", type=int, default=24, help="MT-Bench prompts")
    p.add_argument("--per-category", type=int, default=6, help="held-out ShareGPT prompts per category")
    p.add_argument("--max-tokens", nargs="+", type=int, default=[256, 128])
    p.add_argument("--no-native", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    from transformers import AutoTokenizer
    from vllm import LLM

    import vllm_eagle
    from benchmarks.run import environment, native_method, workloads
    target = a.target or vllm_eagle.default_target()
    tok = AutoTokenizer.from_pretrained(target)
    wls = {"mtbench": workloads(tok, ["mtbench"], a.prompts)["mtbench"], **category_prompts(tok, a.per_category)}
    env = environment()
    rows = []
    for head in a.heads:
        method = native_method(head)
        cfgs = {"ours": vllm_eagle.speculative_kwargs(head, num_speculative_tokens=K, adaptive=False)}
        if not a.no_native:
            cfgs[f"native-{method}"] = {"speculative_config": {"method": method, "model": head,
                                                               "num_speculative_tokens": K}}
        for name, spec in cfgs.items():
            llm = LLM(model=target, dtype=a.dtype, max_model_len=2048, enforce_eager=True, disable_log_stats=False,
                      max_num_seqs=32, seed=0, **{"enable_prefix_caching": False, **spec})
            for wl, prompts in wls.items():
                for n in a.max_tokens if wl == "mtbench" else a.max_tokens[-1:]:
                    r = acceptance(llm, prompts, n)
                    rows.append({"head": os.path.basename(os.path.normpath(head)), "method": method, "config": name,
                                 "workload": wl, "prompts": len(prompts), "max_tokens": n, **r})
                    print(f"[heads] {rows[-1]['head']} {name} {wl} {n}: tau(K) {r['tau_by_k']} "
                          f"per-position {r['per_position_acceptance']}", flush=True)
            llm.llm_engine.engine_core.shutdown()
            del llm
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"{time.strftime('%Y-%m-%d')}-{env['commit']}-heads")
    cmd = "python -m benchmarks.heads " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "command": cmd, "dtype": a.dtype, "target": target, "rows": rows}, f, indent=1)
    lines = [f"Command: `{cmd}`  ", f"Environment: {json.dumps(env)}  ", f"dtype {a.dtype}, greedy, chain K={K}, "
             "every step drafting\n", "| head | config | workload | tokens | tau K=1..6 | per-position acceptance |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['head']} | {r['config']} | {r['workload']} | {r['max_tokens']} | "
              f"{' / '.join(f'{t:.2f}' for t in r['tau_by_k'])} | "
              f"{' / '.join(f'{x:.2f}' for x in r['per_position_acceptance'])} |" for r in rows]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"rows": rows}


if __name__ == "__main__":
    main()
