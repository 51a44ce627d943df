"""Lossless sampling with trees: what the accept stage emits is distributed exactly as the target.

Synthetic target over V = 6 tokens: p0 after the root, p1[x] after token x, p2[x, y] after x y (temperature, top-k and
top-p applied through vLLM's own apply_top_k_top_p, as in serving). Drafts are deterministic top-k picks of a
*different* draft distribution q. For each tree shape, S independent requests run one accept step
(`accept_and_emit`, the kernels' reference walk + the final-token sampling of the engine path); when a step emits only
one token, the second comes from a vanilla step (sampled from p1[t1]). The pair (t1, t2) must follow
p(t1, t2) = p0(t1) p1[t1](t2): Pearson chi-square over the V^2 = 36 cells (cells expected < 5 times pooled; S = 12,000
steps per check) against the critical value for a false-failure probability of 1e-6 per check (Wilson-Hilferty), i.e.
under 1e-5 for the whole module.
The same check rejects the classic bug (accepting a deterministic top-k draft with min(1, p/q) using the draft's
softmax q), so the test has the power to catch it.
"""
import math

import pytest
import torch

from vllm_eagle.acceptance import accept_and_emit, child_tables, target_probs_for
from vllm_eagle.tree import compile_tree

V, S = 6, 12000
SHAPES = {
    "chain": [(0,), (0, 0)],
    "static": [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0)],
    "dynamic-like": [(0,), (1,), (1, 0), (1, 1), (1, 2), (0, 0)],      # an uneven shape an EAGLE-2 step can grow
}
PROCESSING = {"T=1": (1.0, None, None), "T=0.7,top-k=4": (0.7, 4, None), "T=1.3,top-p=0.8": (1.3, None, 0.8)}


