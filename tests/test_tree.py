"""Golden trees compile to exact buffers; invalid specs fail with a message naming the path."""
import pytest
import torch

from vllm_eagle.tree import TreeSpecError, chain, compile_tree
from vllm_eagle.verify import build_tree_step

i32 = lambda x: torch.tensor(x, dtype=torch.int32)


def test_docstring_tree():
    t = compile_tree("[(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]")
    assert t.paths == ((), (0,), (0, 0), (0, 0, 0), (0, 1), (1,))                 # preorder
    assert torch.equal(t.parent, i32([-1, 0, 1, 2, 1, 0]))
    assert torch.equal(t.depth, i32([0, 1, 2, 3, 2, 1]))
    assert torch.equal(t.rank, i32([0, 0, 0, 0, 1, 1]))
    assert torch.equal(t.first_child, i32([1, 2, 3, -1, -1, -1]))
    assert torch.equal(t.next_sibling, i32([-1, 5, 4, -1, -1, -1]))
    assert t.ancestors.tolist() == [0b1, 0b11, 0b111, 0b1111, 0b10011, 0b100001]
    assert t.retrieve.tolist() == [[0, 1, 2, 3], [0, 1, 4, -1], [0, 5, -1, -1]]


def test_chain():
    t = chain(4)
    assert torch.equal(t.parent, i32([-1, 0, 1, 2, 3])) and torch.equal(t.depth, i32([0, 1, 2, 3, 4]))
    assert t.ancestors.tolist() == [0b1, 0b11, 0b111, 0b1111, 0b11111]
    assert torch.equal(t.first_child, i32([1, 2, 3, 4, -1])) and torch.equal(t.next_sibling, i32([-1] * 5))
    assert t.retrieve.tolist() == [[0, 1, 2, 3, 4]]


def test_binary_depth_2_and_invariants():
    t = compile_tree([(1, 1), (0,), (1,), (0, 0), (0, 1), (1, 0)])           # any input order
    assert t.paths == ((), (0,), (0, 0), (0, 1), (1,), (1, 0), (1, 1))
    assert torch.equal(t.parent, i32([-1, 0, 1, 1, 0, 4, 4]))
    assert torch.equal(t.first_child, i32([1, 2, -1, -1, 5, -1, -1]))
    assert torch.equal(t.next_sibling, i32([-1, 4, 3, -1, -1, 6, -1]))
    for i in range(1, t.num_nodes):
        p = int(t.parent[i])
        assert p < i
        assert bin(int(t.ancestors[i])).count("1") == int(t.depth[i]) + 1
        assert int(t.ancestors[i]) & int(t.ancestors[p]) == int(t.ancestors[p])     # row superset of parent's


# EAGLE-1 style: 24 paths in the order of their estimated acceptance (wide at depth 1 and 2, deep along the best chain)
EAGLE1_24 = [(0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0), (0, 5),
             (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2)]


