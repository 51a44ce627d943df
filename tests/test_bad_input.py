"""Bad input fails at start-up with an error that names the problem and the fix."""
import json
import os
import subprocess
import sys

import pytest
import torch
from builders import make_random_head
from conftest import make_llm

import vllm_eagle
from vllm_eagle.config import EagleOptionError


@pytest.fixture(scope="module")
def wrong_hidden_head(tiny, models_dir):
    return make_random_head(tiny, os.path.join(models_dir, "wrong-hidden"), hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def wrong_vocab_head(tiny, models_dir):
    return make_random_head(tiny, os.path.join(models_dir, "wrong-vocab"), vocab_size=999)


def test_missing_head_path():
    with pytest.raises(EagleOptionError, match=r"/no/such/head.*does not exist"):
        vllm_eagle.speculative_kwargs("/no/such/head")


@pytest.mark.parametrize("k", [0, -2])
def test_non_positive_k(tiny_random_head, k):
    with pytest.raises(EagleOptionError, match="num_speculative_tokens must be a positive integer"):
        vllm_eagle.speculative_kwargs(tiny_random_head, num_speculative_tokens=k)


def test_head_without_weights(tmp_path, tiny_random_head):
    d = tmp_path / "cfg-only"
    d.mkdir()
    (d / "config.json").write_text(open(os.path.join(tiny_random_head, "config.json")).read())
    from vllm_eagle.draft_head import EagleHead, HeadConfigError
    with pytest.raises(HeadConfigError, match="no \\*.safetensors"):
        EagleHead.from_pretrained(str(d))


@pytest.mark.parametrize("fixture,field", [("wrong_hidden_head", "hidden_size: head 64 vs target 128"),
                                           ("wrong_vocab_head", "vocab_size: head 999 vs target 1024")])
def test_mismatched_head_fails_early_and_at_engine_start(request, tiny, fixture, field):
    head = request.getfixturevalue(fixture)
    with pytest.raises(EagleOptionError, match=field):
        vllm_eagle.speculative_kwargs(head, target=tiny)
    # Without target= the check runs where LLM(...) builds the engine's config (patches P6), before any engine
    # process exists: the caller gets HeadConfigError itself, naming the field.
    from vllm.engine.arg_utils import EngineArgs
    from vllm_eagle.draft_head import HeadConfigError
    spec = vllm_eagle.speculative_kwargs(head)
    with pytest.raises(HeadConfigError, match=field):
        EngineArgs(model=tiny, dtype="float32", **spec).create_engine_config()
    with pytest.raises(HeadConfigError, match=field):
        make_llm(tiny, spec)


@pytest.mark.parametrize("config,feature", [({"alibi": True}, "ALiBi")])
def test_trees_on_attention_they_cannot_run_are_refused_at_start(tiny, tiny_random_head, tmp_path, config, feature):
    """Trees on a target whose attention tree verification cannot run fail where the engine's config is built (not
    at the first tree step of a running engine); chains on it pass that check."""
    import shutil

    from vllm.engine.arg_utils import EngineArgs
    target = str(tmp_path / "target")
    shutil.copytree(tiny, target)
    with open(os.path.join(target, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump({**cfg, **config}, f)
    for tree in ("dynamic", "[(0,), (1,)]"):
        with pytest.raises(EagleOptionError, match=f"tree=.* does not support this engine's {feature}.*use a chain"):
            EngineArgs(model=target, dtype="float32", **vllm_eagle.speculative_kwargs(tiny_random_head, tree=tree)
                       ).create_engine_config()
    for tree in ("chain", "[(0,), (0, 0)]"):                # a path-tuple chain verifies as a chain
        EngineArgs(model=target, dtype="float32", **vllm_eagle.speculative_kwargs(tiny_random_head, tree=tree)
                   ).create_engine_config()


def test_tree_wider_than_the_draft_vocabulary_is_refused_at_start(tiny, head_copy):
    """A node ranks top_k candidates from the head's draft vocabulary: a narrower vocabulary fails where the
    engine's config is built, naming both numbers (a mid-run topk error otherwise)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_eagle.train.train_head import write_draft_vocab
    write_draft_vocab(str(head_copy), torch.tensor([5, 9]))
    for shape in (dict(tree="dynamic", top_k=3), dict(tree="[(0,), (1,), (2,)]")):
        with pytest.raises(EagleOptionError, match=r"ranks 3 candidates per node.*drafts from 2 tokens.*"
                                                   r"draft_vocab=False"):
            EngineArgs(model=tiny, dtype="float32", **vllm_eagle.speculative_kwargs(str(head_copy), **shape)
                       ).create_engine_config()
    EngineArgs(model=tiny, dtype="float32", **vllm_eagle.speculative_kwargs(str(head_copy), tree="dynamic", top_k=2)
               ).create_engine_config()


def test_prefix_caching_is_refused_at_start(tiny, tiny_random_head):
    spec = {**vllm_eagle.speculative_kwargs(tiny_random_head), "enable_prefix_caching": True}
    with pytest.raises(EagleOptionError, match="needs prefix caching off.*--no-enable-prefix-caching"):
        make_llm(tiny, spec)


def test_unknown_plugin_option_is_refused(tiny, tiny_random_head):
    spec = vllm_eagle.speculative_kwargs(tiny_random_head)
    spec["additional_config"]["vllm_eagle"]["treee"] = "dynamic"
    with pytest.raises(EagleOptionError, match=r"unknown vllm_eagle option\(s\) \['treee'\]"):
        make_llm(tiny, spec)


@pytest.mark.slow
def test_serve_cli_rejects_missing_head(tiny):
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", tiny, "--port", "1",
                        "--speculative-model", "/no/such/head"], capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    assert "/no/such/head' does not exist" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_serve_cli_rejects_two_spec_flags(tiny, tiny_random_head):
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", tiny, "--port", "1",
                        "--speculative-model", tiny_random_head, "--speculative-config", '{"method": "ngram"}'],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    assert "mutually exclusive" in r.stderr, r.stderr[-2000:]


@pytest.fixture
def head_copy(tmp_path, tiny_random_head):
    import shutil
    d = tmp_path / "head"
    shutil.copytree(tiny_random_head, d)
    return d


def test_truncated_head_weights_fail_at_load_and_engine_start(tiny, head_copy):
    from vllm_eagle.draft_head import EagleHead, HeadConfigError
    w = head_copy / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(HeadConfigError, match="model.safetensors' cannot be read .*truncated or corrupt"):
        EagleHead.from_pretrained(str(head_copy))
    with pytest.raises(Exception, match="truncated or corrupt"):
        make_llm(tiny, vllm_eagle.speculative_kwargs(str(head_copy)))


def test_wrong_shape_weight_is_named(head_copy):
    from safetensors.torch import load_file, save_file
    from vllm_eagle.draft_head import EagleHead, HeadConfigError
    state = load_file(head_copy / "model.safetensors")
    state["fc.weight"] = state["fc.weight"][:, :128].contiguous()          # [H, H] instead of [H, 2H]
    save_file(state, head_copy / "model.safetensors")
    with pytest.raises(HeadConfigError, match=r"fc.weight has shape \(128, 128\), expected \(128, 256\)"):
        EagleHead.from_pretrained(str(head_copy))


@pytest.mark.parametrize("config,msg", [("{not json", "config.json is not valid JSON"),
                                        ('{"hidden_size": 128}', r"lacks \['intermediate_size'")])
def test_corrupt_head_config(tiny, head_copy, config, msg):
    (head_copy / "config.json").write_text(config)
    with pytest.raises(EagleOptionError, match=msg):
        vllm_eagle.speculative_kwargs(str(head_copy), target=tiny)


def test_absurd_k(tiny_random_head):
    with pytest.raises(EagleOptionError, match="num_speculative_tokens=100000 is over 63"):
        vllm_eagle.speculative_kwargs(tiny_random_head, num_speculative_tokens=100_000)


@pytest.mark.parametrize("tree,msg", [
    ("[(0,), (0, 0, 0)]", r"\(0, 0, 0\) has no parent \(0, 0\)"),
    ("[(0,), (2,)]", r"\(2,\) skips rank 1"),
    ("[(0,), (1,), (0,)]", r"duplicate paths: \[\(0,\)\]"),
    (str([(0,) * d for d in range(1, 65)]), "64 nodes; at most 63"),
    ("[(0,), (-1,)]", "non-negative ranks"),
    ("[(0,), ()]", "non-empty tuple"),
    ("root -> a -> root", "not a list of path tuples"),
])
def test_invalid_trees(tiny_random_head, tree, msg):
    with pytest.raises(EagleOptionError, match=msg):
        vllm_eagle.speculative_kwargs(tiny_random_head, tree=tree)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(tree="dynamic", lookup=4), "lookup drafts chains; it cannot be combined with tree='dynamic'"),
    (dict(lookup=True), r"lookup must be a draft length .*got True \(e.g. lookup=4\)"),
    (dict(lookup=-1), r"lookup must be a draft length .*got -1"),
    (dict(min_confidence=1.0), r"min_confidence must be a probability in \[0, 1\) \(0 = off\), got 1.0"),
    (dict(min_confidence="0.3"), r"min_confidence must be a probability .*got '0.3'"),
    (dict(tree="dynamic", min_confidence=0.3), "min_confidence cuts chains; trees choose their nodes themselves"),
])
def test_invalid_lookup(tiny_random_head, kwargs, msg):
    with pytest.raises(EagleOptionError, match=msg):
        vllm_eagle.speculative_kwargs(tiny_random_head, **kwargs)


def test_lookup_longer_than_the_step_budget_is_refused(tiny_random_head):
    """Through --additional-config the two lengths can disagree with vLLM's K; speculative_kwargs sets K = max."""
    from vllm_eagle.config import EagleOptions
    assert vllm_eagle.speculative_kwargs(tiny_random_head, num_speculative_tokens=2, lookup=5)[
        "speculative_config"]["num_speculative_tokens"] == 5
    with pytest.raises(EagleOptionError, match="lookup=5 / chain_k=2 exceed num_speculative_tokens=3"):
        EagleOptions(head=tiny_random_head, num_speculative_tokens=3, lookup=5, chain_k=2)
