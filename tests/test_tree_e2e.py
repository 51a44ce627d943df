"""Static and EAGLE-2 dynamic draft trees verified in one target pass inside vLLM: greedy output identical to vanilla (fp32), with trees,
chains (sampled rows) and prefills mixed in one continuously batched engine."""
import pytest
import torch
from conftest import generate_ids, tiered
from vllm import SamplingParams

import vllm_eagle
from vllm_eagle.config import EagleOptionError

TREE = "[(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]"
SHAPES = {"static": dict(tree=TREE, adaptive=False),                   # fixed shapes: every step drafts
          "dynamic": dict(tree="dynamic", depth=4, top_k=2, total_tokens=6, adaptive=False)}
shapes = pytest.mark.parametrize("shape", tiered(sorted(SHAPES), fast={"dynamic"}))


@shapes
def test_oracle_tree_lossless_and_deep(oracle, shape):
    target, head = oracle
    prompts = ["def main(", "import os", "class Foo:", "for i in range(", "x = [i for i in"]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want, _ = generate_ids(target, prompts, sp)
    got, c = generate_ids(target, prompts, sp, vllm_eagle.speculative_kwargs(head, **SHAPES[shape]))
    assert got == want
    assert c["draft_tokens"] == 6 * c["drafts"]                      # all 6 nodes verified per step
    assert 1 + c["accepted_tokens"] / c["drafts"] > 3.0, c          # depth-3+ paths accepted (oracle: rank 0 right)


@pytest.mark.parametrize("scratch", tiered([None, 4, 0], fast={None}, ids=["paths", "mixed", "recompute"]))
@shapes
def test_random_head_tree_lossless(tiny, tiny_random_head, shape, scratch, monkeypatch):
    """Tree attention both ways in the engine: each tree request's paths through vLLM's kernel in scratch blocks
    (None: as many as the worker sizes, room for all three; 4: for one, the others recomputed in the same steps) or
    all recomputed (0)."""
    from conftest import close, make_llm, spec_counters
    from vllm_eagle import worker
    if scratch is not None:
        monkeypatch.setattr(worker, "scratch_block_count", lambda *args: scratch)
    prompts = ["def main(", "import os", "class Foo:"]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want, _ = generate_ids(tiny, prompts, sp)
    llm = make_llm(tiny, vllm_eagle.speculative_kwargs(tiny_random_head, **SHAPES[shape]))
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
    stats, counters = llm.collective_rpc("eagle_stats")[0], spec_counters(llm)
    close(llm)
    assert got == want and counters["drafts"] > 0 and stats["trees_verified"] > 0 and stats["tree_attention_s"] > 0
    recomputed = stats["trees_recomputed"]                    # tree requests over all steps
    assert recomputed <= stats["trees_verified"]
    assert (recomputed == 0) if scratch is None else (recomputed > 0), stats


@shapes
def test_tree_with_chunked_prefill_and_sampled_rows(oracle, shape):
    """Long prompts in chunks next to tree rows; a sampled request in the same batch is verified as a tree too."""
    from conftest import close, make_llm
    target, head = oracle
    long = " ".join(["for i in range(10): print(i)"] * 30)
    prompts = [long, "def main(", long[:200], "import os"]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    kw = dict(max_num_batched_tokens=64, max_num_seqs=5)
    want, _ = generate_ids(target, prompts, greedy, **kw)
    llm = make_llm(target, vllm_eagle.speculative_kwargs(head, **SHAPES[shape]), **kw)
    sampled = SamplingParams(temperature=0.8, max_tokens=32, ignore_eos=True, seed=1)
    outs = llm.generate(prompts + ["while True:"], [greedy] * 4 + [sampled], use_tqdm=False)
    close(llm)
    assert [list(o.outputs[0].token_ids) for o in outs[:4]] == want
    assert len(outs[4].outputs[0].token_ids) == 32


def test_bad_tree_is_rejected():
    with pytest.raises(EagleOptionError, match=r"tree: tree path \(0, 0, 0\) has no parent"):
        vllm_eagle.speculative_kwargs("/tmp", tree="[(0,), (0, 0, 0)]")


