"""Head training: data parsing, feature capture, the multi-step rollout, and a tiny end-to-end run whose folder loads
in our head module and in vLLM's native `method: eagle`."""
import json
import os

import pytest
import torch
from builders import write_loop_data
from conftest import generate_ids
from vllm import SamplingParams

import vllm_eagle
from vllm_eagle.draft_head import EagleHead, HeadConfig, attend, load_draft_vocab
from vllm_eagle.train.data import DataFormatError, Example, parse_jsonl, parse_sharegpt
from vllm_eagle.train.rollout import rollout
from vllm_eagle.train.train_head import PRESETS, capture_features, train

REC = {"id": "x", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]}


def test_sharegpt_parser_survives_truncation():
    text = json.dumps([REC, REC, {"id": "sys", "conversations": [{"from": "system", "value": "s"}]}, REC])
    truncated = text[: text.rindex('"hello there"') + 5]                     # cut inside the last record
    assert parse_sharegpt(truncated) == [{"prompt": "hi", "answer": "hello there"}] * 2
    assert len(parse_sharegpt(text)) == 3 and len(parse_sharegpt(text, limit=1)) == 1


def test_sharegpt_parser_on_the_packaged_file():
    from vllm_eagle.assets import sharegpt_path
    with open(sharegpt_path(), encoding="utf-8") as f:
        recs = parse_sharegpt(f.read(4 << 20))                               # first 4 MB, cut mid-record
    assert len(recs) > 100 and all(r["prompt"].strip() and r["answer"].strip() for r in recs)


def test_malformed_records_are_rejected_clearly(tmp_path):
    with pytest.raises(DataFormatError, match="record 1 has no 'conversations' list"):
        parse_sharegpt(json.dumps([REC, {"id": "bad"}]))
    with pytest.raises(DataFormatError, match="does not start with a JSON array"):
        parse_sharegpt('{"a": 1}')
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": 3}\n')
    with pytest.raises(DataFormatError, match=r"d.jsonl:2: expected"):
        parse_jsonl(str(p))
    p.write_text('{"prompt": "a", "answer": "b"}\nnot json\n')
    with pytest.raises(DataFormatError, match=r"d.jsonl:2: not JSON"):
        parse_jsonl(str(p))


def test_feature_capture_is_the_lm_head_input(tiny):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ex = Example(torch.randint(4, 1000, (37,)), torch.ones(37, dtype=torch.bool))
    (f,) = capture_features(model, [ex], dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=ex.tokens[None]).logits[0]
    assert f.shape == (37, model.config.hidden_size)
    assert torch.equal(model.lm_head(f), logits)                          # exact in fp32


def test_batched_feature_capture_equals_one_sequence_at_a_time(tiny):
    """Right-padded batches of odd lengths give each example the states of its own unpadded forward."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    exs = [Example(torch.randint(4, 1000, (n,), generator=g), torch.ones(n, dtype=torch.bool))
           for n in (37, 5, 64, 1, 23)]
    batched = capture_features(model, exs, dtype=torch.float32, batch_tokens=160)
    for ex, f in zip(exs, batched):
        (single,) = capture_features(model, [ex], dtype=torch.float32)
        assert f.shape == single.shape
        torch.testing.assert_close(f, single, rtol=1e-5, atol=1e-5)


def test_rollout_matches_step_by_step_recompute():
    """Step j of the parallel rollout equals running the head entry by entry (as the draft loop does) from every
    start position, with the true next tokens as draft tokens (fp32)."""
    cfg = HeadConfig(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=50,
                     rms_norm_eps=1e-6)
    head = EagleHead(cfg).eval()
    B, T, steps = 2, 11, 3
    feats, emb_next = torch.randn(B, T, 32), torch.randn(B, T, 32)
    lengths = torch.tensor([11, 8])
    with torch.no_grad():
        outs = rollout(head, emb_next, feats, steps)
        for b in range(B):
            for p in range(int(lengths[b]) - steps):
                ent_f, ent_e = list(feats[b, : p + 1]), list(emb_next[b, : p + 1])
                for j in range(1, steps + 1):
                    n = len(ent_f)
                    x = head.project(torch.stack(ent_e), torch.stack(ent_f))
                    q, k, v = head.qkv(x, torch.arange(n))
                    g = head.finish(x, attend(q[None], k[None], v[None], torch.ones(n, n, dtype=torch.bool).tril()[None])[0])[-1]
                    torch.testing.assert_close(outs[j - 1][b, p + j - 1], g, rtol=1e-4, atol=1e-5)
                    ent_f.append(g)
                    ent_e.append(emb_next[b, p + j])


@pytest.fixture(scope="module")
def tiny_trained(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    out = str(d / "head")
    return out, train(tiny, out, PRESETS["tiny"], data="jsonl", data_path=write_loop_data(d / "data.jsonl"))


def test_tiny_preset_learns_and_writes_official_layout(tiny_trained, tiny):
    out, summary = tiny_trained
    assert summary["times"]["last_loss"] < 0.8 * summary["times"]["first_loss"]
    from safetensors.torch import load_file
    keys = set(load_file(os.path.join(out, "model.safetensors")))
    assert "fc.bias" not in keys and "fc.weight" in keys and all(k.startswith(("fc.", "layers.0.")) for k in keys)
    head = EagleHead.from_pretrained(out)
    assert head.cfg == HeadConfig.from_dir(tiny) and os.path.isfile(os.path.join(out, "README.md"))
    ids = load_draft_vocab(out)
    # the tiny data has fewer than 256 distinct answer tokens: all of them, most frequent first
    assert 0 < len(ids) <= 256 and len(set(ids.tolist())) == len(ids) and summary["draft_vocab_coverage"] == 1.0


@pytest.mark.slow
def test_trained_head_drafts_the_same_in_native_vllm_eagle_and_ours(tiny_trained, tiny):
    """Same folder, same prompts, fp32 greedy: vLLM's own EAGLE loop and ours accept the same drafts per position,
    i.e. our head, draft KV and rollout compute what vLLM's draft loop computes."""
    assert_native_and_ours_agree(tiny, tiny_trained[0])


