"""Tree attention on the CPU backend at op level (no engine): the ISA-specific page layout round-trips, tree rows
equal per-branch chain attention through vLLM's own kernel, and slot copies move exactly the tokens asked for."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from vllm import _custom_ops as ops
from vllm.v1.attention import selector
from vllm.v1.attention.backends import cpu_attn
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadata
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm_eagle import kv_layout
from vllm_eagle.kv_layout import copy_kv_slots, gather_kv
from vllm_eagle.tree import chain, compile_tree
from vllm_eagle.tree_attention import (PrivateBlocks, TreeAttentionState, TreeAttentionStep, TreeCPUAttentionBackend,
                                      TreeCPUAttentionImpl, plan_tree_attention, plan_tree_paths,
                                      register_tree_attention, tree_segments)
from vllm_eagle.verify import TreeRow, TreeStep

BLOCK, D, H_KV, H_Q, NUM_BLOCKS = 32, 64, 3, 9, 24     # odd head counts: 3 query heads per KV head
TREE = "[(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]"       # preorder parents [-1, 0, 1, 2, 1, 0]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}     # tree SDPA (cache dtype) vs the kernel, max abs error
CASES = [
    pytest.param(torch.float32, "vec", id="fp32-vec"),
    pytest.param(torch.bfloat16, "vec", id="bf16-vec"),      # this CPU's bf16 layout (no AMX): K^T pages
    pytest.param(torch.bfloat16, "amx", id="bf16-amx",
                 marks=pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="no AMX tiles")),
]


def _seq(length, dtype):
    """(k, v), each [length, H_KV, D]."""
    return torch.randn(length, H_KV, D).to(dtype), torch.randn(length, H_KV, D).to(dtype)


def _paged(seqs, dtype, isa, block_table=None):
    """Write each (k, v) sequence into a fresh cache through (by default shuffled) block tables, as vLLM would.
    Returns kv_cache [NUM_BLOCKS, H_KV, BLOCK, 2 * D], block_table [num_seqs, max_blocks] int32 and per-sequence
    physical slots. E.g. block_table row [7, 2]: token 40 -> slot 2 * 32 + 8 = 72."""
    kv_cache = torch.zeros(NUM_BLOCKS, H_KV, BLOCK, 2 * D, dtype=dtype)
    if block_table is None:
        counts = [-(-len(k) // BLOCK) for k, _ in seqs]
        perm, block_table = torch.randperm(NUM_BLOCKS).int(), torch.zeros(len(seqs), max(counts), dtype=torch.int32)
        for r, c in enumerate(counts):
            block_table[r, :c] = perm[sum(counts[:r]): sum(counts[:r + 1])]
    slots = [block_table[r, torch.arange(len(k)) // BLOCK].long() * BLOCK + torch.arange(len(k)) % BLOCK
             for r, (k, _) in enumerate(seqs)]
    _write(kv_cache, torch.cat([k for k, _ in seqs]), torch.cat([v for _, v in seqs]), torch.cat(slots), isa)
    return kv_cache, block_table, slots


def _write(kv_cache, k, v, slots, isa):
    """vLLM's cache writer: token i's k, v [n, H_KV, D] into slot slots[i]."""
    key_cache, value_cache = kv_cache.view(kv_cache.shape[0], H_KV, 2 * BLOCK, D).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")


def _impl(cls, dtype, monkeypatch, **kw):
    # The constructor only reads the model dtype from the current vLLM config.
    monkeypatch.setattr(cpu_attn, "get_current_vllm_config",
                        lambda: SimpleNamespace(model_config=SimpleNamespace(dtype=dtype)))
    return cls(num_heads=H_Q, head_size=D, scale=D ** -0.5, num_kv_heads=H_KV, alibi_slopes=None,
               kv_cache_dtype="auto", **{"sliding_window": None, **kw})


def _attend(impl, reqs, dtype, isa, tree=None, scratch=0):
    """One forward over requests (k, v, q): k, v [seq_len, H_KV, D], q [num_q, H_Q, D] for the last num_q tokens.
    Returns output [sum num_q, H_Q, D]. With a tree, its scratch is `scratch` of the blocks no request uses."""
    kv_cache, block_table, slots = _paged([(k, v) for k, v, _ in reqs], dtype, isa)
    if tree is not None:
        used = {int(block_table[r, b]) for r, (k, _, _) in enumerate(reqs) for b in range(-(-len(k) // BLOCK))}
        tree.state.scratch = torch.tensor([b for b in range(NUM_BLOCKS) if b not in used][:scratch])
        tree.plans.clear()
    return _forward(impl, reqs, kv_cache, block_table, slots, dtype, isa, tree)


def _forward(impl, reqs, kv_cache, block_table, slots, dtype, isa, tree):
    """One attention forward over requests (k, v, q) whose K/V the cache already holds at `slots`."""
    num_q = torch.tensor([len(q) for _, _, q in reqs])
    qsl = torch.cat([num_q.new_zeros(1), num_q.cumsum(0)]).int()   # [num_reqs + 1]
    seq_lens = torch.tensor([len(k) for k, _, _ in reqs], dtype=torch.int32)
    meta = CPUAttentionMetadata(
        num_actual_tokens=int(qsl[-1]), max_query_len=int(num_q.max()), query_start_loc=qsl,
        max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=block_table,
        slot_mapping=torch.cat([s[-len(q):] for s, (_, _, q) in zip(slots, reqs)]),
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(reqs), num_heads=H_Q, num_kv_heads=H_KV, head_dim=D, seq_lens=seq_lens, dtype=dtype,
            query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False))
    meta.tree = tree
    query = torch.cat([q for _, _, q in reqs])
    key = torch.cat([k[-len(q):] for k, _, q in reqs])
    value = torch.cat([v[-len(q):] for _, v, q in reqs])
    output = torch.full_like(query, float("nan"))
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    impl.forward(layer, query, key, value, kv_cache, meta, output)
    return output


def _tree_row(buf, req_index, start, prefix_len):
    return TreeRow(req_index=req_index, req_id=f"req-{req_index}", start=start, prefix_len=prefix_len, tree=buf,
                   tokens=torch.zeros(buf.num_nodes, dtype=torch.int64))


def _tree_step(rows, pos_delta, state=None):
    return TreeAttentionStep(TreeStep(tuple(rows), pos_delta), state or TreeAttentionState())


def gathered(kv_cache, block_row, length, isa):
    """gather_kv's first `length` columns of one request as [length, num_kv_heads, head_size] (the kernel writer's
    layout)."""
    k, v = gather_kv(kv_cache, block_row[None, : -(-length // BLOCK)], isa)
    return k[0, :, :length].transpose(0, 1), v[0, :, :length].transpose(0, 1)


@pytest.mark.parametrize("strided", [True, False], ids=["strided-view", "element-gather"])
@pytest.mark.parametrize("dtype, isa", CASES)
def test_gather_kv_returns_what_the_kernel_wrote(dtype, isa, strided, monkeypatch):
    if strided:
        assert kv_layout.page_strides(dtype, BLOCK, D, isa) is not None      # both ISAs' layouts are strided views
    else:
        monkeypatch.setattr(kv_layout, "page_strides", lambda *a: None)
    seqs = [_seq(n, dtype) for n in (45 + 6, 1 + 6, 30 + 4, 64)]    # mid-block, one token, block-crossing, full
    kv_cache, block_table, _ = _paged(seqs, dtype, isa)
    # all requests at once, as the tree rows of one step: 2 blocks each, the one-block request reads its block twice
    blocks = torch.stack([block_table[r, torch.tensor([0, 1]).clamp(max=-(-len(k) // BLOCK) - 1)]
                          for r, (k, _) in enumerate(seqs)])                # [4, 2]
    got_k, got_v = gather_kv(kv_cache, blocks, isa, dtype=torch.float32)
    assert got_k.shape == got_v.shape == (4, H_KV, 2 * BLOCK, D) and got_k.dtype == torch.float32
    for r, (k, v) in enumerate(seqs):
        assert torch.equal(got_k[r, :, :len(k)], k.transpose(0, 1).float()), r
        assert torch.equal(got_v[r, :, :len(k)], v.transpose(0, 1).float()), r
        assert torch.equal(gathered(kv_cache, block_table[r], 1, isa)[0], k[:1]), r
    assert torch.equal(got_k[1, :, BLOCK: BLOCK + 7], got_k[1, :, :7])        # the repeated block


def _tree_case(layout, dtype, isa, scratch, monkeypatch, window=None, **impl_kw):
    """One step over `layout` [(prefix_len L, tree buffers or None for a plain 3-token request)] (a tree request's
    queries are its nodes at L..L+n-1) through TreeCPUAttentionImpl with `scratch` free blocks. Returns the output,
    the stock kernel's (causal) output, the oracle — every root-to-leaf path as its own causal chain over the prefix
    through the stock kernel — and the TreeStep."""
    reqs, rows, bufs, start = [], [], [], 0
    for r, (L, buf) in enumerate(layout):
        n = buf.num_nodes if buf is not None else 3
        k, v = _seq(L + n, dtype)
        reqs.append((k, v, torch.randn(n, H_Q, D).to(dtype)))
        if buf is not None:
            rows.append(_tree_row(buf, r, start, L))
            bufs.append(buf)
        start += n
    pos_delta = torch.zeros(start, dtype=torch.int64)
    for row, buf in zip(rows, bufs):
        pos_delta[row.start: row.start + row.num_nodes] = torch.arange(row.num_nodes) - buf.depth
    kernel = _attend(_impl(CPUAttentionBackendImpl, dtype, monkeypatch, sliding_window=window, **impl_kw), reqs, dtype,
                     isa)
    step = _tree_step(rows, pos_delta)
    got = _attend(_impl(TreeCPUAttentionImpl, dtype, monkeypatch, sliding_window=window, **impl_kw), reqs, dtype, isa,
                  step, scratch)
    branches, owners = [], []                                   # owners[b] = (query row of each branch node)
    for row, buf in zip(rows, bufs):
        (k, v, q), L = reqs[row.req_index], row.prefix_len
        for path in buf.retrieve:
            path = path[path >= 0].long()                       # E.g. [0, 1, 3, 5]: slots L, L+1, L+3, L+5
            branches.append((torch.cat([k[:L], k[L + path]]), torch.cat([v[:L], v[L + path]]), q[path]))
            owners.append(row.start + path)
    chains = _attend(_impl(CPUAttentionBackendImpl, dtype, monkeypatch, sliding_window=window, **impl_kw), branches,
                     dtype, isa)
    want = kernel.clone()
    want[torch.cat(owners)] = chains
    return got, kernel, want, step


# Scratch blocks for the trees' paths: none (every tree recomputed), enough for the first tree only (the others are
# recomputed in the same step), enough for all (4 trees below: 2 + 0 + 2 + 3 private blocks, the first segment of
# each needing none; the chain-shaped one needs none, so the kernel verifies it even with no scratch).
# Sliding windows of 3 and 1 (a node then sees only itself): the kernel applies them on the paths, the recompute's
# mask on the trees left to it.
@pytest.mark.parametrize("window", [None, 3, 1], ids=["full", "window-3", "window-1"])
@pytest.mark.parametrize("scratch", [0, 3, 12], ids=["recompute", "mixed", "paths"])
@pytest.mark.parametrize("dtype, isa", CASES)
def test_tree_rows_equal_per_branch_chains(dtype, isa, scratch, window, monkeypatch):
    tol, tree, line = TOL[dtype], compile_tree(TREE), chain(3)
    # L = 30: path 0, 1, 4's positions 31..32 cross a block boundary (two private blocks for it).
    layout = [(45, tree), (20, None), (30, line), (1, tree), (30, tree)]
    got, kernel, want, step = _tree_case(layout, dtype, isa, scratch, monkeypatch, window)
    rows = step.layout.rows
    assert step.recomputed_trees == {0: 3, 3: 2, 12: 0}[scratch]       # tree requests left to the recompute
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)
    plain = slice(rows[0].start + rows[0].num_nodes, rows[1].start)    # the request without a TreeRow
    assert torch.equal(got[plain], kernel[plain])
    chain_rows = slice(rows[1].start, rows[1].start + rows[1].num_nodes)
    torch.testing.assert_close(got[chain_rows].float(), kernel[chain_rows].float(), atol=tol, rtol=0)
    node5 = rows[2].start + 5     # L = 1, parent 0: the causal kernel also let it see nodes 1..4 (window 1: neither)
    assert window == 1 or (got[node5].float() - kernel[node5].float()).abs().max() > 10 * tol


@pytest.mark.parametrize("scratch", [0, 12], ids=["recompute", "paths"])
def test_soft_capped_tree_rows_equal_per_branch_chains(scratch, monkeypatch):
    """Logits soft-capped at 2 (Gemma-2 caps at 50; 2 bends every logit here): the kernel caps the paths, the
    recompute caps its own scores the same way."""
    torch.manual_seed(0)
    layout = [(45, compile_tree(TREE)), (20, None), (1, compile_tree(TREE))]
    got, kernel, want, step = _tree_case(layout, torch.float32, "vec", scratch, monkeypatch, logits_soft_cap=2.0)
    assert step.recomputed_trees == (2 if scratch == 0 else 0)
    torch.testing.assert_close(got, want, atol=TOL[torch.float32], rtol=0)
    torch.manual_seed(0)                                               # the same inputs again, uncapped
    uncapped = _tree_case(layout, torch.float32, "vec", scratch, monkeypatch)[2]
    assert (want - uncapped).abs().max() > 0.1                       # the cap changes the outputs


@pytest.mark.parametrize("dtype, isa", CASES)
def test_depth_1_trees(dtype, isa, monkeypatch):
    """Top-3 children of the root: segments [0, 1] (the request's own blocks), [2], [3] (a private block each); one
    tree ends its block (L = 31: L + 1 starts the next block, so its private blocks need no page copy)."""
    star = compile_tree("[(0,), (1,), (2,)]")
    got, kernel, want, step = _tree_case([(45, star), (31, star)], dtype, isa, 8, monkeypatch)
    (paths, _), = step.plans.values()
    assert len(paths.pages) == 2 and step.recomputed_trees == 0         # L + 1 = 32 starts a block: nothing to copy
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=0)
    assert (got.float() - kernel.float()).abs().max() > 10 * TOL[dtype]      # the causal kernel alone was wrong


def test_tree_segments_cut_a_tree_into_paths():
    assert tree_segments(compile_tree(TREE)) == [([0, 1, 2, 3], [0, 1, 2, 3]), ([4], [0, 1, 4]), ([5], [0, 5])]
    assert tree_segments(chain(3)) == [([0, 1, 2, 3], [0, 1, 2, 3])]
    assert tree_segments(compile_tree("[(0,), (1,), (2,)]")) == [([0, 1], [0, 1]), ([2], [0, 2]), ([3], [0, 3])]
    # a wider, deeper tree: one segment per leaf, every node in exactly one segment, each a first-child run that
    # ends its root-to-leaf path
    big = compile_tree("[(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 0, 0, 0)]")
    cut, parent = tree_segments(big), big.parent.tolist()
    assert [i for seg, _ in cut for i in seg] == list(range(big.num_nodes))
    assert len(cut) == sum(1 for i in range(big.num_nodes) if i not in parent)
    assert all(parent[b] == a for seg, _ in cut for a, b in zip(seg, seg[1:]))
    assert all(path[-len(seg):] == seg and parent[path[0]] == -1 and all(parent[b] == a for a, b in zip(path, path[1:]))
               for seg, path in cut)


def test_tree_paths_plan_is_the_worked_example(monkeypatch):
    """plan_tree_paths' docstring: block 32, L 45, parents [-1, 0, 1, 2, 1, 0], request blocks [7, 3], scratch [20,
    21, 22]; a plain request of 2 rows before it. Then the next step (L 47): the mirrors are current."""
    row = _tree_row(compile_tree(TREE), 1, 2, 45)
    qsl, seq_lens = torch.tensor([0, 2, 8], dtype=torch.int32), torch.tensor([10, 51], dtype=torch.int32)
    md = CPUAttentionMetadata(num_actual_tokens=8, max_query_len=6, query_start_loc=qsl, max_seq_len=51,
                              seq_lens=seq_lens, block_table=torch.tensor([[5, 0], [7, 3]], dtype=torch.int32),
                              slot_mapping=torch.zeros(8, dtype=torch.long), scheduler_metadata=None)
    impl = _impl(TreeCPUAttentionImpl, torch.float32, monkeypatch)
    private = PrivateBlocks([20, 21, 22])
    plan = plan_tree_paths([row], md, BLOCK, private, 1, impl, torch.float32, "vec")
    assert plan.metadata.query_start_loc.tolist() == [0, 2, 6, 7, 8]      # plain rows, segments [0..3], [4], [5]
    assert plan.metadata.seq_lens.tolist() == [10, 45 + 4, 45 + 3, 45 + 2]
    assert plan.metadata.block_table.tolist() == [[5, 0], [7, 3], [7, 22], [7, 21]]
    assert plan.pages == [(3, 22), (3, 21)]
    # block 3 holds positions 32..63: L + i at offset 13 + i
    assert plan.slot_src.tolist() == [3 * 32 + 17, 3 * 32 + 18]
    assert plan.slot_dst.tolist() == [22 * 32 + 15, 21 * 32 + 14]
    assert plan.recompute == set() and private.free == [20]
    row, md.seq_lens = dataclasses.replace(row, prefix_len=47), torch.tensor([10, 53], dtype=torch.int32)
    nxt = plan_tree_paths([row], md, BLOCK, private, 2, impl, torch.float32, "vec")
    assert nxt.pages == [] and nxt.metadata.block_table.tolist() == [[5, 0], [7, 3], [7, 22], [7, 21]]
    # mirror 22: offsets 14, 15 (L 47 is offset 15) committed, then path 0, 1, 4 at 16, 17; mirror 21: 14, 15, 16
    assert nxt.slot_src.tolist() == [3 * 32 + o for o in (14, 15, 16, 19, 14, 15, 20)]
    assert nxt.slot_dst.tolist() == [22 * 32 + o for o in (14, 15, 16, 17)] + [21 * 32 + o for o in (14, 15, 16)]
    same = plan_tree_paths([row], md, BLOCK, private, 3, impl, torch.float32, "vec")   # L did not grow: the root
    assert same.pages == [(3, 22), (3, 21)]                                             # at L is new, copy pages
    again = plan_tree_paths([row], md, BLOCK, private, 5, impl, torch.float32, "vec")      # a step went by
    assert again.pages == [(3, 22), (3, 21)]
    plan_tree_paths([], md, BLOCK, private, 6, impl, torch.float32, "vec")     # no tree: mirrors released
    assert sorted(private.free) == [20, 21, 22] and private.mirrors == {}
    short = plan_tree_paths([row], md, BLOCK, PrivateBlocks([20]), 1, impl, torch.float32, "vec")
    assert short.recompute == {1} and short.metadata is None and short.pages == []


@pytest.mark.parametrize("dtype, isa", CASES)
def test_mirrors_follow_a_request_across_steps(dtype, isa, monkeypatch):
    """One tree request over steps on one cache, its tokens committed in between (new K/V where last step's nodes
    were, as KV compaction leaves them): each step's tree rows equal per-branch chains over what the cache holds,
    whether the mirrors were current (slots copied), stale (steps without trees: pages copied) or moved to the
    next block (step 7: L + 1 = 65 is in block 2, the mirrors copied it)."""
    tree, impl = compile_tree(TREE), _impl(TreeCPUAttentionImpl, dtype, monkeypatch)
    n, block_table = tree.num_nodes, torch.tensor([[9, 4, 17]], dtype=torch.int32)
    slot = lambda pos: block_table[0, pos // BLOCK].long() * BLOCK + pos % BLOCK      # noqa: E731
    k, v = _seq(3 * BLOCK, dtype)
    kv_cache = torch.zeros(NUM_BLOCKS, H_KV, BLOCK, 2 * D, dtype=dtype)
    state, written = TreeAttentionState(torch.tensor([20, 21, 22, 23])), 0
    for step, L, pages in ((1, 40, 2), (2, 43, 0), (3, 44, 0), (5, 47, 2), (6, 62, 0), (7, 64, 2), (8, 66, 0)):
        # committed since, then this step's nodes (fresh values); in the steps without trees before step 5 the
        # request was preempted and recomputed: its block 1 rewritten
        new = torch.arange(BLOCK if step == 5 else written, L + n)
        k[new], v[new] = _seq(len(new), dtype)
        _write(kv_cache, k[new], v[new], slot(new), isa)
        written = L + 1
        q = torch.randn(n, H_Q, D).to(dtype)
        state.step = step
        tstep = _tree_step([_tree_row(tree, 0, 0, L)], torch.arange(n) - tree.depth, state)
        got = _forward(impl, [(k[:L + n], v[:L + n], q)], kv_cache, block_table, [slot(torch.arange(L + n))], dtype,
                       isa, tstep)
        (plan, _), = tstep.plans.values()
        assert len(plan.pages) == pages, step
        for path in tree.retrieve:
            path = path[path >= 0].long()
            want = _attend(_impl(CPUAttentionBackendImpl, dtype, monkeypatch),
                           [(torch.cat([k[:L], k[L + path]]), torch.cat([v[:L], v[L + path]]), q[path])], dtype, isa)
            torch.testing.assert_close(got[path].float(), want.float(), atol=TOL[dtype], rtol=0)


def test_tree_attention_plan_pads_rows_to_the_largest_tree_and_prefix():
    """The worked example of plan_tree_attention: block 32, rows (start 0, L 45, 6 nodes) and (start 9, L 1, 4)."""
    big, small = compile_tree(TREE), chain(3)
    rows = [_tree_row(big, 0, 0, 45), _tree_row(small, 1, 9, 1)]
    block_table = torch.tensor([[7, 3, 0], [5, 0, 0]], dtype=torch.int32)
    plan = plan_tree_attention(rows, block_table, BLOCK, H_Q // H_KV)
    assert plan.blocks.tolist() == [[7, 3], [5, 5]]
    assert plan.query_rows.tolist() == [[0, 1, 2, 3, 4, 5], [9, 10, 11, 12, 12, 12]]
    assert plan.valid_rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert plan.out_rows.tolist() == [0, 1, 2, 3, 4, 5, 9, 10, 11, 12]
    assert plan.mask.shape == (2, 1, 6, 64)
    assert torch.equal(plan.bias.isfinite(), plan.mask.repeat(1, 1, H_Q // H_KV, 1))   # [2, 1, 3 * 6, 64]
    assert (plan.bias[plan.bias.isfinite()] == 0).all()
    m = plan.mask[:, 0].int()
    assert m[0, :, :45].all() and not m[0, :, 51:].any() and m[1, :, :1].all() and not m[1, :, 5:].any()
    assert torch.equal(m[0, :, 45:51].bool(), rows[0].tree.mask)
    assert m[1, :, 1:7].tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]] + [[1, 1, 1, 1, 0, 0]] * 3


def test_tree_refuses_unsupported_features(monkeypatch):
    impl = _impl(TreeCPUAttentionImpl, torch.float32, monkeypatch, logits_soft_cap=30.0)
    impl.sliding_window, impl.alibi_slopes = 16, torch.ones(H_Q)
    k, v = _seq(8, torch.float32)
    reqs = [(k, v, torch.randn(6, H_Q, D))]
    step = _tree_step([_tree_row(compile_tree(TREE), 0, 0, 2)], torch.zeros(6, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="support ALiBi;") as e:   # a window and a soft cap run
        _attend(impl, reqs, torch.float32, "vec", step)
    assert "sliding window" not in str(e.value) and "soft cap" not in str(e.value)
    assert not _attend(impl, reqs, torch.float32, "vec").isnan().any()    # no tree: the stock kernel path


@pytest.mark.parametrize("dtype, isa", CASES)
def test_copy_kv_slots_moves_whole_tokens(dtype, isa):
    L = 30
    seqs = [_seq(L + 6, dtype), _seq(40, dtype)]                 # request 0's tree nodes straddle blocks 0 and 1
    kv_cache, block_table, slots = _paged(seqs, dtype, isa)
    # Accepted path compaction with a chain of overlaps: L+2 -> L+1 while L+4 -> L+2 (reads the old L+2 first).
    src, dst = torch.tensor([L + 2, L + 4]), torch.tensor([L + 1, L + 2])
    copy_kv_slots(kv_cache, slots[0][src], slots[0][dst], isa)
    # A swap (each destination is the other pair's source), across requests: request 0's L+5 <-> request 1's 7.
    copy_kv_slots(kv_cache, torch.stack([slots[0][L + 5], slots[1][7]]), torch.stack([slots[1][7], slots[0][L + 5]]),
                  isa)
    (k0, v0), (k1, v1) = ((k.clone(), v.clone()) for k, v in seqs)
    k0[dst], v0[dst] = seqs[0][0][src], seqs[0][1][src]
    k0[L + 5], v0[L + 5], k1[7], v1[7] = seqs[1][0][7], seqs[1][1][7], seqs[0][0][L + 5], seqs[0][1][L + 5]
    for r, (k, v) in enumerate([(k0, v0), (k1, v1)]):
        got_k, got_v = gathered(kv_cache, block_table[r], len(k), isa)
        assert torch.equal(got_k, k) and torch.equal(got_v, v), r
    want, _, _ = _paged([(k0, v0), (k1, v1)], dtype, isa, block_table)   # the expected tokens, written afresh
    assert torch.equal(kv_cache, want)


def test_register_tree_attention_is_idempotent():
    try:
        register_tree_attention()
        register_tree_attention()
        assert AttentionBackendEnum.CPU_ATTN.get_path() == "vllm_eagle.tree_attention.TreeCPUAttentionBackend"
        assert TreeCPUAttentionBackend.get_name() == CPUAttentionBackend.get_name() == "CPU_ATTN"
        assert TreeCPUAttentionBackend.get_impl_cls() is TreeCPUAttentionImpl
        assert TreeCPUAttentionBackend.get_builder_cls() is CPUAttentionBackend.get_builder_cls()
    finally:        # other tests build engines in this process
        AttentionBackendEnum.CPU_ATTN.clear_override()
        selector._cached_get_attn_backend.cache_clear()


def test_scratch_block_count_covers_every_schedulable_tree_up_to_a_quarter_of_the_cache():
    """The docstring's examples: two blocks per leaf per schedulable request, within [16, num_blocks // 4]."""
    from vllm_eagle.tree_attention import scratch_block_count
    assert scratch_block_count(4, 8, 1000) == 64
    assert scratch_block_count(4, 8, 182) == 45
    assert scratch_block_count(4, 1, 182) == 16
    assert scratch_block_count(8, 256, 20) == 16


