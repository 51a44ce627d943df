"""Tree attention on vLLM's CPU backend: every row through vLLM's own (causal) kernel, tree requests cut into paths.

vLLM's CPU kernel only knows causal masks, under which tree node i would see every node before it, siblings
included. vLLM writes this step's K/V into the paged cache before attention (node j of a tree at slot L + j,
verify.py), so the kernel can verify a tree exactly if each root-to-leaf path is its own causal sequence:

- Paths (the default). A tree is cut into *segments* (tree_segments: depth-first, a new segment at every node that
  is not its parent's first child), each a pseudo-request of the kernel's batch: its query rows are its own nodes, its
  KV is the prefix, then the root and its other ancestors, then itself, at positions L .. L + depth. Nodes are in
  preorder (tree.py), so the segments are consecutive rows in the step's order and the first one, the path 0, 1, ..,
  D, is the request's own rows and blocks as they are. Every other segment's positions from L + 1 on live in private
  blocks (scratch blocks the scheduler never hands out, reserve_scratch_blocks). The one holding L + 1 also needs
  the request's tokens before L + 1 in that block: it is a *mirror* of the request's block, kept by (request,
  segment ordinal) across consecutive tree steps (PrivateBlocks), so a step copies only the slots committed since
  the last (about τ of them) instead of a whole page (196 KB per layer for SmolLM2 in fp32). Per layer: a page copy
  per mirror that is not current (new, not synced in the previous step, or its block changed; none when L + 1 starts
  a block), one slot copy (the committed slots and the path's nodes), then one kernel call over all rows.
  No attention arithmetic of ours.
What the layers share (segments, copies, pages, masks) is planned once per step. Chains and other requests keep the
kernel's output untouched.
"""
from __future__ import annotations

import dataclasses
import time
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backend import AttentionLayer, AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata)

from .kv_layout import copy_kv_slots, gather_kv, slot_copy_index
from .tree import TreeBuffers
from .verify import TreeRow, TreeStep

_BACKEND_PATH = "vllm_eagle.tree_attention.TreeCPUAttentionBackend"
MIN_SCRATCH_BLOCKS = 16     # SmolLM2: 5.9 MB each in fp32 (30 layers x 128 slots x 3 KV heads x 2 x 64 x 4 bytes)


