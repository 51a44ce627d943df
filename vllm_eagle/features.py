"""Features stage: what one target step hands the proposer, read off vLLM's model runner (thin glue, no math).

The target's return value is already the EAGLE-1 feature (its final-norm hidden state, the LM-head input) for every
scheduled token; with `feature_layers` set, the runner also returns those intermediate layers (EAGLE-3 style).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .acceptance import TreeAcceptance


@dataclass
class FeatureBatch:
    """One target step, rows in the runner's input-batch order.

    Worked example: two rows; row 0 decodes with K=2 drafts scheduled at positions 7..9 and accepts 1 draft; row 1 is
    a 4-token prefill chunk at positions 0..3 that is not the last chunk.
      query_start   [0, 3, 7]       features rows 0..2 belong to row 0, rows 3..6 to row 1
      start_pos     [7, 0]
      num_committed [2, 4]          row 0: token at 7 + 1 accepted draft; row 1: the whole chunk
      drafting      [True, False]   row 1 sampled nothing (mid-prefill): it gets no drafts
    Committed entry i of row r pairs features[query_start[r] + i] with token_ids[r, start_pos[r] + i + 1].
    """
    req_ids: list[str]
    features: torch.Tensor            # [num_scheduled_tokens, H] target final-norm hidden states
    aux_features: torch.Tensor | None  # [num_scheduled_tokens, len(feature_layers) * H] or None
    query_start: np.ndarray           # [num_reqs + 1] int: row offsets into features
    start_pos: np.ndarray             # [num_reqs] int: position of each row's first scheduled token
    num_committed: np.ndarray         # [num_reqs] int: leading scheduled tokens that are now committed
    drafting: np.ndarray              # [num_reqs] bool: rows that sampled a token this step
    tree_ok: np.ndarray               # [num_reqs] bool: rows tree acceptance verifies exactly (tree_verifiable);
                                      # the others draft chains for vLLM's rejection sampler
    token_ids: np.ndarray             # [max_num_reqs, max_model_len] int: committed tokens incl. this step's
    finished_req_ids: set[str]
    num_drafts: int                   # K for this step
    num_emitted: np.ndarray | None = None   # [num_reqs] int: tokens each row emitted (sampled) this step
    seeded: np.ndarray | None = None  # [num_reqs] bool: rows whose request samples with its own seed
    sampled: bool = False             # some row samples (T > 0): the gate keeps such steps' estimates apart
    tree_paths: dict[int, np.ndarray] = field(default_factory=dict)
    # rows verified as trees: {row: accepted path [0, a_1, .., a_m]}; committed entry j of such a row takes feature
    # row query_start[r] + a_j (its KV was moved to slot L + j), instead of query_start[r] + j


def tree_verifiable(sp) -> bool:
    """Whether tree acceptance reproduces this request's sampling exactly: greedy or temperature/top-k/top-p (+ seed).
    Penalties, logit bias, min-p, min-tokens, bad words, allowed tokens, structured output, logprobs and custom
    logits processors act on the target's logits in vLLM's sampler and rejection sampler only, so such requests
    draft a chain and are verified there (lossless, just without trees)."""
    return (sp is not None and sp.presence_penalty == 0 and sp.frequency_penalty == 0 and sp.repetition_penalty == 1
            and sp.min_p == 0 and not sp.logit_bias and sp.min_tokens == 0 and not sp.bad_words
            and sp.allowed_token_ids is None and sp.logprobs is None and sp.structured_outputs is None
            and not getattr(sp, "logits_processors", None))


def feature_batch_from_runner(runner, scheduler_output, sampled_token_ids: list[list[int]],
                              hidden_states: torch.Tensor, aux_hidden_states, common_attn_metadata,
                              num_drafts: int, accepted: TreeAcceptance = TreeAcceptance()) -> FeatureBatch:
    batch = runner.input_batch
    n = batch.num_reqs
    qsl = common_attn_metadata.query_start_loc_cpu[: n + 1].numpy().astype(np.int64)
    scheduled = np.diff(qsl)
    seq_lens = common_attn_metadata.seq_lens[:n].cpu().numpy().astype(np.int64)
    spec = scheduler_output.scheduled_spec_decode_tokens
    num_drafted = np.array([len(spec.get(r, ())) for r in batch.req_ids[:n]], dtype=np.int64)
    num_sampled = np.array([len(s) for s in sampled_token_ids[:n]], dtype=np.int64)
    drafting = num_sampled > 0
    # committed = scheduled - drafts + accepted drafts; accepted = sampled - 1 (the last sampled token is the bonus
    # or recovered token, whose entry needs the next step's feature).
    num_committed = np.where(drafting, scheduled - num_drafted + num_sampled - 1, scheduled)
    aux = torch.cat(aux_hidden_states, dim=-1) if aux_hidden_states else None
    row_of = {rid: r for r, rid in enumerate(batch.req_ids[:n])}
    tree_paths = {row_of[rid]: np.asarray(path, dtype=np.int64)          # accept stage: {req_id: [0, a_1, .., a_m]}
                  for rid, path in accepted.paths.items() if rid in row_of}
    return FeatureBatch(
        req_ids=list(batch.req_ids[:n]), features=hidden_states, aux_features=aux, query_start=qsl,
        start_pos=seq_lens - scheduled, num_committed=num_committed, drafting=drafting,
        tree_ok=np.array([tree_verifiable(runner.requests[rid].sampling_params) for rid in batch.req_ids[:n]],
                         dtype=bool),
        token_ids=batch.token_ids_cpu, finished_req_ids=set(scheduler_output.finished_req_ids), num_drafts=num_drafts,
        num_emitted=num_sampled,
        seeded=np.array([i in batch.generators for i in range(n)], dtype=bool),
        sampled=any(rid not in batch.greedy_reqs for rid in batch.req_ids[:n]),
        tree_paths=tree_paths)
