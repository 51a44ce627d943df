"""Self-distillation: the target answers training prompts itself (vLLM, greedy), so the head learns the text it must
draft — the target's own continuations, where every answer token is the target's argmax.

Answers are appended to a JSONL file chunk by chunk ({"prompt", "answer", "finished"}): an interrupted run resumes
where it stopped, and the same file is valid `--data jsonl` input.
"""
from __future__ import annotations

import json
import os
import time


def done_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def self_distill(target: str, prompts: list[str], out_jsonl: str, max_tokens: int = 256, max_prompt_tokens: int = 256,
                 chunk: int = 250, log=print) -> list[dict]:
    """Greedy answers of `target` to `prompts` (user turns, chat-templated here); returns all records of out_jsonl.

    Prompts over `max_prompt_tokens` tokens are skipped (they would fill the training window). Generation runs
    in a vLLM engine (bf16) that is shut down before returning.
    """
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    records = done_records(out_jsonl)
    seen = {r["prompt"] for r in records}
    tok = AutoTokenizer.from_pretrained(target)
    todo = []
    for p in prompts:
        if p in seen:
            continue
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        if len(tok(text, add_special_tokens=False)["input_ids"]) <= max_prompt_tokens:
            todo.append((p, text))
    if not todo:
        return records
    log(f"self-distill: {len(records)} answers on disk, generating {len(todo)} with vLLM (greedy, <= {max_tokens} tokens)")
    # An explicit KV budget (128 sequences x 512 tokens need ~1.5 GiB for SmolLM2): the CPU backend otherwise
    # reserves 92 % of the NUMA node and refuses to start while the trainer holds the HF target in memory.
    llm = LLM(model=target, dtype="bfloat16", max_model_len=max_prompt_tokens + max_tokens, max_num_seqs=128,
              seed=0, enable_prefix_caching=False, kv_cache_memory_bytes=2 << 30)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    t0, n_tokens = time.time(), 0
    try:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            outs = llm.generate([t for _, t in part], sp, use_tqdm=False)
            with open(out_jsonl, "a") as f:
                for (p, _), o in zip(part, outs):
                    c = o.outputs[0]
                    rec = {"prompt": p, "answer": c.text, "finished": c.finish_reason == "stop"}
                    records.append(rec)
                    n_tokens += len(c.token_ids)
                    f.write(json.dumps(rec) + "\n")
            el = time.time() - t0
            done = start + len(part)
            log(f"self-distill: {done}/{len(todo)} answers, {n_tokens} tokens, {n_tokens / el:.0f} tok/s, "
                f"eta {el / done * (len(todo) - done):.0f}s")
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return records