def test_eagle1_style_25_nodes():
    t = compile_tree(EAGLE1_24)
    #   node: 0   1     2      3        4        5        6      7        8      9 .. 14        15    16     17
    #   path: ()  (0,)  (0,0)  (0,0,0)  (0,0,1)  (0,0,2)  (0,1)  (0,1,0)  (0,2)  (0,3)..(0,8)  (1,)  (1,0)  (1,1)
    #   node: 18    19     20 .. 24
    #   path: (2,)  (2,0)  (3,)..(7,)
    assert t.num_nodes == 25 and t.max_depth == 3
    assert t.paths[:9] == ((), (0,), (0, 0), (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1), (0, 1, 0), (0, 2))
    assert t.paths[9:] == ((0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (0, 8), (1,), (1, 0), (1, 1), (2,), (2, 0),
                           (3,), (4,), (5,), (6,), (7,))
    assert t.parent.tolist() == [-1, 0, 1, 2, 2, 2, 1, 6, 1, 1, 1, 1, 1, 1, 1, 0, 15, 15, 0, 18, 0, 0, 0, 0, 0]
    assert t.depth.tolist() == [0, 1, 2, 3, 3, 3, 2, 3, 2, 2, 2, 2, 2, 2, 2, 1, 2, 2, 1, 2, 1, 1, 1, 1, 1]
    assert t.rank.tolist() == [0, 0, 0, 0, 1, 2, 1, 0, 2, 3, 4, 5, 6, 7, 8, 1, 0, 1, 2, 0, 3, 4, 5, 6, 7]
    assert t.first_child.tolist() == [1, 2, 3, -1, -1, -1, 7, -1, -1, -1, -1, -1, -1, -1, -1, 16, -1, -1, 19,
                                      -1, -1, -1, -1, -1, -1]
    assert t.next_sibling.tolist() == [-1, 15, 6, 4, 5, -1, 8, -1, 9, 10, 11, 12, 13, 14, -1, 18, 17, -1, 20,
                                       -1, 21, 22, 23, 24, -1]
    members = [[j for j in range(25) if int(a) >> j & 1] for a in t.ancestors]
    assert members == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 2, 5], [0, 1, 6], [0, 1, 6, 7]] \
        + [[0, 1, i] for i in range(8, 15)] + [[0, 15], [0, 15, 16], [0, 15, 17], [0, 18], [0, 18, 19]] \
        + [[0, i] for i in range(20, 25)]
    assert t.retrieve.tolist() == [[0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 2, 5], [0, 1, 6, 7]] \
        + [[0, 1, i, -1] for i in range(8, 15)] + [[0, 15, 16, -1], [0, 15, 17, -1], [0, 18, 19, -1]] \
        + [[0, i, -1, -1] for i in range(20, 25)]


def test_two_tree_requests_in_one_step():
    """Step of 4 requests, 16 rows: a = tree [(0,), (1,), (0, 0)] with all 3 drafts kept (rows 0-3, L = 7);
    b = a prefill (rows 4-8); c = tree [(0,), (1,), (2,), (0, 0)] cut by the scheduler to 2 drafts, i.e. nodes
    (), (0,), (0, 0): a chain, left to the causal kernel (rows 9-11); d = tree [(0,), (1,), (1, 0), (2,)] cut to
    3 drafts, nodes (), (0,), (1,), (1, 0) (rows 12-15, L = 3)."""
    trees = {"a": compile_tree("[(0,), (1,), (0, 0)]"), "c": compile_tree("[(0,), (1,), (2,), (0, 0)]"),
             "d": compile_tree("[(0,), (1,), (1, 0), (2,)]")}
    spec = {"a": [11, 12, 13], "c": [21, 22], "d": [31, 32, 33]}
    step, again = (build_tree_step(["a", "b", "c", "d"], torch.tensor([0, 4, 9, 12, 16]),
                                   torch.tensor([7, 0, 20, 3]), spec, trees, num_tokens=16) for _ in range(2))
    assert torch.equal(again.pos_delta, step.pos_delta)
    assert all(x.tree is y.tree for x, y in zip(step.rows, again.rows))         # kept prefixes compiled once
    a, d = step.rows
    assert a.tree is trees["a"] and d.tree is compile_tree("[(0,), (1,), (1, 0)]")
    assert (a.req_index, a.req_id, a.start, a.prefix_len) == (0, "a", 0, 7)
    assert (d.req_index, d.req_id, d.start, d.prefix_len) == (3, "d", 12, 3)
    assert a.tree.parent.tolist() == [-1, 0, 1, 0] and d.tree.parent.tolist() == [-1, 0, 0, 2]
    assert a.tokens.tolist() == [0, 11, 12, 13] and d.tokens.tolist() == [0, 31, 32, 33]   # root: placeholder
    assert a.tree.mask.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    assert d.tree.mask.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]
    # slot offset - depth: a's node 3 (depth 1) sits in slot L+3, so its position is 2 below its slot;
    # d's nodes 2 (depth 1) and 3 (depth 2) are 1 below theirs
    assert step.pos_delta.tolist() == [0, 0, 0, 2] + [0] * 5 + [0] * 3 + [0, 0, 1, 1]
    assert build_tree_step(["c"], torch.tensor([0, 3]), torch.tensor([20]), {"c": [21, 22]}, trees, 3) is None


