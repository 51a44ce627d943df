"""KV commit for trees: the scheduler keeps the first m+1 slots of a step (root + m accepted) and rolls back the rest
from the tail, so each accepted node's target KV moves from its tree slot L + a_j to the kept slot L + j.
E.g. path [0, 2, 5] -> copy slot L+2 to L+1 and L+5 to L+2 (a_j >= j, gathered before scattering). RoPE inside the
moved keys is already right: node a_j ran at position L + depth(a_j) = L + j."""
from __future__ import annotations

import torch

from .acceptance import TreeAcceptance
from .kv_layout import copy_kv_slots, slot_copy_index
from .verify import TreeStep


def commit_accepted_kv(runner, step: TreeStep, accepted: TreeAcceptance) -> None:
    for g, group in enumerate(runner.kv_cache_config.kv_cache_groups):
        # [num_scheduled_tokens] this step's slots. `.gpu` is what vLLM computes and its attention reads: on CPU it is
        # the `.cpu` tensor only until vLLM rebuilds its input batch (several KV cache groups, a block size other
        # than the one it started with), after which `.cpu` is never written.
        slots = runner.input_batch.block_table[g].slot_mapping.gpu
        src, dst = [], []
        for row in step.rows:
            path = accepted.paths[row.req_id]
            for j in range(1, len(path)):
                if path[j] != j:
                    src.append(int(slots[row.start + path[j]]))
                    dst.append(int(slots[row.start + j]))
        if not src:
            continue
        seen, index, src, dst = set(), None, torch.tensor(src), torch.tensor(dst)
        for name in group.layer_names:
            layer = runner.compilation_config.static_forward_context[name]
            kv = layer.kv_cache
            if not isinstance(kv, torch.Tensor) or kv.data_ptr() in seen:
                continue
            seen.add(kv.data_ptr())
            index = index or slot_copy_index(kv, src, dst, layer.isa)          # the group's layers share a shape
            copy_kv_slots(kv, src, dst, layer.isa, index)