@pytest.mark.parametrize("kw,msg", [
    (dict(tree="dynamic", depth=0), "dynamic tree depth must be a positive integer"),
    (dict(tree="dynamic", top_k=99), "top_k=99 is over 16"),
    (dict(tree="dynamic", depth=2, top_k=2, total_tokens=7), "total_tokens=7 exceeds what depth=2, top_k=2 can draft"),
    (dict(tree="chain", total_tokens=5), "total_tokens is an option of tree='dynamic'"),
    (dict(tree="dynamic", total_tokens=0), "num_speculative_tokens must be a positive integer"),
])
def test_bad_dynamic_options_are_rejected(tiny_random_head, kw, msg):
    with pytest.raises(EagleOptionError, match=msg):
        vllm_eagle.speculative_kwargs(tiny_random_head, **kw)


@shapes
def test_sampled_trees_reproduce_with_a_seed(oracle, shape):
    """T > 0 with top-k / top-p on tree rows (lossless tree sampling): a seed fixes the output; acceptance happens."""
    target, head = oracle
    prompts = ["def main(", "import os", "class Foo:"]
    sps = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, ignore_eos=True, seed=s) for s in (1, 2, 3)]
    from conftest import close, make_llm, spec_counters
    llm = make_llm(target, vllm_eagle.speculative_kwargs(head, **SHAPES[shape]))
    runs = [[list(o.outputs[0].token_ids) for o in llm.generate(prompts, sps, use_tqdm=False)] for _ in range(2)]
    k = SamplingParams(temperature=1.0, top_k=5, max_tokens=24, ignore_eos=True, seed=9)
    topk = [list(llm.generate(prompts[:1], k, use_tqdm=False)[0].outputs[0].token_ids) for _ in range(2)]
    c = spec_counters(llm)
    close(llm)
    assert runs[0] == runs[1] and topk[0] == topk[1]
    assert all(len(r) == 24 for r in runs[0])
    assert c["accepted_tokens_per_pos"][1] > 0, c           # sampled tree paths deeper than one node were accepted


def test_requests_with_penalties_fall_back_to_chains_losslessly(oracle):
    """Repetition penalty (and other logits processors) act in vLLM's sampler: such rows draft chains, still exact."""
    target, head = oracle
    prompts = ["def main(", "import os"]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3)
    want, _ = generate_ids(target, prompts, sp)
    got, c = generate_ids(target, prompts, sp, vllm_eagle.speculative_kwargs(head, tree=TREE))
    assert got == want and c["drafts"] > 0


def _committed_kv(worker) -> tuple[int, list[torch.Tensor]]:
    """Runs in the worker: (L, per layer K and V [heads, L, head_size]) of the only running request's committed
    tokens, read from the paged cache."""
    from vllm_eagle.kv_layout import gather_kv
    runner = worker.model_runner
    batch = runner.input_batch
    L = int(batch.num_computed_tokens_cpu[0])
    row = batch.block_table[0].block_table.cpu[0]
    out = []
    for name in runner.kv_cache_config.kv_cache_groups[0].layer_names:
        layer = runner.compilation_config.static_forward_context[name]
        k, v = gather_kv(layer.kv_cache, row[None, : -(-L // layer.kv_cache.shape[2])], layer.isa)
        out += [k[0, :, :L].clone(), v[0, :, :L].clone()]
    return L, out


@shapes
def test_committed_kv_equals_vanilla(oracle, shape):
    """KV compaction: after tree steps, the paged cache holds at every committed position what vanilla decoding
    stores there (fp32; the accepted nodes' K/V were moved from their tree slots)."""
    from conftest import close, make_llm
    target, head = oracle
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    snaps = {}
    for name, spec in (("vanilla", None), ("ours", vllm_eagle.speculative_kwargs(head, **SHAPES[shape]))):
        llm = make_llm(target, spec)
        engine = llm.llm_engine
        engine.add_request("r", "def main(", sp)
        produced = 0
        while produced < 25:                                      # outputs are cumulative
            produced = max([produced] + [len(o.outputs[0].token_ids) for o in engine.step()])
        snaps[name] = llm.collective_rpc(_committed_kv)[0]
        c = spec and __import__("conftest").spec_counters(llm)
        close(llm)
    (lv, want), (lo, got) = snaps["vanilla"], snaps["ours"]
    L = min(lv, lo)
    assert L >= 20 and c["accepted_tokens_per_pos"][1] > 0       # several tree steps with deep accepted paths
    for w, g in zip(want, got):
        torch.testing.assert_close(g[:, :L], w[:, :L], rtol=1e-5, atol=1e-5)
