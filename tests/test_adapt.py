"""Load adaptivity (adapt.py): the gate measures both arms per batch-size bucket, then keeps the faster one and
explores the other every explore_every-th decision; in the engine it stops a useless head from drafting, losslessly."""
import pytest
from conftest import generate_ids, spec_counters, tiered
from vllm import SamplingParams

import vllm_eagle
from vllm_eagle.adapt import SpeculationGate


def test_buckets():
    assert [SpeculationGate.bucket_of(n) for n in (1, 2, 3, 4, 7, 8, 15, 16, 33)] == [1, 2, 2, 3, 3, 4, 4, 5, 6]


def decisions(gate: SpeculationGate, num_reqs: int, steps: int, on_s: float, off_s: float, tokens_on: float) -> list:
    """Drive the gate as the proposer does: decide, then record that decision's measured step."""
    out = []
    for _ in range(steps):
        on = gate.speculate(num_reqs)
        gate.record(num_reqs, on, on_s if on else off_s, tokens_on if on else 1.0)
        out.append(on)
    return out


def test_gate_keeps_the_faster_arm_per_bucket_and_explores():
    gate = SpeculationGate(warmup=4, explore_every=16)
    # batch 1: speculation emits 1.6 tokens in 0.10 s vs 1 token in 0.08 s -> on (16 vs 12.5 tok/req/s)
    d1 = decisions(gate, 1, 200, on_s=0.10, off_s=0.08, tokens_on=1.6)
    # batch 8: 1.5 tokens in 0.20 s vs 1 in 0.085 s -> off (7.5 vs 11.8)
    d8 = decisions(gate, 8, 200, on_s=0.20, off_s=0.085, tokens_on=1.5)
    assert d1[:8].count(True) == 4                      # warm-up measures both arms alternately
    # batch 8: after 3 samples each, "on" is 1.57x slower (>= apart 1.5): warm-up ends early, "off" from then on
    assert d8[:6] == [True, False] * 3 and d8[6:8] == [False, False]
    # batch 1: every 4th decision explores until the slower arm has 20 samples, and every 16th after that
    assert 0 < d1[100:].count(False) <= len(d1[100:]) // 16 + 1
    assert 0 < d8[100:].count(True) <= len(d8[100:]) // 16 + 1
    assert gate.summary()["1"][0] > gate.summary()["1"][1] and gate.summary()["8"][0] < gate.summary()["8"][1]


def test_greedy_and_sampled_steps_keep_separate_estimates():
    """Same batch size, T=0 pays (1.6 tokens per step) while T=1 does not (1.1): each keeps its own arm estimates, so
    sampled traffic does not inherit greedy's acceptance (with one bucket it would speculate until the slow token
    average caught up)."""
    gate = SpeculationGate(warmup=4, explore_every=16)
    greedy = []
    for _ in range(200):
        on = gate.speculate(1)
        gate.record(1, on, 0.10 if on else 0.08, 1.6 if on else 1.0)
        greedy.append(on)
    sampled = []
    for _ in range(100):
        on = gate.speculate(1, sampled=True)
        gate.record(1, on, 0.10 if on else 0.08, 1.1 if on else 1.0, sampled=True)
        sampled.append(on)
    # sampled: "off" wins after warm-up; "on" is explored every 4th decision until it has `settle` samples, then
    # every 16th: ~22 of 100. One shared bucket keeps greedy's token average, which takes ~60 "on" steps to fall
    # below "off": ~62 of 100.
    assert greedy[100:].count(True) > 85 and sampled.count(True) <= 30
    s = gate.summary()
    assert set(s) == {"1", "1 sampled"} and s["1"][0] > s["1"][1] and s["1 sampled"][0] < s["1 sampled"][1]


def test_arms_clearly_apart_skip_the_rest_of_warm_up_and_settling():
    """Batch 8, static tree: a drafted step costs ~5 plain steps (142 vs 29 ms) for 1.85 tokens per request, "on" is
    2.6x slower. After 3 samples per arm the gate stops exploring it every other or every 4th step (warm-up 8 +
    settle 20 would draft ~21 of the first 100 steps) and explores only as the budget allows (every ~102nd)."""
    gate = SpeculationGate()
    d = decisions(gate, 8, 300, on_s=0.142, off_s=0.029, tokens_on=1.85)
    assert d[:6] == [True, False] * 3 and 2 <= d[6:].count(True) <= 3
    close = decisions(SpeculationGate(), 8, 100, on_s=0.035, off_s=0.029, tokens_on=1.0)   # 1.2x: not clearly apart
    assert close[:16].count(True) == 8 and close[16:].count(True) >= 5                  # full warm-up, then settling


