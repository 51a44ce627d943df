"""Targets beyond Llama: tiny random Qwen2, Qwen3, Mistral, Gemma-3 and Gemma-2 models
(tests/builders.ARCHITECTURES), each with a head trained by the tiny preset. Greedy fp32 output is vanilla's token
for token with drafts accepted, on prompts longer than the sliding window, with chains and with trees."""
import json
import os

import pytest
from builders import make_tiny_target
from conftest import generate_ids, tiered
from vllm import SamplingParams

import vllm_eagle
from vllm_eagle.config import EagleOptionError
from vllm_eagle.train.train_head import PRESETS, train

SP = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
LOOP = "for i in range(10):\n    print(i)\n"
SLIDING = ("mistral", "gemma3")


@pytest.fixture(scope="module")
def trained(models_dir, tmp_path_factory):
    """(arch, preset) -> (target, head, prompts): the head is trained by the tiny preset ("tiny" EAGLE-1, or
    "tiny-eagle3" on a 4-layer target fusing layers 1-3) on the target's own greedy answers to the prompts
    (self-distillation, as real heads are), so in vLLM it drafts what the target says there only if the engine hands
    it the features, embedding and positions training saw. Chat-templated prompt token ids, 30-70 tokens: longer than
    the Mistral and Gemma-3 targets' 16-token sliding window."""
    from dataclasses import replace

    from transformers import AutoTokenizer
    cache = {}

    def get(arch, preset="tiny"):
        if (arch, preset) not in cache:
            layers = 4 if preset == "tiny-eagle3" else 2
            target = make_tiny_target(os.path.join(models_dir, f"tiny{layers}-{arch}"), arch, layers=layers)
            tok = AutoTokenizer.from_pretrained(target)
            asks = [f"write a loop number {i}\n" + LOOP * (1 + i % 4) for i in range(32)]
            prompts = [{"prompt_token_ids": tok.apply_chat_template([{"role": "user", "content": a}], tokenize=True,
                                                                     add_generation_prompt=True, return_dict=False)}
                       for a in asks]
            answers, _ = generate_ids(target, prompts, SP)
            d = tmp_path_factory.mktemp(arch)
            with open(d / "data.jsonl", "w") as f:
                for a, ids in zip(asks, answers):
                    f.write(json.dumps({"prompt": a, "answer": tok.decode(ids), "finished": False}) + "\n")
            cfg = replace(PRESETS[preset], feature_layers=(1, 2, 3)) if layers == 4 else PRESETS[preset]
            train(target, str(d / "head"), cfg, data="jsonl", data_path=str(d / "data.jsonl"))
            cache[arch, preset] = (target, str(d / "head"), prompts)
        return cache[arch, preset]
    return get


@pytest.mark.parametrize("arch,preset", tiered([("qwen2", "tiny"), ("qwen3", "tiny"), ("mistral", "tiny"),
                                                 ("gemma3", "tiny"), ("qwen3", "tiny-eagle3")],
                                                fast=(("gemma3", "tiny"),)))
def test_chain_is_lossless_and_drafts_as_trained_on_other_architectures(arch, preset, trained):
    """Ours = vanilla, and the head drafts what the target says where it was trained. Without a sliding window
    vLLM's native EAGLE runs the same head as we do, and both accept the same drafts per position. With one they
    differ: native's draft layer inherits the target's model-level window (Mistral), and for Gemma-3 it feeds the
    head the raw embedding rows where ours (and training) use the sqrt(H)-scaled embedding the target reads."""
    target, head, prompts = trained(arch, preset)
    want, _ = generate_ids(target, prompts, SP)
    got, c = generate_ids(target, prompts, SP, vllm_eagle.speculative_kwargs(head, num_speculative_tokens=3,
                                                                             draft_vocab=False, adaptive=False))
    assert got == want
    assert c["accepted_tokens_per_pos"][0] > 0.15 * c["drafts"] > 0, c
    if arch not in SLIDING:
        method = "eagle3" if preset == "tiny-eagle3" else "eagle"
        native, n = generate_ids(target, prompts, SP, {"speculative_config": {"method": method, "model": head,
                                                                              "num_speculative_tokens": 3}})
        assert native == want and n["accepted_tokens_per_pos"] == c["accepted_tokens_per_pos"], (n, c)


