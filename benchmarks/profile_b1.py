"""The batch-1 step under a sampling profiler: one in-process engine (vanilla; ours chain K=2 with the gate on; or
`tree [PATHS]`: ours with a static tree, default the default tree of benchmarks.run, drafting every step),
6 MT-Bench prompts x 128 greedy tokens after an untimed warm-up; `/tmp/profile_b1_go` appears when timing starts.

    python -m benchmarks.profile_b1 chain & \\
      (while [ ! -f /tmp/profile_b1_go ]; do sleep 0.2; done; py-spy record --pid $! --format raw -r 97 -o chain.txt)

In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that one Python process holds the whole step for py-spy.
"""
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

GO = "/tmp/profile_b1_go"


def main(which: str, tree: str | None = None) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import vllm_eagle
    from benchmarks.common import DEFAULT_TREE, workloads
    target, head = vllm_eagle.default_target(), vllm_eagle.default_head()
    prompts = workloads(AutoTokenizer.from_pretrained(target), ["mtbench"], 8)["mtbench"]
    spec = {"chain": lambda: vllm_eagle.speculative_kwargs(head),
            "tree": lambda: vllm_eagle.speculative_kwargs(head, tree=tree or DEFAULT_TREE, adaptive=False),
            "vanilla": lambda: {"enable_prefix_caching": False}}[which]()
    llm = LLM(model=target, dtype="bfloat16", max_model_len=2048, enforce_eager=True, max_num_seqs=32, seed=0, **spec)
    sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=32), use_tqdm=False)
    if os.path.exists(GO):
        os.remove(GO)
    open(GO, "w").close()
    t, n = time.perf_counter(), 0
    for p in prompts[:6]:
        n += len(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids)
    print(f"{which} b1: {n / (time.perf_counter() - t):.1f} tok/s", flush=True)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main(*(sys.argv[1:] or ["chain"]))