def test_gate_follows_a_change_in_acceptance():
    gate = SpeculationGate(warmup=4, explore_every=8, alpha=0.3)
    decisions(gate, 1, 100, on_s=0.10, off_s=0.08, tokens_on=1.6)       # speculation pays ...
    late = decisions(gate, 1, 200, on_s=0.10, off_s=0.08, tokens_on=1.0)[-100:]   # ... then nothing is accepted
    assert late.count(True) <= 100 // 8 + 1


def test_useless_head_is_gated_off_losslessly(tiny, tiny_random_head):
    """A random head is never accepted: after the warm-up the gate keeps it from drafting; output equals vanilla."""
    prompts = ["def main(", "import os", "class Foo:", "for i in range(", "while True:", "return self."]
    sp = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    want, _ = generate_ids(tiny, prompts, sp)
    from conftest import close, make_llm
    llm = make_llm(tiny, vllm_eagle.speculative_kwargs(tiny_random_head, num_speculative_tokens=3))
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
    st = llm.collective_rpc("eagle_stats")[0]
    close(llm)
    assert got == want
    assert st["gated_steps"] > 0.6 * st["steps"], st


@pytest.mark.parametrize("lookup_gate_says", tiered([True, False], fast={True}))
def test_gated_steps_draft_by_lookup_as_the_lookup_gate_says(tiny, tiny_random_head, monkeypatch, lookup_gate_says):
    """With lookup, the steps the gate keeps from drafting ask a second gate whether the lookup rows still draft (no
    head forward). Gates stubbed (what they learn is tested above with simulated timings): the head gate always says
    off; the tiny random target's greedy text repeats itself, so lookup finds drafts, which are accepted when the
    lookup gate lets them through and absent otherwise. Output equals vanilla's either way."""
    from vllm_eagle import proposer
    made = []

    def gate():                                   # each proposer builds its head gate, then its lookup gate
        g = SpeculationGate()
        says = lookup_gate_says if len(made) % 2 else False
        g.speculate = lambda n, sampled=False: says
        made.append(g)
        return g
    monkeypatch.setattr(proposer, "SpeculationGate", gate)
    prompts = ["def main(", "import os", "class Foo:", "for i in range(", "while True:", "return self."]
    sp = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    want, _ = generate_ids(tiny, prompts, sp)
    from conftest import close, make_llm
    llm = make_llm(tiny, vllm_eagle.speculative_kwargs(tiny_random_head, num_speculative_tokens=2, lookup=3))
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
    st, c = llm.collective_rpc("eagle_stats")[0], spec_counters(llm)
    close(llm)
    assert got == want
    assert len(made) % 2 == 0 and st["gated_steps"] > 0, st
    if lookup_gate_says:
        assert st["lookup_only_steps"] == st["gated_steps"] and st["lookup_drafts"] > 0, st
        # every draft vLLM verified was a lookup draft of 3 (a request's last drafts die with it, unscheduled)
        assert c["draft_tokens"] == 3 * c["drafts"] and 0 < c["drafts"] <= st["lookup_drafts"], (c, st)
        assert c["accepted_tokens"] > 0, c
    else:
        assert st["lookup_only_steps"] == st["lookup_drafts"] == c.get("drafts", 0) == 0, (st, c)


def test_seeded_requests_under_the_gate_sample_exactly_as_vanilla(oracle):
    """Under the gate a request with a seed never drafts, so its output is vanilla's for that seed, token for token,
    while greedy and unseeded requests in the same batch are speculated (and greedy stays lossless)."""
    target, head = oracle
    prompts = ["def main(", "import os", "class Foo:", "for i in range(", "while True:"]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    seeded = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=32, ignore_eos=True, seed=s) for s in (1, 2)]
    unseeded = SamplingParams(temperature=0.8, max_tokens=32, ignore_eos=True)
    params = [greedy, greedy, *seeded, unseeded]
    from conftest import close, make_llm
    outs = {}
    for name, spec in (("vanilla", None), ("ours", vllm_eagle.speculative_kwargs(head, num_speculative_tokens=3))):
        llm = make_llm(target, spec)
        outs[name] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        c = spec_counters(llm) if spec else None
        close(llm)
    assert outs["ours"][:4] == outs["vanilla"][:4]
    assert len(outs["ours"][4]) == 32 and c["accepted_tokens"] > 0