def test_llama3_rope_target_runs_and_drafts_as_native(models_dir, tmp_path):
    """A target with Llama-3 RoPE scaling (refused before heads took vLLM's rotary embeddings) trains a head that
    drafts exactly as vLLM's native EAGLE does with it: the head rotates as vLLM's Llama does under the scaling."""
    from builders import make_tiny_target
    target = make_tiny_target(os.path.join(models_dir, "tiny-llama3"), rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    out = str(tmp_path / "head")
    train(target, out, PRESETS["tiny"], data="jsonl", data_path=write_loop_data(tmp_path / "data.jsonl"))
    assert dict(HeadConfig.from_dir(out).rope)["rope_type"] == "llama3"
    assert_native_and_ours_agree(target, out)


def assert_native_and_ours_agree(target: str, out: str) -> None:
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompts = ["def main(", "for i in", "write a loop", "print("]
    results, accepted = {}, {}
    for name, spec in (("native", {"speculative_config": {"method": "eagle", "model": out, "num_speculative_tokens": 2}}),
                       ("ours", vllm_eagle.speculative_kwargs(out, num_speculative_tokens=2, draft_vocab=False,
                                                         adaptive=False))):      # every step drafts, as native
        results[name], c = generate_ids(target, prompts, sp, spec)
        accepted[name] = (c["drafts"], c["accepted_tokens_per_pos"])
    assert results["native"] == results["ours"] == generate_ids(target, prompts, sp)[0]
    assert accepted["native"] == accepted["ours"] and sum(accepted["ours"][1]) > 0, accepted


def test_draft_vocabulary_restricts_drafts_and_stays_lossless(tiny_trained, tiny, monkeypatch):
    """With the head's draft vocabulary every draft token comes from it; output is still the target's."""
    from vllm_eagle.proposer import EagleProposer
    out, _ = tiny_trained
    allowed = set(load_draft_vocab(out).tolist())
    drafted = []
    orig = EagleProposer._propose_step
    monkeypatch.setattr(EagleProposer, "_propose_step", lambda self, fb: [d for d in orig(self, fb) if drafted.extend(d) or True])
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = ["def main(", "for i in", "write a loop"]
    want, _ = generate_ids(tiny, prompts, sp)
    got, _ = generate_ids(tiny, prompts, sp, vllm_eagle.speculative_kwargs(out, num_speculative_tokens=3))
    assert got == want and drafted and set(drafted) <= allowed


@pytest.mark.parametrize("preset", ["tiny", "tiny-eagle3"])
def test_work_dir_features_are_reused_for_the_examples_they_were_captured_for(preset, tiny, tmp_path, capsys):
    """A continued run reuses its work dir's features (EAGLE-3: and the target's argmax) for the leading examples
    they were captured for and captures only the rest: a grown corpus or more conversations cost their new examples."""
    import re
    from dataclasses import replace

    from vllm_eagle.train.train_head import COMPUTE_DTYPE, load_target, target_top1
    data = write_loop_data(tmp_path / "data.jsonl")
    cfg = replace(PRESETS[preset], steps=1, num_conversations=8, num_heldout=2, feature_layers=(0, 1, 2))
    suffix = "-eagle3" if cfg.arch == "eagle3" else ""

    def run(c, work="work"):
        train(tiny, str(tmp_path / "head"), c, data="jsonl", data_path=data, work_dir=str(tmp_path / work))
        m = re.search(r"features: reusing (\d+) of (\d+) examples", capsys.readouterr().out)
        saved = torch.load(tmp_path / work / f"features-teacher-forced{suffix}.pt")
        return (int(m[1]) if m else 0), len(saved["tokens"])

    assert run(cfg) == (0, 10)                             # (the tiny presets write no checkpoint to resume)
    assert run(cfg) == (10, 10)
    grown = replace(cfg, num_conversations=12)
    assert run(grown) == (10, 14)                          # the first 10 reused, 4 captured, 14 kept
    assert run(grown, "fresh") == (0, 14)
    kept = torch.load(tmp_path / "work" / f"features-teacher-forced{suffix}.pt")["features"]
    fresh = torch.load(tmp_path / "fresh" / f"features-teacher-forced{suffix}.pt")["features"]
    for a, b in zip(kept, fresh):                          # bf16 rows, batched differently
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    if suffix:                                             # the argmax rows line up with their examples
        _, model = load_target(tiny)
        lm = model.get_output_embeddings().weight.detach().to(torch.bfloat16).to(COMPUTE_DTYPE)   # as train() does
        hidden = model.config.hidden_size
        tops = torch.load(tmp_path / "work" / "top1-teacher-forced.pt")
        assert len(tops) == 14 and all(torch.equal(t, w) for t, w in zip(tops, target_top1(lm, kept, hidden)))
    assert run(cfg) == (10, 14)                            # fewer: a prefix of the saved ones, which stay
    assert run(replace(cfg, data_offset=1)) == (0, 10)     # other conversations: captured afresh
