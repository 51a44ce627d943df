"""Greedy losslessness: with our speculation the target's greedy output is reproduced token for token (fp32)."""
import os

import pytest
from conftest import close, generate_ids, make_llm, spec_counters
from vllm import SamplingParams

import vllm_eagle
from vllm_eagle.assets import chat_prompts, mtbench_questions

GREEDY = SamplingParams(temperature=0, max_tokens=64)


def generate(llm, prompts, one_at_a_time: bool) -> list[list[int]]:
    """All prompts batched, or one request at a time on every fourth (writing, reasoning, coding, STEM)."""
    if one_at_a_time:
        return [list(llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts[::4]]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def mtbench_prompts(smollm2):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2)
    return chat_prompts(tok, [q["turns"][0] for q in mtbench_questions()[::5]])     # 16 prompts, all 8 categories


@pytest.fixture(scope="module")
def vanilla(smollm2, mtbench_prompts):
    llm = make_llm(smollm2)
    out = {mode: generate(llm, mtbench_prompts, mode) for mode in (True, False)}
    close(llm)
    return out


TREE = "[(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0)]"
TAU: dict = {}                                             # (K, tree, lookup) -> tau on the shipped head


@pytest.mark.slow
@pytest.mark.parametrize("k,tree,lookup,confidence", [(1, "chain", 0, 0), (3, "chain", 0, 0), (5, "chain", 0, 0.2),
                                                      (3, "chain", 5, 0), (8, TREE, 0, 0), (8, "dynamic", 0, 0)])
def test_smollm2_greedy_identical_to_vanilla(smollm2, smollm2_head, mtbench_prompts, vanilla, k, tree, lookup,
                                             confidence):
    """Chains (K = 1, 3; K = 5 cut where the head's cumulative draft probability falls below 0.2, so rows draft 0-5
    tokens; K = 3 again with rows whose context repeats drafting 5 tokens by prompt lookup), a static tree and an
    EAGLE-2 dynamic tree (8 nodes: masks, tree positions and KV commit on a real model). All 16 prompts batched;
    the dynamic tree also one request at a time."""
    assert len(mtbench_prompts) == 16
    llm = make_llm(smollm2, vllm_eagle.speculative_kwargs(smollm2_head, num_speculative_tokens=k, tree=tree,
                                                          target=smollm2, adaptive=False,       # every step drafts
                                                          lookup=lookup, min_confidence=confidence))
    for one_at_a_time in (True, False) if tree == "dynamic" else (False,):
        got = generate(llm, mtbench_prompts, one_at_a_time)
        assert len(got) == len(vanilla[one_at_a_time]) == (4 if one_at_a_time else 16)
        for i, (a, b) in enumerate(zip(got, vanilla[one_at_a_time])):
            assert a == b, f"prompt {i} (batch-1={one_at_a_time}, K={k}, lookup={lookup}) diverges at token " \
                           f"{next(j for j, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)}"
    c, stats = spec_counters(llm), llm.collective_rpc("eagle_stats")[0]
    close(llm)
    # every draft is a head chain of k or a lookup of 5 tokens; greedy SmolLM2 repeats itself within 64 tokens,
    # so some rows draft by lookup, and the head drafts the rest
    assert (stats["lookup_drafts"] > 0) == (lookup > 0), stats
    if lookup:
        assert k * c["drafts"] < c["draft_tokens"] < lookup * c["drafts"], (c, stats)
    elif confidence:                                       # some chains were cut, some ran to k
        assert stats["confidence_cut"] > 0 and c["draft_tokens"] < k * c["drafts"], (c, stats)
        assert len(c["accepted_tokens_per_pos"]) == k and c["accepted_tokens_per_pos"][k - 1] > 0, c
    else:
        assert c["draft_tokens"] == k * c["drafts"] > 0, c
    assert c["accepted_tokens"] > 0, c                     # the trained head is accepted on the real model
    assert len(c["accepted_tokens_per_pos"]) == max(k, lookup)
    TAU[(k, tree, lookup)] = 1 + c["accepted_tokens"] / c["drafts"]
    if tree != "chain":
        assert c["accepted_tokens_per_pos"][1] > 0        # paths deeper than one node were accepted
        if (3, "chain", 0) in TAU:                         # (runs after the chains when the module runs whole)
            assert TAU[(k, tree, 0)] > TAU[(3, "chain", 0)], TAU   # the tree's extra candidates are accepted