@pytest.mark.parametrize("arch,block_size", tiered([("qwen3", None), ("mistral", 32), ("gemma3", 16), ("gemma2", 32)],
                                                    fast=(("gemma3", 16),)))
def test_trees_are_lossless_on_other_architectures(arch, block_size, trained):
    """Trees verify in one pass, = vanilla: full attention (Qwen3); one sliding window on every layer (Mistral: the
    prompts outgrow it, so the nodes' window cuts the prefix, and vLLM frees the blocks that leave it); sliding and
    full layers mixed (Gemma-3: a KV cache group each, so vLLM rebuilds its input batch, as it does for 16-token
    blocks, and the KV commit must read the slot mapping vLLM's attention wrote); the same with soft-capped attention
    logits (Gemma-2)."""
    target, head, prompts = trained(arch)
    kw = {"block_size": block_size} if block_size else {}
    want, _ = generate_ids(target, prompts, SP, **kw)
    for shape in (dict(tree="[(0,), (1,), (0, 0), (0, 0, 0)]"), dict(tree="dynamic", depth=3, top_k=2)):
        # the full vocabulary: the tiny targets' answers repeat a few tokens, fewer than a node's two candidates
        spec = vllm_eagle.speculative_kwargs(head, adaptive=False, draft_vocab=False, **shape)
        got, c = generate_ids(target, prompts, SP, spec, **kw)
        assert got == want, shape
        assert c["accepted_tokens_per_pos"][1] > 0, (shape, c)         # paths past the first node were accepted


def test_eagle3_head_on_a_target_without_layer_capture_is_refused_at_start(models_dir, tmp_path):
    """vLLM's Gemma-3 model class cannot capture intermediate layers (no SupportsEagle3): an EAGLE-3 head for it
    fails where the engine's config is built, naming the model class; an EAGLE-3 head on Qwen3 passes."""
    from builders import make_eagle3_head
    from vllm.engine.arg_utils import EngineArgs
    for arch, refused in (("gemma3", True), ("qwen3", False)):
        target = make_tiny_target(os.path.join(models_dir, f"tiny4-{arch}"), arch, layers=4,
                                  **({"layer_types": ["sliding_attention"] * 3 + ["full_attention"]} if refused else {}))
        head = make_eagle3_head(target, str(tmp_path / arch), layers=(1, 2, 3))
        args = EngineArgs(model=target, dtype="float32", **vllm_eagle.speculative_kwargs(head))
        if refused:
            with pytest.raises(EagleOptionError, match="Gemma3ForCausalLM cannot hand them over.*EAGLE-1 head"):
                args.create_engine_config()
        else:
            args.create_engine_config()


@pytest.mark.slow
def test_gemma3_270m_target_converts_and_generates_its_known_continuation():
    """vllm_eagle.default_target("gemma-3-270m"): the Q4_K_M GGUF from PyPI, dequantised once into an HF folder that
    vLLM serves; its greedy continuation of a known prompt is the one recorded for this GGUF."""
    target = vllm_eagle.default_target("gemma-3-270m")
    with open(os.path.join(target, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["vocab_size"] == 262144
    assert cfg["sliding_window"] == 512 and cfg["num_hidden_layers"] == 18
    out, _ = generate_ids(target, ["The capital of France is Paris. It is famous for"],
                          SamplingParams(temperature=0, max_tokens=12), max_model_len=256)
    from transformers import AutoTokenizer
    text = AutoTokenizer.from_pretrained(target).decode(out[0])
    assert text.startswith(" its architecture, art, and culture."), text
    with pytest.raises(ValueError, match="offline targets are"):
        vllm_eagle.default_target("gemma-3-27b")
