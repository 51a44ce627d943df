"""Thin glue: a CPU worker whose model runner hands the target's features to our proposer.

`--worker-cls vllm_eagle.worker.EagleCPUWorker` is vLLM's official hook for this (the CPU platform keeps a user-set
worker class). The runner overrides `propose_draft_token_ids`, which receives the target hidden states that vLLM's
custom_class branch would otherwise drop, and optionally turns on intermediate-layer capture (`feature_layers`).
"""
from __future__ import annotations

import time

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from .acceptance import TreeAcceptance, accept_trees
from .config import CONFIG_KEY
from .features import feature_batch_from_runner
from .kv_commit import commit_accepted_kv
from .proposer import EagleProposer
from .tree_attention import (TreeAttentionState, TreeAttentionStep, reserve_scratch_blocks,
                             scratch_block_count)
from .verify import build_tree_step


class EagleCPUModelRunner(CPUModelRunner):
    """Chains go through vLLM's own verification unchanged; trees add three overrides: tree positions
    (`_prepare_inputs`), tree masks for the attention backend (`_build_attention_metadata`), and tree acceptance +
    KV commit (`_sample`). Each delegates to a stage module and does nothing when the step has no tree. With trees
    on, the KV cache also gets scratch blocks the scheduler does not know of (`initialize_kv_cache`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._tree_step: TreeAttentionStep | None = None        # this step's trees, None without any
        self._tree_state = TreeAttentionState()                 # scratch blocks and their mirrors, across steps
        self._accepted = TreeAcceptance()                       # the last step's accepted tree paths

    def _ours(self) -> bool:
        return isinstance(getattr(self, "drafter", None), EagleProposer)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._tree_step, self._tree_state.step = None, self._tree_state.step + 1
        if self._ours() and self.drafter.drafted_trees:
            n, t0 = self.input_batch.num_reqs, time.perf_counter()
            layout = build_tree_step(
                self.input_batch.req_ids[:n], self.query_start_loc.np[: n + 1],
                self.input_batch.num_computed_tokens_cpu[:n], scheduler_output.scheduled_spec_decode_tokens,
                self.drafter.drafted_trees, scheduler_output.total_num_scheduled_tokens)
            if layout is not None:                              # slots stay L+i; RoPE positions become L+depth(i)
                self.positions[: scheduler_output.total_num_scheduled_tokens] -= layout.pos_delta
                self._tree_step = TreeAttentionStep(layout, self._tree_state)
            self.drafter.stats.mask_s += time.perf_counter() - t0
        return out

    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, common = super()._build_attention_metadata(*args, **kwargs)
        if self._tree_step is not None:
            for md in {id(m): m for m in attn_metadata.values()}.values():
                md.tree = self._tree_step
        return attn_metadata, common

    def _sample(self, logits, spec_decode_metadata):
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
            # No row verifies drafts (the gate said off, or only prefills): vLLM would still run its rejection
            # sampler, which at T > 0 draws an exponential over [num_reqs, vocab] and softmaxes every row (~1/3 of a
            # gated step at batch 8). Then logits are exactly vanilla's rows [num_reqs, vocab] and the plain sampler
            # is vanilla's step; its [num_reqs, 1] output parses the same.
            spec_decode_metadata = None
        out = super()._sample(logits, spec_decode_metadata)     # chains: vLLM's rejection sampler, bit for bit
        self._accepted = TreeAcceptance()
        if self._tree_step is not None:
            stats, t0 = self.drafter.stats, time.perf_counter()
            self._accepted = accept_trees(self._tree_step.layout, logits,
                                                spec_decode_metadata.cu_num_sampled_tokens, out.sampled_token_ids,
                                                self._tree_sampling())
            t1 = time.perf_counter()
            commit_accepted_kv(self, self._tree_step.layout, self._accepted)
            stats.accept_s += t1 - t0
            stats.kv_commit_s += time.perf_counter() - t1
            stats.tree_attention_s += self._tree_step.attention_s
            stats.trees_verified += len(self._tree_step.layout.rows)
            stats.trees_recomputed += self._tree_step.recomputed_trees
        return out

    def _tree_sampling(self) -> dict:
        """{req_index: (temperature, top_k, top_p, generator)} of the sampled tree rows (greedy rows are absent)."""
        batch, out = self.input_batch, {}
        for row in self._tree_step.layout.rows:
            i, rid = row.req_index, row.req_id
            if rid not in batch.greedy_reqs:
                out[i] = (float(batch.temperature_cpu[i]), int(batch.top_k_cpu[i]) if rid in batch.top_k_reqs else None,
                          float(batch.top_p_cpu[i]) if rid in batch.top_p_reqs else None, batch.generators.get(i))
        return out

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        if self._ours() and self.drafter.options.tree != "chain":
            tree = self.drafter.tree                            # None: dynamic, at most K leaves
            leaves = tree.retrieve.shape[0] if tree is not None else self.drafter.options.num_speculative_tokens
            groups = [g.layer_names for g in kv_cache_config.kv_cache_groups]
            num = scratch_block_count(leaves, self.vllm_config.scheduler_config.max_num_seqs,
                                      kv_cache_config.num_blocks // max(1, len(groups)))
            kv_cache_config, scratch = reserve_scratch_blocks(kv_cache_config, num)
            if scratch:
                self._tree_state = TreeAttentionState.for_groups(scratch, groups)
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)

    def load_model(self, *args, **kwargs) -> None:
        if isinstance(getattr(self, "drafter", None), EagleProposer) and self.drafter.feature_layers:
            self.use_aux_hidden_state_outputs = True           # the target returns (hidden, [layer inputs])
        super().load_model(*args, **kwargs)

    def _get_eagle3_aux_layers_from_config(self):
        if isinstance(getattr(self, "drafter", None), EagleProposer) and self.drafter.feature_layers:
            return tuple(self.drafter.feature_layers)
        return super()._get_eagle3_aux_layers_from_config()

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                sample_hidden_states, aux_hidden_states, spec_decode_metadata, common_attn_metadata,
                                slot_mappings):
        if not isinstance(getattr(self, "drafter", None), EagleProposer):
            return super().propose_draft_token_ids(
                scheduler_output, sampled_token_ids, sampling_metadata, hidden_states, sample_hidden_states,
                aux_hidden_states, spec_decode_metadata, common_attn_metadata, slot_mappings)
        # K for this step: num_speculative_tokens, or vLLM's batch-size schedule (num_speculative_tokens_per_batch_size),
        # which may be 0 under load; entries are committed either way.
        num_drafts = scheduler_output.num_spec_tokens_to_schedule
        fb = feature_batch_from_runner(self, scheduler_output, sampled_token_ids, hidden_states, aux_hidden_states,
                                       common_attn_metadata, num_drafts, self._accepted)
        return self.drafter.propose_step(fb)


class EagleCPUWorker(CPUWorker):
    def eagle_stats(self, reset: bool = False) -> dict:
        """Proposer counters (collective_rpc("eagle_stats")); {} when this engine does not run our proposer."""
        drafter = getattr(self.model_runner, "drafter", None)
        if not isinstance(drafter, EagleProposer):
            return {}
        out = dict(vars(drafter.stats), draft_kv_requests=len(drafter.kv),   # requests holding head KV now
                   gate=drafter.gate.summary() if drafter.gate is not None else None,
                   lookup_gate=drafter.lookup_gate.summary() if drafter.lookup_gate is not None else None)
        if reset:
            drafter.stats = type(drafter.stats)()
        return out

    def init_device(self) -> None:
        from . import trace
        from .tree_attention import register_tree_attention
        trace("worker")
        if ((self.vllm_config.additional_config or {}).get(CONFIG_KEY) or {}).get("tree", "chain") != "chain":
            register_tree_attention()                          # before the model (and its attention layers) is built
        super().init_device()
        if not isinstance(self.model_runner, EagleCPUModelRunner):
            self.model_runner = EagleCPUModelRunner(self.vllm_config, torch.device("cpu"))
