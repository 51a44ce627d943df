"""EagleProposer: our EAGLE (-1 and -3) proposer, plugged into vLLM through `speculative_config.method = "custom_class"`.

vLLM constructs it in the worker and calls `load_model(target)`; our worker's runner (worker.py) then calls
`propose_step(FeatureBatch)` each step with the target's features. Verification of the chain runs in vLLM's own
rejection sampler, so greedy output is the target's and sampled output follows the target's distribution.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .adapt import SpeculationGate
from .config import DYNAMIC, WORKER_CLASS, EagleOptionError, check_engine_config
from .draft import commit_entries, draft_chain, draft_dynamic, draft_tree, dynamic_tree_paths
from .draft_head import EagleHead, HeadConfig, Linear, load_draft_vocab, load_head, torch_linear
from .draft_kv import DraftKVCache
from .features import FeatureBatch
from .lookup import lookup_draft
from .tree import TreeBuffers, chain, compile_tree

def engine_linear(weight: torch.Tensor) -> Linear:
    """weight [N, K] -> x [..., K] -> [..., N] through the GEMM vLLM's own linear layers run on this platform: on CPU
    its prepacked oneDNN / sgl kernel (`dispatch_cpu_unquantized_gemm`), elsewhere F.linear."""
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        return torch_linear(weight)
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    n, k = weight.shape
    return lambda x: layer.cpu_linear(x.reshape(-1, k), layer.weight, None).view(*x.shape[:-1], n)


@dataclass
class ProposerStats:
    """Counters for the cost model (read by benchmarks through the worker's `eagle_stats` RPC)."""
    steps: int = 0              # propose_step calls (one per engine step)
    draft_s: float = 0.0        # wall time inside propose_step: commit + draft stages
    mask_s: float = 0.0         # tree steps: laying out trees and building masks (verify.build_tree_step)
    tree_attention_s: float = 0.0   # tree attention beyond vLLM's kernel (path copies, recompute), all layers
    trees_verified: int = 0     # tree requests verified (one per request per tree step)
    trees_recomputed: int = 0   # of those, verified by the masked recompute (no scratch blocks left for their paths)
    accept_s: float = 0.0       # tree acceptance + final tokens (acceptance.accept_trees)
    kv_commit_s: float = 0.0    # moving accepted nodes' KV (kv_commit.commit_accepted_kv)
    gated_steps: int = 0        # steps the load-adaptive gate kept from drafting (adapt.py)
    lookup_drafts: int = 0      # rows drafted by prompt lookup instead of the head (options.lookup)
    lookup_only_steps: int = 0  # gated steps on which the lookup gate still let lookup rows draft
    confidence_cut: int = 0     # head chain drafts not proposed: below options.min_confidence (or never drafted)


class EagleProposer:
    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self.options = check_engine_config(vllm_config)
        self.feature_layers = self._feature_layers(vllm_config)    # target layers the worker captures
        self.max_model_len = vllm_config.model_config.max_model_len
        self.dtype = vllm_config.model_config.dtype
        self.head: EagleHead | None = None
        self.stats = ProposerStats()
        self.dynamic = self.options.tree == DYNAMIC
        self.tree = None if self.options.tree in ("chain", DYNAMIC) else compile_tree(self.options.tree)
        self.drafted_trees: dict[str, TreeBuffers] = {}   # req_id -> tree of the drafts last returned (not chains)
        self.gate = SpeculationGate() if self.options.adaptive else None
        # With lookup, a step the gate keeps from drafting can still draft its lookup rows (no head forward, only
        # verify work): a second gate decides that, on gated steps only, by measuring lookup-only vs plain steps.
        self.lookup_gate = SpeculationGate() if self.options.adaptive and self.options.lookup else None
        self._last_decision: tuple | None = None    # (call start, head drafted?, requests, sampled?, lookup-only?)
        self._step_start = 0.0

    def _feature_layers(self, vllm_config) -> tuple[int, ...]:
        """What the target must hand over besides its final state: an EAGLE-3 head's fused layers (its config, or
        vLLM's default for the target's depth), else the `feature_layers` option (capture only)."""
        cfg = HeadConfig.from_dir(self.options.head)
        hf = vllm_config.model_config.hf_config
        layers = cfg.feature_layers(getattr(hf.get_text_config(), "num_hidden_layers", 0))
        if not cfg.eagle3:
            return self.options.feature_layers
        if self.options.feature_layers and tuple(self.options.feature_layers) != layers:
            raise EagleOptionError(f"feature_layers={list(self.options.feature_layers)} differs from the layers the "
                                   f"EAGLE-3 head {self.options.head!r} was trained on ({list(layers)}): leave "
                                   "feature_layers unset")
        return layers

    def load_model(self, target: torch.nn.Module) -> None:
        self.target = target
        self.vocab_size = self.vllm_config.model_config.get_vocab_size()
        self.head = load_head(self.options.head, dtype=self.dtype).pack(engine_linear)
        self.kv = DraftKVCache(self.head.cfg.num_kv_heads, self.head.cfg.head_dim, self.dtype)
        self.draft_vocab, lm_rows = self._draft_lm_head(target)
        self.draft_lm_head = None if lm_rows is None else engine_linear(lm_rows)   # head outputs -> draft logits
        own = self.head.embed_tokens
        self.own_embedding = None if own is None else own.to(self.dtype)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.own_embedding is not None:
            return self.own_embedding[token_ids]
        return self.target.embed_input_ids(token_ids)

    def _draft_lm_head(self, target) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(draft vocabulary [D] token ids or None = the whole vocabulary, LM-head rows [D, H] drafting scores).
        EAGLE-3: the head's own lm_head over its draft vocabulary (d2t). EAGLE-1: the target's LM head, restricted to
        the head's draft vocabulary (its most frequent tokens, see draft_vocab.json) if it has one. Verification
        always uses the full vocabulary, so a draft vocabulary costs acceptance only when the target's choice lies
        outside it; argmax ignores logit scaling and soft-capping, so the plain weight rows suffice."""
        if self.head.eagle3:
            return self.head.draft_token_ids(), self.head.lm_head.weight.detach()
        weight = getattr(getattr(target, "lm_head", None), "weight", None)
        if weight is None or weight.ndim != 2 or getattr(target.lm_head, "bias", None) is not None:
            return None, None                                   # unusual LM head: score through compute_logits
        ids = load_draft_vocab(self.options.head) if self.options.draft_vocab else None
        if ids is None:
            return None, weight[: self.vocab_size].contiguous()
        return ids, weight[ids].contiguous()

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """predicted features [M, H] -> logits [M, D] over the draft vocabulary (D = its size, or the vocabulary)"""
        hidden = self.head.logits_input(hidden)
        if self.draft_lm_head is None:
            return self.target.compute_logits(hidden)[:, : self.vocab_size]
        return self.draft_lm_head(hidden)

    def token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """indices into the draft vocabulary -> token ids (same shape)"""
        return index if self.draft_vocab is None else self.draft_vocab[index]

    def topk_tokens(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """predicted features [M, H] -> the k most likely draft token ids [M, k], best first"""
        return self.token_ids(self.draft_logits(hidden).topk(k, dim=-1).indices)

    def topk_logprobs(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """predicted features [M, H] -> (draft log-probs [M, k], token ids [M, k]), best first: the draft confidences
        EAGLE-2 grows its tree by (normalised over the draft vocabulary)."""
        lp, best = self.draft_logits(hidden).float().log_softmax(-1).topk(k, dim=-1)
        return lp, self.token_ids(best)

    def propose(self, *args, **kwargs):
        raise RuntimeError(f"vllm_eagle's proposer needs target features, which only its worker provides: start the "
                           f"engine with worker_cls={WORKER_CLASS!r} (vllm_eagle.speculative_kwargs or "
                           f"`vllm serve TARGET --speculative-model HEAD` set it)")

    def propose_step(self, fb: FeatureBatch) -> list[list[int]]:
        """features -> commit entries -> draft. Returns draft token ids per row ([] = no speculation for the row)."""
        t0 = time.perf_counter()
        if self.gate is not None and self._last_decision is not None and fb.num_emitted is not None:
            # The interval since the previous call measures that call's decision: its drafting + this step, if this
            # step ran the same requests (adapt.SpeculationGate.comparable).
            start, on, req_ids, sampled, lookup_only = self._last_decision
            if self.gate.comparable(req_ids, fb.req_ids):
                tokens = float(fb.num_emitted.mean())
                self.gate.record(len(req_ids), on, t0 - start, tokens, sampled)
                if lookup_only is not None:                # a gated step: it also measures the lookup gate's choice
                    self.lookup_gate.record(len(req_ids), lookup_only, t0 - start, tokens, sampled)
        self._last_decision = None
        try:
            self._step_start = t0
            return self._propose_step(fb)
        finally:
            self.stats.steps += 1
            self.stats.draft_s += time.perf_counter() - t0

    def shapes(self, num_drafts: int) -> tuple[TreeBuffers, TreeBuffers]:
        """(tree for tree_ok rows, chain for the others) within this step's K; the chain has the tree's depth and is
        verified by vLLM's rejection sampler."""
        if self.dynamic:                                 # the tree is grown per request in _propose_step
            n = min(num_drafts, self.options.num_speculative_tokens)
            return None, chain(min(n, self.options.depth))
        if self.tree is None:
            k = min(num_drafts, self.options.chain_k or num_drafts)       # the head's chain (lookup may draft more)
            return chain(k), chain(k)
        n = min(num_drafts, self.tree.num_nodes - 1)
        tree = self.tree.prefix(n + 1)
        return tree, chain(min(n, tree.max_depth))

    def _propose_step(self, fb: FeatureBatch) -> list[list[int]]:
        """Commit the head's KV for the tokens just accepted, decide whether to draft, then draft: prompt lookup
        for the rows it serves, the head for the others (chains, static or dynamic trees)."""
        self.kv.free(fb.finished_req_ids)
        self.drafted_trees = {}
        x, last = commit_entries(self.head, self.kv, fb, self.embed)      # x [num_entries, H]; last [num_reqs]
        pos_last = fb.start_pos + fb.num_committed - 1                     # [num_reqs] the root's position
        out: list[list[int]] = [[] for _ in fb.req_ids]
        if fb.num_drafts <= 0:
            return out
        gated, lookup_only = self._decide(fb)
        fits = self._rows_that_fit(fb, last, pos_last)
        if self.options.lookup and (not gated or lookup_only):
            fits &= ~self._lookup(fb, np.nonzero(fits)[0], pos_last, out)
        if not gated:
            self._draft_with_head(fb, fits, x, last, pos_last, out)
        return out

    def _decide(self, fb: FeatureBatch) -> tuple[bool, bool | None]:
        """The gate's decision for this step -> (gated: no head drafts, lookup_only: lookup rows still draft; None
        without a lookup gate), remembered for measuring it at the next call."""
        if self.gate is None:
            return False, None
        gated, lookup_only = not self.gate.speculate(len(fb.req_ids), fb.sampled), None
        if gated and self.lookup_gate is not None:
            lookup_only = self.lookup_gate.speculate(len(fb.req_ids), fb.sampled)
            self.stats.lookup_only_steps += lookup_only
        self._last_decision = (self._step_start, not gated, frozenset(fb.req_ids), fb.sampled, lookup_only)
        self.stats.gated_steps += gated
        return gated, lookup_only

    def _rows_that_fit(self, fb: FeatureBatch, last: np.ndarray, pos_last: np.ndarray) -> np.ndarray:
        """[num_reqs] bool: rows that may draft this step (drafting, an entry committed, room before max_model_len)."""
        fits = fb.drafting & (last >= 0) & (pos_last + 2 + fb.num_drafts <= self.max_model_len)
        if self.gate is not None:
            # Under the gate, requests with a seed never draft: drafts change which random numbers a sampled token
            # uses, and timing must not decide a seeded output. Their output is then vanilla's for that seed.
            fits &= ~fb.seeded
        return fits

    def _draft_with_head(self, fb: FeatureBatch, fits: np.ndarray, x: torch.Tensor, last: np.ndarray,
                         pos_last: np.ndarray, out: list[list[int]]) -> None:
        """Head drafts into out[r] for the rows in `fits`: chains, or trees for rows that can verify one (the others
        get the tree's depth as a chain)."""
        tree, line = self.shapes(fb.num_drafts)
        chains_only = self.tree is None and not self.dynamic
        groups = [(line, fits)] if chains_only else [(tree, fits & fb.tree_ok), (line, fits & ~fb.tree_ok)]
        for shape, selected in groups:
            rows = np.nonzero(selected)[0]
            if len(rows) == 0:
                continue
            x_last = x[torch.from_numpy(last[rows])]
            if chains_only:
                self._draft_chain(fb, rows, x_last, pos_last[rows], shape.num_nodes - 1, out)
            elif shape is None:
                self._draft_dynamic(fb, rows, x_last, pos_last[rows],
                                    min(fb.num_drafts, self.options.num_speculative_tokens), out)
            else:
                drafts = draft_tree(self.head, self.kv, [fb.req_ids[r] for r in rows], x_last, pos_last[rows], shape,
                                    self.embed, self.topk_tokens)
                for r, d in zip(rows.tolist(), drafts.tolist()):   # host sync: the scheduler wants lists
                    out[r] = d
                    if not shape.is_chain:                          # a real tree: verify.py lays it out
                        self.drafted_trees[fb.req_ids[r]] = shape

    def _draft_chain(self, fb: FeatureBatch, rows: np.ndarray, x_last: torch.Tensor, pos_last: np.ndarray, k: int,
                     out: list[list[int]]) -> None:
        """The head's chains of up to k drafts for `rows`, each cut before its first draft whose cumulative draft
        probability is below options.min_confidence. E.g. min_confidence 0.3, draft probabilities 0.9, 0.5, 0.8 ->
        cumulative 0.9, 0.45, 0.36: all three kept; 0.6, 0.4 -> 0.6, 0.24: the first one only."""
        floor = math.log(self.options.min_confidence) if self.options.min_confidence > 0 else -math.inf
        tokens, logprob = draft_chain(self.head, self.kv, [fb.req_ids[r] for r in rows], x_last, pos_last, k,
                                      self.embed, self.topk_logprobs, floor)
        keep = (logprob >= floor).sum(1)                # [len(rows)]: cumulative log-probs only fall along a chain
        self.stats.confidence_cut += int(k * len(rows) - keep.sum())
        for r, d, n in zip(rows.tolist(), tokens.tolist(), keep.tolist()):   # host sync: the scheduler wants lists
            out[r] = d[:n]

    def _lookup(self, fb: FeatureBatch, rows: np.ndarray, pos_last: np.ndarray, out: list[list[int]]) -> np.ndarray:
        """Prompt-lookup drafts of min(K, options.lookup) tokens into out[r] for the rows whose context allows one ->
        [num_reqs] bool: rows drafted. Row r's committed tokens are token_ids[r, :p + 2] (p = pos_last[r]: its last
        entry, whose next token is the one just sampled)."""
        hit, k = np.zeros(len(fb.req_ids), dtype=bool), min(fb.num_drafts, self.options.lookup)
        for r in rows.tolist():
            out[r] = lookup_draft(fb.token_ids[r, : pos_last[r] + 2], k)
            hit[r] = bool(out[r])
        self.stats.lookup_drafts += int(hit.sum())
        return hit

    def _draft_dynamic(self, fb: FeatureBatch, rows: np.ndarray, x_last: torch.Tensor, pos_last: np.ndarray,
                       total: int, out: list[list[int]]) -> None:
        """EAGLE-2 trees for `rows`: each request gets its own tree, compiled to the same buffers as static ones."""
        o = self.options
        req_ids = [fb.req_ids[r] for r in rows]
        selected, tokens, parent, rank = draft_dynamic(self.head, self.kv, req_ids, x_last, pos_last, o.depth,
                                                       o.top_k, total, self.embed, self.topk_logprobs)
        selected, tokens, parent, rank = selected.tolist(), tokens.tolist(), parent.tolist(), rank.tolist()
        for b, r in enumerate(rows.tolist()):
            paths = dynamic_tree_paths(selected[b], parent[b], rank[b])
            tree = compile_tree(paths)                          # preorder; compiled once per shape
            token_of = {p: tokens[b][i] for p, i in zip(paths, selected[b])}
            out[r] = [token_of[p] for p in tree.paths[1:]]
            if not tree.is_chain:
                self.drafted_trees[fb.req_ids[r]] = tree