def test_trees_are_compiled_once_and_their_prefixes_index_the_same_data():
    """compile_tree remembers its trees (any input order, string or list); a prefix is the tree of the first paths
    in preorder, compiled once too; the masks are the mask kernel's reference for the same parents."""
    from vllm_eagle.kernels.reference import build_tree_masks
    spec = "[(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]"
    t = compile_tree(spec)
    assert compile_tree([(1,), (0, 1), (0,), (0, 0, 0), (0, 0)]) is t and t.prefix(t.num_nodes) is t
    for n in range(1, t.num_nodes + 1):
        p = t.prefix(n)
        assert p is t.prefix(n) and p.paths == t.paths[:n] and torch.equal(p.parent, t.parent[:n])
        assert torch.equal(p.depth, t.depth[:n]) and torch.equal(p.mask, t.mask[:n, :n])
        assert p.is_chain == (n <= 4)                                    # nodes (), (0,), (0, 0), (0, 0, 0)
        depth, ancestors, mask = build_tree_masks(p.parent[None].contiguous(), torch.tensor([n], dtype=torch.int32))
        assert torch.equal(p.depth, depth[0]) and torch.equal(p.ancestors, ancestors[0])
        assert torch.equal(p.mask, mask[0])


def test_accept_on_the_two_tree_step():
    """Greedy acceptance on the step above, bf16 logits with ties (first index wins, as argmax): a accepts node 3
    (token 13, the root's second child) + bonus 7; d accepts nodes 2, 3 (32, 33; 33 ties 35 at node 2) + bonus 9.
    Sampled rows: a 0-3, b 4, c 5-7, d 8-11; the prefill's and the chain's outputs stay as vLLM's sampler wrote them."""
    from vllm_eagle.acceptance import accept_trees
    trees = {"a": compile_tree("[(0,), (1,), (0, 0)]"), "d": compile_tree("[(0,), (1,), (1, 0), (2,)]")}
    step = build_tree_step(["a", "b", "c", "d"], torch.tensor([0, 4, 9, 12, 16]), torch.tensor([7, 0, 20, 3]),
                           {"a": [11, 12, 13], "c": [21, 22], "d": [31, 32, 33]}, trees, num_tokens=16)
    logits = torch.zeros(12, 40, dtype=torch.bfloat16)
    for row, tokens in {0: [13], 1: [2], 2: [3], 3: [7, 30], 8: [32], 9: [1], 10: [33, 35], 11: [9]}.items():
        logits[row, tokens] = 1.5
    sampled = torch.tensor([[-1] * 4, [4, -1, -1, -1], [21, 22, 5, -1], [-1] * 4], dtype=torch.int32)
    accepted = accept_trees(step, logits, torch.tensor([4, 5, 8, 12]), sampled, {})
    assert dict(accepted.paths) == {"a": (0, 3), "d": (0, 2, 3)}
    assert sampled.tolist() == [[13, 7, -1, -1], [4, -1, -1, -1], [21, 22, 5, -1], [32, 33, 9, -1]]


@pytest.mark.parametrize("spec,msg", [("[(0,), (0, 0, 0)]", r"\(0, 0, 0\) has no parent \(0, 0\)"),
                                      ("[(1,)]", r"\(1,\) skips rank 0"),
                                      ("[(0,), (0,)]", "duplicate paths"),
                                      ("[(0,), ()]", "non-empty tuple"),
                                      ("not a tree", "not a list of path tuples"),
                                      (str([(0,) * d for d in range(1, 65)]), "at most 63")])
def test_invalid_trees(spec, msg):
    with pytest.raises(TreeSpecError, match=msg):
        compile_tree(spec)
