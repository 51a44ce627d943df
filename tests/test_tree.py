"""Golden trees compile to exact buffers; invalid specs fail with a message naming the path."""
import pytest
import torch

from vllm_eagle.tree import TreeSpecError, chain, compile_tree

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


@pytest.mark.parametrize("spec,msg", [("[(0,), (0, 0, 0)]", r"\(0, 0, 0\) has no parent \(0, 0\)"),
                                      ("[(1,)]", r"\(1,\) skips rank 0"),
                                      ("[(0,), (0,)]", "duplicate paths"),
                                      ("[(0,), ()]", "non-empty tuple"),
                                      ("not a tree", "not a list of path tuples"),
                                      (str([(0,) * d for d in range(1, 65)]), "at most 63")])
def test_invalid_trees(spec, msg):
    with pytest.raises(TreeSpecError, match=msg):
        compile_tree(spec)
