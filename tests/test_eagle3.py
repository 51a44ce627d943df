"""EAGLE-3 heads: official layouts load, the training-time test computes what the draft loop computes, and inside
vLLM the fused-layer head drafts losslessly with chains, static and dynamic trees (fp32, token for token), with the
acceptance an oracle head must reach."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import generate_ids, tiered
from safetensors.torch import load_file, save_file
from vllm import SamplingParams

import vllm_eagle
from builders import make_eagle3_head, make_oracle_pair, make_tiny_target, write_loop_data
from vllm_eagle.draft import commit_entries, draft_chain
from vllm_eagle.draft_head import HeadConfigError, check_head_matches_target, load_head, read_config
from vllm_eagle.draft_kv import DraftKVCache
from vllm_eagle.features import FeatureBatch
from vllm_eagle.train.rollout import rollout

LAYERS = (1, 2, 3)          # a 4-layer target: vLLM's default (2, L // 2, L - 3) would repeat a layer


@pytest.fixture(scope="module")
def tiny4(models_dir):
    return make_tiny_target(os.path.join(models_dir, "tiny4"), layers=4)


@pytest.fixture(scope="module")
def oracle3(tiny4, models_dir):
    """(identity-layer target, EAGLE-3 head that drafts its next token exactly)"""
    root = os.path.join(models_dir, "oracle4")
    os.makedirs(root, exist_ok=True)
    target, _ = make_oracle_pair(tiny4, root)
    return target, make_eagle3_head(target, os.path.join(root, "eagle3-oracle"), LAYERS, oracle=True)


@pytest.fixture(scope="module")
def random3(tiny4, models_dir):
    return make_eagle3_head(tiny4, os.path.join(models_dir, "eagle3-random"), LAYERS, draft_vocab=300)


def drafts(head, feats, tokens, k=3):
    """Commit one request's entries (positions 0..p, target features feats [p+1, F]) and draft a greedy chain of k
    through the engine's draft stage (fp32) -> (tokens [k], per-depth logits [k, D], the embedding used).
    EAGLE-1 heads score through a fixed random LM head."""
    p = len(feats) - 1
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(head.cfg.vocab_size, head.cfg.hidden_size, generator=g)
    lm = head.lm_head.weight if head.eagle3 else torch.randn(head.cfg.vocab_size, head.cfg.hidden_size, generator=g)
    ids = head.draft_token_ids() if head.eagle3 else None
    kv = DraftKVCache(head.cfg.num_kv_heads, head.cfg.head_dim, torch.float32)
    fb = FeatureBatch(req_ids=["r"], features=feats, aux_features=feats, query_start=np.array([0, p + 1]),
                      start_pos=np.array([0]), num_committed=np.array([p + 1]), drafting=np.array([True]),
                      tree_ok=np.array([True]), token_ids=np.asarray(tokens)[None], finished_req_ids=set(), num_drafts=k)
    logits = []

    def topk_logprobs(g, n):
        logits.append(head.logits_input(g) @ lm.T)
        lp, best = logits[-1].log_softmax(-1).topk(n, dim=-1)
        return lp, best if ids is None else ids[best]

    with torch.no_grad():
        x, last = commit_entries(head, kv, fb, lambda t: emb[t])
        out, _ = draft_chain(head, kv, ["r"], x[last], np.array([p]), k, lambda t: emb[t], topk_logprobs)
    return out[0], torch.cat(logits), emb


def test_training_time_test_equals_the_draft_loop(random3):
    """The rollout that trains EAGLE-3 (steps 1..3) yields, at the positions of one draft chain, exactly the logits
    the engine's draft loop computes, when the sequence continues with the chain's own drafts (fp32)."""
    head = load_head(random3)
    g = torch.Generator().manual_seed(0)
    p, k = 9, 3
    aux = torch.randn(p + 1, 3 * 128, generator=g)
    tokens = torch.randint(0, 1024, (p + 2,), generator=g).tolist()
    chain, logits, emb = drafts(head, aux, tokens, k)
    seq = tokens + chain.tolist()                                     # t_0 .. t_{p+1}, then the k drafts
    T = len(seq) - 1                                                  # rows 0..T-1 pair with t_{q+1}
    emb_next = emb[torch.tensor(seq[1:])][None]                        # [1, T, H]
    feats = torch.cat([aux, torch.zeros(T - (p + 1), aux.shape[1])])[None]   # rows past p are never read at step 1
    with torch.no_grad():
        outs = rollout(head, emb_next, feats, k)
        for j in range(1, k + 1):                                     # step j's rollout from p sits at row p + j - 1
            got = head.lm_head(head.logits_input(outs[j - 1][0, p + j - 1]))
            torch.testing.assert_close(got, logits[j - 1], rtol=1e-4, atol=1e-4)


def write_official(src: str, dst: str, rename, fmt: str, extra: dict | None = None) -> str:
    """Copy a head folder with its tensors renamed (rename(key) -> key) and saved as safetensors or a .bin."""
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    state = {rename(k): v for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    state.update(extra or {})
    if fmt == "bin":
        torch.save(state, os.path.join(dst, "pytorch_model.bin"))
    else:
        save_file(state, os.path.join(dst, "model.safetensors"))
    return dst


def same_drafts(a: str, b: str, width: int) -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(7, width, generator=g)
    tokens = torch.randint(0, 1024, (8,), generator=g).tolist()
    da, la, _ = drafts(load_head(a), feats, tokens)
    db, lb, _ = drafts(load_head(b), feats, tokens)
    assert da.tolist() == db.tolist()
    torch.testing.assert_close(la, lb)


def test_official_eagle3_namings_load_the_same(random3, tmp_path):
    """SafeAILab's EAGLE-3 folder (`midlayer.*`, pytorch_model.bin, t2d) and vLLM's (`model.layers.0.*`) load as the
    safetensors folder they were written from and draft the same."""
    safeailab = write_official(random3, str(tmp_path / "safeailab"), lambda k: k.replace("layers.0.", "midlayer."), "bin")
    vllm_names = write_official(random3, str(tmp_path / "vllm"), lambda k: k if k.startswith("lm_head") else "model." + k,
                                "safetensors")
    for folder in (safeailab, vllm_names):
        same_drafts(random3, folder, 3 * 128)


def test_official_eagle1_folder_with_bias_and_bin_loads(tiny_random_head, tmp_path):
    """An EAGLE-1 folder as SafeAILab publishes it (pytorch_model.bin, fc.bias, the target's embedding) loads, runs its
    bias, and with a zero bias drafts as the folder it was written from."""
    zero = write_official(tiny_random_head, str(tmp_path / "zero"), lambda k: k, "bin",
                          {"fc.bias": torch.zeros(128), "embed_tokens.weight": torch.randn(1024, 128)})
    same_drafts(tiny_random_head, zero, 128)
    biased = write_official(tiny_random_head, str(tmp_path / "biased"), lambda k: k, "bin", {"fc.bias": torch.ones(128)})
    h0, h1 = load_head(tiny_random_head), load_head(biased)
    e, f = torch.randn(2, 128), torch.randn(2, 128)
    with torch.no_grad():
        torch.testing.assert_close(h1.project(e, f), h0.project(e, f) + 1, rtol=1e-5, atol=1e-5)


def test_wrong_eagle3_heads_are_refused(random3, tiny4, tmp_path):
    bad = write_official(random3, str(tmp_path / "fc"), lambda k: k, "safetensors")
    state = load_file(os.path.join(bad, "model.safetensors"))
    state["fc.weight"] = state["fc.weight"][:, :200].contiguous()
    save_file(state, os.path.join(bad, "model.safetensors"))
    with pytest.raises(HeadConfigError, match=r"fc.weight has shape \(128, 200\)"):
        load_head(bad)
    target_cfg = json.load(open(os.path.join(tiny4, "config.json")))
    for change, msg in (({"eagle_aux_hidden_state_layer_ids": [1, 2, 9]}, r"\[9\] outside the target's layers 0..3"),
                        ({"eagle_aux_hidden_state_layer_ids": [1, 1, 3]}, "repeats a layer"),
                        ({"norm_before_fc": True}, "sets \\['norm_before_fc'\\]"),
                        ({"target_hidden_size": 64}, "target_hidden_size: head 64 vs target 128")):
        cfg = {**read_config(random3), **change}
        with pytest.raises(HeadConfigError, match=msg):
            check_head_matches_target(cfg, target_cfg, random3)


SHAPES = {"chain": dict(num_speculative_tokens=3),
          "static": dict(tree="[(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]"),
          "dynamic": dict(tree="dynamic", depth=4, top_k=2, total_tokens=6)}


@pytest.mark.parametrize("shape", tiered(sorted(SHAPES), fast={"dynamic"}))
def test_oracle_eagle3_lossless_with_high_acceptance(oracle3, shape):
    """fp32 greedy, continuous batching with chunked prefill: token for token vanilla's, and the oracle's drafts are
    accepted (tau > 2.5 at 3+ draft nodes per step), so the fused-feature path drafts what it should."""
    target, head = oracle3
    prompts = ["def main(", "import os", " ".join(["for i in range(10): print(i)"] * 20), "class Foo:"]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    kw = dict(max_num_batched_tokens=64, max_num_seqs=3)
    want, _ = generate_ids(target, prompts, sp, **kw)
    got, c = generate_ids(target, prompts, sp, vllm_eagle.speculative_kwargs(head, adaptive=False, **SHAPES[shape]),
                          **kw)
    assert got == want
    assert 1 + c["accepted_tokens"] / c["drafts"] > 2.5, c


def test_random_eagle3_head_with_draft_vocab_lossless_and_sampled(tiny4, random3):
    """A random head over a 300-token draft vocabulary (d2t): greedy output is the target's; seeded sampling with a
    dynamic tree reproduces."""
    prompts = ["def main(", "import os", "class Foo:"]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want, _ = generate_ids(tiny4, prompts, sp)
    got, c = generate_ids(tiny4, prompts, sp, vllm_eagle.speculative_kwargs(random3, num_speculative_tokens=3,
                                                                            adaptive=False))
    assert got == want and c["drafts"] > 0
    sps = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, ignore_eos=True, seed=s) for s in (1, 2, 3)]
    spec = vllm_eagle.speculative_kwargs(random3, tree="dynamic", depth=3, top_k=2, total_tokens=4, adaptive=False)
    runs = [generate_ids(tiny4, prompts, sps, spec)[0] for _ in range(2)]
    assert runs[0] == runs[1] and all(len(r) == 16 for r in runs[0])


@pytest.fixture(scope="module")
def tiny3_trained(tiny4, tmp_path_factory):
    from dataclasses import replace

    from vllm_eagle.train.train_head import PRESETS, train
    d = tmp_path_factory.mktemp("train3")
    out = str(d / "head")
    return out, train(tiny4, out, replace(PRESETS["tiny-eagle3"], feature_layers=LAYERS), data="jsonl",
                      data_path=write_loop_data(d / "data.jsonl"))


def test_tiny_eagle3_preset_learns_and_writes_vllm_layout(tiny3_trained, tiny4):
    out, summary = tiny3_trained
    # The soft-CE's floor is the random target's entropy, so learning shows in top-1: an untrained head agrees with
    # the target's argmax about as often as chance over its draft vocabulary.
    assert min(summary["heldout_top1_per_step"]) > 0.5, summary["heldout_top1_per_step"]
    keys = set(load_file(os.path.join(out, "model.safetensors")))
    assert {"fc.weight", "d2t", "t2d", "norm.weight", "lm_head.weight", "layers.0.hidden_norm.weight",
            "layers.0.input_layernorm.weight"} <= keys and "fc.bias" not in keys
    cfg = read_config(out)
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert cfg["draft_vocab_size"] <= 256 and len(summary["heldout_top1_per_step"]) == 3


def test_trained_eagle3_drafts_the_same_in_native_vllm_eagle3_and_ours(tiny3_trained, tiny4):
    """Same folder, fp32 greedy: vLLM's own `method: eagle3` and ours accept the same drafts per position, i.e. our
    fused features, EAGLE-3 layer, own LM head and d2t compute what vLLM's EAGLE-3 model computes."""
    from transformers import AutoTokenizer

    from vllm_eagle.assets import chat_prompts
    out, _ = tiny3_trained
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompts = chat_prompts(AutoTokenizer.from_pretrained(tiny4), [f"write a loop number {i}" for i in range(40, 44)])
    results, accepted = {}, {}
    for name, spec in (("native", {"speculative_config": {"method": "eagle3", "model": out,
                                                          "num_speculative_tokens": 2}}),
                       ("ours", vllm_eagle.speculative_kwargs(out, num_speculative_tokens=2, adaptive=False))):
        results[name], c = generate_ids(tiny4, prompts, sp, spec)
        accepted[name] = (c["drafts"], c["accepted_tokens_per_pos"])
    assert results["native"] == results["ours"]
    assert accepted["native"] == accepted["ours"] and sum(accepted["ours"][1]) > 0, accepted
