"""Reliability in the engine: preemption with recomputation, prompts at the context limit, aborted requests, and the
request features that assume a linear chain (n > 1, stop strings, logprobs, structured output, penalties) -- all
lossless against vanilla vLLM with chains, static and dynamic trees (fp32, oracle pair: deep accepted paths)."""
import pytest
from conftest import close, generate_ids, make_llm, spec_counters, tiered
from vllm import SamplingParams

import vllm_eagle

TREE = "[(0,), (1,), (0, 0), (0, 1), (0, 0, 0), (0, 0, 0, 0)]"
SHAPES = {"chain": dict(num_speculative_tokens=3, adaptive=False), "static": dict(tree=TREE, adaptive=False),
          "dynamic": dict(tree="dynamic", depth=3, top_k=2, total_tokens=5, adaptive=False)}   # every step drafts
shapes = pytest.mark.parametrize("shape", tiered(sorted(SHAPES), fast={"dynamic"}))
PROMPTS = ["def main(", "import os", "class Foo:", "for i in range(", "while True:", "return self.",
           " ".join(["x = [i * i for i in range(10)]"] * 6), "with open(path) as f:"]


def metric(llm, name: str) -> float:
    return sum(getattr(m, "value", 0) or 0 for m in llm.get_metrics() if m.name == name)


@shapes
def test_preemption_and_recomputation_stay_lossless(oracle, shape):
    """A KV cache of 4 blocks for 8 growing requests: the scheduler preempts and later recomputes requests (the head's
    KV is rebuilt by the recomputed prefill); every output equals vanilla's without preemption."""
    target, head = oracle
    sp = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
    want, _ = generate_ids(target, PROMPTS, sp)
    llm = make_llm(target, vllm_eagle.speculative_kwargs(head, **SHAPES[shape]), num_gpu_blocks_override=4,
                   max_num_seqs=8, max_model_len=256, block_size=128)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    preemptions, c = metric(llm, "vllm:num_preemptions"), spec_counters(llm)
    close(llm)
    assert preemptions > 0
    assert got == want
    assert 1 + c["accepted_tokens"] / c["drafts"] > 2.0, c


@shapes
def test_prompts_at_the_context_limit(oracle, shape):
    """Prompts ending 1..20 tokens short of max_model_len with max_tokens past it: drafts are cut at the limit, output
    stops exactly at max_model_len and equals vanilla's."""
    target, head = oracle
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(target)
    body = tok(" ".join(PROMPTS * 40), add_special_tokens=False)["input_ids"]
    L = 256
    prompts = [{"prompt_token_ids": body[i: i + L - short]} for i, short in enumerate((1, 2, 3, 5, 8, 20))]
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    want, _ = generate_ids(target, prompts, sp, max_model_len=L)
    got, c = generate_ids(target, prompts, sp, vllm_eagle.speculative_kwargs(head, **SHAPES[shape]), max_model_len=L)
    assert got == want
    assert [len(p["prompt_token_ids"]) + len(g) for p, g in zip(prompts, got)] == [L] * len(prompts)
    assert c["drafts"] > 0


@shapes
def test_aborted_requests_leave_no_state(oracle, shape):
    """Requests aborted mid-decode (the server does this when a client disconnects) free their head KV; the others'
    outputs are unaffected."""
    target, head = oracle
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    want, _ = generate_ids(target, PROMPTS, sp)
    llm = make_llm(target, vllm_eagle.speculative_kwargs(head, **SHAPES[shape]))
    engine = llm.llm_engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, sp)
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = list(o.outputs[0].token_ids)
        steps += 1
        if steps == 3:
            engine.abort_request(["1", "4", "6"])
    assert sorted(done, key=int) == ["0", "2", "3", "5", "7"]
    assert all(done[r] == want[int(r)] for r in done)
    llm.generate(PROMPTS[:1], sp, use_tqdm=False)          # one more request: its steps deliver the finished ids
    kv_left = llm.collective_rpc("eagle_stats")[0]["draft_kv_requests"]
    close(llm)
    assert kv_left <= 1                                     # at most that last request, freed on the next step


def _stop_at_middle(text: str) -> str:
    return text[len(text) // 2: len(text) // 2 + 3]


FEATURES = {
    "n=2": dict(n=2, temperature=0.8, seed=5),                # n > 1 needs sampling: seeded, checked for reproduction
    "stop string": dict(stop="<from vanilla>"),
    "logprobs": dict(logprobs=3),
    "presence penalty": dict(presence_penalty=0.5),
    "structured output": "regex",
}


# Features that run through trees are checked with both shapes; the chain fallback is the same for every shape.
CASES = [("dynamic", f) for f in sorted(FEATURES)] + [("static", "n=2"), ("static", "stop string")]


@pytest.mark.parametrize("shape,feature", tiered(CASES, fast={("dynamic", "logprobs"), ("dynamic", "n=2")},
                                                 ids=[f"{s}-{f}" for s, f in CASES]))
def test_chain_assuming_features_with_trees(oracle, shape, feature):
    """Each feature either runs through trees losslessly (n, stop strings) or falls back to a chain for that request
    (logprobs, penalties, structured output: vLLM's rejection sampler applies them); greedy output equals vanilla's,
    sampled n=2 output reproduces with its seed."""
    from vllm.sampling_params import StructuredOutputsParams
    target, head = oracle
    prompts = PROMPTS[:4]
    base = dict(temperature=0, max_tokens=40)
    want_plain, _ = generate_ids(target, prompts, SamplingParams(**base))
    kw = FEATURES[feature]
    if feature == "n=2":
        base.pop("temperature")
    if feature == "stop string":
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(target)
        kw = dict(stop=[_stop_at_middle(tok.decode(want_plain[0]))])
    elif kw == "regex":
        kw = dict(structured_outputs=StructuredOutputsParams(regex="[a-z_ ]{4,30}\\(\\)"))
    sp = SamplingParams(**base, **kw)

    def run(spec, times=1):
        llm = make_llm(target, spec)
        outs = [llm.generate(prompts, sp, use_tqdm=False) for _ in range(times)]
        c = spec_counters(llm)
        close(llm)
        res = [[[(list(x.token_ids), x.text, x.finish_reason) for x in o.outputs] for o in out] for out in outs]
        return res, c, outs[0]

    (want, *_), _, want_outs = run(None)
    (got, *again), c, got_outs = run(vllm_eagle.speculative_kwargs(head, **SHAPES[shape]), 1 + (feature == "n=2"))
    assert c["drafts"] > 0 and (c["accepted_tokens"] > 0 or feature == "structured output")
    if feature == "n=2":
        assert again[0] == got and all(len(o) == 2 and o[0] != o[1] for o in got)
        assert all(len(x[0]) == 40 for o in got for x in o)
        return
    assert got == want
    if feature == "stop string":
        assert got[0][0][2] == "stop"
    if feature == "logprobs":
        for a, b in zip(got_outs, want_outs):
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert la.keys() == lb.keys()
                assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)
