"""The draft stage against a from-scratch reference: commit entries, then draft, recomputing attention over the
whole entry sequence (committed entries + the drafted path) for every draft (no cache), in fp32."""
import numpy as np
import pytest
import torch

from vllm_eagle.draft import commit_entries, draft_chain, draft_dynamic, draft_tree, dynamic_tree_paths
from vllm_eagle.draft_head import EagleHead, HeadConfig, attend
from vllm_eagle.draft_kv import DraftKVCache
from vllm_eagle.features import FeatureBatch
from vllm_eagle.tree import chain, compile_tree

CFG = HeadConfig(hidden_size=48, intermediate_size=96, num_heads=6, num_kv_heads=2, head_dim=8, vocab_size=37,
                 rms_norm_eps=1e-6)


def feature_batch(req_ids, features, query_start, start_pos, num_committed, drafting, token_ids, finished=()):
    """A FeatureBatch of greedy rows, no aux features, K = 3."""
    return FeatureBatch(req_ids=req_ids, features=features, aux_features=None, query_start=np.array(query_start),
                        start_pos=np.array(start_pos), num_committed=np.array(num_committed),
                        drafting=np.array(drafting), tree_ok=np.ones(len(req_ids), dtype=bool), token_ids=token_ids,
                        finished_req_ids=set(finished), num_drafts=3)


def two_prefills(lens: dict, dtype: torch.dtype):
    """Two full prefills in one FeatureBatch: request r commits positions 0..lens[r]-1 ->
    (tokens {r: [lens[r] + 1]}, features {r: [lens[r], H]}, the batch)."""
    seqs = {r: torch.randint(0, 37, (n + 1,)) for r, n in lens.items()}
    feats = {r: torch.randn(n, 48, dtype=dtype) for r, n in lens.items()}
    token_ids = np.zeros((2, 16), dtype=np.int64)
    for i, r in enumerate(lens):
        token_ids[i, : len(seqs[r])] = seqs[r].numpy()
    n = list(lens.values())
    fb = feature_batch(list(lens), torch.cat(list(feats.values())), [0, n[0], n[0] + n[1]], [0, 0], n, [True, True],
                       token_ids)
    return seqs, feats, fb


def reference_feature(head, embed_w, entry_f, entry_t):
    """Entries (entry_f[i] [H], entry_t[i]) at positions 0..n-1 -> the last entry's predicted feature [H], by causal
    attention over the whole sequence."""
    n = len(entry_f)
    x = head.project(embed_w[torch.tensor(entry_t)], torch.stack(entry_f))
    q, kk, v = head.qkv(x, torch.arange(n))
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None]
    return head.finish(x, attend(q[None], kk[None], v[None], causal)[0])[-1]


def reference_drafts(head, embed_w, lm_w, feats, tokens, k):
    """feats [p+1, H] true features f_0..f_p; tokens [p+2] t_0..t_{p+1} -> (k greedy draft ids, their cumulative
    draft log-probabilities)."""
    entry_f, entry_t = list(feats), list(tokens[1:])
    out, logprob = [], [0.0]
    for _ in range(k):
        g = reference_feature(head, embed_w, entry_f, entry_t)
        lp = (g @ lm_w.T).log_softmax(-1)
        tok = int(lp.argmax())
        out.append(tok)
        logprob.append(logprob[-1] + float(lp[tok]))
        entry_f.append(g)
        entry_t.append(tok)
    return out, logprob[1:]


def reference_tree(head, embed_w, lm_w, feats, tokens, paths):
    """feats [p+1, H], tokens [p+2] as above -> {path: token} for every path, each rebuilt from scratch along its path:
    the node (r_1, .., r_d) appends, depth by depth, the entry (g, r_i-th best token of g) with g the feature predicted
    by the sequence so far."""
    out = {}
    for path in paths:
        entry_f, entry_t = list(feats), list(tokens[1:])
        for r in path:
            g = reference_feature(head, embed_w, entry_f, entry_t)
            tok = int((g @ lm_w.T).topk(r + 1).indices[r])
            entry_f.append(g)
            entry_t.append(tok)
        out[path] = tok
    return out


