"""`vllm-eagle` command: generate (the main job: speculative decoding on the default model and head), train, bench."""
from __future__ import annotations

import argparse
import os
import sys
import time


def _env() -> None:
    # The CPU backend needs an explicit KV budget (a VM's NUMA node may under-report memory); no hub access.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def generate(argv: list[str]) -> None:
    import vllm_eagle
    from .config import add_option_args, speculative_kwargs_from_args
    p = argparse.ArgumentParser(prog="vllm-eagle generate",
                                description="Generate with EAGLE speculation and report tokens/s and tau.")
    p.add_argument("--target", help="HF model folder (default: SmolLM2-135M-Instruct, prepared on first use)")
    add_option_args(p, aliases=True)            # --speculative-model/--head (default: the head shipped for SmolLM2)
    p.add_argument("--prompt", action="append", help="user message (repeatable); default: 4 MT-Bench questions")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--dtype", default=None,
                   help="default: bfloat16 on CPUs with AVX512-BF16 or AMX, else float32 (faster there)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--compare", action="store_true", help="also run vanilla vLLM and print the speedup")
    p.add_argument("-v", "--verbose", action="store_true", help="show vLLM's INFO logs (default: warnings only)")
    a = p.parse_args(argv)
    _env()
    if not a.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")     # read when vllm is first imported, below
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from .assets import chat_prompts, mtbench_questions
    from .metrics import spec_counters
    if a.dtype is None:
        from .train.train_head import has_bf16_matmul
        a.dtype = "bfloat16" if has_bf16_matmul() else "float32"
    target = a.target or vllm_eagle.default_target()
    a.speculative_model = a.speculative_model or vllm_eagle.default_head()
    spec = speculative_kwargs_from_args(a, target)
    k = spec["speculative_config"]["num_speculative_tokens"]
    questions = a.prompt or [q["turns"][0] for q in mtbench_questions()[:4]]
    prompts = chat_prompts(AutoTokenizer.from_pretrained(target), questions)
    sp = SamplingParams(temperature=a.temperature, max_tokens=a.max_tokens, seed=0)

    def run(kw):
        llm = LLM(model=target, dtype=a.dtype, max_model_len=2048, enforce_eager=True, disable_log_stats=False, **kw)
        llm.generate(prompts[:1], SamplingParams(max_tokens=8), use_tqdm=False)           # warm-up
        before = spec_counters(llm)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=True)
        dt = time.perf_counter() - t
        after = spec_counters(llm)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        delta = {k: after[k] - before.get(k, 0) for k in ("drafts", "accepted_tokens") if k in after}
        return outs, n / dt, delta
    outs, tps, c = run(spec)
    for q, o in zip(questions, outs):
        print(f"\n### {q}\n{o.outputs[0].text}")
    tau = 1 + c["accepted_tokens"] / c["drafts"] if c.get("drafts") else float("nan")
    print(f"\nvllm-eagle: {len(prompts)} prompts, tree={a.eagle_tree}, K={k}, {a.dtype}: {tps:.1f} tokens/s, "
          f"mean acceptance length tau = {tau:.2f}")
    if a.compare:
        _, base_tps, _ = run({})
        print(f"vanilla vLLM: {base_tps:.1f} tokens/s -> speedup {tps / base_tps:.2f}x")


def bench(argv: list[str]) -> None:
    # benchmarks/ is not installed: it lives in the source checkout, next to the vllm_eagle/ folder
    # of an editable install (a console script's sys.path does not hold the current directory).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "benchmarks", "run.py")) and root not in sys.path:
        sys.path.insert(0, root)
    try:
        from benchmarks.run import main as run_main
    except ModuleNotFoundError as e:
        if e.name != "benchmarks":
            raise
        sys.exit("vllm-eagle bench runs benchmarks/, which is not installed: use an editable install "
                 "of the source checkout, or python -m benchmarks.run from its root")
    run_main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cmds = {"generate": generate, "train": lambda rest: __import__("vllm_eagle.train.train_head", fromlist=["main"]).main(rest),
            "corpus": lambda rest: __import__("vllm_eagle.train.corpus", fromlist=["main"]).main(rest),
            "bench": bench}
    if not argv or argv[0] not in cmds:
        print("usage: vllm-eagle {generate,train,corpus,bench} [options]  (see vllm-eagle CMD --help)")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    cmds[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