def test_steps_without_drafts_sample_through_vanillas_sampler(tiny, tiny_random_head, monkeypatch):
    """When the gate keeps every row from drafting, the step is vanilla's: vLLM's rejection sampler (which at T > 0
    draws a [num_reqs, vocab] exponential even with no drafts) is skipped, and seeded samples equal vanilla's."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    prompts = ["def main(", "import os", "class Foo:"]
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, ignore_eos=True, seed=s) for s in (1, 2, 3)]
    want, _ = generate_ids(tiny, prompts, params)
    calls = []
    forward = RejectionSampler.forward
    monkeypatch.setattr(RejectionSampler, "forward", lambda self, *a, **kw: calls.append(1) or forward(self, *a, **kw))
    monkeypatch.setattr(SpeculationGate, "speculate", lambda self, num_reqs, sampled=False: False)
    got, _ = generate_ids(tiny, prompts, params, vllm_eagle.speculative_kwargs(tiny_random_head))
    assert got == want
    assert calls == []


def test_gate_keeps_a_small_win_despite_noisy_acceptance():
    """Batch 1 at tau ~1.6: an "on" step emits 1, 2, 3 or 4 tokens (57/29/9/5 %) in 45 ms, an "off" step 1 in 33 ms:
    on is worth 36 tok/s against 30. Single steps swing far either way; the gate must still keep speculating."""
    import random
    rng = random.Random(0)
    gate = SpeculationGate()
    ons = []
    for _ in range(2000):
        on = gate.speculate(1)
        tokens = rng.choices([1, 2, 3, 4], weights=[57, 29, 9, 5])[0] if on else 1
        gate.record(1, on, (0.045 if on else 0.033) * rng.uniform(0.9, 1.1), tokens)
        ons.append(on)
    assert sum(ons[200:]) > 0.9 * len(ons[200:])


def test_an_arm_measured_absurdly_slow_is_re_measured_and_recovers():
    """A stall-ridden run of "off" measurements (1000x its real cost) must not keep the gate from going back to "off"
    when "off" pays: it is still explored (every explore_max-th decision) and one normal sample replaces the average."""
    gate = SpeculationGate()
    decisions(gate, 1, 80, on_s=0.040, off_s=0.030, tokens_on=1.2)     # off pays: 33.3 vs 30 tok/req/s
    for _ in range(30):
        gate.record(1, False, 30.0, 1.0)                                # off now looks 1000x slower than it is
    d = decisions(gate, 1, 800, on_s=0.040, off_s=0.030, tokens_on=1.2)
    assert 16 < d.index(False) < gate.explore_max                      # explored late while it looks absurd ...
    assert d[400:].count(False) >= 0.9 * 400                            # ... and "off" again once re-measured


def test_exploring_a_much_slower_arm_costs_about_the_budget():
    """Batch 32, static tree: a drafted step costs ~5 plain steps (142 vs 29 ms) for 1.85 tokens. Exploring it costs
    what the plain arm would have emitted meanwhile (3.05 plain steps), not (rate ratio - 1) = 1.65: the gate keeps
    ~97 % of all-off throughput over 2,000 decisions (the rate-ratio rule explored every 57th: 94.5 %)."""
    gate = SpeculationGate()
    d = decisions(gate, 32, 2000, on_s=0.142, off_s=0.029, tokens_on=1.85)
    seconds = sum(0.142 if on else 0.029 for on in d)
    tokens = sum(1.85 if on else 1.0 for on in d)
    assert 0.96 <= (tokens / seconds) / (1 / 0.029) < 1.0
    assert 15 <= d.count(True) <= 25                                    # warm-up 3 + every ~102nd decision


def test_only_steps_of_the_same_requests_measure_a_decision():
    decided = frozenset({"a", "b"})
    assert SpeculationGate.comparable(decided, ["a", "b"])
    assert SpeculationGate.comparable(decided, ["b"])                     # "a" finished: the step still counts
    assert not SpeculationGate.comparable(decided, ["a", "b", "c"])      # "c" joined with its prefill
    assert not SpeculationGate.comparable(decided, ["c"])                 # the engine went idle in between
    assert not SpeculationGate.comparable(decided, [])