def test_commit_and_chain_match_reference():
    torch.manual_seed(0)
    head = EagleHead(CFG).eval()
    embed_w, lm_w = torch.randn(37, 48), torch.randn(37, 48)
    # Three rows: a decode row that accepted 1 of 2 drafts, a full prefill, and a mid-prefill chunk (no drafts).
    lens = {"a": 9, "b": 5, "c": 12}
    seqs = {r: torch.randint(0, 37, (n + 2,)) for r, n in lens.items()}
    feats = {r: torch.randn(n + 1, 48) for r, n in lens.items()}
    kv = DraftKVCache(CFG.num_kv_heads, CFG.head_dim, torch.float32)
    # Earlier steps committed a[0..6] and c[0..3].
    for r, upto in (("a", 7), ("c", 4)):
        fb0 = feature_batch([r], feats[r][:upto], [0, upto], [0], [upto], [False], seqs[r][None].numpy())
        commit_entries(head, kv, fb0, lambda t: embed_w[t])
    # This step: a scheduled positions 7..9 (accepted 1 -> 2 committed), b 0..5 (6 committed), c 4..7 (4 committed).
    rows = [("a", 7, 3, 2, True), ("b", 0, 6, 6, True), ("c", 4, 4, 4, False)]
    feat_rows = [feats[r][s:s + n] for r, s, n, _, _ in rows]
    qs = np.concatenate([[0], np.cumsum([n for _, _, n, _, _ in rows])])
    token_ids = np.zeros((3, 16), dtype=np.int64)
    for i, (r, *_) in enumerate(rows):
        token_ids[i, : len(seqs[r])] = seqs[r].numpy()
    fb = feature_batch(["a", "b", "c"], torch.cat(feat_rows), qs, [7, 0, 4], [2, 6, 4], [True, True, False], token_ids,
                       finished={"zzz"})
    with torch.no_grad():
        x, last = commit_entries(head, kv, fb, lambda t: embed_w[t])
        assert last.tolist() == [1, 7, 11]
        pos_last = np.array([8, 5])
        got = draft_tree(head, kv, ["a", "b"], x[torch.from_numpy(last[:2])], pos_last, chain(3),
                         lambda t: embed_w[t], lambda h, k: (h @ lm_w.T).topk(k, dim=-1).indices)
        topk_logprobs = lambda h, k: (h @ lm_w.T).log_softmax(-1).topk(k, dim=-1)    # noqa: E731
        x_last = x[torch.from_numpy(last[:2])]
        tokens, logprob = draft_chain(head, kv, ["a", "b"], x_last, pos_last, 3, lambda t: embed_w[t], topk_logprobs)
        for b, (r, p) in enumerate((("a", 8), ("b", 5))):
            want, want_lp = reference_drafts(head, embed_w, lm_w, feats[r][: p + 1], seqs[r][: p + 2], 3)
            assert got[b].tolist() == want == tokens[b].tolist(), r
            torch.testing.assert_close(logprob[b], torch.tensor(want_lp), rtol=1e-5, atol=1e-5)
        # A floor above every row's first draft: drafting stops after depth 1, the rest reads "not drafted".
        floor = float(logprob[:, 0].max()) + 0.1
        cut_tokens, cut_lp = draft_chain(head, kv, ["a", "b"], x_last, pos_last, 3, lambda t: embed_w[t],
                                         topk_logprobs, floor)
        assert torch.equal(cut_tokens[:, 0], tokens[:, 0]) and torch.equal(cut_lp[:, 0], logprob[:, 0])
        assert cut_tokens[:, 1:].eq(0).all() and cut_lp[:, 1:].eq(-float("inf")).all()
        # A floor between the rows' first drafts: the confident row keeps drafting, so both rows get depth 2.
        floor = float(logprob[:, 0].mean())
        _, mid_lp = draft_chain(head, kv, ["a", "b"], x_last, pos_last, 3, lambda t: embed_w[t], topk_logprobs, floor)
        assert torch.isfinite(mid_lp[:, 1]).all()