def test_oracle_pair_lossless_with_high_acceptance(oracle):
    """The oracle head drafts exactly the target's next token: accepted, rejected-free and bonus paths, tau > 2."""
    target, head = oracle
    prompts = ["def main(", "import os", "class Foo:", "for i in range(", "while True:", "return self."]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want, _ = generate_ids(target, prompts, sp)
    got, c = generate_ids(target, prompts, sp, vllm_eagle.speculative_kwargs(head, num_speculative_tokens=3))
    assert got == want
    tau = 1 + c["accepted_tokens"] / c["drafts"]
    assert tau > 2.0, c


def test_partial_oracle_accepts_about_half_and_stays_lossless(oracle, tmp_path):
    """A "partial oracle": the oracle head restricted to a draft vocabulary that lacks half of the tokens the target
    emits, so drafts are right exactly when the target's next token is in it. Chains, a static tree and a dynamic
    tree then go through accepted, rejected and partly accepted paths (what a trained head exercises) on tiny
    models, token for token identical to vanilla."""
    import json
    import shutil
    target, head = oracle
    prompts = ["def main(", "import os", "class Foo:", "for i in range(", "while True:", "return self."]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want, _ = generate_ids(target, prompts, sp)
    emitted = sorted({t for ids in want for t in ids})
    vocab = json.load(open(os.path.join(target, "config.json")))["vocab_size"]
    dropped = set(emitted[::2])                                 # every other token the target emits
    partial = tmp_path / "partial-oracle"
    shutil.copytree(head, partial)
    with open(partial / "draft_vocab.json", "w") as f:
        json.dump({"token_ids": [t for t in range(vocab) if t not in dropped]}, f)
    for tree in ("chain", "[(0,), (1,), (0, 0), (0, 0, 0)]", "dynamic"):
        got, c = generate_ids(target, prompts, sp, vllm_eagle.speculative_kwargs(
            str(partial), num_speculative_tokens=3 if tree == "chain" else None, tree=tree, adaptive=False))
        assert got == want, tree
        first = c["accepted_tokens_per_pos"][0] / c["drafts"]
        assert 0.2 < first < 0.9 and c["accepted_tokens_per_pos"][1] > 0, (tree, c)     # partly accepted


def test_random_head_is_rejected_but_lossless(tiny, tiny_random_head):
    prompts = ["def main(", "import os", "class Foo:"]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want, _ = generate_ids(tiny, prompts, sp)
    got, c = generate_ids(tiny, prompts, sp, vllm_eagle.speculative_kwargs(tiny_random_head, num_speculative_tokens=4))
    assert got == want
    assert c["drafts"] > 0 and c["accepted_tokens"] < c["draft_tokens"] / 4     # mostly rejected: the rejection path ran


def test_chunked_prefill_and_mixed_lengths(oracle):
    """Long prompts split into prefill chunks next to decoding rows: draft KV of every chunk is committed."""
    target, head = oracle
    long = " ".join(["for i in range(10): print(i)"] * 40)
    prompts = [long, "def main(", long[:300], "import os"]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    kw = dict(max_num_batched_tokens=64, max_num_seqs=4, enable_chunked_prefill=True)
    want, _ = generate_ids(target, prompts, sp, **kw)
    got, c = generate_ids(target, prompts, sp, vllm_eagle.speculative_kwargs(head, num_speculative_tokens=3), **kw)
    assert got == want
    assert 1 + c["accepted_tokens"] / c["drafts"] > 2.0, c      # acceptance survives chunking


def test_k_schedule_turns_speculation_off_under_load(oracle):
    """vLLM's batch-size schedule reaches our proposer: K=2 for one request, 0 from two on; lossless throughout."""
    target, head = oracle
    prompts = ["def main(", "import os", "class Foo:"]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want, _ = generate_ids(target, prompts, sp)
    spec = vllm_eagle.speculative_kwargs(head, num_speculative_tokens=2, k_by_batch_size=[(1, 1, 2), (2, 64, 0)])
    batched, c_batched = generate_ids(target, prompts, sp, spec)
    assert batched == want and c_batched.get("drafts", 0) == 0          # 3 running requests: no drafts at all
    single, c_single = generate_ids(target, prompts[:1], sp, spec)
    assert single == want[:1] and c_single["draft_tokens"] == 2 * c_single["drafts"] > 0
