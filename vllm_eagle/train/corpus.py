"""A self-distilled training corpus that grows across runs: the target's own greedy answers to ShareGPT turns.

The head must predict the target's own continuations, and generating them is the slowest phase on a CPU, so answers
are kept (in the repository, a few MB) and every later run reuses and extends them. A corpus folder holds
  answers.jsonl.gz  one record per answer: {"conv": id, "turn": k, "ids": [answer token ids], "finished": bool}
                    (gzip members appended chunk by chunk, so an interrupted run keeps what it generated)
  meta.json         the target's identity (name, config hash), dtype, max tokens, the selection and the command
A record's prompt is rebuilt, never stored: ShareGPT conversation `conv` (its id in data.sharegpt_conversations)
up to its k-th human turn, earlier answers as ShareGPT has them, in the target's chat template (plain text for a base
model: assets.prompt_text).

Selection: every turn of the conversations before data.HOLDOUT_START (the benchmarks take theirs after it), prompts up
to max_prompt_tokens, evaluation prompts (MT-Bench, HumanEval) excluded, balanced over what users send: chat, code,
maths, translation, summarisation, long documents (round-robin over categories, seeded order within each).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass

import torch

from ..assets import prompt_ids
from .data import HOLDOUT_START, Example, sharegpt_conversations

CATEGORIES = ("chat", "code", "maths", "translation", "summarisation", "long-document")
_PATTERNS = {   # checked in this order; the first match wins (a long prompt is a long document whatever it asks)
    "summarisation": re.compile(r"summar|tl;dr|key points|main points", re.I),
    "translation": re.compile(r"translat|in (english|french|spanish|german|chinese|japanese|korean)\b", re.I),
    "code": re.compile(r"```|\b(python|javascript|typescript|java|c\+\+|sql|function|code|script|bug|api|html|css|"
                       r"regex|class)\b", re.I),
    "maths": re.compile(r"\b(solve|calculate|equation|integral|derivative|probability|how many|math|prove|sum of)\b"
                        r"|\d+\s*[-+*/^=]\s*\d+", re.I),
}
LONG_DOCUMENT_TOKENS = 600
KV_CACHE_GIB = 4        # generation's KV budget: it bounds the batch (up to 64 sequences of up to 1,280 tokens)


def category(text: str, prompt_tokens: int) -> str:
    if prompt_tokens >= LONG_DOCUMENT_TOKENS:
        return "long-document"
    return next((name for name, p in _PATTERNS.items() if p.search(text)), "chat")


@dataclass(frozen=True)
class Turn:
    conv: int                 # conversation id (index in data.sharegpt_conversations)
    turn: int                 # k: answers the k-th human turn (0-based)
    prompt_ids: tuple         # chat-templated prompt, generation prompt appended
    category: str


def conversation_messages(turns: list[dict], k: int) -> list[dict] | None:
    """Chat messages up to human turn k (ShareGPT's answers before it), or None if the turns do not alternate."""
    msgs = []
    for i, t in enumerate(turns[: 2 * k + 1]):
        want = "human" if i % 2 == 0 else "gpt"
        if t.get("from") != want or not str(t.get("value", "")).strip():
            return None
        msgs.append({"role": "user" if want == "human" else "assistant", "content": t["value"]})
    return msgs if len(msgs) == 2 * k + 1 else None


def excluded_prompts() -> set[str]:
    """Evaluation prompts that must never be trained on (MT-Bench turns, HumanEval prompts), whitespace-stripped."""
    from ..assets import humaneval_problems, mtbench_questions
    return ({t.strip() for q in mtbench_questions() for t in q["turns"]}
            | {p["prompt"].strip() for p in humaneval_problems()})


def select_turns(conversations: list[list[dict]], tokenizer, max_prompt_tokens: int, seed: int = 0,
                 exclude: set[str] = frozenset()) -> list[Turn]:
    """Every usable turn of conversations [0, HOLDOUT_START), in the corpus's generation order: categories
    round-robin, each in a seeded random order (the order is fixed by the data and seed, so a corpus grows by
    taking the next turns)."""
    by_cat: dict[str, list[Turn]] = {c: [] for c in CATEGORIES}
    for conv, turns in enumerate(conversations[:HOLDOUT_START]):
        for k in range((len(turns) + 1) // 2):
            msgs = conversation_messages(turns, k)
            if msgs is None:
                break
            if msgs[-1]["content"].strip() in exclude:
                continue
            ids = prompt_ids(tokenizer, msgs)                                 # as data.tokenize renders prompts
            if len(ids) > max_prompt_tokens:
                break                                    # later turns only grow
            cat = category(msgs[-1]["content"], len(ids))
            by_cat[cat].append(Turn(conv, k, tuple(ids), cat))
    rng = random.Random(seed)
    for c in CATEGORIES:
        rng.shuffle(by_cat[c])
    order, queues = [], [list(reversed(by_cat[c])) for c in CATEGORIES]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop())
    return order


def target_identity(target: str) -> dict:
    with open(os.path.join(target, "config.json"), "rb") as f:
        raw = f.read()
    return {"name": os.path.basename(os.path.normpath(target)), "config_sha256": hashlib.sha256(raw).hexdigest()[:16]}


def read_answers(folder: str) -> list[dict]:
    path = os.path.join(folder, "answers.jsonl.gz")
    if not os.path.isfile(path):
        return []
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_meta(folder: str) -> dict | None:
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class CorpusMismatch(ValueError):
    """The corpus folder was generated by another target or with other settings; the message names the difference."""


def grow(target: str, folder: str, num_answers: int, max_tokens: int = 256, max_prompt_tokens: int = 1536,
         dtype: str = "float32", max_num_seqs: int = 64, chunk: int = 128, sharegpt: str | None = None,
         command: str = "", log=print) -> list[dict]:
    """Generate answers until the corpus holds num_answers (vLLM, greedy); returns all records.

    A corpus keeps one target, dtype, max_tokens and max_prompt_tokens for its life (the selection order and the
    answers depend on them): asking for others raises CorpusMismatch naming the field.
    """
    from transformers import AutoTokenizer
    os.makedirs(folder, exist_ok=True)
    settings = {"target": target_identity(target), "dtype": dtype, "max_tokens": max_tokens,
                "max_prompt_tokens": max_prompt_tokens, "seed": 0, "holdout_start": HOLDOUT_START}
    meta = read_meta(folder)
    if meta is not None:
        diff = [k for k in settings if meta.get(k) != settings[k]]
        if diff:
            raise CorpusMismatch(f"corpus {folder!r} was made with {', '.join(f'{k}={meta.get(k)!r}' for k in diff)}; "
                                 f"this run asks {', '.join(f'{k}={settings[k]!r}' for k in diff)}: use another "
                                 "--corpus folder or the corpus's settings")
    records = read_answers(folder)
    if len(records) >= num_answers:
        return records
    tok = AutoTokenizer.from_pretrained(target)
    from ..assets import sharegpt_path
    with open(sharegpt or sharegpt_path(), encoding="utf-8") as f:
        conversations = sharegpt_conversations(f.read())
    done = {(r["conv"], r["turn"]) for r in records}
    todo = [t for t in select_turns(conversations, tok, max_prompt_tokens, exclude=excluded_prompts())
            if (t.conv, t.turn) not in done][: num_answers - len(records)]
    log(f"corpus: {len(records)} answers in {folder}, generating {len(todo)} ({dtype}, greedy, <= {max_tokens} tokens)")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    # An explicit KV budget: the CPU backend otherwise reserves most of the NUMA node.
    llm = LLM(model=target, dtype=dtype, max_model_len=max_prompt_tokens + max_tokens, max_num_seqs=max_num_seqs,
              seed=0, enable_prefix_caching=True, kv_cache_memory_bytes=KV_CACHE_GIB << 30)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    t0, n_tokens = time.time(), 0
    try:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            outs = llm.generate([TokensPrompt(prompt_token_ids=list(t.prompt_ids)) for t in part], sp, use_tqdm=False)
            new = [{"conv": t.conv, "turn": t.turn, "ids": list(o.outputs[0].token_ids),
                    "finished": o.outputs[0].finish_reason == "stop"} for t, o in zip(part, outs)]
            with gzip.open(os.path.join(folder, "answers.jsonl.gz"), "at") as f:
                f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in new)
            records += new
            n_tokens += sum(len(r["ids"]) for r in new)
            meta = dict(settings, answers=len(records), answer_tokens=sum(len(r["ids"]) for r in records),
                        command=command or (meta or {}).get("command", ""))
            with open(os.path.join(folder, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1)
            el = time.time() - t0
            log(f"corpus: {len(records)} answers ({start + len(part)}/{len(todo)} this run), {n_tokens / el:.0f} "
                f"generated tok/s, eta {el / (start + len(part)) * (len(todo) - start - len(part)):.0f}s")
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return records


def ensure_answers(target: str, folder: str, num_answers: int, log=print) -> None:
    """Grow the corpus to num_answers (0: leave it) with the settings it was made with (grow's defaults for a new
    one), so a training run can ask for more self-distilled answers than the corpus holds."""
    if num_answers and len(read_answers(folder)) < num_answers:
        meta = read_meta(folder) or {}
        grow(target, folder, num_answers, log=log,
             **{k: meta[k] for k in ("max_tokens", "max_prompt_tokens", "dtype") if k in meta})


def examples(folder: str, tokenizer, max_len: int, sharegpt: str | None = None) -> list[Example]:
    """The corpus as training examples, in generation order: prompt (rebuilt from ShareGPT) + the target's answer,
    answer tokens masked in. A sequence over max_len keeps its answer and the prompt's end (the head then sees a
    cut document, and the target's features are captured on the same cut text)."""
    records = read_answers(folder)
    if not records:
        raise FileNotFoundError(f"corpus {folder!r} has no answers: grow it first with `vllm-eagle corpus --target T "
                                f"--out {folder} --answers N`")
    from ..assets import sharegpt_path
    with open(sharegpt or sharegpt_path(), encoding="utf-8") as f:
        conversations = sharegpt_conversations(f.read())
    out = []
    for r in records:
        msgs = conversation_messages(conversations[r["conv"]], r["turn"])
        prompt = prompt_ids(tokenizer, msgs)
        answer = r["ids"][: max_len - 8]
        prompt = prompt[max(0, len(prompt) + len(answer) - max_len):]
        if len(answer) < 2:
            continue
        mask = torch.zeros(len(prompt) + len(answer), dtype=torch.bool)
        mask[len(prompt):] = True
        out.append(Example(torch.tensor(prompt + answer, dtype=torch.long), mask))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="vllm-eagle corpus", description="Grow a self-distilled training corpus.")
    p.add_argument("--target", required=True)
    p.add_argument("--out", required=True, help="corpus folder (created, or extended if it exists)")
    p.add_argument("--answers", type=int, required=True, help="grow the corpus to this many answers")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-prompt-tokens", type=int, default=1536)
    p.add_argument("--dtype", default="float32", help="generation dtype (kept for the corpus's life)")
    a = p.parse_args(argv)
    # vLLM's CPU platform lets this variable override the engine's kv_cache_memory_bytes.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A batch job: the worker takes every core (vLLM reserves one for its front end by default, which here sits idle).
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    grow(a.target, a.out, a.answers, a.max_tokens, a.max_prompt_tokens, a.dtype,
         command="vllm-eagle corpus " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