def test_tree_matches_per_branch_reference():
    torch.manual_seed(0)
    head = EagleHead(CFG).eval()
    with torch.no_grad():   # stronger, sharper attention, so that a query seeing a wrong entry changes its top-k
        for proj in (head.q_proj, head.k_proj, head.v_proj, head.o_proj):
            proj.weight.mul_(4)
    embed_w, lm_w = torch.randn(37, 48), torch.randn(37, 48)
    tree = compile_tree("[(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]")
    # Two full prefills of different lengths: u commits positions 0..10, w 0..3.
    seqs, feats, fb = two_prefills({"u": 11, "w": 4}, torch.float32)
    kv = DraftKVCache(CFG.num_kv_heads, CFG.head_dim, torch.float32)
    with torch.no_grad():
        x, last = commit_entries(head, kv, fb, lambda t: embed_w[t])
        pos_last = np.array([10, 3])
        got = draft_tree(head, kv, ["u", "w"], x[torch.from_numpy(last)], pos_last, tree,
                         lambda t: embed_w[t], lambda h, k: (h @ lm_w.T).topk(k, dim=-1).indices)
        assert got.shape == (2, tree.num_nodes - 1) and got.dtype == torch.int64
        for b, (r, p) in enumerate((("u", 10), ("w", 3))):
            want = reference_tree(head, embed_w, lm_w, feats[r][: p + 1], seqs[r][: p + 2], tree.paths[1:])
            assert got[b].tolist() == [want[path] for path in tree.paths[1:]], (r, got[b].tolist(), want)


def reference_dynamic(head, embed_w, lm_w, feats, tokens, depth, top_k, total):
    """EAGLE-2 by brute force: every node's children recomputed from scratch along its path; -> {path: token} of the
    `total` best nodes by summed draft log-prob (the frontier of each depth = its top_k nodes)."""
    pool, frontier = [], [((), list(feats), list(tokens[1:]), 0.0)]
    for _ in range(depth):
        cands = []
        for path, entry_f, entry_t, score in frontier:
            g = reference_feature(head, embed_w, entry_f, entry_t)
            lp, ids = (g @ lm_w.T).log_softmax(-1).topk(top_k)
            cands += [(path + (r,), entry_f + [g], entry_t + [int(ids[r])], score + float(lp[r])) for r in range(top_k)]
        pool += cands
        frontier = sorted(cands, key=lambda c: -c[3])[:top_k]
    return {c[0]: c[2][-1] for c in sorted(pool, key=lambda c: -c[3])[:total]}


def test_dynamic_tree_matches_brute_force_eagle2():
    """Two requests of different lengths (so different trees), float64 so near-tied scores rank the same."""
    torch.manual_seed(0)
    head = EagleHead(CFG).double().eval()
    with torch.no_grad():
        for proj in (head.q_proj, head.k_proj, head.v_proj, head.o_proj):
            proj.weight.mul_(4)
    embed_w, lm_w = torch.randn(37, 48, dtype=torch.float64), torch.randn(37, 48, dtype=torch.float64)
    seqs, feats, fb = two_prefills({"u": 9, "w": 5}, torch.float64)
    kv = DraftKVCache(CFG.num_kv_heads, CFG.head_dim, torch.float64)
    trees = set()
    with torch.no_grad():
        x, last = commit_entries(head, kv, fb, lambda t: embed_w[t])
        for depth, top_k, total in ((4, 3, 10), (3, 2, 6), (1, 4, 3)):
            sel, tok, par, rank = draft_dynamic(head, kv, ["u", "w"], x[torch.from_numpy(last)], np.array([8, 4]),
                                                depth, top_k, total, lambda t: embed_w[t],
                                                lambda h, k: (h @ lm_w.T).log_softmax(-1).topk(k, dim=-1))
            assert sel.shape == (2, total) and (sel[:, 1:] > sel[:, :-1]).all()
            for b, (r, p) in enumerate((("u", 8), ("w", 4))):
                paths = dynamic_tree_paths(sel[b].tolist(), par[b].tolist(), rank[b].tolist())
                got = {path: int(tok[b, i]) for path, i in zip(paths, sel[b].tolist())}
                want = reference_dynamic(head, embed_w, lm_w, feats[r][: p + 1], seqs[r][: p + 2], depth, top_k, total)
                assert got == want, (r, depth, top_k, total)
                trees.add(compile_tree(paths).paths)     # a valid tree (parents present, no rank gaps)
    assert len(trees) > 3                                # the two requests grew different shapes