class TreeCPUAttentionImpl(CPUAttentionBackendImpl):
    _tree_checked = False       # _check_tree_supported passed (its attributes are fixed at construction)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,            # [num_tokens, num_heads, head_size]
        key: torch.Tensor,              # [num_tokens, num_kv_heads, head_size], already in kv_cache
        value: torch.Tensor,            # [num_tokens, num_kv_heads, head_size], already in kv_cache
        kv_cache: torch.Tensor,         # [num_blocks, num_kv_heads, block_size, 2 * head_size]
        attn_metadata: CPUAttentionMetadata | None,
        output: torch.Tensor,           # [num_tokens, num_heads, head_size] (or [num_tokens, num_heads * head_size])
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        args = (layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        tree = getattr(attn_metadata, "tree", None)
        if not isinstance(tree, TreeAttentionStep):
            return super().forward(*args)
        if not self._tree_checked:
            self._check_tree_supported()
            self._tree_checked = True
        t0 = time.perf_counter()
        # The same for every layer of a KV cache group with these heads (the scheduler metadata depends on them).
        plan_key = (attn_metadata.block_table.data_ptr(), kv_cache.shape[2], self.num_heads, self.num_kv_heads,
                    self.head_size, self.sliding_window)
        if plan_key not in tree.plans:
            scratch = tree.state.scratch_of(getattr(layer, "layer_name", None))
            if scratch.numel() and int(scratch.max()) >= kv_cache.shape[0]:
                raise RuntimeError(f"tree scratch blocks {scratch.tolist()} lie beyond this layer's "
                                   f"{kv_cache.shape[0]} KV blocks (vLLM split or resized its blocks?)")
            rows = tree.layout.rows
            private = tree.state.private_blocks(plan_key, scratch)
            paths = plan_tree_paths(rows, attn_metadata, kv_cache.shape[2], private, tree.state.step, self,
                                    query.dtype, layer.isa)
            todo = [r for r in rows if r.req_index in paths.recompute]
            tree.plans[plan_key] = (paths, todo and plan_tree_attention(
                todo, attn_metadata.block_table, kv_cache.shape[2], self.num_heads // self.num_kv_heads,
                kv_cache.dtype, self.sliding_window))
            tree.recomputed_trees = len(todo)
        paths, recompute = tree.plans[plan_key]
        out = output.view(-1, self.num_heads, self.head_size)
        for src, dst in paths.pages:                            # a loop of plain copies: faster than index ops
            kv_cache[dst].copy_(kv_cache[src])
        if len(paths.slot_src):
            if paths.slot_index is None:
                paths.slot_index = slot_copy_index(kv_cache, paths.slot_src, paths.slot_dst, layer.isa)
            copy_kv_slots(kv_cache, paths.slot_src, paths.slot_dst, layer.isa, paths.slot_index)
        t1 = time.perf_counter()
        if paths.metadata is None:                              # nothing cut into segments: the step's metadata
            super().forward(*args)
        else:
            super().forward(layer, query, key, value, kv_cache, paths.metadata, output, output_scale,
                            output_block_scale)
        kernel_s = time.perf_counter() - t1                     # the kernel's own time is not tree overhead
        if recompute:
            o = tree_rows_attention(query, kv_cache, recompute, layer.isa, self.num_kv_heads, self.scale,
                                    self.logits_soft_cap)
            out.index_copy_(0, recompute.out_rows, o.to(out.dtype))
        tree.attention_s += time.perf_counter() - t0 - kernel_s
        return output

    def _check_tree_supported(self) -> None:
        unsupported = [name for name, bad in (
            ("ALiBi", self.alibi_slopes is not None),
            ("attention sinks", self.sinks is not None),
            ("fp8 KV cache", self.is_fp8_kv_cache),
            (f"attention type {self.attn_type}", self.attn_type != AttentionType.DECODER),
            ("KV sharing across layers", self.kv_sharing_target_layer_name is not None),
        ) if bad]
        if unsupported:
            raise NotImplementedError(f"vllm-eagle tree verification does not support {', '.join(unsupported)}; "
                                      "use a chain tree (the default) for this model")


def tree_segments(tree: TreeBuffers) -> list[tuple[list[int], list[int]]]:
    """A tree cut into segments, one per leaf: (its nodes, its root-to-leaf path). In preorder the segments are
    consecutive runs of nodes, each ending at a leaf (retrieve's rows, leaves ascending), and a segment's nodes are
    the end of its path. E.g. the module docstring's tree, parents [-1, 0, 1, 2, 1, 0]: ([0, 1, 2, 3], [0, 1, 2, 3]),
    ([4], [0, 1, 4]), ([5], [0, 5])."""
    out, first = [], 0
    for path in tree.retrieve.tolist():
        path = [i for i in path if i >= 0]
        out.append((list(range(first, path[-1] + 1)), path))
        first = path[-1] + 1
    return out


@dataclass
class Mirror:
    """A scratch block holding a copy of one request's block: positions from the block's start up to `synced`
    (exclusive) equal the request's, in every layer."""
    block: int          # the scratch block
    src: int            # the request's block it copies
    synced: int         # first position not copied (L + 1 of the step that synced it)
    step: int           # the step that last synced it: it is current in step + 1 only, if L grew


@dataclass
class PrivateBlocks:
    """The scratch blocks of one KV cache group, across steps: mirrors[(req_id, s)] is the private block of segment
    s + 1 of that request's tree holding position L + 1; the rest are free (a segment's blocks past L + 1 hold only
    its own nodes and are taken from the free ones for one step)."""
    free: list[int]
    mirrors: dict[tuple[str, int], Mirror] = dataclasses.field(default_factory=dict)
    step: int = -1      # the step last planned


@dataclass
class TreeAttentionState:
    """Tree attention's state across steps, owned by the model runner: the scratch blocks no request owns
    (reserve_scratch_blocks) and, per KV cache group (plan key), which of them mirror which request's block."""
    scratch: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [S]
    # With several KV cache groups (their layers alias one allocation, so block ids are shared): layer name -> its
    # group's own share of `scratch`. Empty with one group, whose layers all use `scratch`.
    layer_scratch: dict = dataclasses.field(default_factory=dict)
    private: dict = dataclasses.field(default_factory=dict)   # plan key -> PrivateBlocks
    step: int = 0               # the runner's step number (consecutive steps differ by 1)

    @classmethod
    def for_groups(cls, scratch: list[torch.Tensor], layer_names: list[list[str]]) -> "TreeAttentionState":
        """scratch[g]: the ids reserved for KV cache group g, whose layers are layer_names[g]."""
        if len(scratch) == 1:
            return cls(scratch[0])
        return cls(torch.cat(scratch), {name: ids for ids, names in zip(scratch, layer_names) for name in names})

    def scratch_of(self, layer_name: str | None) -> torch.Tensor:
        return self.layer_scratch.get(layer_name, self.scratch)

    def private_blocks(self, plan_key, scratch: torch.Tensor) -> PrivateBlocks:
        """This KV cache group's entry, new with every one of its scratch blocks free the first time; groups not
        planned in the previous step are dropped (a step without trees leaves every mirror stale anyway)."""
        for key in [k for k, g in self.private.items() if g.step < self.step - 1]:
            del self.private[key]
        if plan_key not in self.private:
            self.private[plan_key] = PrivateBlocks(scratch.tolist())
        return self.private[plan_key]


@dataclass
class TreeAttentionStep:
    """What the attention metadata carries as `.tree` in a step with trees: the step's layout, the runner's
    state, and what the backend works out once for all layers (its plans) and reports back."""
    layout: TreeStep
    state: TreeAttentionState
    plans: dict = dataclasses.field(default_factory=dict)   # plan key (block table, block size, heads) -> plans
    attention_s: float = 0.0    # wall time on the tree rows (all layers) beyond the kernel's own
    recomputed_trees: int = 0   # tree requests whose rows were recomputed (no scratch left for their paths)


@dataclass
class PathPlan:
    """One step's kernel call with tree requests cut into segments (see the module docstring)."""
    metadata: CPUAttentionMetadata | None   # the step's, with each planned tree request replaced by its segments
    #                                         (None: nothing planned)
    pages: list[tuple[int, int]]    # (request's block, mirror): each layer first copies these whole pages
    slot_src: torch.Tensor      # [num_copies] int64: then slot slot_dst[j] takes this step's K/V of slot slot_src[j]
    slot_dst: torch.Tensor      #   (a current mirror's slots committed since its last step; a path's node at depth
    #                             d: from L + node to its segment's position L + d)
    recompute: set[int]         # req_index of the tree requests left to the masked recompute (no scratch left)
    slot_index: tuple | None = None     # kv_layout.slot_copy_index of the slot copies, made at the first layer


def plan_tree_paths(rows: list[TreeRow], md: CPUAttentionMetadata, block_size: int, private: PrivateBlocks,
                    step: int, impl: CPUAttentionBackendImpl, dtype: torch.dtype, isa: str) -> PathPlan:
    """rows: this step's trees; md: the step's metadata (block_table [num_reqs, max_blocks] int32); private: this KV
    cache group's scratch blocks (updated: mirrors taken, synced, released); step: this step's number (consecutive).

    Segment s of a request with prefix L, path nodes path[0..D] (path[d] at depth d, path[0] = root): query rows
    start + its nodes, seq_len L + D + 1, block table = the request's with every block holding positions L + 1 ..
    L + D replaced by a private one, unless the path is 0, 1, .., D (the first segment). E.g. block 32, L 45,
    parents [-1, 0, 1, 2, 1, 0] (preorder; children 0: 1, 5; 1: 2, 4; 2: 3), request blocks [7, 3], free scratch
    [20, 21, 22]: segment [0, 1, 2, 3] is the request's own rows, seq_len L + 4, and blocks; segment [4] (path 0, 1,
    4) has one query row, seq_len L + 3, and reads positions 46..47 from mirror 22, a page copy of the request's
    block 3 (positions 32..63, so L + i at offset 13 + i) whose slot 22 * 32 + 15 then takes the K/V at L + 4
    (node 1's, at offset 14, came with the page); segment [5] (path 0, 5), seq_len L + 2, reads position 46 from
    mirror 21: slot 21 * 32 + 14 takes L + 5. Next step, with 2 more tokens committed (L 47), both mirrors are
    current: no page copy, slots 14 and 15 of each take the request's, then the new paths' nodes go to 16 on."""
    qsl, seq_lens, bt = md.query_start_loc.tolist(), md.seq_lens.tolist(), md.block_table
    by_req, mirrors, free = {r.req_index: r for r in rows}, private.mirrors, private.free
    paths_of = {}
    for row in rows:
        r = row.req_index
        if (row.start, row.num_nodes) != (qsl[r], qsl[r + 1] - qsl[r]):
            raise RuntimeError(f"tree request {row.req_id}: its {row.num_nodes} nodes from row {row.start} are not "
                               f"its scheduled rows {qsl[r]}..{qsl[r + 1] - 1} (vLLM's step layout changed?)")
        cut = tree_segments(row.tree)
        paths_of[r] = [seg for seg, _ in cut], [path for _, path in cut[1:]]
    wanted = {(by_req[r].req_id, s) for r, (_, paths) in paths_of.items() for s in range(len(paths))}
    for key in [k for k in mirrors if k not in wanted]:
        free.append(mirrors.pop(key).block)
    private.step = step
    q_lens, new_seq, new_bt, recompute = [], [], [], set()
    pages, slot_src, slot_dst, one_step, planned = [], [], [], [], False
    slot = lambda table, pos: int(table[pos // block_size]) * block_size + pos % block_size     # noqa: E731
    for r in range(len(seq_lens)):
        row = by_req.get(r)
        segments, paths = paths_of.get(r, ((), ()))
        L = 0 if row is None else row.prefix_len
        b = (L + 1) // block_size                               # the block of L + 1: mirrored
        extra = [range(b + 1, (L + len(path) - 1) // block_size + 1) for path in paths]    # blocks of nodes only
        new = sum((row.req_id, s) not in mirrors for s in range(len(paths))) + sum(map(len, extra))   # blocks to take
        if row is None or new > len(free):
            if row is not None:
                recompute.add(r)
            q_lens.append(qsl[r + 1] - qsl[r])
            new_seq.append(seq_lens[r])
            new_bt.append(bt[r])
            continue
        planned = True
        q_lens.append(len(segments[0]))
        new_seq.append(L + len(segments[0]))
        new_bt.append(bt[r])
        src_block = int(bt[r, b])
        for s, (seg, path, blocks) in enumerate(zip(segments[1:], paths, extra)):
            m = mirrors.get((row.req_id, s))
            if m is None:
                m = mirrors[(row.req_id, s)] = Mirror(free.pop(), -1, 0, -1)
            table = bt[r].clone()
            table[b] = m.block
            paged = False
            if m.step == step - 1 and m.src == src_block and m.synced <= L:     # current (L grew: the root at L
                for pos in range(max(m.synced, b * block_size), L + 1):        # is new): the slots committed since
                    slot_src.append(slot(bt[r], pos))
                    slot_dst.append(slot(table, pos))
            elif (L + 1) % block_size:                          # (nothing to copy when L + 1 starts the block)
                pages.append((src_block, m.block))
                paged = True
            m.src, m.synced, m.step = src_block, L + 1, step
            for blk in blocks:
                table[blk] = free.pop()
                one_step.append(int(table[blk]))
            for d in range(1, len(path)):
                if not (paged and path[d] == d and (L + d) // block_size == b):    # else it came with the page
                    slot_src.append(slot(bt[r], L + path[d]))
                    slot_dst.append(slot(table, L + d))
            q_lens.append(len(seg))
            new_seq.append(L + len(path))
            new_bt.append(table)
    free.extend(one_step)
    if not planned:
        return PathPlan(None, [], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), recompute)
    qsl_new = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq_new = torch.tensor(new_seq, dtype=torch.int32)
    metadata = dataclasses.replace(            # num_actual_tokens: the scheduled rows (vLLM's may count padding)
        md, num_actual_tokens=int(qsl_new[-1]), query_start_loc=qsl_new, seq_lens=seq_new,
        block_table=torch.stack(new_bt), max_query_len=max(q_lens), max_seq_len=max(new_seq),
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(new_seq), num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size,
            seq_lens=seq_new, dtype=dtype, query_start_loc=qsl_new, causal=True, sliding_window_size=-1, isa=isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV))
    as_long = lambda x: torch.tensor(x, dtype=torch.long)      # noqa: E731
    return PathPlan(metadata, pages, as_long(slot_src), as_long(slot_dst), recompute)


def scratch_block_count(max_leaves: int, max_num_seqs: int, num_blocks: int) -> int:
    """Scratch blocks per layer for the trees' private paths: a tree has one segment per leaf, each needing at most
    two private blocks (its positions L + 1 .. L + depth cross at most one block boundary), for every request the
    scheduler may run at once; capped at a quarter of the scheduler's blocks (trees past it are recomputed), at least
    MIN_SCRATCH_BLOCKS. E.g. the 8-node default tree (4 leaves), max_num_seqs 8: 64; SmolLM2 fp32 with 1 GiB (182
    blocks): min(64, 45) = 45; max_num_seqs 1: 8 -> 16."""
    return max(MIN_SCRATCH_BLOCKS, min(2 * max_leaves * max_num_seqs, num_blocks // 4))


def reserve_scratch_blocks(kv_cache_config, num: int):
    """-> (a copy of vLLM's KV cache config with `num` more blocks per KV cache group, [each group's new block ids]),
    or (the config, []) if its layout is not the layer-outermost one this CPU backend allocates. Groups' layers alias
    one allocation (a block id belongs to one group at a time), so each group gets ids of its own. The scheduler keeps
    the original config, so it never hands these blocks to a request. E.g. SmolLM2 fp32 with 1 GiB: 182 blocks of
    196,608 bytes per layer, 30 layers, one group; with num 16 every layer's 182 + 16 blocks sit 198 * 196,608 bytes
    apart, and blocks 182..197 are the scratch."""
    tensors, n = kv_cache_config.kv_cache_tensors, kv_cache_config.num_blocks
    groups = max(1, len(kv_cache_config.kv_cache_groups))
    if not tensors or any(t.offset != 0 or t.host_resident or t.layer_stride != t.block_stride * n
                          or t.size != t.layer_stride * len(t.layers) for t in tensors):
        return kv_cache_config, []
    config = deepcopy(kv_cache_config)
    config.num_blocks = n + groups * num
    for t in config.kv_cache_tensors:
        t.layer_stride = t.block_stride * config.num_blocks
        t.size = t.layer_stride * len(t.layers)
    return config, [torch.arange(n + g * num, n + (g + 1) * num) for g in range(groups)]


def tree_rows_attention(query: torch.Tensor, kv_cache: torch.Tensor, plan: "TreeAttentionPlan", isa: str,
                        num_kv_heads: int, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """The tree rows' attention over prefix + ancestors, in the cache's dtype (torch's CPU SDPA accumulates a bf16
    one in fp32, as the stock kernel does).

    query [num_tokens, num_heads, hs] (the step's rows); kv_cache: one layer's paged cache, this step's K/V already
    written -> [num valid tree rows, num_heads, hs], in plan.out_rows order."""
    (R, N), H, hs = plan.query_rows.shape, num_kv_heads, query.shape[-1]
    G = query.shape[1] // H
    k, v = gather_kv(kv_cache, plan.blocks, isa)                          # [R, H, P, hs]: prefix and nodes
    # Query head h reads KV head h // G: fold each KV head's G query heads into its rows (plain multi-head
    # attention over num_kv_heads, G * N rows, no K/V expansion: faster than enable_gqa; docs/notes.md).
    q = query[plan.query_rows].view(R, N, H, G, hs).permute(0, 2, 3, 1, 4).reshape(R, H, G * N, hs)
    if softcap:             # logits soft-capped as the kernel does (Gemma-2): cap * tanh(s / cap), in fp32
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        s = softcap * torch.tanh(s / softcap) + plan.bias.float()
        o = torch.matmul(torch.softmax(s, dim=-1), v.float()).to(k.dtype)
    else:
        o = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=plan.bias, scale=scale)
    o = o.view(R, H, G, N, hs).permute(0, 3, 1, 2, 4).reshape(R * N, H * G, hs)   # [R * N, num_heads, hs]
    return o.index_select(0, plan.valid_rows)


@dataclass
class TreeAttentionPlan:
    """What every layer of one tree step shares. R tree rows, padded to N nodes and NB blocks (P = NB * block_size
    columns: a row's tokens in slot order, prefix then nodes)."""
    blocks: torch.Tensor        # [R, NB] int64: row r's blocks up to its last node (a shorter row repeats its last)
    query_rows: torch.Tensor    # [R, N] int64: step row of node i (padding repeats the last node)
    mask: torch.Tensor          # [R, 1, N, P] bool, True = attend: columns < L, then L + j for the node's ancestors j
    valid_rows: torch.Tensor    # [num valid] int64: flat index r * N + i of the real nodes (not padding)
    out_rows: torch.Tensor      # [num valid] int64: their step rows
    bias: torch.Tensor          # [R, 1, G * N, P] in the cache dtype: the mask for G query heads per KV head,
    #                             additive (0 where row g * N + i, head group g and node i, attends; -inf elsewhere:
    #                             SDPA is faster so)


def plan_tree_attention(rows: list[TreeRow], block_table: torch.Tensor, block_size: int, groups: int,
                        dtype: torch.dtype = torch.float32, window: int = -1) -> TreeAttentionPlan:
    """block_table: [num_reqs, max_blocks] int32 (the attention metadata's); groups: query heads per KV head; dtype:
    the KV cache's (attention runs in it); window: the layers' sliding window (-1: none): a node at position p sees
    only keys at positions p - window + 1 .. p, as vLLM's kernel lets a token see them.

    E.g. block 32, rows (start 0, L 45, 6 nodes: slots 0..50) and (start 9, L 1, 4 nodes: slots 0..4): NB = 2,
    N = 6, P = 64; row 0 attends columns 0..44 and its ancestors among 45..50; row 1 reads its block twice, attends
    column 0 and its ancestors among 1..4; its query rows are [9, 10, 11, 12, 12, 12] and its nodes 4 and 5 are
    padding (valid_rows skips 10 and 11)."""
    N = max(r.num_nodes for r in rows)
    nbs = [-(-(r.prefix_len + r.num_nodes) // block_size) for r in rows]
    NB, col, node = max(nbs), torch.arange(max(nbs)), torch.arange(N)
    blocks = torch.stack([block_table[r.req_index, col.clamp(max=nb - 1)] for r, nb in zip(rows, nbs)]).long()
    query_rows = torch.stack([r.start + node.clamp(max=r.num_nodes - 1) for r in rows])
    mask = torch.zeros(len(rows), 1, N, NB * block_size, dtype=torch.bool)
    for b, r in enumerate(rows):
        L = r.prefix_len
        nodes = node.clamp(max=r.num_nodes - 1)
        mask[b, 0, :, :L] = True
        mask[b, 0, :, L: L + r.num_nodes] = r.tree.mask[nodes]
        if window > 0:                  # columns hold positions 0 .. L - 1, then node j's L + depth[j]
            depth = r.tree.depth.long()
            cols = torch.cat([torch.arange(L), L + depth])
            rows_pos = L + depth[nodes]
            mask[b, 0, :, : L + r.num_nodes] &= rows_pos[:, None] - cols[None, :] < window
    valid_rows = torch.stack([node < r.num_nodes for r in rows]).flatten().nonzero().squeeze(1)
    grouped = mask.repeat(1, 1, groups, 1)
    bias = torch.zeros(grouped.shape, dtype=dtype).masked_fill_(~grouped, float("-inf"))
    return TreeAttentionPlan(blocks, query_rows, mask, valid_rows, query_rows.flatten()[valid_rows], bias)


class TreeCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with tree rows recomputed; get_name() stays "CPU_ATTN" so vLLM's CPU-specific paths still apply."""

    @staticmethod
    def get_impl_cls() -> type[TreeCPUAttentionImpl]:
        return TreeCPUAttentionImpl


def register_tree_attention() -> None:
    """Idempotent: make AttentionBackendEnum.CPU_ATTN resolve to TreeCPUAttentionBackend, dropping backends the
    selector cached before. Must run before the model's Attention layers are built."""
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    if AttentionBackendEnum.CPU_ATTN.get_path() == _BACKEND_PATH:
        return
    register_backend(AttentionBackendEnum.CPU_ATTN, _BACKEND_PATH)
    selector._cached_get_attn_backend.cache_clear()