def test_reserve_scratch_blocks_extends_every_layer_past_the_schedulers_blocks():
    """The docstring's example (SmolLM2 fp32, 1 GiB: 182 blocks of 196,608 bytes, 30 layers); the engine's own
    config is left alone, and a layout it does not know gets no scratch. Two KV cache groups (Gemma-3's sliding and
    full layers, one tensor each aliasing one allocation): every tensor grows by both groups' blocks, and each group
    gets ids of its own, which the runner's state hands to that group's layers only."""
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
    from vllm_eagle.tree_attention import reserve_scratch_blocks
    page, layers = 196_608, [f"model.layers.{i}.self_attn.attn" for i in range(30)]
    engine = KVCacheConfig(num_blocks=182, kv_cache_groups=[], kv_cache_tensors=[KVCacheTensor(
        size=30 * 182 * page, layers=layers, layer_stride=182 * page, block_stride=page)])
    config, scratch = reserve_scratch_blocks(engine, 16)
    assert [s.tolist() for s in scratch] == [list(range(182, 198))] and config.num_blocks == 198
    t = config.kv_cache_tensors[0]
    assert (t.layer_stride, t.block_stride, t.size) == (198 * page, page, 30 * 198 * page)
    assert engine.num_blocks == 182 and engine.kv_cache_tensors[0].size == 30 * 182 * page
    blocked = KVCacheConfig(num_blocks=182, kv_cache_groups=[], kv_cache_tensors=[KVCacheTensor(   # block-outermost
        size=30 * 182 * page, layers=layers, layer_stride=page, block_stride=30 * page)])
    same, none = reserve_scratch_blocks(blocked, 16)
    assert same is blocked and none == []
    groups = [KVCacheGroupSpec(layers[g::2], None) for g in (0, 1)]
    hybrid = KVCacheConfig(num_blocks=182, kv_cache_groups=groups, kv_cache_tensors=[KVCacheTensor(
        size=15 * 182 * page, layers=g.layer_names, layer_stride=182 * page, block_stride=page) for g in groups])
    config, scratch = reserve_scratch_blocks(hybrid, 16)
    assert [s.tolist() for s in scratch] == [list(range(182, 198)), list(range(198, 214))]
    assert config.num_blocks == 214 and all(t.size == 15 * 214 * page for t in config.kv_cache_tensors)
    state = TreeAttentionState.for_groups(scratch, [g.layer_names for g in groups])
    assert state.scratch_of(layers[3]).tolist() == list(range(198, 214)) and state.scratch.numel() == 32
    assert TreeAttentionState.for_groups(scratch[:1], [layers]).scratch_of(layers[3]).tolist() == list(range(182, 198))