def test_attend_fast_path_equals_sdpa():
    """attend's drafting path (<= 16 queries: grouped fp32 matmuls) equals its SDPA path (training's long queries)."""
    B, Tk, nh, nkv, hd = 3, 41, 6, 2, 8
    q = torch.randn(B, 17, nh, hd)
    k, v = torch.randn(B, Tk, nkv, hd), torch.randn(B, Tk, nkv, hd)
    mask = torch.rand(B, 17, Tk) > 0.4
    mask[..., 0] = True                                   # every query sees at least one key
    for tq in (1, 5, 16):
        torch.testing.assert_close(attend(q[:, :tq], k, v, mask[:, :tq]), attend(q, k, v, mask)[:, :tq],
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attend(q[:, :3], k, v, None), attend(q, k, v, None)[:, :3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_head_computes_what_its_layers_compute(dtype, tol):
    """pack() (q|k|v and gate|up fused, each GEMM vLLM's CPU kernel) changes nothing the head computes, on 2-D and
    3-D inputs and an odd token count."""
    from vllm_eagle.proposer import engine_linear
    torch.manual_seed(0)
    head = EagleHead(CFG).to(dtype).eval()
    e, f = torch.randn(7, 48, dtype=dtype), torch.randn(7, 48, dtype=dtype)
    pos, attn = torch.arange(3, 10), torch.randn(7, 48, dtype=dtype)
    calls = lambda: (head.project(e, f), *head.qkv(e, pos), head.finish(e, attn),
                     head.finish(e.view(1, 7, 48), attn.view(1, 7, 48)))
    with torch.no_grad():
        want = calls()
        for make in (engine_linear, None):
            head.pack(make) if make else head.pack()
            for w, g in zip(want, calls()):
                assert g.shape == w.shape and g.dtype == dtype
                torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("tokens,k,want", [
    ([5, 9, 2, 7, 1, 9, 2], 2, [7, 1]),                            # the module docstring's example
    ([7, 8, 9, 1, 2, 3, 7, 8, 9, 4, 5, 6, 1, 2, 3, 7, 8, 9], 2, [4, 5]),   # longest tail first: (3, 7, 8, 9), not (8, 9)
    ([1, 2, 0, 1, 2, 5, 6, 1, 2], 2, [5, 6]),                      # the most recent occurrence of the tail
    ([1, 2, 1, 2], 2, [1, 2]),                                     # continuation up to the tail, never past the end
    ([1, 2, 1, 2], 3, []),                                         # k followers do not fit
    ([4, 1, 2, 3, 1, 2], 1, [3]),
    ([3, 4, 5], 1, []),                                            # no repeat
    ([6, 6], 1, []),                                               # a tail of one token is below min_n = 2
])
def test_lookup_draft_takes_what_followed_the_tail_before(tokens, k, want):
    from vllm_eagle.lookup import lookup_draft
    assert lookup_draft(np.array(tokens, dtype=np.int32), k) == want


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_head_rotates_as_the_target_for_any_rope_scaling(rope):
    """The head's RoPE (vLLM's rotary-embedding factory, from the target's config) equals HF Llama's for the same
    config, scaling and attention factor included, at positions past the scaled range."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from vllm_eagle.draft_head import rope_cos_sin
    hf = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=1024, rope_parameters=ROPES[rope])
    cfg = HeadConfig.from_hf_dict(hf.to_dict())
    pos = torch.tensor([0, 1, 63, 64, 200, 1023])
    cos, sin = rope_cos_sin(pos, cfg, torch.float32)
    want_cos, want_sin = LlamaRotaryEmbedding(hf)(torch.zeros(1, len(pos), 32), pos[None])
    torch.testing.assert_close(cos, want_cos[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, want_sin[0], rtol=1e-5, atol=1e-5)
    if rope != "default":                                  # the scaling changes the rotation
        plain, _ = rope_cos_sin(pos, HeadConfig.from_hf_dict({**hf.to_dict(), "rope_parameters": ROPES["default"]}),
                                torch.float32)
        assert not torch.allclose(cos, plain, atol=1e-3)