def chi2_critical(df: int, z: float = 4.753) -> float:
    """Upper quantile of chi-square(df) at the standard-normal quantile z (4.753: tail 1e-6), Wilson-Hilferty."""
    a = 2.0 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2_passes(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square of counts [C] against probs [C] below the 1e-6 critical value. Cells expected < 5 times are
    pooled into one (the chi-square approximation needs it); zero-probability cells must be empty."""
    expected = probs * counts.sum()
    assert counts[expected == 0].sum() == 0, "a token with zero target probability was emitted"
    big, small = expected >= 5, (expected > 0) & (expected < 5)
    obs = torch.cat([counts[big], counts[small].sum()[None]])
    exp = torch.cat([expected[big], expected[small].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    return float(((obs - exp) ** 2 / exp).sum()) < chi2_critical(len(obs) - 1)


def synthetic(seed: int, processing):
    g = torch.Generator().manual_seed(seed)
    logits = {"0": torch.randn(V, generator=g) * 1.5, "1": torch.randn(V, V, generator=g) * 1.5,
              "2": torch.randn(V, V, V, generator=g) * 1.5}
    t, k, p = processing
    proc = lambda x: target_probs_for(x.reshape(-1, V), t, k, p).reshape(x.shape)        # noqa: E731
    target = {d: proc(x) for d, x in logits.items()}
    q0, q1 = torch.randn(V, generator=g), torch.randn(V, V, generator=g)                # draft logits
    return target, q0, q1


def tree_inputs(paths, target, q0, q1):
    """Node tokens (rank-r pick of q after the parent) and the target distribution after every node."""
    tree = compile_tree(paths)
    n = tree.num_nodes
    tokens = torch.zeros(n, dtype=torch.int64)
    probs = torch.zeros(n, V)
    probs[0] = target["0"]
    for i in range(1, n):
        path = tree.paths[i]
        par = int(tree.parent[i])
        q = q0 if len(path) == 1 else q1[tokens[par]]
        tokens[i] = q.topk(path[-1] + 1).indices[-1]
        probs[i] = target["1"][tokens[i]] if len(path) == 1 else target["2"][tokens[par], tokens[i]]
    return tree, tokens, probs


def emitted_pairs(tree, tokens, probs, target, seed: int) -> torch.Tensor:
    """S independent accept steps -> counts [V, V] of (first, second) emitted token."""
    g = torch.Generator().manual_seed(seed)
    n = tree.num_nodes
    fc, ns = child_tables([tree] * S, n)
    path, m, final = accept_and_emit(tokens.expand(S, n).contiguous(), fc, ns, torch.zeros(S, n, dtype=torch.int64),
                                     probs.expand(S, n, V).contiguous(), torch.rand(S, n, generator=g),
                                     torch.zeros(S, dtype=torch.bool), [None] * S)
    first = torch.where(m >= 1, tokens[path[:, 1].clamp(min=0).long()], final)
    second = torch.where(m >= 2, tokens[path[:, 2].clamp(min=0).long()], final)
    vanilla = m == 0                                  # one token this step: the next step samples from p1[first]
    if vanilla.any():
        second[vanilla] = torch.multinomial(target["1"][first[vanilla]], 1, generator=g)[:, 0]
    return torch.bincount(first * V + second, minlength=V * V).view(V, V).float()


@pytest.mark.parametrize("shape,processing", [("chain", "T=1"), ("static", "T=0.7,top-k=4"), ("static", "T=1.3,top-p=0.8"),
                                              ("dynamic-like", "T=1"), ("dynamic-like", "T=1.3,top-p=0.8")])
def test_tree_sampling_matches_target_distribution(shape, processing):
    target, q0, q1 = synthetic(1, PROCESSING[processing])
    tree, tokens, probs = tree_inputs(SHAPES[shape], target, q0, q1)
    counts = emitted_pairs(tree, tokens, probs, target, seed=2)
    want = target["0"][:, None] * target["1"]                       # [V, V] p0(x) p1[x](y)
    assert chi2_passes(counts.flatten(), want.flatten())


def test_acceptance_actually_happens():
    """The trees are accepted often (the test exercises accepted paths, not only residual sampling)."""
    target, q0, q1 = synthetic(1, PROCESSING["T=1"])
    tree, tokens, probs = tree_inputs(SHAPES["static"], target, q0, q1)
    n = tree.num_nodes
    fc, ns = child_tables([tree] * 2000, n)
    g = torch.Generator().manual_seed(0)
    _, m, _ = accept_and_emit(tokens.expand(2000, n).contiguous(), fc, ns, torch.zeros(2000, n, dtype=torch.int64),
                              probs.expand(2000, n, V).contiguous(), torch.rand(2000, n, generator=g),
                              torch.zeros(2000, dtype=torch.bool), [None] * 2000)
    assert (m >= 1).float().mean() > 0.3 and (m >= 2).any()


def test_the_chi_square_check_catches_draft_softmax_as_q():
    """The classic bug: for a deterministic top-1 draft x (q = point mass), using the draft's softmax q(x) in
    min(1, p(x)/q(x)) and max(p - q, 0) as the residual. Its first-token distribution must fail the same check."""
    target, q0, _ = synthetic(1, PROCESSING["T=1"])
    p, q = target["0"], q0.softmax(-1)
    x = int(q.argmax())
    g = torch.Generator().manual_seed(3)
    accept = torch.rand(S, generator=g) < min(1.0, float(p[x] / q[x]))
    residual = (p - q).clamp(min=0)
    out = torch.where(accept, x, torch.multinomial(residual / residual.sum(), S, replacement=True, generator=g))
    assert not chi2_passes(torch.bincount(out, minlength=V).float(), p)
    # while the correct rule (accept with p(x), else sample p without x) passes
    accept = torch.rand(S, generator=g) < float(p[x])
    rest = p.clone()
    rest[x] = 0
    out = torch.where(accept, x, torch.multinomial(rest / rest.sum(), S, replacement=True, generator=g))
    assert chi2_passes(torch.bincount(out, minlength=V).float(), p)


def two_sample_chi2_passes(a: list[int], b: list[int]) -> tuple[bool, float, float]:
    """Two samples of equal size from one distribution? Pearson chi-square of the 2 x C table (cells with fewer than
    10 observations in both samples together pooled into one) against the 1e-6 critical value. -> (passes, stat,
    critical)."""
    from collections import Counter
    ca, cb = Counter(a), Counter(b)
    assert len(a) == len(b)
    cells, rare = [], [0, 0]
    for t in set(ca) | set(cb):
        if ca[t] + cb[t] >= 10:
            cells.append((ca[t], cb[t]))
        else:
            rare[0] += ca[t]
            rare[1] += cb[t]
    if sum(rare):
        cells.append(tuple(rare))
    stat = sum((x - y) ** 2 / (x + y) for x, y in cells)        # equal sizes: sum (a - b)^2 / (a + b)
    crit = chi2_critical(len(cells) - 1)
    return stat < crit, stat, crit


@pytest.mark.slow
def test_smollm2_sampled_token_frequencies_match_vanilla(smollm2, smollm2_head):
    """End to end on SmolLM2 (T=1, top-p 0.95): 400 requests with distinct seeds, vanilla vs EAGLE-2 dynamic trees.
    The 2nd and 3rd emitted tokens (the first ones that go through tree acceptance; the 1st comes from the prefill)
    must have the same distribution in both engines: two-sample chi-square at a false-failure probability of 1e-6
    per check (the unit tests above show the check's power against the classic bug). bf16 where the CPU has
    AVX512-BF16; fp32 elsewhere, where vLLM runs bf16 matmuls through torch's fallback (497 s in bf16, 275 s in fp32
    on an AVX2-only CPU)."""
    from conftest import close, make_llm, spec_counters
    from vllm import SamplingParams

    import vllm_eagle
    n = 400
    dtype = "bfloat16" if torch.cpu._is_avx512_bf16_supported() else "float32"
    prompts = ["Once upon a time, in a small village,"] * n
    params = [SamplingParams(temperature=1.0, top_p=0.95, max_tokens=4, seed=s, ignore_eos=True) for s in range(n)]

    def run(spec):
        llm = make_llm(smollm2, spec, dtype=dtype, max_num_seqs=128)
        out = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        c = spec_counters(llm)
        close(llm)
        return out, c

    vanilla, _ = run(None)
    ours, c = run(vllm_eagle.speculative_kwargs(smollm2_head, tree="dynamic", depth=2, top_k=3,
                                                total_tokens=4, adaptive=False))
    assert c["accepted_tokens"] > 0.2 * c["drafts"], c           # tree acceptance really decided these tokens
    for pos in (1, 2):
        ok, stat, crit = two_sample_chi2_passes([o[pos] for o in vanilla], [o[pos] for o in ours])
        assert ok, f"token {pos}: chi-square {stat:.1f} >= {crit:.1f}"
