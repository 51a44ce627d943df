"""Triton kernels (run under TRITON_INTERPRET=1, fp32) against their torch references, on deliberately odd shapes;
integer outputs compared exactly. The host wrappers run the references on CPU tensors when not interpreting."""
import os
import random

import pytest
import torch

from vllm_eagle.kernels import acceptance, reference, tree_mask
from vllm_eagle.tree import compile_tree

assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """Route the wrappers to the (interpreted) Triton kernels; the engine path keeps the torch references."""
    monkeypatch.setenv("VLLM_EAGLE_TRITON_INTERPRET", "1")


def test_wrappers_use_the_reference_without_opt_in(monkeypatch):
    from vllm_eagle.kernels._triton import use_triton
    monkeypatch.delenv("VLLM_EAGLE_TRITON_INTERPRET")
    assert not use_triton(torch.zeros(1))


def random_trees(B: int, N: int, seed: int):
    """B random trees (parent[i] < i) of up to N nodes each, padded to N: parent [B, N] int32, num_nodes [B] int32."""
    rng = random.Random(seed)
    parent = torch.full((B, N), -1, dtype=torch.int32)
    num = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        n = rng.randint(1, N)
        num[b] = n
        for i in range(1, n):
            parent[b, i] = rng.randint(max(0, i - 4), i - 1)      # parent < i, mixes deep chains and wide nodes
    return parent, num


@pytest.mark.parametrize("B,N", [(1, 1), (3, 7), (5, 26), pytest.param(2, 64, marks=pytest.mark.slow), (7, 13)])
def test_build_tree_masks_kernel_matches_reference(B, N):
    parent, num = random_trees(B, N, seed=B * 100 + N)
    want = reference.build_tree_masks(parent, num)
    got = tree_mask.build_tree_masks(parent, num)
    for g, w, name in zip(got, want, ("depth", "ancestors", "mask")):
        assert torch.equal(g, w), f"{name} differs (B={B}, N={N}):\n{g}\nvs\n{w}"


@pytest.mark.parametrize("B,N", [(1, 1), (3, 7), (5, 26), (2, 64), (7, 13)])
def test_build_tree_masks_cpu_path_matches_reference(B, N):
    """The vectorised CPU path the engine runs on this machine."""
    parent, num = random_trees(B, N, seed=B * 100 + N + 1)
    for g, w, name in zip(tree_mask.build_tree_masks_cpu(parent, num), reference.build_tree_masks(parent, num),
                          ("depth", "ancestors", "mask")):
        assert torch.equal(g, w), f"{name} differs (B={B}, N={N})"


def test_masks_of_compiled_tree_and_chain():
    t = compile_tree("[(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]")
    depth, anc, mask = tree_mask.build_tree_masks(t.parent[None].contiguous(), torch.tensor([6], dtype=torch.int32))
    assert torch.equal(depth[0], t.depth) and torch.equal(anc[0], t.ancestors)
    chain_parent = torch.arange(-1, 8, dtype=torch.int32)[None]
    _, _, m = tree_mask.build_tree_masks(chain_parent, torch.tensor([9], dtype=torch.int32))
    assert torch.equal(m[0], torch.ones(9, 9, dtype=torch.bool).tril())         # all-chain tree = causal mask


def accept_inputs(B, N, V, seed):
    parent, num = random_trees(B, N, seed)
    g = torch.Generator().manual_seed(seed)
    first_child = torch.full((B, N), -1, dtype=torch.int32)
    next_sib = torch.full((B, N), -1, dtype=torch.int32)
    cand = torch.zeros(B, N, dtype=torch.int64)
    for b in range(B):
        for i in range(int(num[b]) - 1, 0, -1):
            p = int(parent[b, i])
            next_sib[b, i] = first_child[b, p]
            first_child[b, p] = i
        for p in range(int(num[b])):                        # distinct tokens among siblings
            kids, c = [], int(first_child[b, p])
            while c != -1:
                kids.append(c)
                c = int(next_sib[b, c])
            toks = torch.randperm(V, generator=g)[: len(kids)]
            for c, t in zip(kids, toks):
                cand[b, c] = t
    probs = torch.softmax(torch.randn(B, N, V, generator=g) * 3, dim=-1)
    # Greedy argmax: often a child's token, so paths get accepted several levels deep.
    argmax = torch.where(torch.rand(B, N, generator=g) < 0.9,
                         cand.gather(1, first_child.clamp(min=0).long()), torch.randint(0, V, (B, N), generator=g))
    uniform = torch.rand(B, N, generator=g)
    is_greedy = torch.arange(B) % 2 == 0                    # even rows greedy, odd rows sampled
    return cand, first_child, next_sib, argmax, probs, uniform, is_greedy


@pytest.mark.parametrize("B,N,V", [(1, 1, 5), (4, 9, 33), (6, 26, 101), pytest.param(3, 64, 17, marks=pytest.mark.slow)])
def test_tree_accept_kernel_matches_reference(B, N, V):
    args = accept_inputs(B, N, V, seed=B + N + V)
    want = reference.tree_accept(*args, max_depth=N - 1 if N > 1 else 1)
    got = acceptance.tree_accept(*args, max_depth=N - 1 if N > 1 else 1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"{got}\nvs\n{want}"
    assert (want[1] > 0).any() or N == 1                       # some rows accept: the walk is exercised


def test_tree_accept_greedy_walk_by_hand():
    t = compile_tree("[(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]")
    cand = torch.tensor([[0, 10, 20, 30, 21, 11]])             # node tokens (nodes (), (0,), (0,0), (0,0,0), (0,1), (1,))
    argmax = torch.tensor([[11, 21, 5, 7, 99, 0]])             # root wants 11 (node 5), node 5 wants 0 (no child)
    args = (cand, t.first_child[None].contiguous(), t.next_sibling[None].contiguous(), argmax, None,
            torch.zeros(1, 6), torch.tensor([True]))
    for impl in (reference.tree_accept, acceptance.tree_accept):
        out, n = impl(*args, max_depth=3)
        assert out.tolist() == [[0, 5, -1, -1]] and n.tolist() == [1]
    argmax[0, 0] = 10                                          # root -> node 1 -> node 4 (token 21) -> leaf
    for impl in (reference.tree_accept, acceptance.tree_accept):
        out, n = impl(*args, max_depth=3)
        assert out.tolist() == [[0, 1, 4, -1]] and n.tolist() == [2]
