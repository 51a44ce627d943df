"""EagleProposer: our EAGLE-1 proposer, plugged into vLLM through `speculative_config.method = "custom_class"`.

vLLM constructs it in the worker and calls `load_model(target)`; our worker's runner (worker.py) then calls
`propose_step(FeatureBatch)` each step with the target's features. Verification of the chain runs in vLLM's own
rejection sampler, so greedy output is the target's and sampled output follows the target's distribution.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import WORKER_CLASS, EagleOptions
from .draft import commit_entries, draft_chain
from .draft_head import EagleHead, check_head_matches_target, load_draft_vocab, read_config
from .draft_kv import DraftKVCache
from .features import FeatureBatch


@dataclass
class ProposerStats:
    """Counters for the cost model (read by benchmarks through the worker's `eagle_stats` RPC)."""
    steps: int = 0              # propose_step calls (one per engine step)
    draft_s: float = 0.0        # wall time inside propose_step: commit + draft stages


class EagleProposer:
    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self.options = EagleOptions.from_vllm_config(vllm_config)
        self.max_model_len = vllm_config.model_config.max_model_len
        self.dtype = vllm_config.model_config.dtype
        self.head: EagleHead | None = None
        self.stats = ProposerStats()

    def load_model(self, target: torch.nn.Module) -> None:
        hf = self.vllm_config.model_config.hf_config
        check_head_matches_target(read_config(self.options.head), hf.to_dict(), self.options.head)
        self.target = target
        self.vocab_size = self.vllm_config.model_config.get_vocab_size()
        self.head = EagleHead.from_pretrained(self.options.head, dtype=self.dtype)
        self.kv = DraftKVCache(self.head.cfg.num_kv_heads, self.head.cfg.head_dim, self.dtype)
        self.draft_vocab, self.draft_lm_head = self._draft_lm_head(target)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.target.embed_input_ids(token_ids)

    def _draft_lm_head(self, target) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The LM-head rows drafting scores: the head's draft vocabulary (its most frequent tokens, see
        draft_vocab.json) or the whole vocabulary. Verification always uses the full vocabulary, so a draft
        vocabulary costs acceptance only when the target's choice lies outside it; argmax ignores logit scaling and
        soft-capping, so the plain weight rows suffice."""
        weight = getattr(getattr(target, "lm_head", None), "weight", None)
        if weight is None or weight.ndim != 2 or getattr(target.lm_head, "bias", None) is not None:
            return None, None                                   # unusual LM head: score through compute_logits
        ids = load_draft_vocab(self.options.head) if self.options.draft_vocab else None
        if ids is None:
            return None, weight[: self.vocab_size]
        return ids, weight[ids].contiguous()

    def greedy_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """predicted features [B, H] -> draft token ids [B]"""
        if self.draft_lm_head is None:
            return self.target.compute_logits(hidden)[:, : self.vocab_size].argmax(dim=-1)
        best = (hidden @ self.draft_lm_head.T).argmax(dim=-1)
        return best if self.draft_vocab is None else self.draft_vocab[best]

    def propose(self, *args, **kwargs):
        raise RuntimeError(f"vllm_eagle's proposer needs target features, which only its worker provides: start the "
                           f"engine with worker_cls={WORKER_CLASS!r} (vllm_eagle.speculative_kwargs or "
                           f"`vllm serve TARGET --speculative-model HEAD` set it)")

    def propose_step(self, fb: FeatureBatch) -> list[list[int]]:
        """features -> commit entries -> draft. Returns draft token ids per row ([] = no speculation for the row)."""
        t0 = time.perf_counter()
        try:
            return self._propose_step(fb)
        finally:
            self.stats.steps += 1
            self.stats.draft_s += time.perf_counter() - t0

    def _propose_step(self, fb: FeatureBatch) -> list[list[int]]:
        self.kv.free(fb.finished_req_ids)
        x, last = commit_entries(self.head, self.kv, fb, self.embed)
        pos_last = fb.start_pos + fb.num_committed - 1
        rows = np.nonzero(fb.drafting & (last >= 0) & (pos_last + 2 + fb.num_drafts <= self.max_model_len))[0]
        out: list[list[int]] = [[] for _ in fb.req_ids]
        if len(rows) == 0 or fb.num_drafts <= 0:
            return out
        drafts = draft_chain(self.head, self.kv, [fb.req_ids[r] for r in rows], x[torch.from_numpy(last[rows])],
                             pos_last[rows], fb.num_drafts, self.embed, self.greedy_token)
        for r, d in zip(rows.tolist(), drafts.tolist()):   # host sync: the scheduler wants lists
            out[r] = d
        return out
