"""Heads side by side, in one run: acceptance per draft position and tau for K = 1..6, per workload.

Each head runs our chain with K = 6 drafts and every step drafting (greedy drafts of a chain do not depend on K, so
tau(K) = 1 + the first K per-position acceptances), and vLLM's native method with the same folder (`eagle` or
`eagle3`) at the same K, on MT-Bench first turns and on held-out ShareGPT first turns of the categories the corpus
balances (corpus.category; conversations after data.HOLDOUT_START, never trained on). The offline replay
(`offline_acceptance`) walks the same chains from HF features through the training code: where it and the engine
disagree, features, dtype or the draft loop differ.

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

    from vllm_eagle.metrics import spec_counters
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


def offline_acceptance(head_dir: str, target: str, sequences: list[tuple[list[int], list[int]]]) -> dict:
    """The engine's greedy chain walk replayed offline, from HF features (fp32): at each verify step the head's K
    drafts from the committed prefix (the rollout's step-j argmax at row p + j - 1, which is the draft loop's while
    the drafts are right), accepted while they equal the target's tokens, then a bonus token. Per-position
    acceptance must match the engine's on the same sequences; teacher-forced top-1 (every position, no walk) is
    what training reports, and differs from the walk by which positions a chain drafts at.

    sequences: (prompt ids, the target's greedy answer ids) -> {per_position_acceptance, tau_by_k, top1_step1}
    """
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_eagle.draft_head import load_draft_vocab, load_head
    from vllm_eagle.train.rollout import rollout
    from vllm_eagle.train.train_head import capture_features
    from vllm_eagle.train.data import Example
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    head = load_head(head_dir)
    L = model.config.num_hidden_layers
    layers = head.cfg.feature_layers(L)
    embed, lm = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    if head.eagle3:
        ids, rows = head.draft_token_ids(), head.lm_head.weight.detach()
    else:
        ids = load_draft_vocab(head_dir)
        rows = lm if ids is None else lm[ids]
    exs = [Example(torch.tensor(pr + an), torch.arange(len(pr) + len(an)) >= len(pr)) for pr, an in sequences]
    feats = capture_features(model, exs, dtype=torch.float32, layers=layers)
    drafts_total, accepted, hits, positions = 0, [0] * K, 0, 0
    with torch.no_grad():
        for ex, f, (pr, an) in zip(exs, feats, sequences):
            toks = ex.tokens
            emb_next = embed[torch.cat([toks[1:], toks[:1]])][None]
            outs = rollout(head, emb_next, (f[:, embed.shape[1]:] if head.eagle3 else f)[None], K)
            best = torch.stack([(head.logits_input(o[0]) @ rows.T).argmax(-1) for o in outs])   # [K, T]
            best = best if ids is None else ids[best]
            T = len(toks)
            # row q's step-j draft is the token at q + 2 for the chain started at q - j + 1
            hits += int((best[0, len(pr) - 1:T - 2] == toks[len(pr) + 1:]).sum())
            positions += T - len(pr) - 1
            p = len(pr) - 1                      # last committed entry: the bonus token after it is t_{p+1}
            while p + 2 < T:
                drafts_total += 1
                n = 0
                while n < K and p + n + 2 < T and int(best[n, p + n]) == int(toks[p + n + 2]):
                    accepted[n] += 1
                    n += 1
                p += n + 1
    per_pos = [a / max(1, drafts_total) for a in accepted]
    return {"per_position_acceptance": [round(x, 4) for x in per_pos],
            "tau_by_k": [round(1 + sum(per_pos[:k]), 3) for k in range(1, K + 1)],
            "top1_step1": round(hits / max(1, positions), 4)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.heads", description=__doc__.split("\n")[0])
    p.add_argument("--heads", nargs="+", required=True)
    p.add_argument("--target")
    p.add_argument("--prompts", type=int, default=24, help="MT-Bench prompts")
    p.add_argument("--per-category", type=int, default=6, help="held-out ShareGPT prompts per category")
    p.add_argument("--max-tokens", nargs="+", type=int, default=[256, 128])
    p.add_argument("--no-native", action="store_true")
    p.add_argument("--no-offline", action="store_true", help="skip the offline replay (HF features, training code)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    from transformers import AutoTokenizer
    from vllm import LLM

    import vllm_eagle
    from benchmarks.common import environment, native_method, workloads
    target = a.target or vllm_eagle.default_target()
    tok = AutoTokenizer.from_pretrained(target)
    wls = {"mtbench": workloads(tok, ["mtbench"], a.prompts)["mtbench"], **category_prompts(tok, a.per_category)}
    env = environment()
    rows = []
    sequences = []
    if not a.no_offline:                                 # the target's own greedy MT-Bench answers, for the replay
        from vllm import SamplingParams
        llm = LLM(model=target, dtype=a.dtype, max_model_len=2048, enforce_eager=True, seed=0, max_num_seqs=32)
        outs = llm.generate(wls["mtbench"], SamplingParams(temperature=0, max_tokens=a.max_tokens[0]), use_tqdm=False)
        sequences = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]
        llm.llm_engine.engine_core.shutdown()
        del llm
    for head in a.heads:
        if sequences:
            r = offline_acceptance(head, target, sequences)
            rows.append({"head": os.path.basename(os.path.normpath(head)), "method": native_method(head),
                         "config": "offline-replay", "workload": "mtbench", "prompts": len(sequences),
                         "max_tokens": a.max_tokens[0], **r})
            print(f"[heads] {rows[-1]['head']} offline replay: {r}", flush=True)
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
