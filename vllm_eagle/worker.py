"""Thin glue: a CPU worker whose model runner hands the target's features to our proposer.

`--worker-cls vllm_eagle.worker.EagleCPUWorker` is vLLM's official hook for this (the CPU platform keeps a user-set
worker class). The runner overrides `propose_draft_token_ids`, which receives the target hidden states that vLLM's
custom_class branch would otherwise drop, and optionally turns on intermediate-layer capture (`feature_layers`).
"""
from __future__ import annotations

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from .features import feature_batch_from_runner
from .proposer import EagleProposer


class EagleCPUModelRunner(CPUModelRunner):
    def load_model(self, *args, **kwargs) -> None:
        if isinstance(getattr(self, "drafter", None), EagleProposer) and self.drafter.options.feature_layers:
            self.use_aux_hidden_state_outputs = True           # the target returns (hidden, [layer outputs])
        super().load_model(*args, **kwargs)

    def _get_eagle3_aux_layers_from_config(self):
        if isinstance(getattr(self, "drafter", None), EagleProposer) and self.drafter.options.feature_layers:
            return tuple(self.drafter.options.feature_layers)
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
                                       common_attn_metadata, num_drafts)
        return self.drafter.propose_step(fb)


class EagleCPUWorker(CPUWorker):
    def eagle_stats(self, reset: bool = False) -> dict:
        """Proposer counters (collective_rpc("eagle_stats")); {} when this engine does not run our proposer."""
        drafter = getattr(self.model_runner, "drafter", None)
        if not isinstance(drafter, EagleProposer):
            return {}
        out = dict(vars(drafter.stats))
        if reset:
            drafter.stats = type(drafter.stats)()
        return out

    def init_device(self) -> None:
        from . import trace
        trace("worker")
        super().init_device()
        if not isinstance(self.model_runner, EagleCPUModelRunner):
            self.model_runner = EagleCPUModelRunner(self.vllm_config, torch.device("cpu"))
